"""Time, injected: the service asks a Clock, tests pass a fake one.

Two readings, for two uses. `now_ms` is the wall clock, for timestamps that are
stored or shown (a session's creation and expiry, an audit event): these are
compared across processes and restarts, so they must be wall-clock time, and a
wall-clock step moves them (docs/reliability.md, "Clock steps"). `monotonic_ms`
never jumps, for durations this process measures on its own (rate-limit
windows, cache ages, back-offs): a step of the wall clock does not change them.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of the current time."""

    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch, UTC (wall clock)."""
        ...

    def monotonic_ms(self) -> int:
        """Milliseconds on a clock that only moves forward (any origin)."""
        ...


class SystemClock:
    """The real clocks."""

    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch, UTC."""
        return time.time_ns() // 1_000_000

    def monotonic_ms(self) -> int:
        """Milliseconds of `time.monotonic`."""
        return time.monotonic_ns() // 1_000_000
