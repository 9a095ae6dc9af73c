"""Retention: how long data is kept, applied by a periodic job and by `expense-auth purge`."""

from __future__ import annotations

from dataclasses import dataclass

from server.domain.clock import Clock
from server.domain.ports import RetentionStore

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """The windows, in days.

    Attributes:
        session_days: Ended (expired or revoked) sessions are kept this long, so that
            users can still see them in their export and history.
        audit_days: Audit events are kept this long (tombstones forever).
        full_ip_days: After this, IP addresses in events are cut to /24 or /48.
        session_idle_ms: The idle timeout, so that sessions ended by inactivity count
            as ended.
    """

    session_days: int = 30
    audit_days: int = 365
    full_ip_days: int = 30
    session_idle_ms: int = 30 * 60 * 1000


class Retention:
    """Purges what the policy says is no longer kept."""

    def __init__(self, store: RetentionStore, *, clock: Clock, policy: RetentionPolicy) -> None:
        self._store = store
        self._clock = clock
        self._policy = policy

    async def run(self) -> dict[str, int]:
        """Apply every window once; returns how many rows of each kind changed."""
        now = self._clock.now_ms()
        return await self._store.purge(
            now_ms=now,
            session_grace_ms=self._policy.session_days * DAY_MS,
            idle_ms=self._policy.session_idle_ms,
            events_before_ms=now - self._policy.audit_days * DAY_MS,
            ips_before_ms=now - self._policy.full_ip_days * DAY_MS,
        )
