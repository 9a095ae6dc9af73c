"""Last-seen writes that never fail or slow a read, for any engine.

Reads that move a session's last-seen time wait at most `wait_s` for the write;
if it is not done by then, the read succeeds anyway and the write goes on in the
background, retried every `retry_s` while the database refuses it. Until it is
written, `pending(session_id)` tells this process's lookups the newer time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from server.domain.errors import Unavailable

WAIT_S = 0.25
RETRY_S = 1.0


class DeferredTouches:
    """Pending last-seen times, and the task that writes them."""

    def __init__(
        self,
        write: Callable[[Mapping[str, int]], Awaitable[None]],
        *,
        wait_s: float = WAIT_S,
        retry_s: float = RETRY_S,
    ) -> None:
        self._write = write
        self._wait_s = wait_s
        self._retry_s = retry_s
        self._pending: dict[str, int] = {}
        self._writer: asyncio.Task[None] | None = None

    def pending(self, session_id: str) -> int | None:
        """The last-seen time not written yet for this session, if any."""
        return self._pending.get(session_id)

    async def touch(self, session_id: str, last_seen_ms: int) -> None:
        """Record a use of the session; wait a little for it to be written."""
        self._pending[session_id] = max(self._pending.get(session_id, 0), last_seen_ms)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_all())
        await asyncio.wait({self._writer}, timeout=self._wait_s)

    async def flush(self) -> None:
        """Write what is pending, once (at shutdown); what fails is lost, as last-seen."""
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        if self._pending:
            try:
                await self._write_batch()
            except Unavailable:
                self._pending.clear()

    async def _write_all(self) -> None:
        while self._pending:
            try:
                await self._write_batch()
            except Unavailable:
                await asyncio.sleep(self._retry_s)

    async def _write_batch(self) -> None:
        batch = dict(self._pending)
        await self._write(batch)
        for session_id, at in batch.items():
            if self._pending.get(session_id) == at:
                del self._pending[session_id]
