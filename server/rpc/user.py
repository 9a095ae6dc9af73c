"""expense.user.v1.UserService: the caller's profile, preferences, data and history."""

from __future__ import annotations

from connectrpc.request import RequestContext

from gen.expense.user.v1 import user_connect
from gen.expense.user.v1.user_pb import (
    DeleteCurrentUserRequest,
    DeleteCurrentUserResponse,
    ExportCurrentUserDataRequest,
    ExportCurrentUserDataResponse,
    GetCurrentUserRequest,
    GetCurrentUserResponse,
    ListSecurityEventsRequest,
    ListSecurityEventsResponse,
    UpdateCurrentUserRequest,
    UpdateCurrentUserResponse,
)
from server.domain.accounts import Accounts
from server.domain.clock import Clock
from server.domain.errors import InvalidArgument
from server.domain.ports import IdentityVerifier
from server.domain.preferences import EDITABLE_FIELDS, not_editable
from server.domain.users import Users
from server.rpc import convert
from server.rpc.auth import CLEAR_SITE_DATA
from server.rpc.context import current_principal, origin_of
from server.rpc.cookies import SessionCookies
from server.rpc.page_tokens import PageTokens


class UserService(user_connect.UserService):
    """Implements the generated `UserService` protocol."""

    def __init__(
        self,
        *,
        users: Users,
        accounts: Accounts,
        verifier: IdentityVerifier,
        cookies: SessionCookies,
        page_tokens: PageTokens,
        clock: Clock,
    ) -> None:
        self._users = users
        self._accounts = accounts
        self._verifier = verifier
        self._cookies = cookies
        self._page_tokens = page_tokens
        self._clock = clock

    async def get_current_user(
        self,
        request: GetCurrentUserRequest,
        ctx: RequestContext[GetCurrentUserRequest, GetCurrentUserResponse],
    ) -> GetCurrentUserResponse:
        """The signed-in user."""
        return GetCurrentUserResponse(user=convert.user(current_principal().user))

    async def update_current_user(
        self,
        request: UpdateCurrentUserRequest,
        ctx: RequestContext[UpdateCurrentUserRequest, UpdateCurrentUserResponse],
    ) -> UpdateCurrentUserResponse:
        """Apply the fields named by the update mask."""
        paths = list(request.update_mask.paths) if request.update_mask is not None else []
        if request.user is None and paths:
            raise InvalidArgument("user", "user is required when update_mask names fields")
        changes: dict[str, str] = {}
        for path in paths:
            if path not in EDITABLE_FIELDS:
                raise not_editable(path)
            assert request.user is not None
            changes[path] = getattr(request.user, path)
        updated = await self._users.update(current_principal(), changes)
        return UpdateCurrentUserResponse(user=convert.user(updated))

    async def delete_current_user(
        self,
        request: DeleteCurrentUserRequest,
        ctx: RequestContext[DeleteCurrentUserRequest, DeleteCurrentUserResponse],
    ) -> DeleteCurrentUserResponse:
        """Delete the caller after a fresh re-authentication."""
        identity = await self._verifier.verify(request.google_id_token)
        await self._accounts.delete(current_principal(), identity)
        ctx.response_headers.add("set-cookie", self._cookies.expire())
        ctx.response_headers["clear-site-data"] = CLEAR_SITE_DATA
        return DeleteCurrentUserResponse()

    async def export_current_user_data(
        self,
        request: ExportCurrentUserDataRequest,
        ctx: RequestContext[ExportCurrentUserDataRequest, ExportCurrentUserDataResponse],
    ) -> ExportCurrentUserDataResponse:
        """Everything stored about the caller."""
        exported = await self._accounts.export(current_principal(), origin_of(ctx))
        return convert.export(exported, now_ms=self._clock.now_ms())

    async def list_security_events(
        self,
        request: ListSecurityEventsRequest,
        ctx: RequestContext[ListSecurityEventsRequest, ListSecurityEventsResponse],
    ) -> ListSecurityEventsResponse:
        """One page of the caller's security history."""
        principal = current_principal()
        cursor = self._page_tokens.decode(principal.user.id, request.page_token, shape=(int,))
        events, next_id = await self._accounts.events(
            principal,
            page_size=request.page_size,
            before_id=None if cursor is None else cursor[0],
        )
        return ListSecurityEventsResponse(
            security_events=[convert.security_event(e) for e in events],
            next_page_token=self._page_tokens.encode(
                principal.user.id, None if next_id is None else [next_id]
            ),
        )
