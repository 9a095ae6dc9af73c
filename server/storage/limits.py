"""Where rate-limit counts live: this process's memory, or Redis shared by replicas.

Both run the sliding-window counter: the previous window's count is weighed by
how much of it still overlaps the sliding window (no burst at a window edge,
unlike fixed windows), with two counters per key.

- `memory://` (the default): `MemoryWindows`, the algorithm of `limits`' own
  strategy done in place in a dict, with old windows dropped whole (why not
  `limits`' memory storage: docs/benchmarks.md, "Rate limiting in memory").
  Windows are measured on the monotonic clock, so a wall-clock step changes
  nothing.
- `redis://host:port`: `limits`' Redis storage and strategy, shared by every
  replica.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from limits import RateLimitItemPerSecond, parse_many
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from server.domain.clock import Clock
from server.domain.throttle import Limit, WindowCounter


def parse_limits(spec: str) -> tuple[Limit, ...]:
    """`10/minute;60/hour` as limits.

    Raises:
        ValueError: Not a limit specification.
    """
    return tuple(Limit(amount=item.amount, window_s=item.get_expiry()) for item in parse_many(spec))


class MemoryWindows:
    """Sliding-window counters for one limit (`amount` per `window_s`), in memory.

    Counts are kept per window (window index -> key -> count); only the current
    and the previous window are read, and a window's counts are dropped as a
    whole once it is two windows old, so memory follows the keys seen recently
    and no pass over the keys is needed.
    """

    def __init__(self, amount: int, window_s: int, *, now: Callable[[], float]) -> None:
        self._amount = amount
        self._window_s = window_s
        self._now = now
        self._counts: dict[int, dict[str, int]] = {}
        self._lock = threading.Lock()  # uncontended on the event loop; safe from any thread

    def hit(self, key: str, *, count: bool = True, refuse: bool = True) -> bool:
        """Whether one more request fits; counts it if it does (or if `refuse` is off)."""
        now = self._now()
        index = int(now // self._window_s)
        with self._lock:
            current = self._counts.get(index)
            if current is None:
                current = self._start_window(index)
            previous = self._counts.get(index - 1)
            earlier = previous.get(key, 0) if previous else 0
            counted = current.get(key, 0)
            elapsed = now / self._window_s - index  # fraction of the current window gone
            fits = math.floor(earlier * (1.0 - elapsed) + counted) + 1 <= self._amount
            if count and (fits or not refuse):
                current[key] = counted + 1
            return fits

    def retry_after_s(self, key: str) -> int:
        """Whole seconds until one more request would fit, if nothing else is counted."""
        now = self._now()
        index = int(now // self._window_s)
        with self._lock:
            previous = self._counts.get(index - 1, {}).get(key, 0)
            current = self._counts.get(index, {}).get(key, 0)
        limit = self._amount
        start = index * self._window_s
        if current < limit and previous > 0:
            # Within this window: previous * (1 - f) + current < limit.
            at = start + self._window_s * (1.0 - (limit - current) / previous)
        else:
            # In the next window, where this window's count is the previous one.
            carried = max(current, limit)
            at = start + self._window_s * (2.0 - limit / carried)
        return max(1, math.ceil(at - now))

    def __len__(self) -> int:
        """How many counts are held (a key seen in both windows counts twice)."""
        return sum(len(counts) for counts in self._counts.values())

    def _start_window(self, index: int) -> dict[str, int]:
        for old in [i for i in self._counts if i < index - 1]:
            del self._counts[old]
        current: dict[str, int] = {}
        self._counts[index] = current
        return current


class MemoryCounter:
    """Counts in this process, one `MemoryWindows` per limit of each policy."""

    def __init__(self, *, now: Callable[[], float]) -> None:
        self._now = now
        self._windows: dict[tuple[str, int], MemoryWindows] = {}

    async def hit(
        self, slot: tuple[str, int], limit: Limit, key: str, *, count: bool, refuse: bool
    ) -> int | None:
        """See `WindowCounter.hit`."""
        windows = self._windows.get(slot)
        if windows is None:
            windows = self._windows[slot] = MemoryWindows(
                limit.amount, limit.window_s, now=self._now
            )
        if windows.hit(key, count=count, refuse=refuse):
            return None
        return windows.retry_after_s(key)


class RedisCounter:
    """Counts in Redis (or Valkey), through `limits`' storage and strategy."""

    def __init__(self, url: str) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(storage_from_string(f"async+{url}"))

    async def hit(
        self, slot: tuple[str, int], limit: Limit, key: str, *, count: bool, refuse: bool
    ) -> int | None:
        """See `WindowCounter.hit`."""
        item = RateLimitItemPerSecond(limit.amount, limit.window_s)
        policy = slot[0]
        if count:
            fits = await self._limiter.hit(item, policy, key)
        else:
            fits = await self._limiter.test(item, policy, key)
        if fits:
            return None
        stats = await self._limiter.get_window_stats(item, policy, key)
        # Redis windows are shared by replicas, so they are on the wall clock.
        return max(1, math.ceil(stats.reset_time - time.time()))


def counter_from_url(url: str, *, clock: Clock) -> WindowCounter:
    """The counter for RATE_LIMIT_STORAGE_URL (`memory://` or `redis://host:port`)."""
    url = url.removeprefix("async+")
    if url.startswith("memory://"):
        return MemoryCounter(now=lambda: clock.monotonic_ms() / 1000)
    return RedisCounter(url)
