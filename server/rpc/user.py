"""expense.user.v1.UserService: the caller's profile and preferences."""

from __future__ import annotations

from connectrpc.request import RequestContext

from gen.expense.user.v1 import user_connect
from gen.expense.user.v1.user_pb import (
    GetCurrentUserRequest,
    GetCurrentUserResponse,
    UpdateCurrentUserRequest,
    UpdateCurrentUserResponse,
)
from interceptors.session import current_principal
from server.domain.errors import InvalidArgument
from server.domain.preferences import EDITABLE_FIELDS
from server.domain.users import Users
from server.rpc import convert


class UserService(user_connect.UserService):
    """Implements the generated `UserService` protocol."""

    def __init__(self, *, users: Users) -> None:
        self._users = users

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
                raise InvalidArgument(
                    "update_mask",
                    f"update_mask names {path[:60]!r}, which cannot be changed; "
                    f"allowed: {', '.join(EDITABLE_FIELDS)}",
                )
            assert request.user is not None
            changes[path] = getattr(request.user, path)
        updated = await self._users.update(current_principal(), changes)
        return UpdateCurrentUserResponse(user=convert.user(updated))
