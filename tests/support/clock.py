"""A controllable clock shared with a server process through a file.

The server under test reads the file on every `now_ms()`; the test writes it.
Until the test sets a time, the real time is used.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class FileClock:
    """The fake clock: a millisecond timestamp in a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def now_ms(self) -> int:
        """The time in the file, or the real time when unset."""
        try:
            return int(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return time.time_ns() // 1_000_000

    def set_ms(self, value: int) -> None:
        """Set the time (atomically, so the server never reads half a number)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(value))
        os.replace(tmp, self.path)

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.set_ms(self.now_ms() + int(seconds * 1000))


class ManualClock:
    """An in-process fake clock: milliseconds that move only when the test says so."""

    def __init__(self, start_ms: int = 1_767_225_600_000) -> None:
        self.ms = start_ms

    def now_ms(self) -> int:
        """The current fake time."""
        return self.ms

    def advance(self, seconds: float) -> None:
        """Move forward by seconds."""
        self.ms += int(seconds * 1000)

    def advance_ms(self, ms: int) -> None:
        """Move forward by milliseconds."""
        self.ms += ms
