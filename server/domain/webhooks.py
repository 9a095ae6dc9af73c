"""Delivering the outbox: at least once, in order per user, retried, then parked.

Every serving process (every worker, every replica) runs the same loop over
the shared database. A process claims a batch of due events with a lease
(`OutboxStore.claim`), sends each, and records the outcome under that lease.
Only the oldest pending event of a user (per endpoint) can be claimed, so a
user's next event is not sent before the previous one is acknowledged or
parked; the lease keeps two processes from sending the same event at once,
and an event whose process died mid-delivery is sent again once its lease has
run out (the receiver drops the duplicate by its `webhook-id`).

A failed attempt is retried with exponential back-off (and jitter) until the
event's retry window has passed; then it is parked: it no longer holds the
user's later events back, operators see it (metric, ListWebhookEvents) and can
redeliver it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from server.domain import paging
from server.domain.clock import Clock
from server.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from server.domain.models import WebhookDelivery
from server.domain.ports import OutboxStore, WebhookSender

PENDING: Final = "pending"
PARKED: Final = "parked"
STATES = (PENDING, PARKED)
# The outcomes the deliveries counter is labelled with (and PARKED).
DELIVERED: Final = "delivered"
FAILED: Final = "failed"
Outcome = Literal["delivered", "failed", "parked"]
MAX_ERROR = 200


class DeliveryFailed(Exception):
    """An attempt did not get a 2xx answer.

    Attributes:
        reason: What happened (`HTTP 503`, `no answer within 10 s`...), never a secret.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason[:MAX_ERROR]


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How hard and how long the worker tries.

    Attributes:
        retry_for_ms: An event still failing this long after it was written (or
            redelivered) is parked.
        first_backoff_ms: The wait after the first failure; it doubles after each.
        max_backoff_ms: The longest wait between two attempts.
        lease_ms: How long a claimed event is reserved for the process that claimed
            it: longer than an attempt can take (the attempt's timeout bounds it).
        batch: Events claimed (and sent side by side) at a time; at most one per user.
    """

    retry_for_ms: int
    max_backoff_ms: int
    lease_ms: int
    first_backoff_ms: int = 1000
    batch: int = 8

    def backoff_ms(self, attempts: int) -> int:
        """The wait before attempt `attempts + 1`: doubling, capped, with jitter
        (between half and all of it), so that receivers coming back are not hit by
        every retry at once."""
        full: int = min(self.max_backoff_ms, self.first_backoff_ms * 2 ** min(attempts - 1, 30))
        half = full // 2
        return half + secrets.randbelow(full - half + 1)


class Deliveries:
    """The delivery worker's rules, and operators' view of the outbox."""

    def __init__(
        self,
        store: OutboxStore,
        sender: WebhookSender,
        *,
        clock: Clock,
        policy: DeliveryPolicy,
        endpoints: Sequence[str],
        owner: str,
        on_outcome: Callable[[Outcome], None] = lambda outcome: None,
    ) -> None:
        self._store = store
        self._sender = sender
        self._clock = clock
        self._policy = policy
        self._endpoints = tuple(endpoints)
        self._owner = owner
        self._on_outcome = on_outcome

    async def due(self) -> bool:
        """Whether an event may be claimed now (a cheap read before the claim's write)."""
        return await self._store.outbox_due(now_ms=self._clock.now_ms(), endpoints=self._endpoints)

    async def run_once(self) -> int:
        """Claim due events, send them side by side and record each outcome; returns how
        many were claimed (0: nothing is due)."""
        now = self._clock.now_ms()
        claimed = await self._store.claim_outbox(
            now_ms=now,
            lease_until_ms=now + self._policy.lease_ms,
            owner=self._owner,
            endpoints=self._endpoints,
            limit=self._policy.batch,
        )
        if claimed:
            await asyncio.gather(*(self._deliver(entry) for entry in claimed))
        return len(claimed)

    async def _deliver(self, entry: WebhookDelivery) -> None:
        try:
            await self._sender.send(entry.event)
        except DeliveryFailed as exc:
            await self._failed(entry, exc.reason)
            return
        await self._store.outbox_delivered(entry.seq, owner=self._owner)
        self._on_outcome(DELIVERED)

    async def _failed(self, entry: WebhookDelivery, reason: str) -> None:
        now = self._clock.now_ms()
        attempts = entry.attempts + 1
        park = now >= entry.since_ms + self._policy.retry_for_ms
        await self._store.outbox_failed(
            entry.seq,
            owner=self._owner,
            error=reason,
            next_attempt_ms=now + self._policy.backoff_ms(attempts),
            park=park,
        )
        self._on_outcome(PARKED if park else FAILED)

    # Operators

    async def list_events(
        self, *, state: str, page_size: int, after_seq: int | None
    ) -> tuple[list[WebhookDelivery], int | None]:
        """One page of the outbox in order, optionally of one state, and the next cursor."""
        if state and state not in STATES:
            raise InvalidArgument("state", f"state must be pending or parked, got {state!r}")
        size = paging.page_size(page_size)
        rows = await self._store.list_outbox(
            states=(state,) if state else STATES, after_seq=after_seq, limit=size + 1
        )
        page, last = paging.split_page(rows, size)
        return page, None if last is None else last.seq

    async def redeliver(self, event_id: str) -> list[WebhookDelivery]:
        """Put a parked event back in line, with a fresh retry window.

        Raises:
            NotFound: No such event in the outbox (delivered events leave it).
            FailedPrecondition: The event is not parked (it is still being delivered).
        """
        if not event_id:
            raise InvalidArgument("event_id", "event_id is required")
        now = self._clock.now_ms()
        redelivered, pending = await self._store.redeliver_outbox(event_id, now_ms=now)
        if redelivered:
            return redelivered
        if pending:
            raise FailedPrecondition(
                f"event {event_id[:64]!r} is not parked: it is still being delivered"
            )
        raise NotFound(f"no event {event_id[:64]!r} in the outbox (delivered events leave it)")

    async def counts(self) -> dict[str, int]:
        """How many events are in each state (for the gauge)."""
        counted = await self._store.count_outbox()
        return {state: counted.get(state, 0) for state in STATES}
