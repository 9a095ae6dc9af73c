"""The Throttle over real storages: in memory, and Redis shared by two replicas."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from server.domain.errors import RateLimited
from server.domain.throttle import Throttle

REDIS = "redis://127.0.0.1:6379"


async def outcomes(throttle: Throttle, key: str, n: int) -> list[bool]:
    async def one() -> bool:
        try:
            await throttle.hit("p", key, what="too many")
        except RateLimited:
            return False
        return True

    return list(await asyncio.gather(*(one() for _ in range(n))))


def test_concurrent_hits_never_exceed_the_limit_in_memory() -> None:
    throttle = Throttle("memory://", {"p": "10/minute"})
    results = asyncio.run(outcomes(throttle, "k", 50))
    assert results.count(True) == 10


def test_every_limit_of_a_policy_holds() -> None:
    throttle = Throttle("memory://", {"p": "100/minute;3/second"})
    assert asyncio.run(outcomes(throttle, "k", 5)).count(True) == 3


def test_refusal_says_what_and_when() -> None:
    throttle = Throttle("memory://", {"p": "1/hour"})

    async def run() -> RateLimited:
        await throttle.hit("p", "k", what="too many sign-ins")
        with pytest.raises(RateLimited) as err:
            await throttle.hit("p", "k", what="too many sign-ins")
        return err.value

    error = asyncio.run(run())
    assert error.message.startswith("too many sign-ins; try again in ")
    assert 1 <= error.retry_after_s <= 3600


REPLICA = """
import asyncio, sys
from server.domain.errors import RateLimited
from server.domain.throttle import Throttle

async def main() -> None:
    throttle = Throttle(sys.argv[1], {"p": "10/minute"})
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
