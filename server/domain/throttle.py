"""Rate limits by named policy, and how a client is keyed.

Each policy is a list of limits such as `10/minute;60/hour`, all of which must
hold. The counts live behind the `WindowCounter` port: in this process's memory
by default, or in Redis shared by replicas (server/storage/limits.py). Each hit
is an atomic check-and-count, so concurrent requests cannot overshoot.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

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

# When the shared counter storage (Redis) fails, each limit decides: these may
# pass everything for the outage (they keep one signed-in user from hogging the
# server, which the global limit also bounds), while every other limit counts in
# this process's memory instead: sign-in and failed sign-ins are never an open
# door, and nothing becomes an outage (docs/security.md, "When Redis fails").
FAIL_OPEN = frozenset({PER_SESSION, PER_USER})


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


@dataclass(frozen=True, slots=True)
class Limit:
    """At most `amount` requests per `window_s` seconds (a sliding-window counter)."""

    amount: int
    window_s: int


class WindowCounter(Protocol):
    """Where the counts live: this process's memory, or Redis shared by replicas."""

    async def hit(
        self, slot: tuple[str, int], limit: Limit, key: str, *, count: bool, refuse: bool
    ) -> int | None:
        """Weigh one more request for `key` against `limit` (one of a policy's limits).

        Returns None when it fits, counting it if `count`; else the whole seconds
        until one more would fit (counting it anyway when `refuse` is off).
        """
        ...


class Throttle:
    """Named rate-limit policies, each a list of limits that must all hold."""

    def __init__(self, counter: WindowCounter, policies: Mapping[str, Sequence[Limit]]) -> None:
        self._counter = counter
        self._policies = {name: tuple(limits) for name, limits in policies.items()}

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
        for i, limit in enumerate(self._policies[policy]):
            wait_s = await self._counter.hit((policy, i), limit, key, count=count, refuse=refuse)
            if wait_s is not None and refuse:
                raise _refusal(what, wait_s)


def _refusal(what: str, retry_s: int) -> RateLimited:
    retry = max(1, retry_s)
    return RateLimited(f"{what}; try again in {retry} s", retry_after_s=retry)
