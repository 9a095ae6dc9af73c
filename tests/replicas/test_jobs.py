"""Periodic jobs run once per period for the whole cluster, and a replica killed in
the middle of one leaves nothing half done.

Both replicas read one file clock (tests/support/clock.py), as two machines read
one synchronised wall clock; it stands still unless the test moves it, so a
period is exactly the time between two of the test's steps. The retention job
runs every second (RETENTION_INTERVAL_SECONDS=1) on each replica, and each run
first claims its period in `job_runs`. Triggers the test adds to that table
record every attempt and every claim, with the client port of the database
connection that made it; /proc tells which replica owns that port.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.reliability.harness import Conn, kill_hard, sign_in
from tests.replicas.cluster import (
    Cluster,
    Database,
    database_ports,
    replica_env,
    wait_for,
)
from tests.support import postgres
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.redis import RedisServer
from tests.support.server import RunningServer

INTERVAL_S = 1
PERIODS = 5
JOB = "retention"
DAY_S = 86_400
# Far enough for every session (12 h at most) and sign-in event (kept 365 days) to
# be past its retention window.
LATER_S = 400 * DAY_S

# Every attempt to claim a period, and every claim, with the connection's client port.
RECORD_CLAIMS = """
CREATE TABLE test_job_attempts (
    seq BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    client_port INTEGER NOT NULL,
    claimed BOOLEAN NOT NULL
);
CREATE FUNCTION test_job_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_job_attempts (name, at_ms, client_port, claimed)
    VALUES (NEW.name, NEW.last_run_ms, inet_client_port(), TG_WHEN = 'AFTER');
    RETURN NEW;
END $$;
-- BEFORE INSERT fires for every attempt (ON CONFLICT or not); AFTER INSERT OR
-- UPDATE only when the row was written: when the period was claimed.
CREATE TRIGGER test_job_attempt BEFORE INSERT ON job_runs
    FOR EACH ROW EXECUTE FUNCTION test_job_attempt();
CREATE TRIGGER test_job_claim AFTER INSERT OR UPDATE ON job_runs
    FOR EACH ROW EXECUTE FUNCTION test_job_attempt();
"""


@pytest.fixture(scope="module")
def clock(tmp_path_factory: pytest.TempPathFactory) -> FileClock:
    """The cluster's wall clock, standing still from before the replicas start."""
    return FileClock(tmp_path_factory.mktemp("jobs-clock") / "now").freeze()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    google: FakeGoogle,
    clock: FileClock,
    redis: RedisServer,
) -> Iterator[Cluster]:
    """Two replicas running the retention job every second on one database (and
    sharing rate limits in Redis, as replicas must: database 1, apart from the pair's)."""
    with postgres.database() as url:
        db = Database(url)
        try:
            db.execute(RECORD_CLAIMS)
        finally:
            db.close()
        env = replica_env(
            google,
            database_url=url,
            redis_url=f"{redis.url}/1",
            RETENTION_INTERVAL_SECONDS=str(INTERVAL_S),
            # A statement waiting for a lock (below) waits; by default it gives up
            # after 2 s, before the test could kill its replica.
            DATABASE_STATEMENT_TIMEOUT_MS="120000",
        )
        cluster = Cluster(tmp_path_factory.mktemp("jobs"), env, clock=clock).start()
        yield cluster
        assert cluster.stop() == []


@pytest.fixture
def db(cluster: Cluster) -> Iterator[Database]:
    """A connection to the cluster's database."""
    url = cluster.replicas()[0].env["DATABASE_URL"]
    conn = Database(url)
    yield conn
    conn.close()


def owners(db: Database, servers: list[RunningServer]) -> dict[int, str]:
    """Which replica (`a`, `b`) owns each of the database's client ports now."""
    found: dict[int, str] = {}
    for name, server in zip("ab", servers, strict=True):
        for port in database_ports(server, db.url):
            found[port] = name
    return found


def attempts(db: Database, at_ms: int, *, claimed: bool) -> list[int]:
    """The client ports of the attempts (or the claims) of the job's period at `at_ms`."""
    rows = db.fetch(
        "SELECT client_port FROM test_job_attempts WHERE name = $1 AND at_ms = $2 "
        "AND claimed = $3 ORDER BY seq",
        JOB,
        at_ms,
        claimed,
    )
    return [row[0] for row in rows]


def test_each_period_of_a_job_runs_once_in_the_cluster(
    cluster: Cluster, clock: FileClock, db: Database
) -> None:
    servers = cluster.replicas()
    periods: list[int] = []
    for period in range(PERIODS):
        if period:
            clock.advance(INTERVAL_S)
        at = clock.now_ms()
        periods.append(at)

        def both_tried(at: int = at) -> bool:
            # Each replica tries once a second; one of them wins the period.
            ports = owners(db, servers)
            tried = {ports.get(port) for port in attempts(db, at, claimed=False)}
            return tried >= {"a", "b"} and bool(attempts(db, at, claimed=True))

        wait_for(f"both replicas tried period {period}", both_tried)

    claims = {at: attempts(db, at, claimed=True) for at in periods}
    assert all(len(ports) == 1 for ports in claims.values()), claims
    every_claim = db.fetch("SELECT at_ms FROM test_job_attempts WHERE name = $1 AND claimed", JOB)
    assert sorted(row[0] for row in every_claim) == periods
    assert db.value("SELECT last_run_ms FROM job_runs WHERE name = $1", JOB) == periods[-1]
    ports = owners(db, servers)
    winners = [ports.get(port, "?") for ports_ in claims.values() for port in ports_]
    print(f"\nreplicas: {PERIODS} periods of {JOB}, each claimed once, by {winners}")


def history(db: Database, user_ids: list[str]) -> tuple[int, int]:
    """(sessions, audit events) of these users."""
    sessions = db.value("SELECT count(*) FROM sessions WHERE user_id = ANY($1::text[])", user_ids)
    events = db.value("SELECT count(*) FROM audit_events WHERE user_id = ANY($1::text[])", user_ids)
    return int(sessions), int(events)


def test_a_replica_killed_in_the_middle_of_a_job_leaves_nothing_half_done(
    cluster: Cluster, clock: FileClock, google: FakeGoogle, db: Database
) -> None:
    servers = cluster.replicas()
    user_ids = []
    for i in range(4):
        conn = Conn(servers[i % 2].port)
        try:
            sub = secrets.token_hex(8)
            user_ids.append(sign_in(conn, google.token(sub=sub, email=f"{sub}@x.test")).user_id)
        finally:
            conn.close()
    before = history(db, user_ids)
    assert before[0] == 4 and before[1] >= 4, before

    # The test holds a lock on one of these events: the run that comes deletes the
    # old sessions, then waits for the lock in its second statement, half done.
    holder = Database(db.url)
    try:
        holder.execute("BEGIN")
        holder.fetch(
            "SELECT id FROM audit_events WHERE user_id = ANY($1::text[]) ORDER BY id LIMIT 1 "
            "FOR UPDATE",
            user_ids,
        )
        clock.advance(LATER_S)
        halfway = clock.now_ms()
        blocked: list[tuple[int, int]] = []

        def waits_for_the_lock() -> bool:
            blocked[:] = db.fetch(
                "SELECT pid, client_port FROM pg_stat_activity WHERE datname = "
                "current_database() AND wait_event_type = 'Lock' "
                "AND query LIKE 'DELETE FROM audit_events%'"
            )
            return bool(blocked)

        wait_for("a retention run waits for the test's lock", waits_for_the_lock)
        ((backend, port),) = blocked
        ports = owners(db, servers)
        victim = servers["ab".index(ports[port])]
        survivor = servers["ab".index(ports[port]) ^ 1]
        claims = attempts(db, halfway, claimed=True)
        assert [ports.get(claim) for claim in claims] == [ports[port]]  # the victim's period
        kill_hard(victim)
        holder.execute("ROLLBACK")
    finally:
        holder.close()

    # Its database session ends once it finds its client gone; nothing it did stays.
    wait_for(
        "the killed replica's database session ends",
        lambda: not db.fetch("SELECT 1 FROM pg_stat_activity WHERE pid = $1", backend),
    )
    assert history(db, user_ids) == before
    assert attempts(db, halfway, claimed=True) == claims  # claimed once: not run again

    # The next period runs on the survivor, whole.
    clock.advance(INTERVAL_S)
    next_period = clock.now_ms()
    wait_for("the survivor applies retention", lambda: history(db, user_ids) == (0, 0))
    (claim,) = attempts(db, next_period, claimed=True)
    assert claim in database_ports(survivor, db.url)
    assert "retention applied" in survivor.logs()
