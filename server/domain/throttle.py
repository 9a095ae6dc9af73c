"""Rate limits by named policy: the sliding-window counter, in memory or in Redis.

Each policy is a list of limits such as `10/minute;60/hour` (parsed by the
`limits` library), all of which must hold. The sliding-window counter weighs
the previous window's count by how much of it still overlaps (no burst at a
window edge, unlike fixed windows) and keeps two counters per key. Each hit is
an atomic check-and-count, so concurrent requests cannot overshoot.

- `redis://host:port` shares the counts between replicas, through `limits`'
  own Redis storage and strategy.
- `memory://` (the default) keeps them in this process, in `MemoryWindows`: the
  same algorithm as `limits`' strategy, done in place. `limits`' memory storage
  cost ~20 us per hit (an asyncio lock, two key lookups and an expiry pass over
  every key in a worker thread every 10 ms); the hot path makes three hits per
  call, which was ~15 % of its CPU (bench/variants.py, `no_limits`). Here a hit
  is two dict lookups and an integer update, and old windows are dropped whole.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import threading
import time
from collections.abc import Callable, Mapping

from limits import RateLimitItem, parse_many
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from server.domain.errors import RateLimited

# The policies; their limits come from the RATE_LIMIT_* settings of the same name.
GLOBAL = "global"
SIGNIN_PER_IP = "signin_per_ip"
SIGNIN_PER_SUBJECT = "signin_per_subject"
FAILED_SIGNIN_PER_IP = "failed_signin_per_ip"
FAILED_SIGNIN_PER_SUBJECT = "failed_signin_per_subject"
UNAUTHENTICATED_PER_IP = "unauthenticated_per_ip"
PROBE_PER_IP = "probe_per_ip"
PER_SESSION = "per_session"
PER_USER = "per_user"
EXPORT_PER_USER = "export_per_user"
POLICIES = (
    GLOBAL,
    SIGNIN_PER_IP,
    SIGNIN_PER_SUBJECT,
    FAILED_SIGNIN_PER_IP,
    FAILED_SIGNIN_PER_SUBJECT,
    UNAUTHENTICATED_PER_IP,
    PROBE_PER_IP,
    PER_SESSION,
    PER_USER,
    EXPORT_PER_USER,
)


@functools.lru_cache(maxsize=4096)
def network_key(ip: str, ipv6_prefix: int) -> str:
    """The key of a client address for per-IP limits.

    IPv4 addresses are keyed one by one. An IPv6 client is its /`ipv6_prefix`
    network (a /64 by default): one host commonly holds a whole /64 (SLAAC,
    privacy addresses) and can pick a new address per request. IPv4-mapped IPv6
    addresses count as the IPv4 address.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


class MemoryWindows:
    """Sliding-window counters for one limit (`amount` per `window_s`), in memory.

    Windows are aligned to the epoch, as in `limits`. Counts are kept per window
    (window index -> key -> count); only the current and the previous window are
    read, and a window's counts are dropped as a whole once it is two windows old,
    so memory follows the keys seen recently and no pass over the keys is needed.
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


class Throttle:
    """Named rate-limit policies over one storage."""

    def __init__(
        self,
        storage_url: str,
        policies: Mapping[str, str],
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._policies: dict[str, tuple[RateLimitItem, ...]] = {
            name: tuple(parse_many(spec)) for name, spec in policies.items()
        }
        self._now = now
        url = storage_url.removeprefix("async+")
        self._memory: dict[tuple[str, int], MemoryWindows] | None = None
        self._limiter: SlidingWindowCounterRateLimiter | None = None
        if url.startswith("memory://"):
            self._memory = {
                (name, i): MemoryWindows(item.amount, item.get_expiry(), now=now)
                for name, items in self._policies.items()
                for i, item in enumerate(items)
            }
        else:
            self._limiter = SlidingWindowCounterRateLimiter(storage_from_string(f"async+{url}"))

    async def hit(self, policy: str, key: str, *, what: str) -> None:
        """Count one request against every limit of `policy` for `key`.

        Raises:
            RateLimited: A limit is exhausted; the message says `what` and when to retry.
        """
        await self._apply(policy, key, what=what, count=True, refuse=True)

    async def check(self, policy: str, key: str, *, what: str) -> None:
        """Refuse if `policy` is exhausted for `key`, without counting a request."""
        await self._apply(policy, key, what=what, count=False, refuse=True)

    async def record(self, policy: str, key: str) -> None:
        """Count an event (such as a failed sign-in) without refusing anything."""
        await self._apply(policy, key, what="", count=True, refuse=False)

    async def _apply(self, policy: str, key: str, *, what: str, count: bool, refuse: bool) -> None:
        memory = self._memory
        for i, item in enumerate(self._policies[policy]):
            if memory is not None:
                windows = memory[policy, i]
                if not windows.hit(key, count=count, refuse=refuse) and refuse:
                    raise _refusal(what, windows.retry_after_s(key))
                continue
            assert self._limiter is not None
            if count:
                fits = await self._limiter.hit(item, policy, key)
            else:
                fits = await self._limiter.test(item, policy, key)
            if not fits and refuse:
                stats = await self._limiter.get_window_stats(item, policy, key)
                raise _refusal(what, math.ceil(stats.reset_time - self._now()))


def _refusal(what: str, retry_s: int) -> RateLimited:
    retry = max(1, retry_s)
    return RateLimited(f"{what}; try again in {retry} s", retry_after_s=retry)
