"""Liveness and readiness, for load balancers and orchestrators.

`/healthz` says the process answers (it touches nothing else, so it answers in
milliseconds whatever the database does). `/readyz` (and grpc.health.v1) says
it should get traffic: the database takes a real write and is migrated, and
shutdown has not begun; it also reports, without gating on them, Google's keys
and the rate-limit storage. Shutdown is signalled
by the serving process (which receives SIGTERM) through a marker file, because
the app runs in Envoy's process, where Python cannot install signal handlers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from starlette.types import Scope

from server.domain.clock import Clock
from server.edge.router import PlainResponse


@dataclass(frozen=True, slots=True)
class _Report:
    checks: dict[str, str]
    dependencies: dict[str, str]


# The environment variable through which `expense-auth serve` tells the app
# (in Envoy's process) where the shutdown marker file will appear.
SHUTDOWN_MARKER_ENV = "EXPENSE_AUTH_SHUTDOWN_MARKER"
# With several workers, the file where `expense-auth serve` keeps how many run.
WORKERS_STATUS_ENV = "EXPENSE_AUTH_WORKERS_FILE"


class StoreProbe(Protocol):
    """The store, as readiness sees it."""

    async def probe(self, *, now_ms: int) -> str:
        """ "" when the store is reachable, takes a real write and is migrated; else the
        problem."""
        ...


# A dependency's state: "ok", or what is wrong with it (it does not gate readiness).
DependencyCheck = Callable[[], Awaitable[str]]


def workers_check(status_file: Path) -> DependencyCheck:
    """The `workers` dependency: "ok" while every worker of `serve --workers N` runs.

    Not gating: while one worker restarts the others serve, and every worker
    answers /readyz for the whole (they share the database and the shutdown marker).
    """

    def read() -> str:
        try:
            status = json.loads(status_file.read_text())
            workers, running = int(status["workers"]), int(status["running"])
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown: the supervisor's status file cannot be read"
        if running >= workers:
            return "ok"
        return f"degraded: {running} of {workers} workers running; the others are restarting"

    async def check() -> str:
        return await asyncio.to_thread(read)

    return check


class Readiness:
    """Computes the readiness checks, at most once per `max_age_s` for all callers.

    Readiness is the truth about serving: it fails when shutdown has begun or the
    database does not take a real write (full disk, read-only file, a lock held
    too long, a damaged file). Dependencies whose failure leaves the service
    serving are reported beside it without gating it: Google's certs (every
    existing session still works, and a Google outage during a rollout must not
    mark every replica unready) and the rate-limit storage (limits fall back).

    /readyz, Health/Check and every Health/Watch stream share one computation:
    probes from many load balancers (or a flood of them) cost one database probe
    a second, not one each. Watch streams wait on one shared poll.
    """

    def __init__(
        self,
        store: StoreProbe,
        *,
        dependencies: Mapping[str, DependencyCheck],
        shutdown_marker: Path | None,
        clock: Clock,
        max_age_s: float = 1.0,
        poll_s: float = 1.0,
        on_check: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._on_check = on_check
        self._dependencies = dict(dependencies)
        self._marker = shutdown_marker
        self._max_age_s = max_age_s
        self._poll_s = poll_s
        self._cached: tuple[int, _Report] | None = None
        self._computing: asyncio.Task[_Report] | None = None
        self._watchers = 0
        self._watched: bool | None = None
        self._changed = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None

    @property
    def draining(self) -> bool:
        """Whether shutdown has begun."""
        return self._marker is not None and self._marker.exists()

    async def checks(self) -> dict[str, str]:
        """Each gating check's result: "ok" or what is wrong."""
        return {"shutdown": "draining" if self.draining else "ok"} | (await self._report()).checks

    async def dependencies(self) -> dict[str, str]:
        """Each dependency's state: "ok" or what is wrong (not gating)."""
        return dict((await self._report()).dependencies)

    async def _report(self) -> _Report:
        cached = self._cached
        if (
            cached is not None
            and 0 <= self._clock.monotonic_ms() - cached[0] < self._max_age_s * 1000
        ):
            return cached[1]
        if self._computing is None:
            self._computing = asyncio.get_running_loop().create_task(self._compute())
        # Shielded: a caller that goes away does not cancel the others' answer.
        return await asyncio.shield(self._computing)

    async def _compute(self) -> _Report:
        if self._on_check is not None:
            self._on_check()
        try:
            store_problem = await self._store.probe(now_ms=self._clock.now_ms())
            dependencies = {name: await check() for name, check in self._dependencies.items()}
            report = _Report(checks={"database": store_problem or "ok"}, dependencies=dependencies)
            self._cached = (self._clock.monotonic_ms(), report)
            return report
        finally:
            self._computing = None

    async def ready(self) -> bool:
        """Whether every check passes."""
        return all(v == "ok" for v in (await self.checks()).values())

    async def wait_change(self, last: bool) -> bool:
        """Readiness, once it differs from `last`. Every waiter shares one poll."""
        self._watchers += 1
        try:
            if self._poller is None or self._poller.done():
                self._poller = asyncio.get_running_loop().create_task(self._poll())
            while True:
                changed = self._changed
                if self._watched is not None and self._watched != last:
                    return self._watched
                await changed.wait()
        finally:
            self._watchers -= 1

    async def _poll(self) -> None:
        while self._watchers > 0:
            ready = await self.ready()
            if ready != self._watched:
                self._watched = ready
                changed, self._changed = self._changed, asyncio.Event()
                changed.set()
            await asyncio.sleep(self._poll_s)
        self._watched = None

    async def readyz(self, scope: Scope) -> PlainResponse:
        """The `/readyz` answer: 200 when ready, 503 with the failing checks otherwise;
        the dependencies' states in both."""
        checks = await self.checks()
        ready = all(v == "ok" for v in checks.values())
        return PlainResponse.json(
            200 if ready else 503,
            {
                "status": "ready" if ready else "not_ready",
                "checks": checks,
                "dependencies": await self.dependencies(),
            },
        )


async def healthz(scope: Scope) -> PlainResponse:
    """The `/healthz` answer: the process is alive."""
    return PlainResponse.json(200, {"status": "alive"})
