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
  replica, behind `FallbackCounter`: each call has a deadline of milliseconds,
  and while Redis fails or is slow, each limit counts in memory or passes, as
  the domain's policy says (`server.domain.throttle.FAIL_OPEN`); Redis is tried
  again a second later, so the service recovers by itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable

from limits import RateLimitItemPerSecond, parse_many
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from server.domain.clock import Clock
from server.domain.throttle import Limit, WindowCounter

log = logging.getLogger("expense_auth.limits")

# Redis is a few milliseconds away; a call it does not answer in this long is a
# failure (a stopped or overloaded Redis must not hold calls). The default of
# RATE_LIMIT_STORAGE_TIMEOUT_MS.
REDIS_TIMEOUT_S = 0.1
REDIS_RETRY_S = 1.0


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

    def __init__(self, url: str, *, timeout_s: float) -> None:
        storage = storage_from_string(
            f"async+{url}", connect_timeout=timeout_s, stream_timeout=timeout_s
        )
        self._limiter = SlidingWindowCounterRateLimiter(storage)

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


class FallbackCounter:
    """Redis first; while it fails, limits count in memory or pass (`fail_open`).

    A failure (an error, or no answer within `timeout_s`) is logged once per
    outage and counted; for `retry_s` after it, calls do not wait for Redis at
    all. The first call that Redis answers again ends the outage.
    """

    def __init__(
        self,
        redis: WindowCounter,
        memory: WindowCounter,
        *,
        fail_open: frozenset[str],
        clock: Clock,
        timeout_s: float = REDIS_TIMEOUT_S,
        retry_s: float = REDIS_RETRY_S,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_error = on_error
        self._redis = redis
        self._memory = memory
        self._fail_open = fail_open
        self._clock = clock
        self._timeout_s = timeout_s
        self._retry_ms = int(retry_s * 1000)
        self._skip_until_ms = 0
        self._down_since_ms: int | None = None
        self.errors = 0

    async def hit(
        self, slot: tuple[str, int], limit: Limit, key: str, *, count: bool, refuse: bool
    ) -> int | None:
        """See `WindowCounter.hit`."""
        if self._clock.monotonic_ms() >= self._skip_until_ms:
            try:
                async with asyncio.timeout(self._timeout_s):
                    result = await self._redis.hit(slot, limit, key, count=count, refuse=refuse)
            except Exception as exc:
                self._failed(exc)
            else:
                self._recovered()
                return result
        if slot[0] in self._fail_open:
            return None
        return await self._memory.hit(slot, limit, key, count=count, refuse=refuse)

    def status(self) -> str:
        """ "ok", or how the limits work while the storage is down."""
        if self._down_since_ms is None:
            return "ok"
        seconds = (self._clock.monotonic_ms() - self._down_since_ms) // 1000
        return (
            f"degraded: the rate-limit storage has not answered for {seconds} s; sign-in and "
            "other limits count in this process, per-session and per-user limits are off"
        )

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._on_error()
        now = self._clock.monotonic_ms()
        self._skip_until_ms = now + self._retry_ms
        if self._down_since_ms is None:
            self._down_since_ms = now
            log.error(
                "rate-limit storage unavailable; limits fall back to this process",
                extra={"error": f"{type(exc).__name__}: {exc}"[:300]},
            )

    def _recovered(self) -> None:
        if self._down_since_ms is not None:
            seconds = (self._clock.monotonic_ms() - self._down_since_ms) / 1000
            self._down_since_ms = None
            log.warning("rate-limit storage is back", extra={"outage_s": round(seconds, 1)})


class Counters:
    """The counter for RATE_LIMIT_STORAGE_URL, and how it is doing."""

    def __init__(
        self,
        url: str,
        *,
        clock: Clock,
        fail_open: frozenset[str],
        on_error: Callable[[], None] = lambda: None,
        timeout_s: float = REDIS_TIMEOUT_S,
    ) -> None:
        url = url.removeprefix("async+")
        memory = MemoryCounter(now=lambda: clock.monotonic_ms() / 1000)
        self.fallback: FallbackCounter | None = None
        self.counter: WindowCounter = memory
        if not url.startswith("memory://"):
            redis = RedisCounter(url, timeout_s=timeout_s)
            self.fallback = FallbackCounter(
                redis,
                memory,
                fail_open=fail_open,
                clock=clock,
                on_error=on_error,
                timeout_s=timeout_s,
            )
            self.counter = self.fallback

    async def status(self) -> str:
        """ "ok", or how the limits work while Redis is down (a readiness dependency)."""
        return "ok" if self.fallback is None else self.fallback.status()

    @property
    def errors(self) -> int:
        """Calls that Redis failed or did not answer in time."""
        return 0 if self.fallback is None else self.fallback.errors


def counter_from_url(
    url: str,
    *,
    clock: Clock,
    fail_open: frozenset[str] = frozenset(),
    timeout_s: float = REDIS_TIMEOUT_S,
) -> WindowCounter:
    """The counter for RATE_LIMIT_STORAGE_URL (`memory://` or `redis://host:port`)."""
    return Counters(url, clock=clock, fail_open=fail_open, timeout_s=timeout_s).counter
