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
    ListWebhookEventsRequest,
    ListWebhookEventsResponse,
    ManagedUser,
    RedeliverWebhookEventRequest,
    RedeliverWebhookEventResponse,
    RevokeUserSessionsRequest,
    RevokeUserSessionsResponse,
    WebhookEvent,
    WebhookEventState,
)
from server.domain.admin import Admin
from server.domain.errors import InvalidArgument
from server.domain.models import User, WebhookDelivery
from server.domain.webhooks import PARKED, PENDING, Deliveries
from server.rpc import convert
from server.rpc.context import origin_of
from server.rpc.page_tokens import PageTokens

ADMIN = "admin"
_STATES = {
    WebhookEventState.UNSPECIFIED: "",
    WebhookEventState.PENDING: PENDING,
    WebhookEventState.PARKED: PARKED,
}
_STATE_OF = {name: state for state, name in _STATES.items() if name}


def managed(user: User) -> ManagedUser:
    """A user with their administrative state."""
    return ManagedUser(
        user=convert.user(user),
        disable_time=None if user.disabled_ms is None else convert.timestamp(user.disabled_ms),
    )


def webhook_event(entry: WebhookDelivery) -> WebhookEvent:
    """An outbox entry as operators see it (never its payload)."""
    return WebhookEvent(
        event_id=entry.event.id,
        endpoint=entry.event.endpoint,
        type=entry.event.type,
        user_id=entry.event.user_id,
        state=_STATE_OF[entry.state],
        attempt_count=entry.attempts,
        last_error=entry.last_error,
        create_time=convert.timestamp(entry.event.create_ms),
        next_attempt_time=(
            convert.timestamp(entry.next_attempt_ms) if entry.state == PENDING else None
        ),
    )


def _user_id(value: str) -> str:
    if not value:
        raise InvalidArgument("user_id", "user_id is required")
    return value


class AdminService(admin_connect.AdminService):
    """Implements the generated `AdminService` protocol."""

    def __init__(
        self,
        *,
        admin: Admin,
        page_tokens: PageTokens,
        deliveries: Deliveries,
        event_page_tokens: PageTokens,
    ) -> None:
        self._admin = admin
        self._page_tokens = page_tokens
        self._deliveries = deliveries
        self._event_page_tokens = event_page_tokens

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

    async def list_webhook_events(
        self,
        request: ListWebhookEventsRequest,
        ctx: RequestContext[ListWebhookEventsRequest, ListWebhookEventsResponse],
    ) -> ListWebhookEventsResponse:
        """One page of undelivered events, in outbox order."""
        state = _STATES.get(request.state)
        if state is None:
            got = getattr(request.state, "value", request.state)
            raise InvalidArgument(
                "state", f"state must be PENDING, PARKED or unspecified, got {got}"
            )
        # The filter is part of the cursor's owner: a token pages only the list it began.
        owner = f"{ADMIN}:{state}"
        cursor = self._event_page_tokens.decode(owner, request.page_token, shape=(int,))
        entries, next_seq = await self._deliveries.list_events(
            state=state,
            page_size=request.page_size,
            after_seq=None if cursor is None else cursor[0],
        )
        return ListWebhookEventsResponse(
            events=[webhook_event(e) for e in entries],
            next_page_token=self._event_page_tokens.encode(
                owner, None if next_seq is None else [next_seq]
            ),
        )

    async def redeliver_webhook_event(
        self,
        request: RedeliverWebhookEventRequest,
        ctx: RequestContext[RedeliverWebhookEventRequest, RedeliverWebhookEventResponse],
    ) -> RedeliverWebhookEventResponse:
        """Put a parked event back in line."""
        entries = await self._deliveries.redeliver(request.event_id)
        return RedeliverWebhookEventResponse(events=[webhook_event(e) for e in entries])
