"""Forward auth: a gateway asks, for each request to the expense services, who sends it.

Envoy's ext_authz filter (HTTP mode), nginx `auth_request`, Traefik `forwardAuth`
and Caddy `forward_auth` all call an HTTP endpoint with the original request's
headers and let the request through on a 2xx answer, copying the headers the
endpoint names into it. This is that endpoint, served on its own internal
listener (FORWARD_AUTH_PORT), never on the public port. docs/integration.md has
each gateway's configuration.

Each check applies the API's own rules, in the API's order (server/app.py):
- a state-changing original request (any method but GET and HEAD) from a
  browser must come from our site: `server.edge.browser_rules`, as the API's
  BrowserGuard; safe requests pass, so that a link from another site still opens;
- the global rate limit;
- the session cookie: signature, then `Sessions.authenticate` (revocation,
  disabled account, idle and absolute timeouts, the last-seen touch);
- a check that ends unauthenticated counts against the client network's
  unauthenticated budget, as an API call does; a signed-in one counts against
  the session's and the user's budgets, which it shares with the session's API
  calls (one session costs this process the same through either door).

The answer is 200 with `X-Expense-User-Id` and `X-Expense-Session-Id` (and an
empty body), or 401/403/429/503 with a JSON body `{"code", "message"}` as the API's
errors, which the gateway relays to the client. Nothing is ever set or echoed: no
cookie, no token.

How each gateway tells the original request (the method decides whether the
browser rules apply; the host, what "our own origin" is):
- method: the request's own method (Envoy keeps it; nginx's subrequest inherits
  it), `X-Forwarded-Method` (Traefik, Caddy), `X-Original-Method` (nginx, as
  configured). The strictest wins: if any says the request changes state, the
  browser rules apply, so a client-supplied header can only make a check stricter;
- host: `X-Forwarded-Host` when the gateway sets it, else `Host`;
- client address: the listener's peer is a gateway, so its `X-Forwarded-For` is
  believed (then TRUSTED_PROXIES to the left of it, as on the public port).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence

from starlette.types import Receive, Scope, Send

from server.domain.audit import Audit, Origin
from server.domain.errors import (
    DomainError,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from server.domain.models import Principal
from server.domain.sessions import Sessions
from server.domain.throttle import (
    GLOBAL,
    PER_SESSION,
    PER_USER,
    UNAUTHENTICATED_PER_IP,
    Throttle,
    network_key,
)
from server.edge.browser_rules import BrowserRules
from server.edge.client_address import IPAddress, IPNetwork, peer_ip, resolve
from server.edge.router import PlainResponse, send_plain
from server.ops.reports import Report
from server.rpc.cookies import SessionCookies
from server.rpc.user_agent import summarize

log = logging.getLogger("expense_auth.forward_auth")

# Where gateways send checks (Envoy's path_prefix appends the original path).
PATH = "/forward-auth"
USER_ID_HEADER = "x-expense-user-id"
SESSION_ID_HEADER = "x-expense-session-id"
# Headers that name the original request's method, by gateway.
METHOD_HEADERS = (b"x-forwarded-method", b"x-original-method")
SAFE_METHODS = frozenset({"GET", "HEAD"})
# What a refused check is recorded as in the user's security events.
AUDIT_REASON = "forward-auth"
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
INTERNAL_MESSAGE = "internal error; it has been logged"
_NO_STORE = {"cache-control": "no-store"}
_STATUS: tuple[tuple[type[DomainError], int, str], ...] = (
    (Unauthenticated, 401, "unauthenticated"),
    (PermissionDenied, 403, "permission_denied"),
    (RateLimited, 429, "resource_exhausted"),
    (Unavailable, 503, "unavailable"),
)


class _Request:
    """What a check reads of the gateway's request: a few headers, all cookies."""

    __slots__ = ("cookies", "forwarded_for", "headers", "method", "methods", "peer")

    def __init__(self, scope: Scope) -> None:
        self.cookies: list[str] = []
        self.forwarded_for: list[str] = []
        self.methods: list[str] = [scope.get("method", "GET")]
        self.headers: dict[bytes, str] = {}
        for name, raw in scope.get("headers", ()):
            value = raw.decode("latin-1")
            if name == b"cookie":
                self.cookies.append(value)
            elif name == b"x-forwarded-for":
                self.forwarded_for.append(value)
            elif name in METHOD_HEADERS:
                self.methods.append(value.strip())
            else:
                self.headers.setdefault(name, value)
        client = scope.get("client")
        self.peer = f"{client[0]}:{client[1]}" if client else None
        # For the log: what the gateway says the method was, else the request's own.
        self.method = self.methods[-1]

    def get(self, name: bytes) -> str | None:
        return self.headers.get(name)

    @property
    def changes_state(self) -> bool:
        """Whether any account of the original method is other than GET or HEAD."""
        return any(method.upper() not in SAFE_METHODS for method in self.methods)

    @property
    def host(self) -> str:
        """The host the browser addressed, as the gateway reports it."""
        return self.get(b"x-forwarded-host") or self.get(b"host") or ""


class ForwardAuth:
    """The ASGI app of the forward-auth listener: `/forward-auth[/...]` and `/healthz`."""

    def __init__(
        self,
        *,
        sessions: Sessions,
        cookies: SessionCookies,
        throttle: Throttle,
        audit_log: Audit,
        allowed_origins: Sequence[str],
        trusted_proxies: Sequence[IPNetwork],
        ipv6_prefix: int = 64,
        on_result: Callable[[str], None] | None = None,
        report: Report | None = None,
    ) -> None:
        self._sessions = sessions
        self._report = report
        self._cookies = cookies
        self._throttle = throttle
        self._audit = audit_log
        self._rules = BrowserRules(allowed_origins)
        self._trusted = list(trusted_proxies)
        self._ipv6_prefix = ipv6_prefix
        self._on_result = on_result

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        path: str = scope["path"]
        if path == PATH or path.startswith(PATH + "/"):
            await send_plain(send, await self.check(scope))
        elif path == "/healthz" and scope["method"] in ("GET", "HEAD"):
            await send_plain(send, PlainResponse.json(200, {"status": "alive"}, _NO_STORE))
        else:
            message = f"no such route: {path[:200]}; gateways call {PATH}"
            body = {"code": "not_found", "message": message}
            await send_plain(send, PlainResponse.json(404, body, _NO_STORE))

    async def check(self, scope: Scope) -> PlainResponse:
        """The answer to one gateway check."""
        started = time.perf_counter()
        request = _Request(scope)
        request_id = _request_id(request)
        client = self._client(request)
        try:
            principal = await self._authorize(request, client)
            response = PlainResponse(
                status=200,
                body=b"",
                headers={
                    USER_ID_HEADER: principal.user.id,
                    SESSION_ID_HEADER: principal.session.id,
                    **_NO_STORE,
                },
            )
            result = "ok"
        except DomainError as exc:
            response, result = _refusal(exc)
        except Exception as exc:
            log.exception("forward-auth check failed", extra={"request_id": request_id})
            if self._report is not None:
                self._report(exc, tags={"request_id": request_id, "listener": "forward_auth"})
            body = {"code": "internal", "message": INTERNAL_MESSAGE}
            response, result = PlainResponse.json(500, body, _NO_STORE), "internal"
        if self._on_result is not None:
            self._on_result(result)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "forward_auth",
                extra={
                    "code": result,
                    "status": response.status,
                    "original_method": request.method[:16],
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "client": client,
                    "peer": request.peer or "",
                    "request_id": request_id,
                },
            )
        return response

    async def _authorize(self, request: _Request, client: str) -> Principal:
        if request.changes_state:
            self._rules.check(
                origin=request.get(b"origin"),
                fetch_site=request.get(b"sec-fetch-site"),
                host=request.host,
            )
        await self._throttle.hit(GLOBAL, "*", what="the server is busy")
        try:
            principal = await self._authenticate(request)
        except Unauthenticated:
            await self._throttle.hit(
                UNAUTHENTICATED_PER_IP,
                network_key(client, self._ipv6_prefix),
                what="too many calls without a valid session",
            )
            raise
        origin = Origin(ip=client, user_agent=summarize(request.get(b"user-agent") or ""))
        await self._audit.guard(
            self._principal_limits(principal),
            user_id=principal.user.id,
            origin=origin,
            reason=AUDIT_REASON,
        )
        return principal

    async def _authenticate(self, request: _Request) -> Principal:
        secret = self._cookies.secret_from(request.cookies)
        if secret is None:
            if self._cookies.present(request.cookies):
                raise Unauthenticated(
                    "the session cookie is not valid; sign in again", reason="bad_cookie"
                )
            raise Unauthenticated("sign in first: this request needs a session", reason="no_cookie")
        return await self._sessions.authenticate(secret)

    async def _principal_limits(self, principal: Principal) -> None:
        what = "too many calls from this session"
        await self._throttle.hit(PER_SESSION, principal.session.id, what=what)
        await self._throttle.hit(PER_USER, principal.user.id, what="too many calls for this user")

    def _client(self, request: _Request) -> str:
        """The client's IP: the gateway (our peer) is believed about who called it."""
        gateway = peer_ip(request.peer)
        if gateway is None:
            return ""
        trusted = [*self._trusted, _network_of(gateway)]
        return resolve(request.peer, request.forwarded_for, trusted)


@functools.lru_cache(maxsize=256)
def _network_of(address: IPAddress) -> IPNetwork:
    return ipaddress.ip_network(address)


def _refusal(error: DomainError) -> tuple[PlainResponse, str]:
    for kind, status, code in _STATUS:
        if isinstance(error, kind):
            headers = dict(_NO_STORE)
            retry = getattr(error, "retry_after_s", None)
            if retry:
                headers["retry-after"] = str(retry)
            body = {"code": code, "message": error.message}
            return PlainResponse.json(status, body, headers), code
    # Other domain errors are not raised on this path; answer as the API would a bug.
    log.error("unexpected %s in a forward-auth check", type(error).__name__)
    return PlainResponse.json(500, {"code": "internal", "message": INTERNAL_MESSAGE}), "internal"


def _request_id(request: _Request) -> str:
    incoming = request.get(b"x-request-id") or ""
    return incoming if _SAFE_ID.fullmatch(incoming) else secrets.token_hex(8)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
