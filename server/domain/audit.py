"""The audit log: what happened to whom, when, from where — never a token or a cookie."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass

from server.domain.clock import Clock
from server.domain.errors import RateLimited
from server.domain.models import AuditEvent
from server.domain.ports import AuditStore

SIGN_IN = "sign_in"
SIGN_IN_FAILED = "sign_in_failed"
SIGN_OUT = "sign_out"
SESSION_REVOKED = "session_revoked"
RATE_LIMITED = "rate_limited"
DATA_EXPORTED = "data_exported"
ACCOUNT_DELETED = "account_deleted"
ACCOUNT_DISABLED = "account_disabled"
ACCOUNT_ENABLED = "account_enabled"
# Rate-limit events are recorded at most this often per user, so a flood of
# refused calls cannot turn into a flood of writes.
RATE_LIMITED_RECORD_INTERVAL_MS = 60_000


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request came from: its client IP and a User-Agent summary."""

    ip: str = ""
    user_agent: str = ""


class Audit:
    """Appends events to the store's audit log."""

    def __init__(self, store: AuditStore, *, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._last_rate_limited: dict[str, int] = {}

    async def record(
        self,
        kind: str,
        *,
        user_id: str | None,
        origin: Origin,
        reason: str = "",
        session_id: str = "",
    ) -> None:
        """Append one event, stamped with the current time."""
        await self._store.record_event(
            self.event(kind, user_id=user_id, origin=origin, reason=reason, session_id=session_id)
        )

    def event(
        self,
        kind: str,
        *,
        user_id: str | None,
        origin: Origin,
        reason: str = "",
        session_id: str = "",
    ) -> AuditEvent:
        """An event stamped with the current time, for a store call to record with its writes."""
        return AuditEvent(
            time_ms=self._clock.now_ms(),
            kind=kind,
            user_id=user_id,
            reason=reason[:100],
            session_id=session_id,
            ip=origin.ip,
            user_agent=origin.user_agent,
        )

    async def guard(
        self, limit: Awaitable[None], *, user_id: str, origin: Origin, reason: str
    ) -> None:
        """Await a rate-limit check; when it refuses, record that on the user's history.

        Raises:
            RateLimited: The check's refusal, after it is recorded.
        """
        try:
            await limit
        except RateLimited:
            await self.rate_limited(user_id=user_id, origin=origin, reason=reason)
            raise

    async def rate_limited(self, *, user_id: str, origin: Origin, reason: str) -> None:
        """Record a refusal by a rate limit, at most once a minute per user."""
        now = self._clock.monotonic_ms()
        last = self._last_rate_limited.get(user_id)
        if last is not None and now - last < RATE_LIMITED_RECORD_INTERVAL_MS:
            return
        if len(self._last_rate_limited) > 10_000:
            self._last_rate_limited.clear()
        self._last_rate_limited[user_id] = now
        await self.record(RATE_LIMITED, user_id=user_id, origin=origin, reason=reason)
