"""Operator actions on any account, each one audited."""

from __future__ import annotations

from server.domain import audit, paging
from server.domain.audit import Audit, Origin
from server.domain.clock import Clock
from server.domain.errors import NotFound
from server.domain.lifecycle import ChangeEvents, no_events
from server.domain.models import User
from server.domain.ports import AdminStore
from server.domain.sessions import SessionPolicy


class Admin:
    """What the admin API can do."""

    def __init__(
        self,
        store: AdminStore,
        *,
        clock: Clock,
        audit_log: Audit,
        policy: SessionPolicy,
        events: ChangeEvents = no_events,
    ) -> None:
        self._store = store
        self._events = events
        self._clock = clock
        self._audit = audit_log
        self._policy = policy

    def _live_window(self) -> dict[str, int]:
        now = self._clock.now_ms()
        return {"now_ms": now, "idle_cutoff_ms": now - self._policy.idle_ms}

    async def list_users(
        self, *, email_contains: str, page_size: int, after_id: str | None
    ) -> tuple[list[User], str | None]:
        """One page of users ordered by id, and the id to continue after."""
        size = paging.page_size(page_size)
        rows = await self._store.list_users(
            email_contains=email_contains.strip(), after_id=after_id, limit=size + 1
        )
        page, last = paging.split_page(rows, size)
        return page, None if last is None else last.id

    async def get_user(self, user_id: str) -> User:
        """One user by id."""
        user = await self._store.get_user(user_id)
        if user is None:
            raise NotFound(f"no user {user_id[:64]!r}")
        return user

    async def set_disabled(self, user_id: str, *, disabled: bool, origin: Origin) -> User:
        """Disable a user (every session ends at once) or enable them again."""
        user = await self._store.set_disabled(
            user_id, disabled=disabled, events=self._events, **self._live_window()
        )
        if user is None:
            raise NotFound(f"no user {user_id[:64]!r}")
        kind = audit.ACCOUNT_DISABLED if disabled else audit.ACCOUNT_ENABLED
        await self._audit.record(kind, user_id=user.id, origin=origin, reason="admin")
        return user

    async def revoke_sessions(self, user_id: str, *, origin: Origin) -> int:
        """Revoke every session of a user."""
        await self.get_user(user_id)
        count = await self._store.revoke_all_sessions(user_id, **self._live_window())
        await self._audit.record(
            audit.SESSION_REVOKED, user_id=user_id, origin=origin, reason=f"admin:{count}"
        )
        return count
