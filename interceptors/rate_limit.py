"""Rate limiting, in three places of the chain, plus the probes.

`NetworkRateLimit` runs before the session lookup, keyed by client network
(see client_ip.py; IPv4 by address, IPv6 by its /64) and globally: a ceiling
for the whole server, SignIn attempts per network, and a budget per network for
calls that end unauthenticated (no cookie, a forged one, a dead session) or
that need none (CreateSignInNonce, reflection). A call whose session
authenticates never counts against that budget, so signed-in users behind a
shared address are not refused because of someone else. `PrincipalRateLimit`
runs after the session lookup, keyed by session and by user. Failed sign-ins
are limited by the SignIn handler, once it knows whether the token verified
(see server/rpc/auth.py). `ProbeRateLimit` guards health checks.

Refusals are `resource_exhausted` with a `Retry-After` header (HTTP 429 on
Connect). There is no account lockout: every limit is per window and a victim
can always sign in again after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from connectrpc.request import RequestContext
from starlette.types import Scope

from interceptors.client_ip import IPNetwork, resolve
from server.domain.audit import Audit
from server.domain.errors import RateLimited, Unauthenticated
from server.domain.throttle import (
    GLOBAL,
    PER_SESSION,
    PER_USER,
    PROBE_PER_IP,
    SIGNIN_PER_IP,
    UNAUTHENTICATED_PER_IP,
    Throttle,
    network_key,
)
from server.edge.router import PlainResponse, Route
from server.rpc.context import (
    SIGN_IN,
    client_network,
    current_principal,
    origin_of,
    procedure_of,
)

_TOO_MANY_UNAUTHENTICATED = "too many calls without a valid session"


class NetworkRateLimit:
    """Global and per-network limits, around the session lookup."""

    def __init__(self, throttle: Throttle, *, public: frozenset[str]) -> None:
        self._throttle = throttle
        self._public = public

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        """Count the call; refuse it when a limit is exhausted."""
        await self._throttle.hit(GLOBAL, "*", what="the server is busy")
        procedure = procedure_of(ctx)
        key = client_network()
        if procedure == SIGN_IN:
            await self._throttle.hit(
                SIGNIN_PER_IP, key, what="too many sign-in attempts from your network"
            )
        elif procedure in self._public:
            await self._throttle.hit(UNAUTHENTICATED_PER_IP, key, what=_TOO_MANY_UNAUTHENTICATED)

    async def on_end(
        self, token: None, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        """Count a call that ended unauthenticated; past the budget, answer 429 instead."""
        if not isinstance(error, Unauthenticated):
            return
        procedure = procedure_of(ctx)
        if procedure == SIGN_IN or procedure in self._public:
            return
        await self._throttle.hit(
            UNAUTHENTICATED_PER_IP, client_network(), what=_TOO_MANY_UNAUTHENTICATED
        )


class PrincipalRateLimit:
    """Per-session and per-user limits, after the session is known."""

    def __init__(self, throttle: Throttle, *, public: frozenset[str], audit_log: Audit) -> None:
        self._throttle = throttle
        self._public = public
        self._audit = audit_log

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        """Count the call for its session and its user."""
        if procedure_of(ctx) in self._public:
            return
        principal = current_principal()
        await self._audit.guard(
            self._hit(principal.session.id, principal.user.id),
            user_id=principal.user.id,
            origin=origin_of(ctx),
            reason=procedure_of(ctx),
        )

    async def _hit(self, session_id: str, user_id: str) -> None:
        await self._throttle.hit(PER_SESSION, session_id, what="too many calls from this session")
        await self._throttle.hit(PER_USER, user_id, what="too many calls for this user")

    async def on_end(
        self, token: None, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        """Nothing to undo."""


class ProbeRateLimit:
    """A budget per client network for health checks: grpc.health.v1 and the HTTP probes.

    Probes are not counted against the global ceiling, and nothing else counts
    against theirs: a load balancer or kubelet probing from its own address at a
    few calls a second always passes, however busy the server is and whatever
    other clients do, while one client cannot flood the health endpoints.
    """

    def __init__(
        self, throttle: Throttle, *, trusted_proxies: Sequence[IPNetwork], ipv6_prefix: int = 64
    ) -> None:
        self._throttle = throttle
        self._trusted = list(trusted_proxies)
        self._ipv6_prefix = ipv6_prefix

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        """Refuse a health call past the caller's budget."""
        await self._hit(client_network())

    async def on_end(
        self, token: None, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        """Nothing to undo."""

    def route(self, route: Route) -> Route:
        """`route` (a plain HTTP probe such as /readyz) behind the same budget."""

        async def limited(scope: Scope) -> PlainResponse:
            client = scope.get("client")
            peer = f"{client[0]}:{client[1]}" if client else None
            forwarded = [
                value.decode("latin-1")
                for name, value in scope.get("headers", ())
                if name == b"x-forwarded-for"
            ]
            ip = resolve(peer, forwarded if self._trusted else (), self._trusted)
            try:
                await self._hit(network_key(ip, self._ipv6_prefix))
            except RateLimited as exc:
                return PlainResponse.json(
                    429,
                    {"code": "resource_exhausted", "message": exc.message},
                    headers={"retry-after": str(exc.retry_after_s)},
                )
            return await route(scope)

        return limited

    async def _hit(self, network: str) -> None:
        await self._throttle.hit(
            PROBE_PER_IP, network, what="too many health checks from your network"
        )
