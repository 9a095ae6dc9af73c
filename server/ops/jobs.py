"""Background jobs of a running server: retention, and scheduled backups when configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from server.domain.errors import Unavailable
from server.domain.retention import Retention
from server.ops.reports import Report
from server.storage.backup import BackupError, prune
from server.storage.files import private_dir

log = logging.getLogger("expense_auth.jobs")

# Claims this period of a job for this process: (job name, interval in seconds).
Claim = Callable[[str, float], Awaitable[bool]]


class Periodic:
    """Runs `step` every `interval_s` on the event loop until stopped.

    A run that fails is logged and reported (`report`, the error tracker), and the
    next one happens on time.
    """

    def __init__(
        self,
        name: str,
        step: Callable[[], Awaitable[None]],
        *,
        interval_s: float,
        claim: Claim | None = None,
        report: Report | None = None,
    ) -> None:
        self._name = name
        self._step = step
        self._interval_s = interval_s
        self._claim = claim
        self._report = report
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the loop (the first run happens at once)."""
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        """Stop the loop, waiting for a run in progress to be cancelled."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                if await self._claimed():
                    await self._step()
            except Exception as exc:
                log.exception("background job failed", extra={"job": self._name})
                if self._report is not None:
                    self._report(exc, tags={"job": self._name})
            await asyncio.sleep(self._interval_s)

    async def _claimed(self) -> bool:
        """Whether this process runs this period (another process of the cluster may)."""
        if self._claim is None:
            return True
        try:
            return await self._claim(self._name, self._interval_s)
        except Unavailable as exc:
            log.warning("background job skipped", extra={"job": self._name, "why": exc.message})
            return False


def retention_job(
    retention: Retention,
    *,
    interval_s: float,
    claim: Claim | None = None,
    report: Report | None = None,
) -> Periodic:
    """Apply the retention windows periodically."""

    async def step() -> None:
        counts = await retention.run()
        if any(counts.values()):
            log.info("retention applied", extra=counts)

    return Periodic("retention", step, interval_s=interval_s, claim=claim, report=report)


def backup_job(
    take: Callable[[Path], Path],
    directory: Path,
    *,
    keep: int,
    suffix: str,
    interval_s: float,
    before: Callable[[], Awaitable[None]],
    after: Callable[[], None] = lambda: None,
    claim: Claim | None = None,
    report: Report | None = None,
) -> Periodic:
    """Take a verified backup into `directory` periodically (`take(directory)`, in a
    thread), keeping the newest `keep` files of `suffix`.

    `after` runs once a backup has passed its check (it records the time).
    """

    async def step() -> None:
        await before()
        await asyncio.to_thread(private_dir, directory)
        try:
            path = await asyncio.to_thread(take, directory)
        except BackupError as exc:
            log.error("scheduled backup failed", extra={"error": str(exc)})
            if report is not None:
                report(exc, tags={"job": "backup"})
            return
        await asyncio.to_thread(after)
        removed = await asyncio.to_thread(prune, directory, keep=keep, suffix=suffix)
        log.info("backup taken", extra={"path": path.name, "pruned": len(removed)})

    return Periodic("backup", step, interval_s=interval_s, claim=claim, report=report)
