"""Crash safety: SIGKILL the server again and again under a sign-in and write load.

Worker threads sign in (new users and returning ones, each with a fresh token),
read their sessions and change their profiles, against whichever server is up.
The main thread lets the load run, then SIGKILLs Envoy (which runs the app and
holds the database connections) and its `expense-auth serve` parent at an
unpredictable moment, as a machine crash would, and restarts the server on the
same DATA_DIR and database. Both engines: SQLite (the file in DATA_DIR, which
the killed process had open) and PostgreSQL (a throwaway database; the kill
drops the app's connections mid-transaction).

After every restart, before the load resumes:
- the database is sound (harness.store_problems): no session without its user;
  on SQLite `PRAGMA integrity_check` is `ok` and `foreign_key_check` finds
  nothing; on PostgreSQL the foreign key is in place, every constraint is
  validated and amcheck finds no damaged table or index;
- every sign-in that was acknowledged to a client (a 200 carrying a session and
  its cookie), in any earlier round, still has a working session: GetSession
  with its cookie answers 200 with the same session and user.

Every request that was not cut off by a kill must have been answered as a
well-behaved client expects (no errors, no dropped connections).

SIGKILL loses the process, not the machine's page cache (nor, with PostgreSQL,
the database server), so this is a process crash. A power cut is not simulated;
the last test checks the precondition for surviving one instead: the commit is
on stable storage before the answer (see docs/reliability.md).

Run longer with CRASH_KILLS=50 (default 10).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import require_tool, server_env
from tests.interop.tools import new_sub
from tests.reliability.harness import (
    AUTH,
    ENGINES,
    USER,
    Conn,
    Dropped,
    SignedIn,
    engine_env,
    envoy_pid,
    kill_hard,
    log_faults,
    sign_in,
    signed_in,
    store_problems,
)
from tests.support.database import rows
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer, start_server

pytestmark = pytest.mark.reliability

KILLS = int(os.environ.get("CRASH_KILLS", "10"))
WORKERS = 4
RETURNING_USERS = 16  # subjects that sign in again and again (user upserts), besides new ones
MIN_ACKS_PER_ROUND = 5  # sign-ins acknowledged by a server before it may be killed
MAX_KILL_DELAY_S = 0.5  # then it dies at a random moment within this long
VERIFIERS = 4
PROGRESS_TIMEOUT_S = 60


@dataclass
class Round:
    """What happened to one server, from its start to its kill."""

    start_s: float = 0.0
    verified: int = 0
    acked: int = 0


@dataclass
class Load:
    """Threads signing in and writing against whichever server generation is up."""

    google: FakeGoogle
    subjects: list[str]
    acked: list[tuple[int, SignedIn]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    cut_off: int = 0  # requests that lost their answer to a kill
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _port: int = 0
    _generation: int = 0
    _killing: int = 0  # the generation being killed, once the kill has begun
    _stopping: bool = False
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, workers: int) -> None:
        """Start the workers; they wait for `serve`."""
        for i in range(workers):
            thread = threading.Thread(target=self._work, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def serve(self, port: int) -> int:
        """Point the load at a new server; returns its generation."""
        with self._cond:
            self._port = port
            self._generation += 1
            self._cond.notify_all()
            return self._generation

    def killing(self) -> None:
        """The current server is about to be killed: the requests it cuts off are expected."""
        with self._cond:
            self._killing = self._generation

    def acknowledged(self) -> list[tuple[int, SignedIn]]:
        """Every acknowledged sign-in so far, with the generation of the server that made it."""
        with self._cond:
            return list(self.acked)

    def acked_in(self, generation: int) -> int:
        """How many sign-ins the given server acknowledged."""
        with self._cond:
            return sum(1 for g, _ in self.acked if g == generation)

    def stop(self) -> None:
        """Stop and join the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _next(self, after: int) -> tuple[int, int] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or self._generation > after)
            return None if self._stopping else (self._port, self._generation)

    def _work(self, seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 (test data, not a secret)
        mine: list[SignedIn] = []
        generation = 0
        while (target := self._next(generation)) is not None:
            port, generation = target
            conn = Conn(port)
            try:
                while not self._stopping:
                    self._one(conn, rng, mine, generation)
            except Dropped as exc:
                with self._cond:
                    if self._killing == generation:
                        self.cut_off += 1
                    else:
                        self.unexpected.append(f"dropped while the server was up: {exc}")
            except Exception as exc:  # a worker must never die silently
                with self._cond:
                    self.unexpected.append(f"worker error: {exc!r}")
            finally:
                conn.close()

    def _one(self, conn: Conn, rng: random.Random, mine: list[SignedIn], generation: int) -> None:
        choice = rng.random()
        if choice < 0.4 or not mine:
            sub = rng.choice(self.subjects) if rng.random() < 0.5 else new_sub()
            token = self.google.token(sub=sub, email=f"{sub}@example.com")
            reply = conn.connect_call(f"{AUTH}/SignIn", {"googleIdToken": token})
            done = signed_in(reply)
            with self._cond:
                self.calls["SignIn"] += 1
                if done is None:
                    self.unexpected.append(f"SignIn: {reply}")
                    return
                self.acked.append((generation, done))
            mine.append(done)
        elif choice < 0.7:
            session = rng.choice(mine)
            reply = conn.connect_call(f"{AUTH}/GetSession", {}, cookie=session.cookie)
            with self._cond:
                self.calls["GetSession"] += 1
                if reply.status != 200 or reply.json()["session"]["id"] != session.session_id:
                    self.unexpected.append(f"GetSession {session.session_id}: {reply}")
        else:
            session = rng.choice(mine)
            change = {"displayName": f"Crash test {rng.randrange(10**6)}"}
            reply = conn.connect_call(
                f"{USER}/UpdateCurrentUser",
                {"user": change, "updateMask": "displayName"},
                cookie=session.cookie,
            )
            with self._cond:
                self.calls["UpdateCurrentUser"] += 1
                if reply.status != 200:
                    self.unexpected.append(f"UpdateCurrentUser {session.session_id}: {reply}")


def broken_sessions(server: RunningServer, acked: list[tuple[int, SignedIn]]) -> list[str]:
    """Every acknowledged sign-in whose session does not work on `server`."""
    local = threading.local()
    opened: list[Conn] = []

    def check(item: tuple[int, SignedIn]) -> str | None:
        generation, session = item
        conn: Conn | None = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = Conn(server.port)
            opened.append(conn)
        try:
            reply = conn.connect_call(f"{AUTH}/GetSession", {}, cookie=session.cookie)
        except Dropped as exc:
            return f"{session.session_id} (acknowledged by server #{generation}): {exc}"
        body = reply.json() if reply.status == 200 else {}
        if (
            reply.status != 200
            or body["session"]["id"] != session.session_id
            or body["user"]["id"] != session.user_id
        ):
            return f"{session.session_id} (acknowledged by server #{generation}): {reply}"
        return None

    try:
        with ThreadPoolExecutor(max_workers=VERIFIERS) as pool:
            return [problem for problem in pool.map(check, acked) if problem is not None]
    finally:
        for conn in opened:
            conn.close()


def restart(
    tmp: Path, google: FakeGoogle, data_dir: Path, env: dict[str, str], load: Load
) -> tuple[RunningServer, int]:
    """Start a server on `data_dir` (and the database in `env`), check that everything
    acknowledged so far survived.

    Returns the server and how many acknowledged sessions were checked.
    """
    server = start_server(tmp, server_env(google, **env), data_dir=data_dir)
    try:
        problems = store_problems(server)
        assert not problems, f"database damaged after a kill: {problems}"
        acked = load.acknowledged()
        broken = broken_sessions(server, acked)
        assert not broken, (
            f"{len(broken)} of {len(acked)} acknowledged sign-ins lost their session "
            f"after a kill:\n" + "\n".join(broken[:20])
        )
    except BaseException:
        server.stop()
        raise
    return server, len(acked)


@pytest.mark.parametrize("engine", ENGINES)
def test_acknowledged_sign_ins_survive_repeated_sigkill(
    engine: str, tmp_path: Path, google: FakeGoogle
) -> None:
    started = time.monotonic()
    data_dir = tmp_path / "var"  # one DATA_DIR (the cookie key, the SQLite file) for every server
    load = Load(google, subjects=[new_sub() for _ in range(RETURNING_USERS)])
    rng = random.Random()  # noqa: S311 (kill timing, not a secret)
    rounds: list[Round] = []
    up: RunningServer | None = None  # the server running now, if any
    with engine_env(engine) as env:
        load.start(WORKERS)
        try:
            for _ in range(KILLS):
                t0 = time.monotonic()
                up, verified = restart(tmp_path, google, data_dir, env, load)
                round_ = Round(start_s=time.monotonic() - t0, verified=verified)
                generation = load.serve(up.port)
                deadline = time.monotonic() + PROGRESS_TIMEOUT_S
                while load.acked_in(generation) < MIN_ACKS_PER_ROUND:
                    assert not load.unexpected, load.unexpected[:10]
                    assert time.monotonic() < deadline, f"no progress:\n{up.logs()[-3000:]}"
                    time.sleep(0.01)
                time.sleep(rng.uniform(0, MAX_KILL_DELAY_S))
                load.killing()
                killed_server, up = up, None
                kill_hard(killed_server)
                round_.acked = load.acked_in(generation)
                rounds.append(round_)
                faults = log_faults(killed_server)
                assert not faults, faults
            up, verified = restart(tmp_path, google, data_dir, env, load)
            rounds.append(Round(verified=verified))
        finally:
            load.stop()
            # Stopped before its database is dropped, also when a round failed.
            exit_code = up.stop() if up is not None else None
        assert up is not None
        assert exit_code == 0, up.logs()[-3000:]

    assert not load.unexpected, f"{len(load.unexpected)} unexpected answers:\n" + "\n".join(
        load.unexpected[:20]
    )
    killed = rounds[:-1]
    assert len(killed) == KILLS
    starts = sorted(r.start_s for r in killed)
    print(
        f"\ncrash ({engine}): {KILLS} kills; {len(load.acked)} acknowledged sign-ins, all intact "
        f"after every restart ({sum(r.verified for r in rounds)} GetSession checks); "
        f"acknowledged per server {[r.acked for r in killed]}; calls {dict(load.calls)}; "
        f"{load.cut_off} requests cut off by the kills; restart and checks "
        f"{starts[0]:.1f}-{starts[-1]:.1f} s (median {starts[len(starts) // 2]:.1f}); "
        f"total {time.monotonic() - started:.1f} s"
    )


# --- beyond SIGKILL: a power cut ----------------------------------------------------------------

SYNCED_SIGN_INS = 5


def tracer_of(pid: int) -> int:
    """The pid tracing the process (0: none)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("engine", ENGINES)
def test_a_sign_in_is_on_stable_storage_before_it_is_acknowledged(
    engine: str, tmp_path: Path, google: FakeGoogle
) -> None:
    """SIGKILL cannot lose what the kernel (or the database server) already holds; a power
    cut can. Only a commit that reached the disk before the answer survives one."""
    if engine == "sqlite":
        fsynced_before_acknowledged(tmp_path, google)
    else:
        flushed_before_acknowledged(tmp_path, google)


def fsynced_before_acknowledged(tmp_path: Path, google: FakeGoogle) -> None:
    """SQLite: each acknowledged sign-in was preceded by an fsync of the database.

    strace counts the fsync/fdatasync calls of the process that holds the file:
    with WAL, the commit is on the disk once the WAL is synced.
    """
    strace = require_tool(shutil.which("strace"), "strace")
    server = start_server(tmp_path, server_env(google))
    conn = Conn(server.port)
    trace = tmp_path / "strace.txt"
    tracer: subprocess.Popen[bytes] | None = None
    try:
        sign_in(conn, google.token(sub=new_sub()))  # the first one opens the connections
        envoy = envoy_pid(server)
        tracer = subprocess.Popen(
            [strace, "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(trace), "-p", str(envoy)]
        )
        deadline = time.monotonic() + 10
        while tracer_of(envoy) != tracer.pid:
            if tracer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"strace could not attach to {envoy} (ptrace not permitted?)")
            time.sleep(0.05)
        time.sleep(0.5)  # strace -f attaches to the other threads after the first
        for _ in range(SYNCED_SIGN_INS):
            reply = conn.connect_call(f"{AUTH}/SignIn", {"googleIdToken": google.token()})
            if signed_in(reply) is None:
                raise RuntimeError(f"sign-in failed: {reply}")
    finally:
        if tracer is not None:
            tracer.terminate()
            tracer.wait(timeout=10)
        conn.close()
        server.stop()
    syncs = [line for line in trace.read_text().splitlines() if "sync(" in line]
    assert len(syncs) >= SYNCED_SIGN_INS, (
        f"{SYNCED_SIGN_INS} acknowledged sign-ins, {len(syncs)} fsync/fdatasync calls"
    )


@dataclass(frozen=True)
class Flushed:
    """One acknowledged sign-in and the WAL around it."""

    session: SignedIn
    before: str  # the WAL insert position before the request was sent
    at_ack: str  # how far PostgreSQL had flushed its WAL when the answer arrived


def flushed_before_acknowledged(tmp_path: Path, google: FakeGoogle) -> None:
    """PostgreSQL: each acknowledged sign-in's commit record was flushed before the answer.

    The disk belongs to the database server, so the question becomes: did the app
    wait for COMMIT (and leave `synchronous_commit` on) before it answered? Right
    after each answer the test reads PostgreSQL's WAL flush position; afterwards
    pg_walinspect finds the commit record of the transaction that wrote the
    session (the row's xmin) and the record must end at or before that position.
    An app that answered before its commit returned, or committed asynchronously,
    leaves its commit record past it (unless another client's commit happened to
    flush it in the milliseconds between: then the test passes by luck, never
    fails by it). Then the server is SIGKILLed at once and every acknowledged
    session must be in the database. Whether PostgreSQL's own flush reaches the
    platters (`fsync`, the disk's cache) is the database server's configuration.
    """
    with engine_env("postgres") as env:
        url = env["DATABASE_URL"]
        server = start_server(tmp_path, server_env(google, **env))
        conn = Conn(server.port)
        acked: list[Flushed] = []
        try:
            sign_in(conn, google.token(sub=new_sub()))  # the first one opens the pool
            with asyncio.Runner() as runner:
                monitor = runner.run(asyncpg.connect(url, timeout=10))
                try:
                    for _ in range(SYNCED_SIGN_INS):
                        before = runner.run(monitor.fetchval(_INSERT_LSN))
                        done = sign_in(conn, google.token(sub=new_sub()))
                        at_ack = runner.run(monitor.fetchval(_FLUSH_LSN))
                        acked.append(Flushed(done, before, at_ack))
                    kill_hard(server)  # at once, after the last answer
                finally:
                    runner.run(monitor.close())
        finally:
            conn.close()
            server.stop()
        settings = dict(rows(server, _SETTINGS))
        stored = {row[0] for row in rows(server, "SELECT id FROM sessions")}
        late = [problem for one in acked if (problem := _commit_after_ack(server, one))]
    print(f"\nstable storage (postgres): {len(acked)} sign-ins; server settings {settings}")
    lost = [one.session.session_id for one in acked if one.session.session_id not in stored]
    assert not lost, f"acknowledged, then lost to a SIGKILL: {lost}"
    assert not late, "answered before the commit was flushed:\n" + "\n".join(late)


_INSERT_LSN = "SELECT pg_current_wal_insert_lsn()::text"
_FLUSH_LSN = "SELECT pg_current_wal_flush_lsn()::text"
_SETTINGS = (
    "SELECT name, setting FROM pg_settings "
    "WHERE name IN ('fsync', 'synchronous_commit', 'wal_sync_method')"
)


def _commit_after_ack(server: RunningServer, one: Flushed) -> str | None:
    """Why the sign-in's commit was not flushed by the time of its answer; None if it was."""
    # pg_walinspect goes into the test's own throwaway database, never into a real one.
    assert "/expense_auth_test_" in server.env["DATABASE_URL"], "not a throwaway database"
    rows(server, "CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    xid = rows(server, "SELECT xmin::text FROM sessions WHERE id = ?", one.session.session_id)
    if not xid:
        return f"{one.session.session_id}: no such session"
    commits = rows(
        server,
        "SELECT end_lsn::text, end_lsn <= ?::text::pg_lsn FROM pg_get_wal_records_info("
        "?::text::pg_lsn, pg_current_wal_flush_lsn()) "
        "WHERE resource_manager = 'Transaction' AND record_type = 'COMMIT' AND xid::text = ?",
        one.at_ack,
        one.before,
        xid[0][0],
    )
    if not commits:
        return f"{one.session.session_id}: no commit record of transaction {xid[0][0]}"
    end, in_time = commits[0]
    if not in_time:
        return (
            f"{one.session.session_id}: commit record ends at {end}, "
            f"the WAL was flushed to {one.at_ack} when the answer came"
        )
    return None
