"""expense.auth.v1.AuthService: a thin adapter from protobuf to the session service."""

from __future__ import annotations

from connectrpc.request import RequestContext

from gen.expense.auth.v1 import auth_connect
from gen.expense.auth.v1.auth_pb import (
    CreateSignInNonceRequest,
    CreateSignInNonceResponse,
    GetSessionRequest,
    GetSessionResponse,
    ListSessionsRequest,
    ListSessionsResponse,
    RevokeOtherSessionsRequest,
    RevokeOtherSessionsResponse,
    RevokeSessionRequest,
    RevokeSessionResponse,
    SignInRequest,
    SignInResponse,
    SignOutRequest,
    SignOutResponse,
)
from server.domain.audit import SESSION_REVOKED, SIGN_OUT, Audit
from server.domain.models import Identity, SingleUse
from server.domain.sessions import Sessions
from server.domain.signin import SignIns
from server.rpc import convert
from server.rpc.context import client_network, current_principal, origin_of
from server.rpc.cookies import SessionCookies
from server.rpc.nonces import SignInNonces
from server.rpc.page_tokens import PageTokens, session_cursor

# Not "cookies": browsers apply that to the whole registrable domain, which would
# also wipe the frontend's and sibling apps' cookies. The session cookie itself is
# expired by Set-Cookie.
CLEAR_SITE_DATA = '"cache", "storage"'


class AuthService(auth_connect.AuthService):
    """Implements the generated `AuthService` protocol."""

    def __init__(
        self,
        *,
        sessions: Sessions,
        sign_ins: SignIns,
        cookies: SessionCookies,
        nonces: SignInNonces,
        page_tokens: PageTokens,
        audit_log: Audit,
    ) -> None:
        self._sessions = sessions
        self._sign_ins = sign_ins
        self._cookies = cookies
        self._nonces = nonces
        self._page_tokens = page_tokens
        self._audit = audit_log

    async def create_sign_in_nonce(
        self,
        request: CreateSignInNonceRequest,
        ctx: RequestContext[CreateSignInNonceRequest, CreateSignInNonceResponse],
    ) -> CreateSignInNonceResponse:
        """A fresh nonce, bound to this browser by a short-lived cookie."""
        nonce, set_cookie, expire_ms = self._nonces.issue()
        ctx.response_headers.add("set-cookie", set_cookie)
        return CreateSignInNonceResponse(nonce=nonce, expire_time=convert.timestamp(expire_ms))

    async def sign_in(
        self, request: SignInRequest, ctx: RequestContext[SignInRequest, SignInResponse]
    ) -> SignInResponse:
        """Verify the token and start a new session (never reuse the caller's)."""
        cookies = ctx.request_headers.getall("cookie")
        nonce_spent = False

        def check_nonce(identity: Identity) -> SingleUse | None:
            nonlocal nonce_spent
            nonce = self._nonces.check(identity.nonce, cookies)
            nonce_spent = nonce is not None
            return nonce

        created = await self._sign_ins.sign_in(
            request.google_id_token,
            origin=origin_of(ctx),
            network=client_network(),
            check_nonce=check_nonce,
        )
        ctx.response_headers.add("set-cookie", self._cookies.issue(created.secret))
        if nonce_spent:
            ctx.response_headers.add("set-cookie", self._nonces.expire())
        return SignInResponse(
            user=convert.user(created.user),
            session=convert.session(
                created.session, policy=self._sessions.policy, current_id=created.session.id
            ),
        )

    async def get_session(
        self,
        request: GetSessionRequest,
        ctx: RequestContext[GetSessionRequest, GetSessionResponse],
    ) -> GetSessionResponse:
        """The caller's session and user, as loaded by the session interceptor."""
        principal = current_principal()
        return GetSessionResponse(
            user=convert.user(principal.user),
            session=convert.session(
                principal.session, policy=self._sessions.policy, current_id=principal.session.id
            ),
        )

    async def sign_out(
        self, request: SignOutRequest, ctx: RequestContext[SignOutRequest, SignOutResponse]
    ) -> SignOutResponse:
        """Revoke the current session and expire the cookie."""
        principal = current_principal()
        await self._sessions.sign_out(principal)
        await self._audit.record(
            SIGN_OUT,
            user_id=principal.user.id,
            origin=origin_of(ctx),
            session_id=principal.session.id,
        )
        ctx.response_headers.add("set-cookie", self._cookies.expire())
        # Also tells the browser to drop what it cached or stored for this site.
        ctx.response_headers["clear-site-data"] = CLEAR_SITE_DATA
        return SignOutResponse()

    async def list_sessions(
        self,
        request: ListSessionsRequest,
        ctx: RequestContext[ListSessionsRequest, ListSessionsResponse],
    ) -> ListSessionsResponse:
        """One page of the caller's live sessions."""
        principal = current_principal()
        after = session_cursor(self._page_tokens, principal.user.id, request.page_token)
        page, next_cursor = await self._sessions.list_live(
            principal, page_size=request.page_size, after=after
        )
        policy = self._sessions.policy
        return ListSessionsResponse(
            sessions=[
                convert.session(s, policy=policy, current_id=principal.session.id) for s in page
            ],
            next_page_token=self._page_tokens.encode(
                principal.user.id,
                None if next_cursor is None else [next_cursor.create_ms, next_cursor.session_id],
            ),
        )

    async def revoke_session(
        self,
        request: RevokeSessionRequest,
        ctx: RequestContext[RevokeSessionRequest, RevokeSessionResponse],
    ) -> RevokeSessionResponse:
        """Revoke one of the caller's sessions (possibly the current one)."""
        principal = current_principal()
        await self._sessions.revoke(principal, request.session_id)
        await self._audit.record(
            SESSION_REVOKED,
            user_id=principal.user.id,
            origin=origin_of(ctx),
            session_id=request.session_id,
            reason=f"by:{principal.session.id}",
        )
        if request.session_id == principal.session.id:
            ctx.response_headers.add("set-cookie", self._cookies.expire())
        return RevokeSessionResponse()

    async def revoke_other_sessions(
        self,
        request: RevokeOtherSessionsRequest,
        ctx: RequestContext[RevokeOtherSessionsRequest, RevokeOtherSessionsResponse],
    ) -> RevokeOtherSessionsResponse:
        """Sign out everywhere else."""
        principal = current_principal()
        count = await self._sessions.revoke_others(principal)
        if count:
            await self._audit.record(
                SESSION_REVOKED,
                user_id=principal.user.id,
                origin=origin_of(ctx),
                reason=f"others:{count}",
                session_id=principal.session.id,
            )
        return RevokeOtherSessionsResponse(revoked_count=count)
