"""Session lookup: the cookie becomes the request's principal, or the call is refused.

Runs before the request body is read (a leading metadata interceptor), so an
unauthenticated call costs no body parsing. The principal lives in a ContextVar
for the duration of the call; handlers read it with `server.rpc.context.current_principal()`.
"""

from __future__ import annotations

from collections.abc import Collection
from contextvars import Token
from typing import Any

from connectrpc.request import RequestContext

from server.domain.errors import Unauthenticated
from server.domain.models import Principal
from server.domain.sessions import Sessions
from server.rpc.context import procedure_of, reset_principal, set_principal
from server.rpc.cookies import SessionCookies


class SessionInterceptor:
    """Authenticates every procedure except the listed public ones."""

    def __init__(
        self, sessions: Sessions, cookies: SessionCookies, *, public: Collection[str]
    ) -> None:
        self._sessions = sessions
        self._cookies = cookies
        self._public = frozenset(public)

    async def on_start(self, ctx: RequestContext[Any, Any]) -> Token[Principal | None] | None:
        """Load the session named by the cookie; refuse the call without one."""
        if procedure_of(ctx) in self._public:
            return None
        cookie_headers = ctx.request_headers.getall("cookie")
        secret = self._cookies.secret_from(cookie_headers)
        if secret is None:
            # Expire only a session cookie of ours that failed, never because of
            # other cookies whose names merely contain ours.
            if self._cookies.present(cookie_headers):
                ctx.response_headers.add("set-cookie", self._cookies.expire())
                raise Unauthenticated(
                    "the session cookie is not valid; sign in again", reason="bad_cookie"
                )
            raise Unauthenticated("sign in first: this call needs a session", reason="no_cookie")
        try:
            principal = await self._sessions.authenticate(secret)
        except Unauthenticated:
            ctx.response_headers.add("set-cookie", self._cookies.expire())
            raise
        return set_principal(principal)

    async def on_end(
        self,
        token: Token[Principal | None] | None,
        ctx: RequestContext[Any, Any],
        error: Exception | None,
    ) -> None:
        """Forget the principal."""
        if token is not None:
            reset_principal(token)
