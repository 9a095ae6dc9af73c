"""PostgreSQL stopped and started again under load, twice: the replicas ride it out.

A PostgreSQL server of the test's own (tests/support/postgres_server.py) is
stopped with `pg_ctl stop -m fast` (clients disconnected, a clean shutdown) and
later with `-m immediate` (as a crash: the next start replays the WAL), each
while clients sign in on both replicas and read their sessions back. While it is
down, clients get `unavailable` within the server's deadline (never `internal`,
never a hang, never `unauthenticated` for a session that exists), /readyz says
not ready and the processes stay up. Once it is back, calls succeed again without
restarting anything (the connection pools recover), /readyz is ready again, and
every sign-in acknowledged before, between or after the outages is in the
database and works.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.config import Config
from tests.reliability.harness import log_faults
from tests.replicas.cluster import (
    Call,
    Load,
    count,
    not_working,
    readyz,
    replica_env,
    start_replicas,
    stop_all,
    stored_session_ids,
    wait_for,
)
from tests.support.google import FakeGoogle
from tests.support.postgres_server import PostgresServer
from tests.support.redis import RedisServer
from tests.support.server import RunningServer

# Calls of each kind each replica must have answered in each phase before the next.
EVIDENCE = 3
# The server's own deadline on a call (REQUEST_TIMEOUT_SECONDS); within it, each
# store call is bounded too (DATABASE_CONNECT_TIMEOUT_SECONDS +
# DATABASE_STATEMENT_TIMEOUT_MS). An answer later than this is a hang.
DEADLINE_S: float = Config.model_fields["request_timeout_seconds"].default


@pytest.fixture
def database() -> Iterator[PostgresServer]:
    """The test's own PostgreSQL, running."""
    server = PostgresServer().init()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def each_replica_answered(
    code: str, *, since: float, procedure: str | None = None
) -> Callable[[list[Call]], bool]:
    """Whether each replica has answered EVIDENCE calls (of `procedure`, or any) with
    `code` since `since`."""
    match = {"code": code} | ({"procedure": procedure} if procedure else {})

    def check(calls: list[Call]) -> bool:
        return all(count(calls, since, replica=r, **match) >= EVIDENCE for r in "ab")

    return check


def readyz_is(server: RunningServer, status: int) -> Callable[[], bool]:
    """Whether the replica's /readyz answers `status`."""
    return lambda: readyz(server) == status


def test_postgresql_restarted_under_load_costs_unavailable_answers_only(
    tmp_path: Path, google: FakeGoogle, redis: RedisServer, database: PostgresServer
) -> None:
    a, b = start_replicas(
        tmp_path, replica_env(google, database_url=database.url, redis_url=redis.url)
    )
    replicas = {"a": a, "b": b}
    try:
        with Load(replicas, google, clients=4, pause_s=0.05) as load:
            load.wait_until(
                "sign-ins work on both replicas",
                each_replica_answered("ok", since=0, procedure="SignIn"),
            )
            for mode in ("fast", "immediate"):
                database.stop(mode)
                down_at = time.monotonic()
                for server in replicas.values():
                    wait_for(f"/readyz fails ({mode})", readyz_is(server, 503))
                load.wait_until(
                    f"both replicas answer unavailable while PostgreSQL is down ({mode})",
                    each_replica_answered("unavailable", since=down_at),
                )
                assert all(s.process.poll() is None for s in replicas.values())
                database.start()
                up_at = time.monotonic()
                for server in replicas.values():
                    wait_for(f"/readyz passes ({mode})", readyz_is(server, 200))
                load.wait_until(
                    f"sign-ins work again on both replicas ({mode})",
                    each_replica_answered("ok", since=up_at, procedure="SignIn"),
                )
        calls = load.snapshot()
        slowest = max(calls, key=lambda c: c.seconds)
        print(f"\nreplicas: PostgreSQL restarted twice under load: {load.summary()}")
        print(f"replicas: slowest call {slowest.seconds:.2f} s ({slowest.procedure})")

        codes = Counter(c.code for c in calls)
        assert set(codes) <= {"ok", "unavailable"}, codes
        assert slowest.seconds < DEADLINE_S, slowest
        assert all(s.process.poll() is None for s in replicas.values())

        acknowledged = load.acknowledged
        stored = stored_session_ids(database.url)
        lost = [s for s in acknowledged if s.session_id not in stored]
        assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged sign-ins lost"
        for name, server in replicas.items():
            assert not_working(server, acknowledged) == [], name
            assert log_faults(server) == []
    finally:
        assert stop_all([a, b]) == []
