"""expense.admin.v1.AdminService, served only on the admin listener."""

from __future__ import annotations

from connectrpc.request import RequestContext

from gen.expense.admin.v1 import admin_connect
from gen.expense.admin.v1.admin_pb import (
    DisableUserRequest,
    DisableUserResponse,
    EnableUserRequest,
    EnableUserResponse,
    GetUserRequest,
    GetUserResponse,
    ListUsersRequest,
    ListUsersResponse,
    ManagedUser,
    RevokeUserSessionsRequest,
    RevokeUserSessionsResponse,
)
from server.domain.admin import Admin
from server.domain.errors import InvalidArgument
from server.domain.models import User
from server.rpc import convert
from server.rpc.context import origin_of
from server.rpc.page_tokens import PageTokens

ADMIN = "admin"


def managed(user: User) -> ManagedUser:
    """A user with their administrative state."""
    return ManagedUser(
        user=convert.user(user),
        disable_time=None if user.disabled_ms is None else convert.timestamp(user.disabled_ms),
    )


def _user_id(value: str) -> str:
    if not value:
        raise InvalidArgument("user_id", "user_id is required")
    return value


class AdminService(admin_connect.AdminService):
    """Implements the generated `AdminService` protocol."""

    def __init__(self, *, admin: Admin, page_tokens: PageTokens) -> None:
        self._admin = admin
        self._page_tokens = page_tokens

    async def list_users(
        self, request: ListUsersRequest, ctx: RequestContext[ListUsersRequest, ListUsersResponse]
    ) -> ListUsersResponse:
        """One page of users."""
        cursor = self._page_tokens.decode(ADMIN, request.page_token, shape=(str,))
        users, next_id = await self._admin.list_users(
            email_contains=request.email_contains,
            page_size=request.page_size,
            after_id=None if cursor is None else cursor[0],
        )
        return ListUsersResponse(
            users=[managed(u) for u in users],
            next_page_token=self._page_tokens.encode(ADMIN, None if next_id is None else [next_id]),
        )

    async def get_user(
        self, request: GetUserRequest, ctx: RequestContext[GetUserRequest, GetUserResponse]
    ) -> GetUserResponse:
        """One user."""
        return GetUserResponse(user=managed(await self._admin.get_user(_user_id(request.user_id))))

    async def disable_user(
        self,
        request: DisableUserRequest,
        ctx: RequestContext[DisableUserRequest, DisableUserResponse],
    ) -> DisableUserResponse:
        """Disable a user and end their sessions."""
        user = await self._admin.set_disabled(
            _user_id(request.user_id), disabled=True, origin=origin_of(ctx)
        )
        return DisableUserResponse(user=managed(user))

    async def enable_user(
        self,
        request: EnableUserRequest,
        ctx: RequestContext[EnableUserRequest, EnableUserResponse],
    ) -> EnableUserResponse:
        """Enable a user again."""
        user = await self._admin.set_disabled(
            _user_id(request.user_id), disabled=False, origin=origin_of(ctx)
        )
        return EnableUserResponse(user=managed(user))

    async def revoke_user_sessions(
        self,
        request: RevokeUserSessionsRequest,
        ctx: RequestContext[RevokeUserSessionsRequest, RevokeUserSessionsResponse],
    ) -> RevokeUserSessionsResponse:
        """End every session of a user."""
        count = await self._admin.revoke_sessions(_user_id(request.user_id), origin=origin_of(ctx))
        return RevokeUserSessionsResponse(revoked_count=count)
