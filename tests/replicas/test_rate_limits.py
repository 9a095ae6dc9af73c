"""Rate limits are shared by the replicas (Redis): an attacker who spreads its calls
over both gets the limit once, not once per replica.

The limits here are small and per day, so that the whole burst falls in one window:
Redis' sliding window starts at a key's first hit, and each attempt of the test
uses an attacker address (X-Forwarded-For from a trusted proxy) never seen before.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from tests.reliability.harness import Conn
from tests.replicas.cluster import SIGN_IN, outcome, replica_env, start_replicas, stop_all
from tests.replicas.conftest import Pair
from tests.support import postgres
from tests.support.google import FakeGoogle
from tests.support.http import request
from tests.support.redis import RedisServer
from tests.support.server import RunningServer

SIGN_INS_PER_ADDRESS = 6
FAILED_SIGN_INS_PER_ADDRESS = 4
ATTEMPTS = 24  # 12 on each replica: without sharing, each would let the limit through
# A measurement is void when a replica could not reach Redis in time for a call
# (it then counts in memory: docs/security.md, "When Redis fails"); it is taken
# again from a new address, at most this many times.
MEASUREMENTS = 3
STORAGE_ERRORS = "expense_auth_rate_limit_storage_errors_total"


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle, redis: RedisServer
) -> Iterator[Pair]:
    """Two replicas with small per-address sign-in limits, counted in one Redis."""
    with postgres.database(migrated=False) as url:
        env = replica_env(
            google,
            database_url=url,
            redis_url=redis.url,
            TRUSTED_PROXIES="127.0.0.1/32",
            RATE_LIMIT_SIGNIN_PER_IP=f"{SIGN_INS_PER_ADDRESS}/day",
            RATE_LIMIT_FAILED_SIGNIN_PER_IP=f"{FAILED_SIGN_INS_PER_ADDRESS}/day",
        )
        a, b = start_replicas(tmp_path_factory.mktemp("limited"), env)
        yield Pair(a, b, url)
        assert stop_all([a, b]) == []


def storage_errors(server: RunningServer) -> float:
    """How many times the replica failed to reach Redis in time (its /metrics)."""
    metrics = request(server.admin_url, "GET", "/metrics", timeout=30).body.decode()
    for line in metrics.splitlines():
        if line.startswith(STORAGE_ERRORS + " "):
            return float(line.split()[1])
    raise AssertionError(f"{STORAGE_ERRORS} is missing from /metrics")


def attacker_address() -> str:
    """A documentation address (198.18.0.0/15) not used before."""
    return f"198.{18 + secrets.randbelow(2)}.{secrets.randbelow(256)}.{secrets.randbelow(256)}"


def hammer(pair: Pair, token: Callable[[], str]) -> Counter[str]:
    """ATTEMPTS sign-ins from one new address, alternately on A and B; their outcomes."""
    address = attacker_address()
    conns = [Conn(server.port) for server in pair.servers]
    try:
        replies = [
            conns[i % 2].request(
                "POST",
                SIGN_IN,
                json.dumps({"googleIdToken": token()}).encode(),
                [
                    ("content-type", "application/json"),
                    ("connect-protocol-version", "1"),
                    ("x-forwarded-for", address),
                ],
            )
            for i in range(ATTEMPTS)
        ]
    finally:
        for conn in conns:
            conn.close()
    return Counter(outcome(reply) for reply in replies)


def measured(pair: Pair, token: Callable[[], str]) -> Counter[str]:
    """The outcomes of a burst during which both replicas reached Redis every time."""
    for _ in range(MEASUREMENTS):
        before = [storage_errors(server) for server in pair.servers]
        outcomes = hammer(pair, token)
        if [storage_errors(server) for server in pair.servers] == before:
            return outcomes
    raise AssertionError(f"Redis was late for a call in each of {MEASUREMENTS} bursts")


def test_sign_ins_from_one_address_are_limited_across_replicas(
    limited: Pair, google: FakeGoogle
) -> None:
    def new_user() -> str:
        sub = secrets.token_hex(8)
        return google.token(sub=sub, email=f"{sub}@example.com")

    outcomes = measured(limited, new_user)

    assert outcomes == {
        "ok": SIGN_INS_PER_ADDRESS,
        "resource_exhausted": ATTEMPTS - SIGN_INS_PER_ADDRESS,
    }, outcomes


def test_failed_sign_ins_from_one_address_are_limited_across_replicas(
    limited: Pair, google: FakeGoogle
) -> None:
    def token_for_another_app() -> str:
        # Genuine and signed by Google, but for another audience: refused after
        # verification, so it counts as a failed sign-in.
        return google.token(sub=secrets.token_hex(8), aud="another-app.apps.googleusercontent.com")

    outcomes = measured(limited, token_for_another_app)

    # The attacker learns the answer for the first few tokens only; every later
    # attempt, on either replica, is refused before anything is said about its token.
    assert outcomes == {
        "unauthenticated": FAILED_SIGN_INS_PER_ADDRESS,
        "resource_exhausted": ATTEMPTS - FAILED_SIGN_INS_PER_ADDRESS,
    }, outcomes
