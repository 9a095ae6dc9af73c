"""Controllable clocks: one shared with a server process through a file, one in-process.

The server under test reads the file on every reading; the test writes it.
Until the test sets a time, the real clocks are used; after the test removes the
file, the real wall clock, and a monotonic clock that goes on from the last
reading. `advance` moves both the
wall clock and the monotonic clock, as time passing does; `step_wall` moves
only the wall clock, as an NTP correction or an operator's `date -s` does.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class FileClock:
    """The fake clock: `<wall ms> <monotonic ms>` in a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # The last monotonic reading from the file, and the real monotonic time then:
        # once the file is removed, the monotonic clock goes on from there, so that
        # it never runs backwards in the server that reads it.
        self._anchor: tuple[int, int] | None = None

    def _read(self) -> tuple[int, int]:
        real_mono = time.monotonic_ns() // 1_000_000
        try:
            wall, mono = self.path.read_text().split()
        except (FileNotFoundError, ValueError):
            if self._anchor is not None:
                base, at = self._anchor
                return time.time_ns() // 1_000_000, base + real_mono - at
            return time.time_ns() // 1_000_000, real_mono
        self._anchor = (int(mono), real_mono)
        return int(wall), int(mono)

    def now_ms(self) -> int:
        """The wall time in the file, or the real time when unset."""
        return self._read()[0]

    def monotonic_ms(self) -> int:
        """The monotonic time in the file, or the real one when unset."""
        return self._read()[1]

    def _write(self, wall: int, mono: int) -> None:
        # Atomically, so that the server never reads half a number.
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{wall} {mono}")
        os.replace(tmp, self.path)
        # As if read back: once the file is removed, this clock goes on from here.
        self._anchor = (mono, time.monotonic_ns() // 1_000_000)

    def set_ms(self, value: int) -> None:
        """Set the wall time; the monotonic clock moves by as much (forward only)."""
        wall, mono = self._read()
        self._write(value, mono + max(0, value - wall))

    def advance(self, seconds: float) -> None:
        """Let time pass: both clocks move forward."""
        wall, mono = self._read()
        delta = int(seconds * 1000)
        self._write(wall + delta, mono + delta)

    def step_wall(self, seconds: float) -> None:
        """Step the wall clock (forward or back) while the monotonic clock stands."""
        wall, mono = self._read()
        self._write(wall + int(seconds * 1000), mono)

    @contextlib.contextmanager
    def ticking(self) -> Iterator[None]:
        """Inside the block both clocks run at the real pace from where they stand."""
        stop = threading.Event()

        def tick() -> None:
            last = time.monotonic()
            while not stop.wait(0.05):
                now = time.monotonic()
                self.advance(now - last)
                last = now

        thread = threading.Thread(target=tick, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def freeze(self) -> FileClock:
        """Stop both clocks at the real wall time and at the start of a day on the
        monotonic clock: every rate-limit window (a second, a minute, an hour, a day)
        starts there, so exact counts cannot straddle a window's edge. Frozen again
        after it was set or unset, it goes on to the next day, never back."""
        day = 86_400_000
        mono = (self._read()[1] // day + 1) * day
        self._write(time.time_ns() // 1_000_000, mono)
        return self


class ManualClock:
    """An in-process fake clock: milliseconds that move only when the test says so."""

    def __init__(self, start_ms: int = 1_767_225_600_000) -> None:
        self.ms = start_ms
        self.mono = 1_000_000

    def now_ms(self) -> int:
        """The current fake wall time."""
        return self.ms

    def monotonic_ms(self) -> int:
        """The current fake monotonic time."""
        return self.mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by seconds."""
        self.advance_ms(int(seconds * 1000))

    def advance_ms(self, ms: int) -> None:
        """Move both clocks forward by milliseconds."""
        self.ms += ms
        self.mono += ms

    def step_wall(self, seconds: float) -> None:
        """Step the wall clock only."""
        self.ms += int(seconds * 1000)
