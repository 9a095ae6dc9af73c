"""Two real server processes on one PostgreSQL database (and one Redis): what the
replica tests share.

Each replica is `expense-auth serve` in a process of its own, with a data
directory of its own, as on two machines; they share only what replicas share in
production: DATABASE_URL, RATE_LIMIT_STORAGE_URL and the cookie signing key. The
tests act on one replica and observe on the other, read the database beside
them, and tell from /proc which replica holds which database connection.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from tests.conftest import server_env
from tests.reliability.harness import (
    AUTH,
    Conn,
    Dropped,
    Reply,
    SignedIn,
    envoy_pid,
    log_faults,
    signed_in,
)
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.http import request
from tests.support.server import RunningServer, start_server

T = TypeVar("T")

SIGN_IN = f"{AUTH}/SignIn"
GET_SESSION = f"{AUTH}/GetSession"
# Shared by every replica of a cluster, as a deployment shares them.
SESSION_SECRET_KEY = secrets.token_urlsafe(32)
ADMIN_TOKEN = secrets.token_urlsafe(32)
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN_TOKEN}"}
# Error codes that mean the server failed, not the client or a dependency.
SERVER_FAULTS = frozenset({"internal", "unknown", "data_loss"})
# Generous for a loaded machine; each wait ends as soon as its condition holds.
WAIT_S = 60.0


def replica_env(
    google: FakeGoogle, *, database_url: str, redis_url: str | None = None, **extra: str
) -> dict[str, str]:
    """The environment every replica of one cluster gets."""
    env = server_env(
        google,
        DATABASE_URL=database_url,
        SESSION_SECRET_KEY=SESSION_SECRET_KEY,
        ADMIN_TOKEN=ADMIN_TOKEN,
        **extra,
    )
    if redis_url is not None:
        env["RATE_LIMIT_STORAGE_URL"] = redis_url
    return env


def start_replicas(
    tmp: Path, env: Mapping[str, str], *, count: int = 2, clock: FileClock | None = None
) -> list[RunningServer]:
    """`count` servers started at the same time (so they also migrate side by side)."""

    def one(i: int) -> RunningServer:
        directory = tmp / f"replica-{i}-{time.monotonic_ns()}"
        directory.mkdir()
        return start_server(directory, env, clock=clock, timeout_s=120)

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(one, i) for i in range(count)]
        started: list[RunningServer] = []
        failure: BaseException | None = None
        for future in futures:
            try:
                started.append(future.result())
            except Exception as exc:  # the others must not be left running
                failure = exc
    if failure is not None:
        for server in started:
            server.stop()
        raise failure
    return started


def stop_all(servers: Sequence[RunningServer]) -> list[str]:
    """Stop every live replica, all at once; the problems, for the caller to assert on:
    a non-zero exit, or a traceback or `internal` answer in a replica's log (killed
    ones included)."""
    live = [server for server in servers if server.process.poll() is None]
    with ThreadPoolExecutor(max_workers=max(1, len(live))) as pool:
        codes = list(pool.map(lambda server: server.stop(), live))
    problems = [
        f"replica on port {server.port} exited {code}:\n{server.logs()[-3000:]}"
        for server, code in zip(live, codes, strict=True)
        if code != 0
    ]
    problems += [
        f"replica on port {server.port} logged: {faults}"
        for server in servers
        if (faults := log_faults(server))
    ]
    return problems


class Cluster:
    """Replicas of one environment. One a test killed is replaced (a new process on
    the same database) when the next test asks for the replicas."""

    def __init__(
        self, tmp: Path, env: Mapping[str, str], *, clock: FileClock | None = None
    ) -> None:
        self._tmp = tmp
        self._env = dict(env)
        self._clock = clock
        self.servers: list[RunningServer] = []

    def start(self) -> Cluster:
        """Start both replicas."""
        self.servers = start_replicas(self._tmp, self._env, clock=self._clock)
        return self

    def replicas(self) -> list[RunningServer]:
        """Both replicas, alive: the dead ones started again."""
        dead = [i for i, server in enumerate(self.servers) if server.process.poll() is not None]
        if dead:
            fresh = start_replicas(self._tmp, self._env, count=len(dead), clock=self._clock)
            for i, server in zip(dead, fresh, strict=True):
                self.servers[i] = server
        return list(self.servers)

    def stop(self) -> list[str]:
        """Stop the live replicas; the problems."""
        return stop_all(self.servers)


# --- calls ------------------------------------------------------------------------------------


def outcome(reply: Reply) -> str:
    """`ok`, or the Connect error code; anything else is spelled out."""
    if reply.status == 200:
        return "ok"
    return reply.connect_code() or f"HTTP {reply.status} {reply.body[:200]!r}"


def all_at_once(calls: Sequence[tuple[RunningServer, Callable[[Conn], T]]]) -> list[T]:
    """Each call on its own connection to its replica, all released together; in order."""
    barrier = threading.Barrier(len(calls))
    conns = [Conn(server.port) for server, _ in calls]

    def run(i: int) -> T:
        # Connect before the barrier, so that the calls, not the handshakes, race.
        conns[i].request("GET", "/healthz")
        barrier.wait(timeout=WAIT_S)
        return calls[i][1](conns[i])

    try:
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            return list(pool.map(run, range(len(calls))))
    finally:
        for conn in conns:
            conn.close()


def readyz(server: RunningServer) -> int:
    """The status of /readyz (public listener)."""
    return request(server.url, "GET", "/readyz", timeout=30).status


def wait_for(what: str, check: Callable[[], bool], *, timeout_s: float = WAIT_S) -> None:
    """Poll `check` until it holds (a condition in another process: nothing to wait on)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


# --- the database, beside the replicas ------------------------------------------------------


class Database:
    """A connection to the replicas' database, for the test's own reads and writes.

    Synchronous on the outside; one event loop kept for the connection's life, so
    that a transaction (a lock the test holds) spans several calls.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._runner = asyncio.Runner()
        self._conn: asyncpg.Connection = self._runner.run(asyncpg.connect(url, timeout=30))

    def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """The rows of `sql` ($1, $2... placeholders)."""
        return [tuple(row) for row in self._runner.run(self._conn.fetch(sql, *args))]

    def value(self, sql: str, *args: Any) -> Any:
        """The first column of the first row."""
        return self._runner.run(self._conn.fetchval(sql, *args))

    def execute(self, sql: str, *args: Any) -> None:
        """Run a statement (several, without arguments)."""
        self._runner.run(self._conn.execute(sql, *args))

    def close(self) -> None:
        """Close the connection and its loop."""
        try:
            self._runner.run(self._conn.close(timeout=10))
        finally:
            self._runner.close()


def database_ports(server: RunningServer, database_url: str) -> set[int]:
    """The local ports of the replica's TCP connections to the database (from /proc):
    PostgreSQL sees them as `inet_client_port()`, so they tell which replica did what."""
    db_port = urlsplit(database_url).port or 5432
    inodes: set[str] = set()
    for pid in (server.process.pid, envoy_pid(server)):
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == db_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def stored_session_ids(database_url: str) -> set[str]:
    """The ids of every session in the database."""
    db = Database(database_url)
    try:
        return {row[0] for row in db.fetch("SELECT id FROM sessions")}
    finally:
        db.close()


def not_working(server: RunningServer, sessions: Sequence[SignedIn]) -> list[str]:
    """The sessions that GetSession on `server` does not answer as themselves."""
    conn = Conn(server.port)
    try:
        failing = []
        for session in sessions:
            reply = conn.connect_call(GET_SESSION, {}, cookie=session.cookie)
            if reply.status != 200 or reply.json()["session"]["id"] != session.session_id:
                failing.append(f"{session.session_id}: {reply}")
        return failing
    finally:
        conn.close()


# --- load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One call of the load, as its client saw it."""

    replica: str
    procedure: str
    started: float
    seconds: float
    code: str  # `ok`, a Connect code, `dropped` (no HTTP answer) or `HTTP ...`
    signed: SignedIn | None = None


class Load:
    """Client threads signing in as new users against the replicas in turn, each
    reading its new session back on the next replica (a load balancer that does
    not stick); until stopped.

    Every call is recorded; `wait_until` waits on the calls themselves (a
    condition notified at each one), never on the clock.
    """

    def __init__(
        self,
        replicas: Mapping[str, RunningServer],
        google: FakeGoogle,
        *,
        clients: int = 4,
        pause_s: float = 0.05,
    ) -> None:
        self.replicas = dict(replicas)
        self.google = google
        self.calls: list[Call] = []
        self._pause_s = pause_s
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the clients (each finishes its call in flight)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=WAIT_S)
            assert not thread.is_alive(), "a load client hung"

    def _client(self, index: int) -> None:
        names = list(self.replicas)
        conns = {name: Conn(server.port) for name, server in self.replicas.items()}
        turn = index
        try:
            while not self._stop.is_set():
                here, there = names[turn % len(names)], names[(turn + 1) % len(names)]
                turn += 1
                sub = secrets.token_hex(8)
                token = self.google.token(sub=sub, email=f"{sub}@example.com")
                signed = self._call(conns[here], here, SIGN_IN, {"googleIdToken": token})
                if signed is not None:
                    self._call(conns[there], there, GET_SESSION, {}, cookie=signed.cookie)
                self._stop.wait(self._pause_s)
        finally:
            for conn in conns.values():
                conn.close()

    def _call(
        self, conn: Conn, replica: str, procedure: str, message: object, *, cookie: str = ""
    ) -> SignedIn | None:
        started = time.monotonic()
        signed = None
        try:
            reply = conn.connect_call(procedure, message, cookie=cookie or None)
        except Dropped:
            code = "dropped"
        else:
            code = outcome(reply)
            if procedure == SIGN_IN:
                signed = signed_in(reply)
        call = Call(
            replica=replica,
            procedure=procedure.rsplit("/", 1)[1],
            started=started,
            seconds=time.monotonic() - started,
            code=code,
            signed=signed,
        )
        with self._changed:
            self.calls.append(call)
            self._changed.notify_all()
        return signed

    def wait_until(
        self, what: str, check: Callable[[list[Call]], bool], *, timeout_s: float = WAIT_S
    ) -> None:
        """Wait until `check(calls so far)` holds."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not check(self.calls):
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"not within {timeout_s} s: {what}; {self.summary()}"
                self._changed.wait(remaining)

    def snapshot(self) -> list[Call]:
        """The calls so far."""
        with self._changed:
            return list(self.calls)

    @property
    def acknowledged(self) -> list[SignedIn]:
        """Every sign-in a client got a session cookie for."""
        return [c.signed for c in self.snapshot() if c.signed is not None]

    def summary(self) -> str:
        """Counts of (replica, procedure, code), for failure messages."""
        counts: dict[tuple[str, str, str], int] = {}
        for c in self.snapshot():
            key = (c.replica, c.procedure, c.code)
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{r}/{p}/{code}: {n}" for (r, p, code), n in sorted(counts.items()))


def since(calls: Sequence[Call], at: float, **match: str) -> Iterator[Call]:
    """The calls started at or after `at` whose fields equal `match`."""
    for call in calls:
        if call.started >= at and all(getattr(call, k) == v for k, v in match.items()):
            yield call


def count(calls: Sequence[Call], at: float, **match: str) -> int:
    """How many calls `since` yields."""
    return sum(1 for _ in since(calls, at, **match))
