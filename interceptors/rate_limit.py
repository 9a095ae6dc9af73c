"""Rate limiting, in two places of the chain.

`NetworkRateLimit` runs before the session lookup, keyed by client IP (see
client_ip.py) and globally: a ceiling for the whole server, SignIn attempts per
IP, a cool-down for an IP with many failed sign-ins, and a budget per IP for
calls that carry no session cookie. `PrincipalRateLimit` runs after it, keyed
by session and by user. SignIn per Google subject is counted in the SignIn
handler, once the token is verified. Refusals are `resource_exhausted` with a
`Retry-After` header (HTTP 429 on Connect). There is no account lockout: every
limit is per window and a victim can always sign in again after it.
"""

from __future__ import annotations

from typing import Any

from connectrpc.request import RequestContext

from interceptors.client_ip import client_ip
from interceptors.session import current_principal, procedure_of
from server.domain.audit import Audit, Origin
from server.domain.errors import InvalidIdToken, RateLimited
from server.domain.throttle import (
    FAILED_SIGNIN_PER_IP,
    GLOBAL,
    PER_SESSION,
    PER_USER,
    SIGNIN_PER_IP,
    UNAUTHENTICATED_PER_IP,
    Throttle,
)
from server.rpc.user_agent import summarize

SIGN_IN = "/expense.auth.v1.AuthService/SignIn"


class NetworkRateLimit:
    """Global and per-IP limits, before the session is looked up."""

    def __init__(self, throttle: Throttle, *, session_cookie: str) -> None:
        self._throttle = throttle
        self._cookie = session_cookie + "="

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        """Count the call; refuse it when a limit is exhausted."""
        await self._throttle.hit(GLOBAL, "*", what="the server is busy")
        ip = client_ip()
        if procedure_of(ctx) == SIGN_IN:
            await self._throttle.check(
                FAILED_SIGNIN_PER_IP, ip, what="too many failed sign-ins from your network"
            )
            await self._throttle.hit(
                SIGNIN_PER_IP, ip, what="too many sign-in attempts from your network"
            )
        elif not any(self._cookie in h for h in ctx.request_headers.getall("cookie")):
            await self._throttle.hit(
                UNAUTHENTICATED_PER_IP, ip, what="too many calls without a session"
            )

    async def on_end(
        self, token: None, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        """Count a failed sign-in towards the IP's cool-down."""
        if isinstance(error, InvalidIdToken) and procedure_of(ctx) == SIGN_IN:
            await self._throttle.record(FAILED_SIGNIN_PER_IP, client_ip())


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
        try:
            await self._throttle.hit(
                PER_SESSION, principal.session.id, what="too many calls from this session"
            )
            await self._throttle.hit(
                PER_USER, principal.user.id, what="too many calls for this user"
            )
        except RateLimited:
            origin = Origin(
                ip=client_ip(), user_agent=summarize(ctx.request_headers.get("user-agent", ""))
            )
            await self._audit.rate_limited(
                user_id=principal.user.id, origin=origin, reason=procedure_of(ctx)
            )
            raise

    async def on_end(
        self, token: None, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        """Nothing to undo."""
