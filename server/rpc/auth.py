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
from server.domain.audit import (
    SESSION_REVOKED,
    SIGN_IN,
    SIGN_IN_FAILED,
    SIGN_OUT,
    Audit,
    Origin,
)
from server.domain.errors import DomainError, EmailNotVerified, RateLimited, Unauthenticated
from server.domain.models import Identity
from server.domain.ports import IdentityVerifier
from server.domain.sessions import Sessions
from server.domain.throttle import (
    FAILED_SIGNIN_PER_IP,
    FAILED_SIGNIN_PER_SUBJECT,
    SIGNIN_PER_SUBJECT,
    Throttle,
)
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
        verifier: IdentityVerifier,
        cookies: SessionCookies,
        nonces: SignInNonces,
        page_tokens: PageTokens,
        throttle: Throttle,
        audit_log: Audit,
    ) -> None:
        self._sessions = sessions
        self._verifier = verifier
        self._cookies = cookies
        self._nonces = nonces
        self._page_tokens = page_tokens
        self._throttle = throttle
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
        """Verify the token and start a new session (never reuse the caller's).

        Failed attempts are limited per client network and, once the token names
        an account, per account. Only failures count and only failures are
        refused: a valid sign-in passes whatever strangers behind the same address
        did, so nobody can lock an office out by sending bad tokens from it.
        """
        origin = origin_of(ctx)
        try:
            identity = await self._verifier.verify(request.google_id_token)
        except Unauthenticated as exc:
            # No account is known yet: an event for operators, shown to no user.
            await self._audit.record(SIGN_IN_FAILED, user_id=None, origin=origin, reason=exc.reason)
            await self._failed(None)
            raise
        except EmailNotVerified as exc:
            # The token is genuine, so the refusal belongs to that account's history.
            await self._sign_in_refused(exc.identity, origin, exc)
            await self._failed(exc.identity)
            raise
        try:
            nonce = self._nonces.check(identity.nonce, ctx.request_headers.getall("cookie"))
            await self._throttle.hit(
                SIGNIN_PER_SUBJECT,
                identity.subject_hash,
                what="too many sign-ins for this account",
            )
            created = await self._sessions.sign_in(
                identity,
                user_agent=origin.user_agent,
                event=self._audit.event(SIGN_IN, user_id=None, origin=origin),
                nonce=nonce,
            )
        except DomainError as exc:
            await self._sign_in_refused(identity, origin, exc)
            if not isinstance(exc, RateLimited):
                await self._failed(identity)
            raise
        ctx.response_headers.add("set-cookie", self._cookies.issue(created.secret))
        if nonce is not None:
            ctx.response_headers.add("set-cookie", self._nonces.expire())
        return SignInResponse(
            user=convert.user(created.user),
            session=convert.session(
                created.session, policy=self._sessions.policy, current_id=created.session.id
            ),
        )

    async def _failed(self, identity: Identity | None) -> None:
        """Count a failed sign-in; past a budget, refuse it as `resource_exhausted`.

        Raises:
            RateLimited: The network (or the account) has failed too often lately.
        """
        await self._throttle.hit(
            FAILED_SIGNIN_PER_IP,
            client_network(),
            what="too many failed sign-ins from your network",
        )
        if identity is not None:
            await self._throttle.hit(
                FAILED_SIGNIN_PER_SUBJECT,
                identity.subject_hash,
                what="too many failed sign-ins for this account",
            )

    async def _sign_in_refused(self, identity: Identity, origin: Origin, exc: DomainError) -> None:
        """Record a refused sign-in in the history of the account it was for, if any."""
        user = await self._sessions.user_for(identity)
        if isinstance(exc, RateLimited):
            if user is not None:
                await self._audit.rate_limited(user_id=user.id, origin=origin, reason="sign_in")
            return
        reason = getattr(exc, "reason", type(exc).__name__.lower())
        await self._audit.record(
            SIGN_IN_FAILED, user_id=None if user is None else user.id, origin=origin, reason=reason
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
