"""Rate limits by named policy, on the maintained `limits` library.

Each policy is a list of limits such as `10/minute;60/hour`, all of which must
hold. The sliding-window-counter strategy weighs the previous window's count by
how much of it still overlaps (no burst at a window edge, unlike fixed windows)
and costs two counters per key instead of a timestamp per hit: measured 1.3x the
hot-path throughput of the moving window (bench/variants.py). Each hit is an
atomic check-and-count in the storage, so concurrent requests cannot overshoot.
Storage is in memory by default; `redis://host:port` shares the counts between
replicas.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from limits import RateLimitItem, parse_many
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from server.domain.errors import RateLimited

# The policies; their limits come from the RATE_LIMIT_* settings of the same name.
GLOBAL = "global"
SIGNIN_PER_IP = "signin_per_ip"
SIGNIN_PER_SUBJECT = "signin_per_subject"
FAILED_SIGNIN_PER_IP = "failed_signin_per_ip"
UNAUTHENTICATED_PER_IP = "unauthenticated_per_ip"
PER_SESSION = "per_session"
PER_USER = "per_user"
EXPORT_PER_USER = "export_per_user"
POLICIES = (
    GLOBAL,
    SIGNIN_PER_IP,
    SIGNIN_PER_SUBJECT,
    FAILED_SIGNIN_PER_IP,
    UNAUTHENTICATED_PER_IP,
    PER_SESSION,
    PER_USER,
    EXPORT_PER_USER,
)


class Throttle:
    """Named rate-limit policies over one storage."""

    def __init__(self, storage_url: str, policies: Mapping[str, str]) -> None:
        url = storage_url if storage_url.startswith("async+") else f"async+{storage_url}"
        self._limiter = SlidingWindowCounterRateLimiter(storage_from_string(url))
        self._policies: dict[str, tuple[RateLimitItem, ...]] = {
            name: tuple(parse_many(spec)) for name, spec in policies.items()
        }

    async def hit(self, policy: str, key: str, *, what: str) -> None:
        """Count one request against every limit of `policy` for `key`.

        Raises:
            RateLimited: A limit is exhausted; the message says `what` and when to retry.
        """
        for item in self._policies[policy]:
            if not await self._limiter.hit(item, policy, key):
                raise await self._refusal(item, policy, key, what)

    async def check(self, policy: str, key: str, *, what: str) -> None:
        """Refuse if `policy` is exhausted for `key`, without counting a request."""
        for item in self._policies[policy]:
            if not await self._limiter.test(item, policy, key):
                raise await self._refusal(item, policy, key, what)

    async def record(self, policy: str, key: str) -> None:
        """Count an event (such as a failed sign-in) without refusing anything."""
        for item in self._policies[policy]:
            await self._limiter.hit(item, policy, key)

    async def _refusal(self, item: RateLimitItem, policy: str, key: str, what: str) -> RateLimited:
        stats = await self._limiter.get_window_stats(item, policy, key)
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        return RateLimited(f"{what}; try again in {retry} s", retry_after_s=retry)
