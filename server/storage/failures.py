"""Store failures in words for clients and operators, whatever the engine.

A database failure is the dependency's, not ours, so clients get `unavailable`
with a message that says what is wrong in words they can act on (retry later)
and a Retry-After, never `internal` and never the engine's own text. A full disk
is `unavailable` too, not `resource_exhausted`: the client can do nothing about
it, and clients (ours included) read `resource_exhausted` as "you are
rate-limited". Operators get one log line when an incident starts and one when
it is over, with the count of failed calls in between, and a metric. Each
engine classifies its own errors into these (sqlite/failures.py,
postgres/failures.py).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from server.domain.errors import Unavailable

log = logging.getLogger("expense_auth.storage")


@dataclass(frozen=True, slots=True)
class Failure:
    """A classified storage failure.

    Attributes:
        kind: `busy`, `disk_full`, `read_only`, `io`, `damaged` or `error` (metrics, logs).
        message: For the client.
        retry_after_s: For the client's Retry-After.
        reconnect: The connection may be stale (file replaced, permissions changed):
            open a new one for the next call.
        damaged: The file itself is bad; an operator must restore it.
    """

    kind: str
    message: str
    retry_after_s: int
    reconnect: bool = False
    damaged: bool = False

    def error(self) -> Unavailable:
        """The domain error clients get for this failure."""
        return Unavailable(self.message, reason=self.kind, retry_after_s=self.retry_after_s)


BUSY = Failure("busy", "the database is busy; try again shortly", 1)


DAMAGED = Failure(
    "damaged",
    "the server's database is damaged and must be restored by an operator; try again later",
    60,
    reconnect=True,
    damaged=True,
)
UNREACHABLE = Failure(
    "io",
    "the server cannot read or write its database right now; try again later",
    10,
    reconnect=True,
)


# Failures that only writes meet: a successful read does not end them.
WRITE_FAILURES = frozenset({"busy", "disk_full", "read_only"})


class SchemaTooNew(Exception):
    """The database was migrated by a newer version of the service (either engine)."""


class BrokenInstallation(Exception):
    """Files the service needs are missing from its installation (a packaging fault)."""


class DatabaseUnreachable(Exception):
    """A command could not connect to the database; the message says where and why."""


class Incidents:
    """One log line when a kind of failure starts and one when it is over; counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self.counts: Counter[str] = Counter()
        self._observers: list[Callable[[str], None]] = []

    def observe(self, callback: Callable[[str], None]) -> None:
        """Call `callback(kind)` on every failed call (a metric)."""
        self._observers.append(callback)

    def failed(self, failure: Failure, exc: BaseException | None) -> None:
        """Count a failed call; log the start of an incident of its kind."""
        for callback in self._observers:
            callback(failure.kind)
        with self._lock:
            self.counts[failure.kind] += 1
            started = failure.kind not in self._open
            self._open[failure.kind] = self._open.get(failure.kind, 0) + 1
        if started:
            log.error(
                "storage incident started",
                extra={
                    "kind": failure.kind,
                    "error": f"{type(exc).__name__}: {exc}"[:300] if exc else "",
                },
            )

    def succeeded(self, *, write: bool) -> None:
        """A call succeeded: the incidents it proves over are over (a read does not prove
        that writes work again)."""
        if not self._open:
            return
        with self._lock:
            ended = {k: n for k, n in self._open.items() if write or k not in WRITE_FAILURES}
            for kind in ended:
                del self._open[kind]
        for kind, failures in ended.items():
            log.warning("storage incident over", extra={"kind": kind, "failed_calls": failures})
