"""One replica killed with SIGKILL under load: the other keeps serving, and nothing
either of them acknowledged is lost.

Clients sign in as new users on the replicas in turn and read each new session
back on the other replica. Replica B is killed (Envoy, which runs the app, and its
parent) while calls are in flight on both. Calls to B then fail to connect, as
they would until a load balancer takes B out; every call to A, before, during and
after the kill, must succeed; and every sign-in a client got a session cookie
for, from either replica, must be in the database and work on A.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from tests.reliability.harness import kill_hard, log_faults
from tests.replicas.cluster import (
    Call,
    Load,
    count,
    not_working,
    replica_env,
    since,
    start_replicas,
    stop_all,
    stored_session_ids,
)
from tests.support import postgres
from tests.support.google import FakeGoogle
from tests.support.redis import RedisServer

BEFORE = 10  # acknowledged sign-ins on each replica before the kill
AFTER = 20  # acknowledged sign-ins on A after it


def test_killing_one_replica_under_load_loses_nothing_acknowledged(
    tmp_path: Path, google: FakeGoogle, redis: RedisServer
) -> None:
    with postgres.database(migrated=False) as url:
        a, b = start_replicas(tmp_path, replica_env(google, database_url=url, redis_url=redis.url))
        try:
            with Load({"a": a, "b": b}, google, clients=4) as load:
                load.wait_until(
                    f"{BEFORE} sign-ins acknowledged on each replica",
                    lambda calls: min(signed_in(calls, r, since=0) for r in "ab") >= BEFORE,
                )
                killed_at = time.monotonic()
                kill_hard(b)
                load.wait_until(
                    f"{AFTER} sign-ins acknowledged on A after the kill",
                    lambda calls: signed_in(calls, "a", since=killed_at) >= AFTER,
                )
            calls = load.snapshot()
            acknowledged = load.acknowledged
            print(f"\nreplicas: kill -9 of B under load: {load.summary()}")

            on_a = Counter(c.code for c in calls if c.replica == "a")
            assert set(on_a) == {"ok"}, on_a
            on_b_after = Counter(c.code for c in since(calls, killed_at, replica="b"))
            assert set(on_b_after) <= {"dropped"}, on_b_after
            assert a.process.poll() is None
            assert not [c for c in calls if c.replica == "b" and c.code not in ("ok", "dropped")]

            stored = stored_session_ids(url)
            lost = [s for s in acknowledged if s.session_id not in stored]
            assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged sign-ins lost"
            assert not_working(a, acknowledged) == []
            assert log_faults(a) == []
        finally:
            assert stop_all([a, b]) == []


def signed_in(calls: list[Call], replica: str, *, since: float) -> int:
    """How many sign-ins `replica` acknowledged in calls started at or after `since`."""
    return count(calls, since, replica=replica, procedure="SignIn", code="ok")
