"""The user service: read and change the caller's own profile."""

from __future__ import annotations

from server.domain.clock import Clock
from server.domain.errors import NotFound
from server.domain.lifecycle import ChangeEvents, no_events
from server.domain.models import Principal, User
from server.domain.ports import ProfileStore
from server.domain.preferences import clean_changes, nothing_to_update


class Users:
    """Profile and preferences of the signed-in user."""

    def __init__(
        self, store: ProfileStore, *, clock: Clock, events: ChangeEvents = no_events
    ) -> None:
        self._store = store
        self._clock = clock
        self._events = events

    async def update(self, principal: Principal, changes: dict[str, str]) -> User:
        """Apply validated `changes` (field name -> new value) to the caller.

        Raises:
            InvalidArgument: No field named, a field that cannot change, or a bad value.
        """
        if not changes:
            raise nothing_to_update()
        cleaned = clean_changes(changes)
        user = await self._store.update_user(
            principal.user.id, cleaned, now_ms=self._clock.now_ms(), events=self._events
        )
        if user is None:
            raise NotFound("the signed-in user no longer exists")
        return user
