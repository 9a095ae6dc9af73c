"""The Throttle over the real counters: in memory, and Redis shared by two replicas."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from server.domain.clock import Clock, SystemClock
from server.domain.errors import RateLimited
from server.domain.throttle import Throttle
from server.storage.limits import MemoryWindows, counter_from_url, parse_limits
from tests.support.clock import ManualClock

REDIS = "redis://127.0.0.1:6379"


def make(url: str, specs: dict[str, str], clock: Clock | None = None) -> Throttle:
    """A Throttle as create_app builds one."""
    counter = counter_from_url(url, clock=clock or SystemClock())
    return Throttle(counter, {name: parse_limits(spec) for name, spec in specs.items()})


async def outcomes(throttle: Throttle, key: str, n: int) -> list[bool]:
    async def one() -> bool:
        try:
            await throttle.hit("p", key, what="too many")
        except RateLimited:
            return False
        return True

    return list(await asyncio.gather(*(one() for _ in range(n))))


def test_concurrent_hits_never_exceed_the_limit_in_memory() -> None:
    throttle = make("memory://", {"p": "10/minute"})
    results = asyncio.run(outcomes(throttle, "k", 50))
    assert results.count(True) == 10


def test_every_limit_of_a_policy_holds() -> None:
    throttle = make("memory://", {"p": "100/minute;3/second"})
    assert asyncio.run(outcomes(throttle, "k", 5)).count(True) == 3


def test_refusal_says_what_and_when() -> None:
    throttle = make("memory://", {"p": "1/hour"})

    async def run() -> RateLimited:
        await throttle.hit("p", "k", what="too many sign-ins")
        with pytest.raises(RateLimited) as err:
            await throttle.hit("p", "k", what="too many sign-ins")
        return err.value

    error = asyncio.run(run())
    assert error.message.startswith("too many sign-ins; try again in ")
    assert 1 <= error.retry_after_s <= 3600


class FakeTime:
    """Seconds since the epoch, moved by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fits(windows: MemoryWindows, n: int, key: str = "k") -> int:
    return sum(windows.hit(key) for _ in range(n))


def test_previous_window_is_weighted_by_its_overlap() -> None:
    clock = FakeTime(600.0)  # a window edge for 1-minute windows
    windows = MemoryWindows(10, 60, now=clock)
    assert fits(windows, 11) == 10
    clock.now = 660.0  # the next window: all 10 still weigh fully
    assert fits(windows, 3) == 0
    clock.now = 690.0  # half-way: they weigh 5, so 5 more fit
    assert fits(windows, 10) == 5
    clock.now = 780.5  # two windows on: nothing is left
    assert fits(windows, 12) == 10


def test_retry_after_is_when_one_more_request_fits() -> None:
    clock = FakeTime(600.0)
    windows = MemoryWindows(10, 60, now=clock)
    fits(windows, 10)
    assert windows.retry_after_s("k") == 60
    clock.now = 660.0
    assert not windows.hit("k")
    clock.now = 660.01
    assert windows.hit("k")

    clock = FakeTime(600.0)
    windows = MemoryWindows(10, 60, now=clock)
    fits(windows, 10)
    clock.now = 675.0  # previous weighs 7.5: three fit, then full until 678
    assert fits(windows, 5) == 3
    assert windows.retry_after_s("k") == 3
    clock.now = 677.9
    assert not windows.hit("k")
    clock.now = 678.01
    assert windows.hit("k")


def test_check_and_record_do_not_count_or_refuse() -> None:
    windows = MemoryWindows(2, 60, now=FakeTime(600.0))
    assert windows.hit("k", count=False) and windows.hit("k", count=False)
    assert fits(windows, 2) == 2
    assert not windows.hit("k", refuse=False)  # full, but counted anyway
    assert windows.retry_after_s("k") == 60 + 20  # 3 weigh under 2 after 1/3 of the next


def test_counts_of_ended_windows_are_dropped() -> None:
    clock = FakeTime(600.0)
    windows = MemoryWindows(10, 60, now=clock)
    for i in range(1000):
        windows.hit(f"k{i}")
    assert len(windows) == 1000
    clock.now = 600.0 + 180  # both windows of every key have ended
    windows.hit("fresh")
    assert len(windows) == 1


def test_throttle_refusal_quotes_the_exact_wait() -> None:
    clock = ManualClock()
    clock.mono = 600_000  # on a window boundary
    throttle = make("memory://", {"p": "2/minute"}, clock)

    async def run() -> RateLimited:
        await throttle.hit("p", "k", what="too many")
        await throttle.hit("p", "k", what="too many")
        clock.advance(45)
        with pytest.raises(RateLimited) as err:
            await throttle.hit("p", "k", what="too many")
        return err.value

    error = asyncio.run(run())
    assert error.retry_after_s == 15
    assert error.message == "too many; try again in 15 s"


REPLICA = """
import asyncio, sys
from server.domain.clock import SystemClock
from server.domain.errors import RateLimited
from server.domain.throttle import Throttle
from server.storage.limits import counter_from_url, parse_limits

async def main() -> None:
    # A deadline of seconds: on a loaded machine the first Redis call can take longer
    # than the production 100 ms, and a counter that falls back to memory counts alone.
    counter = counter_from_url(sys.argv[1], clock=SystemClock(), timeout_s=5.0)
    throttle = Throttle(counter, {"p": parse_limits("10/minute")})
    passed = 0
    for _ in range(25):
        try:
            await throttle.hit("p", sys.argv[2], what="too many")
            passed += 1
        except RateLimited:
            pass
    print(passed)

asyncio.run(main())
"""


def test_replicas_share_counts_through_redis() -> None:
    """Two processes, as two replicas would be, against the machine's Redis."""
    key = secrets.token_hex(8)
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", REPLICA, REDIS, key],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        for _ in range(2)
    ]
    results = [replica.communicate(timeout=60) for replica in replicas]
    assert all(replica.returncode == 0 for replica in replicas), results
    assert sum(int(out) for out, _ in results) == 10
