"""Backups, the restore drill, scheduled backups and retention, on real servers and files."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
from connectrpc.errors import ConnectError

from gen.expense.auth.v1.auth_pb import GetSessionRequest, SignOutRequest
from gen.expense.user.v1.user_pb import DeleteCurrentUserRequest
from server.domain.models import subject_hash
from tests.conftest import server_env
from tests.support import postgres
from tests.support.client import Session, code_of
from tests.support.clock import FileClock
from tests.support.database import rows
from tests.support.google import ISSUER, FakeGoogle
from tests.support.server import RunningServer, start_server

CLI = str(Path(sys.executable).parent / "expense-auth")
DB_NAME = "expense-auth.db"
HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS
LOCAL_IP = "127.0.0.1"
LOCAL_NETWORK = "127.0.0.0/24"
DATED_BACKUP = re.compile(r"expense-auth-\d{8}T\d{6}Z-\d{6}\.db")


def run_cli(*args: str, data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        env={"PATH": os.environ.get("PATH", ""), "DATA_DIR": str(data_dir), **env},
        cwd=data_dir.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def connect(path: Path) -> closing[sqlite3.Connection]:
    """A read-only connection to a database file (safe beside a live server)."""
    return closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True))


def integrity(path: Path) -> str:
    with connect(path) as db:
        return "; ".join(str(row[0]) for row in db.execute("PRAGMA integrity_check"))


def subjects(path: Path) -> set[str]:
    with connect(path) as db:
        return {row[0] for row in db.execute("SELECT subject FROM users")}


@dataclass
class Person:
    """A Google account signed in on one browser."""

    sub: str
    browser: Session
    session_id: str
    user_id: str

    @property
    def email(self) -> str:
        return f"{self.sub}@example.com"

    def fresh_token(self, google: FakeGoogle) -> str:
        return google.token(sub=self.sub, email=self.email)


def sign_in(url: str, google: FakeGoogle) -> Person:
    sub = secrets.token_hex(8)
    browser = Session(url)
    response = browser.sign_in(google.token(sub=sub, email=f"{sub}@example.com"))
    assert response.session is not None and response.user is not None
    return Person(sub, browser, response.session.id, response.user.id)


def session_id_with(url: str, cookie: str | None) -> str:
    """The session a cookie refers to, asked of the server at `url`."""
    browser = Session(url)
    browser.cookie = cookie
    session = browser.call(browser.auth.get_session, GetSessionRequest()).session
    assert session is not None
    return session.id


class WriteLoad:
    """Clients signing in as new users in a loop, each sign-in timed on arrival of its answer."""

    def __init__(self, url: str, google: FakeGoogle, *, clients: int = 4) -> None:
        self._url = url
        self._google = google
        self._stop = threading.Event()
        self.acknowledged: list[tuple[float, str]] = []  # (time answered, subject)
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            sub = secrets.token_hex(8)
            browser = Session(self._url)
            try:
                browser.sign_in(self._google.token(sub=sub))
            finally:
                browser.close()
            self.acknowledged.append((time.monotonic(), sub))
            time.sleep(0.01)

    def __enter__(self) -> WriteLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


# --- expense-auth backup ------------------------------------------------------------------


def test_backup_under_write_load_is_consistent_and_complete(
    server: RunningServer, google: FakeGoogle, tmp_path: Path
) -> None:
    before = {sign_in(server.url, google).sub for _ in range(5)}
    dest = tmp_path / "under-load.db"
    with WriteLoad(server.url, google) as load:
        while len(load.acknowledged) < 20:
            time.sleep(0.05)
        started = time.monotonic()
        result = run_cli("backup", str(dest), data_dir=server.data_dir)
        finished = time.monotonic()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{dest}: integrity ok"
    listing = sorted(p.name for p in tmp_path.iterdir())  # before this test opens anything
    writes_during = [s for t, s in load.acknowledged if started < t < finished]
    assert writes_during, "the server took no writes while the backup ran"

    assert integrity(dest) == "ok"
    acknowledged_before = before | {s for t, s in load.acknowledged if t < started}
    missing = acknowledged_before - subjects(dest)
    assert not missing, f"{len(missing)} users acknowledged before the backup are not in it"
    with connect(dest) as db:
        orphans = db.execute(
            "SELECT count(*) FROM sessions WHERE user_id NOT IN (SELECT id FROM users)"
        ).fetchone()
    assert orphans == (0,)
    assert listing == [dest.name], f"the backup left files beside it: {listing}"


def test_backup_into_a_directory_makes_a_dated_file_and_never_overwrites(
    server: RunningServer, google: FakeGoogle, tmp_path: Path
) -> None:
    person = sign_in(server.url, google)
    directory = tmp_path / "backups"
    directory.mkdir()
    result = run_cli("backup", str(directory), data_dir=server.data_dir)
    assert result.returncode == 0, result.stderr
    listing = sorted(p.name for p in directory.iterdir())  # before this test opens anything
    (made,) = directory.glob("*.db")
    assert DATED_BACKUP.fullmatch(made.name), made.name
    assert result.stdout.strip() == f"{made}: integrity ok"
    assert integrity(made) == "ok"
    assert person.sub in subjects(made)

    before = made.read_bytes()
    again = run_cli("backup", str(made), data_dir=server.data_dir)
    assert again.returncode != 0
    assert f"{made} exists; choose a new file name" in again.stderr
    assert "Traceback" not in again.stderr, again.stderr
    assert made.read_bytes() == before  # untouched
    assert sorted(directory.glob("*.db")) == [made]
    assert listing == [made.name], f"the backup left files beside it: {listing}"


# --- the restore drill --------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_restore_drill_keeps_later_deletions_deleted(
    tmp_path: Path, google: FakeGoogle, engine: str
) -> None:
    with contextlib.ExitStack() as stack:
        extra = {}
        if engine == "postgres":
            extra["DATABASE_URL"] = stack.enter_context(postgres.database(migrated=False))
        _restore_drill(tmp_path, google, server_env(google, **extra), engine)


def _restore_drill(tmp_path: Path, google: FakeGoogle, env: dict[str, str], engine: str) -> None:
    """On SQLite the backup is a database file; on PostgreSQL a pg_dump archive."""
    data_dir = tmp_path / "var"
    cli_env = {k: v for k, v in env.items() if k == "DATABASE_URL"}
    first = start_server(tmp_path, env, data_dir=data_dir)
    try:
        alice, bob, carol = (sign_in(first.url, google) for _ in range(3))
        backup_file = tmp_path / ("drill.db" if engine == "sqlite" else "drill.pgdump")
        taken = run_cli("backup", str(backup_file), data_dir=data_dir, **cli_env)
        assert taken.returncode == 0, taken.stderr

        # After the backup: carol deletes her account, dave joins.
        carol.browser.call(
            carol.browser.users.delete_current_user,
            DeleteCurrentUserRequest(google_id_token=carol.fresh_token(google)),
        )
        dave = sign_in(first.url, google)
    finally:
        assert first.stop() == 0, first.logs()

    def present() -> set[str]:
        return {row[0] for row in rows(first, "SELECT subject FROM users")}

    assert carol.sub not in present()

    restored = run_cli("restore", str(backup_file), data_dir=data_dir, **cli_env)
    assert restored.returncode == 0, restored.stderr
    assert "account deletions re-applied: 1" in restored.stdout, restored.stdout

    if engine == "sqlite":
        assert integrity(data_dir / DB_NAME) == "ok"
    assert {alice.sub, bob.sub} <= present()
    assert carol.sub not in present(), "the restore resurrected a deleted account"
    assert dave.sub not in present()  # the database is the backup's: later sign-ups are gone
    carol_rows = [
        rows(first, query, carol.user_id)[0]
        for query in (
            "SELECT count(*) FROM sessions WHERE user_id = ?",
            "SELECT count(*) FROM audit_events WHERE user_id = ?",
        )
    ]
    deletions = rows(
        first,
        "SELECT count(*) FROM deleted_accounts WHERE subject_hash = ?",
        subject_hash(ISSUER, carol.sub),
    )
    assert carol_rows == [(0,), (0,)]
    assert deletions == [(1,)]  # a second restore would delete her again

    second = start_server(tmp_path, env, data_dir=data_dir)
    try:
        for person in (alice, bob):
            assert session_id_with(second.url, person.browser.cookie) == person.session_id
        with pytest.raises(ConnectError) as err:
            session_id_with(second.url, carol.browser.cookie)
        assert code_of(err.value) == "unauthenticated"
    finally:
        assert second.stop() == 0, second.logs()


def test_point_in_time_recovery_keeps_later_deletions_deleted_on_postgres(
    tmp_path: Path, google: FakeGoogle
) -> None:
    """`deletions save` before a recovery that takes PostgreSQL back in time, `deletions
    apply` after. The recovery here is pg_restore of an earlier archive, straight into
    the database (a stand-in for a base backup replayed to a point in time: the
    database comes back as it was, without the later deletions)."""
    with postgres.database(migrated=False) as url:
        data_dir = tmp_path / "var"
        cli_env = {"DATABASE_URL": url}
        server = start_server(tmp_path, server_env(google, DATABASE_URL=url), data_dir=data_dir)
        try:
            alice, carol = (sign_in(server.url, google) for _ in range(2))
            earlier = tmp_path / "earlier.pgdump"
            assert run_cli("backup", str(earlier), data_dir=data_dir, **cli_env).returncode == 0
            carol.browser.call(
                carol.browser.users.delete_current_user,
                DeleteCurrentUserRequest(google_id_token=carol.fresh_token(google)),
            )
        finally:
            assert server.stop() == 0, server.logs()

        saved = tmp_path / "deletions.json"
        done = run_cli("deletions", "save", str(saved), data_dir=data_dir, **cli_env)
        assert done.returncode == 0, done.stderr
        assert "1 account deletions saved" in done.stdout
        assert saved.stat().st_mode & 0o777 == 0o600
        subprocess.run(
            ["pg_restore", "--clean", "--if-exists", "--no-owner", "--single-transaction",
             f"--dbname={url}", str(earlier)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

        def present() -> set[str]:
            return {row[0] for row in rows(server, "SELECT subject FROM users")}

        assert carol.sub in present()  # back in time: her account is back
        applied = run_cli("deletions", "apply", str(saved), data_dir=data_dir, **cli_env)
        assert applied.returncode == 0, applied.stderr
        assert "account deletions re-applied: 1" in applied.stdout
        assert present() == {alice.sub}
        again = run_cli("deletions", "apply", str(saved), data_dir=data_dir, **cli_env)
        assert "account deletions re-applied: 0" in again.stdout

        bad = tmp_path / "not-a-log.json"
        bad.write_text("{}")
        refused = run_cli("deletions", "apply", str(bad), data_dir=data_dir, **cli_env)
        assert refused.returncode == 1
        assert "is not a deletion log saved by expense-auth" in refused.stderr


def test_deletions_command_is_for_postgres_only(tmp_path: Path) -> None:
    result = run_cli("deletions", "save", str(tmp_path / "d.json"), data_dir=tmp_path / "var")
    assert result.returncode == 2
    assert "`expense-auth restore` keeps later deletions by itself" in result.stderr


# --- scheduled backups --------------------------------------------------------------------


@pytest.mark.parametrize("exists", [True, False], ids=["existing directory", "new directory"])
def test_scheduled_backups_rotate_and_each_is_verified(
    tmp_path: Path, google: FakeGoogle, exists: bool
) -> None:
    directory = tmp_path / "backups"
    if exists:
        directory.mkdir()
    running = start_server(
        tmp_path,
        server_env(google, BACKUP_DIR=str(directory), BACKUP_INTERVAL_SECONDS="1", BACKUP_KEEP="2"),
    )
    try:
        person = sign_in(running.url, google)
        seen: set[str] = set()  # three backups, one more than kept: one was pruned
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            if directory.exists() and not directory.is_dir():
                break  # the first backup was written over the directory's name
            names = {p.name for p in directory.glob("*.db")} if directory.is_dir() else set()
            seen |= names
            if len(names) > 2:
                # Between taking a backup and pruning, the new file and the old ones
                # exist side by side for an instant; what matters is what is kept.
                time.sleep(0.5)
                kept = list(directory.glob("*.db"))
                assert len(kept) <= 2, sorted(p.name for p in kept)
            time.sleep(0.05)
        logs = running.logs()
        assert directory.is_dir(), f"BACKUP_DIR is not a directory\n{logs}"
        assert len(seen) >= 3, f"backups seen in 10 s: {sorted(seen)}\n{logs}"
    finally:
        assert running.stop() == 0, running.logs()
    listing = sorted(p.name for p in directory.iterdir())  # before this test opens anything

    kept = sorted(directory.glob("*.db"))
    assert len(kept) == 2, kept
    assert all(DATED_BACKUP.fullmatch(p.name) for p in kept), kept
    for path in kept:
        assert integrity(path) == "ok", path
    assert person.sub in subjects(kept[-1])
    assert "backup taken" in logs
    assert "scheduled backup failed" not in logs
    # Nothing accumulates beside the kept backups, however long the server runs.
    assert listing == [p.name for p in kept], f"left beside the backups: {listing}"


# --- retention ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clock(tmp_path_factory: pytest.TempPathFactory) -> FileClock:
    return FileClock(tmp_path_factory.mktemp("clock") / "now")


@pytest.fixture(scope="module")
def clocked(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle, clock: FileClock
) -> Iterator[RunningServer]:
    """A server on the file clock that applies short retention windows every second.

    Each test sets the clock to its own starting time and reads only its own rows.
    """
    running = start_server(
        tmp_path_factory.mktemp("retention"),
        server_env(
            google,
            TEST_CLOCK_FILE=str(clock.path),
            RETENTION_INTERVAL_SECONDS="1",
            RETENTION_SESSION_DAYS="1",
            RETENTION_AUDIT_DAYS="2",
            RETENTION_FULL_IP_DAYS="1",
        ),
        app="tests.support.clock_app:app",
    )
    yield running
    assert running.stop() == 0, running.logs()


def eventually(condition: Callable[[], bool], what: str, *, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_retention_deletes_sessions_a_day_after_they_end(
    clocked: RunningServer, google: FakeGoogle, clock: FileClock
) -> None:
    clock.set_ms(now_ms() + 100 * DAY_MS)  # a time of its own, after the other tests'

    def stored(*people: Person) -> set[str]:
        ids = {str(row[0]) for row in rows(clocked, "SELECT id FROM sessions")}
        return ids & {p.session_id for p in people}

    # 00:00: anna's session will end by inactivity at 00:30; ben signs out.
    anna, ben = sign_in(clocked.url, google), sign_in(clocked.url, google)
    ben.browser.call(ben.browser.auth.sign_out, SignOutRequest())
    # 24:01: eve signs in and out; dan signs in.
    clock.advance((DAY_MS + 60_000) / 1000)
    eve = sign_in(clocked.url, google)
    eve.browser.call(eve.browser.auth.sign_out, SignOutRequest())
    dan = sign_in(clocked.url, google)
    # Ben's session ended a day and a minute ago, anna's 23.5 hours ago.
    eventually(lambda: ben.session_id not in stored(ben), "a session revoked a day ago deleted")
    assert stored(anna, eve, dan) == {anna.session_id, eve.session_id, dan.session_id}

    # 25:01: anna's session, ended by inactivity at 00:30, is over a day past its end.
    clock.advance(HOUR_MS / 1000)
    eventually(
        lambda: anna.session_id not in stored(anna),
        "a session that ended by inactivity deleted a day after it ended",
    )
    assert stored(eve, dan) == {eve.session_id, dan.session_id}  # ended recently, and live


def test_retention_shortens_addresses_then_deletes_events_but_not_tombstones(
    clocked: RunningServer, google: FakeGoogle, clock: FileClock
) -> None:
    clock.set_ms(now_ms())  # a deletion needs a clock that agrees with Google's tokens

    def events(person: Person) -> list[tuple[object, ...]]:
        return rows(
            clocked,
            "SELECT kind, ip FROM audit_events WHERE user_id = ? ORDER BY id",
            person.user_id,
        )

    def tombstones() -> list[tuple[object, ...]]:
        return rows(clocked, "SELECT kind, ip FROM audit_events WHERE subject_hash = ?", cleo_hash)

    # Day 0: anna signs in, ben signs in and out, cleo deletes her account.
    anna, ben, cleo = (sign_in(clocked.url, google) for _ in range(3))
    cleo_hash = subject_hash(ISSUER, cleo.sub)
    ben.browser.call(ben.browser.auth.sign_out, SignOutRequest())
    cleo.browser.call(
        cleo.browser.users.delete_current_user,
        DeleteCurrentUserRequest(google_id_token=cleo.fresh_token(google)),
    )
    assert events(anna) == [("sign_in", LOCAL_IP)]
    assert events(ben) == [("sign_in", LOCAL_IP), ("sign_out", LOCAL_IP)]
    assert tombstones() == [("account_deleted", "")]

    # Day 1 and an hour: past the full-address window, within the audit window.
    clock.advance((DAY_MS + HOUR_MS) / 1000)
    dan = sign_in(clocked.url, google)
    eventually(lambda: events(anna) == [("sign_in", LOCAL_NETWORK)], "day-old addresses shortened")
    assert events(ben) == [("sign_in", LOCAL_NETWORK), ("sign_out", LOCAL_NETWORK)]
    assert events(dan) == [("sign_in", LOCAL_IP)]  # new: kept whole

    # Day 2 and two hours: day-0 events are past the audit window; the tombstone stays.
    clock.advance((DAY_MS + HOUR_MS) / 1000)
    eventually(lambda: not events(anna), "events older than two days deleted")
    assert events(ben) == []
    assert tombstones() == [("account_deleted", "")]
    assert events(dan) == [("sign_in", LOCAL_NETWORK)]  # a day old: kept, address cut
    assert integrity(clocked.data_dir / DB_NAME) == "ok"


def test_purge_command_applies_the_windows_and_prints_the_counts(
    clocked: RunningServer, google: FakeGoogle, clock: FileClock
) -> None:
    # Rows from ten days ago, written by the server with its clock set back (its own
    # job sees them as new). The command runs on the real clock, beside the server.
    clock.set_ms(now_ms() - 10 * DAY_MS)
    anna, ben, cleo = (sign_in(clocked.url, google) for _ in range(3))
    ben.browser.call(ben.browser.auth.sign_out, SignOutRequest())
    cleo.browser.call(
        cleo.browser.users.delete_current_user,
        DeleteCurrentUserRequest(google_id_token=cleo.fresh_token(google)),
    )
    old = now_ms() - 5 * DAY_MS  # only this test's rows are older than this
    mine = "SELECT kind, ip FROM audit_events WHERE time_ms < ? ORDER BY id"
    # Cleo's own events went with her account; her tombstone has no address.
    assert rows(clocked, mine, old) == [
        ("sign_in", LOCAL_IP),
        ("sign_in", LOCAL_IP),
        ("sign_out", LOCAL_IP),
        ("account_deleted", ""),
    ]
    sessions = "SELECT count(*) FROM sessions WHERE create_ms < ?"
    assert rows(clocked, sessions, old) == [(2,)]
    windows = {"RETENTION_SESSION_DAYS": "1", "RETENTION_FULL_IP_DAYS": "1"}

    # Sessions ended over a day ago go; events stay 30 days, with their addresses cut.
    first = run_cli("purge", data_dir=clocked.data_dir, RETENTION_AUDIT_DAYS="30", **windows)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "sessions=2 events=0 tokens=0 ips=3"
    assert rows(clocked, sessions, old) == [(0,)]
    assert rows(clocked, mine, old) == [
        ("sign_in", LOCAL_NETWORK),
        ("sign_in", LOCAL_NETWORK),
        ("sign_out", LOCAL_NETWORK),
        ("account_deleted", ""),
    ]

    # With a five-day audit window the events go too, except the tombstone.
    second = run_cli("purge", data_dir=clocked.data_dir, RETENTION_AUDIT_DAYS="5", **windows)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "sessions=0 events=3 tokens=0 ips=0"
    tombstone = "SELECT kind, subject_hash FROM audit_events WHERE time_ms < ?"
    assert rows(clocked, tombstone, old) == [("account_deleted", subject_hash(ISSUER, cleo.sub))]
    assert {anna.sub, ben.sub} <= subjects(clocked.data_dir / DB_NAME)  # accounts stay
