"""The faults real deployments meet, injected under load into the real server.

Each test injects one fault while clients call, and checks what clients get and
how fast, that /healthz stays fast, that /readyz tells the truth, that nothing
acknowledged is lost, and that the service recovers by itself once the fault is
removed. Bounded for CI: each fault lasts seconds. docs/reliability.md has the
table of faults, what clients see, the recovery, and these tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import require_tool, server_env
from tests.reliability.harness import (
    AUTH,
    USER,
    Conn,
    Dropped,
    Reply,
    database,
    envoy_pid,
    log_faults,
    rss_kb,
    sign_in,
    signed_in,
)
from tests.support import postgres
from tests.support.clock import FileClock
from tests.support.database import rows
from tests.support.google import FakeGoogle
from tests.support.http import request
from tests.support.redis import RedisServer
from tests.support.server import BIN, RunningServer, start_server

pytestmark = pytest.mark.reliability

GET_SESSION = f"{AUTH}/GetSession"
SIGN_IN = f"{AUTH}/SignIn"
UPDATE_USER = f"{USER}/UpdateCurrentUser"
# A store call gives up after the busy timeout (2 s); with the queue and the
# network, a client has its answer within this.
STORE_ANSWER_S = 3.5
HEALTHZ_S = 0.25


# --- what the clients see --------------------------------------------------------------------


@dataclass
class Outcome:
    """One call: when it was made, what it got, how long it took."""

    procedure: str
    at: float
    seconds: float
    status: int
    code: str
    retry_after: str | None


@dataclass
class Load:
    """Clients calling in threads: sign-ins (each acknowledged one kept), session
    checks and profile updates, until stopped."""

    server: RunningServer
    google: FakeGoogle
    cookies: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sign_ins: bool = True

    def start(self, *, readers: int = 2, writers: int = 2, sign_ins: bool = True) -> Load:
        """Readers check sessions; writers sign in and update profiles, alternately (or
        only update profiles, without `sign_ins`)."""
        self._sign_ins = sign_ins
        for n in range(readers + writers):
            thread = threading.Thread(target=self._work, args=(n, n < readers), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        assert not any(t.is_alive() for t in self._threads), "a client hung"

    def between(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.at and o.at + o.seconds <= end]

    def _work(self, n: int, reader: bool) -> None:
        conn = Conn(self.server.port, timeout=30)
        i = 0
        while not self._stop.is_set():
            i += 1
            kind = 1 if reader else (2 * (i % 2) if self._sign_ins else 2)
            started = time.monotonic()
            try:
                if kind == 0:
                    token = self.google.token(sub=secrets.token_hex(8))
                    reply = conn.connect_call(SIGN_IN, {"googleIdToken": token})
                    done = signed_in(reply)
                    if done is not None:
                        with self._lock:
                            self.acknowledged.append(done.session_id)
                    procedure = SIGN_IN
                elif kind == 1:
                    cookie = self.cookies[i % len(self.cookies)]
                    reply = conn.connect_call(GET_SESSION, {}, cookie=cookie)
                    procedure = GET_SESSION
                else:
                    cookie = self.cookies[(i + n) % len(self.cookies)]
                    reply = conn.connect_call(
                        UPDATE_USER,
                        {"user": {"displayName": f"n{i}"}, "updateMask": "displayName"},
                        cookie=cookie,
                    )
                    procedure = UPDATE_USER
            except Dropped as exc:
                with self._lock:
                    self.dropped.append(str(exc))
                continue
            self._record(procedure, started, reply)
            time.sleep(0.02)
        conn.close()

    def _record(self, procedure: str, started: float, reply: Reply) -> None:
        outcome = Outcome(
            procedure=procedure,
            at=started,
            seconds=time.monotonic() - started,
            status=reply.status,
            code=reply.connect_code() or "ok",
            retry_after=reply.header("retry-after"),
        )
        with self._lock:
            self.outcomes.append(outcome)


class Probes:
    """/healthz and /readyz asked every 100 ms from a thread of their own."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.healthz: list[tuple[float, float]] = []  # (when, seconds)
        self.readyz: list[tuple[float, int, dict[str, object]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            response = request(self.server.url, "GET", "/healthz", timeout=10)
            assert response.status == 200
            self.healthz.append((started, time.monotonic() - started))
            ready = request(self.server.url, "GET", "/readyz", timeout=10)
            self.readyz.append((time.monotonic(), ready.status, ready.json()))
            time.sleep(0.1)

    def slowest_healthz(self) -> float:
        return max(seconds for _, seconds in self.healthz)


def readyz(server: RunningServer) -> tuple[int, dict[str, object]]:
    response = request(server.url, "GET", "/readyz", timeout=10)
    return response.status, response.json()


def wait_for(what: str, check: Callable[[], bool], *, timeout_s: float = 15) -> float:
    """Poll `check` until it holds; returns how long that took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def session_ids(path: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return {str(row[0]) for row in conn.execute("SELECT id FROM sessions")}
    finally:
        conn.close()


def assert_clean(server: RunningServer, load: Load) -> None:
    """No internal error, no traceback, no dropped call, nothing acknowledged lost."""
    codes = Counter(o.code for o in load.outcomes)
    assert "internal" not in codes and "unknown" not in codes, codes
    assert not load.dropped, load.dropped[:3]
    assert log_faults(server) == []
    stored = session_ids(database(server))
    lost = [s for s in load.acknowledged if s not in stored]
    assert not lost, f"{len(lost)} acknowledged sign-ins lost"


def signed_in_cookies(server: RunningServer, google: FakeGoogle, n: int) -> list[str]:
    conn = Conn(server.port)
    try:
        return [sign_in(conn, google.token(sub=secrets.token_hex(8))).cookie for _ in range(n)]
    finally:
        conn.close()


def call_once(server: RunningServer, procedure: str, message: object, **kw: str) -> Reply:
    """One call on a connection of its own."""
    conn = Conn(server.port)
    try:
        return conn.connect_call(procedure, message, **kw)
    finally:
        conn.close()


def writes_work(server: RunningServer, google: FakeGoogle) -> Callable[[], bool]:
    def check() -> bool:
        token = google.token(sub=secrets.token_hex(8))
        return call_once(server, SIGN_IN, {"googleIdToken": token}).status == 200

    return check


def ready(server: RunningServer) -> Callable[[], bool]:
    return lambda: readyz(server)[0] == 200


# --- the database ----------------------------------------------------------------------------


def test_an_outside_write_lock_costs_writes_seconds_not_the_service(
    tmp_path: Path, google: FakeGoogle
) -> None:
    """`BEGIN IMMEDIATE` held by a `sqlite3` shell (or a purge, or another process)."""
    clock = FileClock(tmp_path / "now").freeze()
    server = start_server(tmp_path, server_env(google), clock=clock)
    try:
        cookies = signed_in_cookies(server, google, 6)
        clock.advance(120)  # every session's next check writes its last-seen time
        ticking = clock.ticking()
        ticking.__enter__()
        load = Load(server, google, cookies).start()
        time.sleep(0.5)
        holder = sqlite3.connect(database(server), isolation_level=None, timeout=10)
        with Probes(server) as probes:
            holder.execute("BEGIN IMMEDIATE")
            locked = time.monotonic()
            time.sleep(6)
            holder.execute("ROLLBACK")
            released = time.monotonic()
            wait_for("writes work again", writes_work(server, google))
            wait_for("ready again", ready(server))
            time.sleep(0.5)
        load.stop()
        holder.close()
        ticking.__exit__(None, None, None)

        during = load.between(locked + 0.5, released)
        by_procedure = {
            p: [o for o in during if o.procedure == p] for p in (SIGN_IN, UPDATE_USER, GET_SESSION)
        }
        # Reads go on: session checks succeed, fast, even those that write last-seen.
        assert by_procedure[GET_SESSION] and all(o.code == "ok" for o in by_procedure[GET_SESSION])
        assert max(o.seconds for o in by_procedure[GET_SESSION]) < 1.0
        # Writes wait at most the busy timeout, then say so, with a Retry-After.
        writes = by_procedure[SIGN_IN] + by_procedure[UPDATE_USER]
        assert writes and all(o.code == "unavailable" for o in writes), Counter(
            o.code for o in writes
        )
        assert all(o.seconds < STORE_ANSWER_S and o.retry_after == "1" for o in writes)
        assert probes.slowest_healthz() < HEALTHZ_S
        unready = [body for at, status, body in probes.readyz if locked + 3 < at < released]
        assert unready and all("busy" in json.dumps(body) for body in unready), unready[:2]
        assert_clean(server, load)
        logs = server.logs()
        assert logs.count("storage incident started") >= 1 and "kind=busy" in logs
        assert "storage incident over" in logs
    finally:
        assert server.stop() == 0, server.logs()[-3000:]


def test_a_postgres_lock_costs_writes_seconds_not_the_service(
    tmp_path: Path, google: FakeGoogle
) -> None:
    """A migration or an operator holds `LOCK TABLE users, sessions IN EXCLUSIVE MODE`
    (reads pass, writes wait) on the PostgreSQL database for 6 s."""
    with postgres.database(migrated=False) as url:
        clock = FileClock(tmp_path / "now").freeze()
        server = start_server(tmp_path, server_env(google, DATABASE_URL=url), clock=clock)
        try:
            cookies = signed_in_cookies(server, google, 6)
            clock.advance(120)  # every session's next check writes its last-seen time
            with clock.ticking():
                load = Load(server, google, cookies).start()
                time.sleep(0.5)
                with (
                    Probes(server) as probes,
                    postgres.holding(url, "LOCK TABLE users, sessions IN EXCLUSIVE MODE") as held,
                ):
                    locked = time.monotonic()
                    held.wait(6)
                    released = time.monotonic()  # the lock goes after this instant
                wait_for("writes work again", writes_work(server, google))
                time.sleep(0.5)
                load.stop()

            during = load.between(locked + 0.5, released)
            reads = [o for o in during if o.procedure == GET_SESSION]
            writes = [o for o in during if o.procedure in (SIGN_IN, UPDATE_USER)]
            # Reads go on (last-seen writes are deferred, never in the call's way).
            assert reads and all(o.code == "ok" for o in reads), Counter(o.code for o in reads)
            assert max(o.seconds for o in reads) < 1.0
            # Writes wait at most DATABASE_STATEMENT_TIMEOUT_MS, then say so.
            assert writes and all(o.code == "unavailable" for o in writes), [
                (o.procedure[-12:], round(o.at - locked, 2), round(o.seconds, 2), o.code)
                for o in writes
            ]
            assert all(o.seconds < STORE_ANSWER_S and o.retry_after for o in writes)
            assert probes.slowest_healthz() < HEALTHZ_S
            codes = Counter(o.code for o in load.outcomes)
            assert "internal" not in codes and "unknown" not in codes, codes
            assert not load.dropped, load.dropped[:3]
            assert log_faults(server) == []
            stored = {row[0] for row in rows(server, "SELECT id FROM sessions")}
            assert not [s for s in load.acknowledged if s not in stored]
            logs = server.logs()
            assert "storage incident started" in logs and "kind=busy" in logs
            assert "storage incident over" in logs
        finally:
            assert server.stop() == 0, server.logs()[-3000:]


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size`, mounted for the test (tests run as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a filler file until the disk is full; returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_is_unavailable_and_recovers_by_itself(
    tmp_path: Path, google: FakeGoogle
) -> None:
    with small_disk(tmp_path) as disk:
        server = start_server(tmp_path, server_env(google), data_dir=disk / "var")
        try:
            cookies = signed_in_cookies(server, google, 3)
            load = Load(server, google, cookies).start()
            time.sleep(0.5)
            with Probes(server) as probes:
                filler = fill(disk)
                full = time.monotonic()
                wait_for("readiness sees the full disk", lambda: readyz(server)[0] == 503)
                time.sleep(3)
                filler.unlink()
                freed = time.monotonic()
                recovered = wait_for("writes work again", writes_work(server, google))
                wait_for("ready again", ready(server))
            load.stop()

            during = load.between(full + 1, freed)
            writes = [o for o in during if o.procedure != GET_SESSION]
            assert writes and all(o.code == "unavailable" for o in writes), Counter(
                o.code for o in writes
            )
            assert all(o.retry_after for o in writes)
            assert all(o.code == "ok" for o in during if o.procedure == GET_SESSION)
            assert probes.slowest_healthz() < HEALTHZ_S
            body = next(b for at, s, b in probes.readyz if full + 2 < at < freed and s == 503)
            assert "disk_full" in json.dumps(body), body
            assert recovered < 5
            assert_clean(server, load)
            logs = server.logs()
            assert logs.count("storage incident started") == 1 and "kind=disk_full" in logs
            assert "Traceback" not in logs
            token = google.token(sub=secrets.token_hex(8))
            assert call_once(server, SIGN_IN, {"googleIdToken": token}).status == 200
        finally:
            assert server.stop() == 0, server.logs()[-3000:]


def test_a_read_only_database_is_unavailable_and_recovers_by_itself(
    tmp_path: Path, google: FakeGoogle
) -> None:
    chattr = require_tool("chattr", "chattr (e2fsprogs)")
    server = start_server(tmp_path, server_env(google))
    files = [database(server), database(server).with_name(database(server).name + "-wal")]
    try:
        cookies = signed_in_cookies(server, google, 3)
        load = Load(server, google, cookies).start()
        time.sleep(0.5)
        with Probes(server) as probes:
            subprocess.run([chattr, "+i", *map(str, files)], check=True)
            frozen = time.monotonic()
            try:
                wait_for("readiness sees the read-only file", lambda: readyz(server)[0] == 503)
                time.sleep(2)
            finally:
                subprocess.run([chattr, "-i", *map(str, files)], check=True)
            thawed = time.monotonic()
            wait_for("writes work again", writes_work(server, google))
            wait_for("ready again", ready(server))
        load.stop()
        during = load.between(frozen + 1, thawed)
        writes = [o for o in during if o.procedure != GET_SESSION]
        assert writes and all(o.code == "unavailable" for o in writes)
        assert all(o.code == "ok" for o in during if o.procedure == GET_SESSION)
        assert probes.slowest_healthz() < HEALTHZ_S
        assert_clean(server, load)
    finally:
        with contextlib.suppress(OSError):
            subprocess.run([chattr, "-i", *map(str, files)], check=False)
        assert server.stop() == 0, server.logs()[-3000:]


PAGE = 4096


def flip(path: Path, *, page_at: float | None = None, offset: int = 0, count: int = 64) -> None:
    """Complement `count` bytes: at the start of the page `page_at` of the way into the
    file (a b-tree page's header and cell pointers), or at `offset`."""
    data = bytearray(path.read_bytes())
    if page_at is not None:
        offset = int(len(data) // PAGE * page_at) * PAGE
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "expense-auth"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_damaged_file_is_refused_and_restore_handles_it(
    tmp_path: Path, google: FakeGoogle
) -> None:
    server = start_server(tmp_path, server_env(google))
    conn = Conn(server.port)
    kept = [sign_in(conn, google.token(sub=secrets.token_hex(8))) for _ in range(150)]
    conn.close()
    env = server.env
    assert server.stop() == 0
    backups = tmp_path / "backups"
    backups.mkdir()
    taken = cli(env, tmp_path, "backup", str(backups / "before.db"))
    assert taken.returncode == 0, taken.stderr
    path = database(server)

    # Damage inside the file: SQLite would open and serve it; the server refuses.
    flip(path, page_at=0.2)
    refused = cli(env, tmp_path, "serve", "--port", "0")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "is damaged" in refused.stderr and "expense-auth restore" in refused.stderr
    assert "Traceback" not in refused.stderr

    # Damage to the header: not even a database. Restore copes and keeps the wreck.
    flip(path, offset=0, count=100)
    restored = cli(env, tmp_path, "restore", str(backups / "before.db"))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "moved aside" in restored.stdout
    assert "may be back" in restored.stderr  # its deletion log could not be read
    assert list(path.parent.glob(f"{path.name}.damaged-*"))

    again = start_server(tmp_path, server_env(google), data_dir=server.data_dir)
    try:
        conn = Conn(again.port)
        for done in kept[::30]:
            assert conn.connect_call(GET_SESSION, {}, cookie=done.cookie).status == 200
        conn.close()
    finally:
        assert again.stop() == 0, again.logs()[-3000:]


def test_a_removed_wal_stops_writes_and_loses_nothing_acknowledged(
    tmp_path: Path, google: FakeGoogle
) -> None:
    """Deleting the -wal of a live database: SQLite would go on writing into the
    unlinked file and lose every write acknowledged after that. The store refuses
    writes, readiness fails, and the shutdown checkpoint saves what was written."""
    server = start_server(tmp_path, server_env(google))
    try:
        conn = Conn(server.port)
        before = [sign_in(conn, google.token(sub=secrets.token_hex(8))) for _ in range(20)]
        wal = database(server).with_name(database(server).name + "-wal")
        wal.unlink()
        refused = conn.connect_call(SIGN_IN, {"googleIdToken": google.token(sub="after")})
        assert refused.status == 503, refused
        assert refused.connect_code() == "unavailable"
        assert "restored by an operator" in refused.json()["message"]
        status, body = readyz(server)
        assert status == 503 and "removed while the server was running" in json.dumps(body)
        # Reads of sessions go on from the cache only where it can; nothing is internal.
        assert log_faults(server) == []
        conn.close()
    finally:
        assert server.stop() == 0, server.logs()[-3000:]
    stored = session_ids(database(server))
    assert all(done.session_id in stored for done in before)


# --- Redis, for shared rate limits ---------------------------------------------------------


def sign_ins_from(server: RunningServer, google: FakeGoogle, ip: str, n: int) -> list[Reply]:
    conn = Conn(server.port)
    try:
        return [
            conn.request(
                "POST",
                SIGN_IN,
                json.dumps({"googleIdToken": google.token(sub=secrets.token_hex(8))}).encode(),
                [
                    ("content-type", "application/json"),
                    ("connect-protocol-version", "1"),
                    ("x-forwarded-for", ip),
                ],
            )
            for _ in range(n)
        ]
    finally:
        conn.close()


DEADLINE_MS = 300


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_redis_failing_degrades_limits_never_the_service(
    tmp_path: Path, google: FakeGoogle, fault: str
) -> None:
    redis = RedisServer(tmp_path, binary=require_tool("redis-server", "redis-server")).start()
    server = start_server(
        tmp_path,
        server_env(
            google,
            RATE_LIMIT_STORAGE_URL=redis.url,
            TRUSTED_PROXIES="127.0.0.1/32",
            RATE_LIMIT_SIGNIN_PER_IP="5/minute",
            # The deadline of a Redis call, raised from 100 ms so that the test sees it.
            RATE_LIMIT_STORAGE_TIMEOUT_MS=str(DEADLINE_MS),
        ),
    )
    try:
        cookies = signed_in_cookies(server, google, 3)
        assert readyz(server)[1]["dependencies"] == {
            "identity_keys": "ok",
            "rate_limit_storage": "ok",
        }
        # Sign-ins are counted by the test itself, from an address of their own.
        load = Load(server, google, cookies).start(sign_ins=False)
        time.sleep(0.5)
        with Probes(server) as probes:
            if fault == "killed":
                redis.kill()
            else:
                redis.signal(signal.SIGSTOP)
            broken = time.monotonic()
            time.sleep(2)
            # Sign-in limits still hold, counted in this process: never an open door.
            statuses = [r.status for r in sign_ins_from(server, google, "203.0.113.7", 7)]
            assert statuses == [200] * 5 + [429] * 2, statuses
            status, body = readyz(server)
            assert status == 200
            assert str(body["dependencies"]["rate_limit_storage"]).startswith("degraded")  # type: ignore[index]
            if fault == "killed":
                redis.start()
            else:
                redis.signal(signal.SIGCONT)
            mended = time.monotonic()
            wait_for(
                "limits use Redis again",
                lambda: readyz(server)[1]["dependencies"]["rate_limit_storage"] == "ok",  # type: ignore[index]
            )
        load.stop()
        during = load.between(broken, mended)
        assert during and all(o.code == "ok" for o in during), Counter(o.code for o in during)
        # A stopped Redis answers nothing: a call waits at most the deadline, once a
        # second; the rest skip it. A killed one refuses at once.
        slowest = max(o.seconds for o in during)
        if fault == "stopped":
            assert DEADLINE_MS / 1000 <= slowest < DEADLINE_MS / 1000 + 0.4, slowest
        else:
            assert slowest < 0.5, slowest
        # Probes are rate limited too: the one that meets the stopped Redis waits as long.
        assert probes.slowest_healthz() < HEALTHZ_S + DEADLINE_MS / 1000
        assert all(status == 200 for _, status, _ in probes.readyz)
        assert_clean(server, load)
        logs = server.logs()
        assert logs.count("rate-limit storage unavailable") == 1
        assert "rate-limit storage is back" in logs
        metrics = request(server.admin_url, "GET", "/metrics").body.decode()
        errors = next(
            line for line in metrics.splitlines()
            if line.startswith("expense_auth_rate_limit_storage_errors_total ")
        )  # fmt: skip
        assert float(errors.split()[1]) >= 1
    finally:
        assert server.stop() == 0, server.logs()[-3000:]
        redis.stop()


# --- Google's certs --------------------------------------------------------------------------


def threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


@pytest.mark.parametrize("hostile", ["huge", "drip"])
def test_a_hostile_certs_url_costs_a_bounded_wait_and_no_memory(
    tmp_path: Path, hostile: str
) -> None:
    fake = FakeGoogle().start()
    fake.state.max_age = 1  # the cache goes stale at once: every sign-in refreshes it
    server = start_server(tmp_path, server_env(fake))
    try:
        conn = Conn(server.port)
        session = sign_in(conn, fake.token(sub=secrets.token_hex(8)))  # keys cached
        envoy = envoy_pid(server)
        rss_before, threads_before = rss_kb(envoy), threads(envoy)
        huge = 300 * 1024 * 1024 if hostile == "huge" else 0
        drip = 2.0 if hostile == "drip" else 0.0
        with fake.hostile(huge_bytes=huge, drip_s=drip):
            time.sleep(1.1)
            for _ in range(3):
                started = time.monotonic()
                reply = conn.connect_call(
                    SIGN_IN, {"googleIdToken": fake.token(sub="x" + secrets.token_hex(4))}
                )
                took = time.monotonic() - started
                # The refresh fails within its deadline; the cached keys keep working.
                assert reply.status == 200, reply
                assert took < 7, took
                probe_started = time.monotonic()
                assert readyz(server)[0] == 200
                assert time.monotonic() - probe_started < 1.5
                assert conn.connect_call(GET_SESSION, {}, cookie=session.cookie).status == 200
        conn.close()
        assert rss_kb(envoy) - rss_before < 32 * 1024, (rss_before, rss_kb(envoy))
        wait_for("no fetch thread left", lambda: threads(envoy) <= threads_before + 1)
        assert "certs refresh failed; using cached keys" in server.logs()
        assert log_faults(server) == []
    finally:
        assert server.stop() == 0, server.logs()[-3000:]
        fake.stop()


# --- the edge ------------------------------------------------------------------------------


def test_slow_clients_are_cut_off_and_connections_capped(
    tmp_path: Path, google: FakeGoogle
) -> None:
    server = start_server(tmp_path, server_env(google, MAX_CONNECTIONS="40"))
    slow: list[socket.socket] = []
    try:
        cookie = signed_in_cookies(server, google, 1)[0]
        started = time.monotonic()
        for _ in range(30):  # half a request header each, never finished
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
            sock.sendall(b"POST /expense.auth.v1.AuthService/GetSession HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
        # Room is left for others, and they are served at once.
        assert call_once(server, GET_SESSION, {}, cookie=cookie).status == 200
        # Beyond the cap, new connections are refused outright.
        extra = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(15)]
        refused = 0
        for sock in extra:
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                if not sock.recv(64):
                    refused += 1
            except OSError:
                refused += 1
            sock.close()
        assert refused >= 5, refused
        # The slow ones are answered 408 and closed once their headers time out.
        for sock in slow:
            answer = sock.recv(64)
            assert answer.startswith(b"HTTP/1.1 408"), answer
        assert 9 < time.monotonic() - started < 16
        assert call_once(server, GET_SESSION, {}, cookie=cookie).status == 200
    finally:
        for sock in slow:
            sock.close()
        assert server.stop() == 0, server.logs()[-3000:]


# --- time ----------------------------------------------------------------------------------


def test_a_clock_step_moves_sessions_not_durations(tmp_path: Path, google: FakeGoogle) -> None:
    """Rate-limit windows (and cache ages) run on the monotonic clock: a step of the wall
    clock changes nothing. Session lifetimes are stored wall-clock times, compared across
    processes and restarts: a step moves them (docs/reliability.md, "Clock steps")."""
    clock = FileClock(tmp_path / "now").freeze()
    server = start_server(
        tmp_path,
        server_env(google, TRUSTED_PROXIES="127.0.0.1/32", RATE_LIMIT_SIGNIN_PER_IP="2/minute"),
        clock=clock,
    )
    try:
        ip = "198.51.100.9"
        assert [r.status for r in sign_ins_from(server, google, ip, 3)] == [200, 200, 429]
        clock.step_wall(-3600)  # NTP steps the clock an hour back
        assert [r.status for r in sign_ins_from(server, google, ip, 1)] == [429]
        clock.step_wall(2 * 3600)  # and two hours forward
        assert [r.status for r in sign_ins_from(server, google, ip, 1)] == [429]
        clock.advance(120)  # time passes
        assert [r.status for r in sign_ins_from(server, google, ip, 1)] == [200]

        cookie = signed_in_cookies(server, google, 1)[0]
        clock.step_wall(12 * 3600 + 60)  # past the session's absolute lifetime
        reply = call_once(server, GET_SESSION, {}, cookie=cookie)
        assert reply.status == 401 and "expired" in reply.json()["message"]
    finally:
        assert server.stop() == 0, server.logs()[-3000:]
