"""The webhook delivery worker: a background task of every serving process.

It asks the database whether an event is due (a read), claims and sends while
there is work, and otherwise looks again after a short pause. The rules (order,
leases, retries, parking) are the domain's (server/domain/webhooks.py); this is
only the loop, its pacing and its shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from server.domain.errors import Unavailable
from server.domain.webhooks import Deliveries

log = logging.getLogger("expense_auth.webhooks")

POLL_INTERVAL_S = 0.5


class DeliveryWorker:
    """Runs `Deliveries` until stopped."""

    def __init__(
        self,
        deliveries: Deliveries,
        *,
        grace_s: float,
        poll_interval_s: float = POLL_INTERVAL_S,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._deliveries = deliveries
        self._grace_s = grace_s
        self._poll_interval_s = poll_interval_s
        self._on_close = on_close
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._paused = False

    async def start(self) -> None:
        """Start the loop."""
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="webhooks")

    async def stop(self) -> None:
        """Let the attempts in flight finish (within `grace_s`, their timeout), then stop.

        An attempt cut short is not lost: its lease runs out and it is sent again.
        """
        if self._task is not None:
            self._stopping.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self._grace_s)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        if self._on_close is not None:
            await self._on_close()

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if await self._deliveries.due():
                    while not self._stopping.is_set() and await self._deliveries.run_once():
                        pass
                if self._paused:
                    self._paused = False
                    log.info("webhook deliveries resumed")
            except Unavailable as exc:
                # Once per outage, not at every poll: the store logs its own incidents.
                if not self._paused:
                    self._paused = True
                    log.warning("webhook deliveries paused", extra={"why": exc.message})
            except Exception:
                log.exception("webhook deliveries failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._poll_interval_s)
