"""The SQLite store on a real file: schema migrations, what it keeps, concurrent writers."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest

from server.domain.errors import InvalidIdToken
from server.domain.models import AuditEvent, Identity, Principal, User
from server.domain.sessions import NewSession, SessionPolicy, Sessions
from server.rpc.signing import CookieSigner
from server.storage.sqlite import SchemaTooNew, SQLiteStore, check_schema, migrate
from tests.support.clock import ManualClock

MINUTE = 60_000
ALL_MIGRATIONS = [
    "m001_users_and_sessions",
    "m002_used_id_tokens",
    "m003_audit_and_deletions",
    "m004_principal_generation_and_probe",
    "m005_job_runs",
    "m006_webhook_outbox",
]


ANN = Identity(
    issuer="https://accounts.google.com",
    subject="110169484474386276334",
    email="ann@example.com",
    email_verified=True,
    name="Ann Example",
    picture="",
    locale="en-GB",
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "auth.sqlite3"


@pytest.fixture
def store(path: Path) -> Iterator[SQLiteStore]:
    migrate(path)
    sqlite = SQLiteStore(path)
    yield sqlite
    sqlite.close()


@pytest.fixture
def sessions(store: SQLiteStore) -> Sessions:
    policy = SessionPolicy(idle_ms=30 * MINUTE, max_age_ms=12 * 60 * MINUTE)
    return Sessions(store, clock=ManualClock(), policy=policy)


def query(path: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def test_migrate_applies_everything_once(path: Path) -> None:
    assert check_schema(path) == ALL_MIGRATIONS

    assert migrate(path) == ALL_MIGRATIONS
    assert migrate(path) == []
    assert check_schema(path) == []
    tables = {name for (name,) in query(path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"users", "sessions"} <= tables


def test_migrating_again_keeps_the_data(path: Path, sessions: Sessions) -> None:
    new = asyncio.run(sessions.sign_in(ANN, user_agent=""))

    assert migrate(path) == []

    assert query(path, "SELECT id FROM users") == [(new.user.id,)]


@pytest.mark.parametrize("check", [check_schema, migrate], ids=["check_schema", "migrate"])
def test_a_database_from_a_newer_version_is_refused(
    path: Path, check: Callable[[Path], list[str]]
) -> None:
    migrate(path)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES (?, ?, ?)",
            ("expense-auth", "m999_from_the_future", "2030-01-01 00:00:00+00:00"),
        )

    with pytest.raises(SchemaTooNew, match="m999_from_the_future"):
        check(path)


def test_migrations_of_another_set_are_none_of_our_business(path: Path) -> None:
    migrate(path)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES (?, ?, ?)",
            ("some-plugin", "m001_plugin_tables", "2030-01-01 00:00:00+00:00"),
        )

    assert check_schema(path) == []


def test_wal_mode_is_on(path: Path, sessions: Sessions) -> None:
    asyncio.run(sessions.sign_in(ANN, user_agent=""))

    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    assert path.with_name(path.name + "-wal").exists()


def test_only_the_hash_of_a_session_secret_is_stored(path: Path, sessions: Sessions) -> None:
    new: NewSession = asyncio.run(sessions.sign_in(ANN, user_agent="Firefox on Linux"))
    secret = new.secret
    cookie = CookieSigner(["some-key"]).sign(secret)

    rows = query(path, "SELECT * FROM sessions")

    assert len(rows) == 1
    for value in rows[0]:
        assert value not in (secret, secret.encode(), cookie, cookie.encode())
        if isinstance(value, str | bytes):
            assert secret[:16] not in (value if isinstance(value, str) else value.decode("latin-1"))
    assert query(path, "SELECT token_hash FROM sessions") == [
        (hashlib.sha256(secret.encode()).digest(),)
    ]
    on_disk = b"".join(
        file.read_bytes() for file in path.parent.iterdir() if file.name.startswith(path.name)
    )
    assert secret.encode() not in on_disk
    assert hashlib.sha256(secret.encode()).digest() in on_disk  # the scan sees the data


def test_concurrent_first_sign_ins_create_one_user(
    path: Path, store: SQLiteStore, sessions: Sessions
) -> None:
    threads_count = 20
    start = threading.Barrier(threads_count)
    results: list[NewSession] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        try:
            start.wait(timeout=10)
            new = asyncio.run(sessions.sign_in(ANN, user_agent=f"thread {index}"))
        except BaseException as exc:  # reported below, with the thread's error
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(new)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert len(results) == threads_count
    users: set[User] = {new.user for new in results}
    assert len({user.id for user in users}) == 1
    (user_id,) = {user.id for user in users}
    assert query(path, "SELECT count(*) FROM users") == [(1,)]
    assert query(
        path, "SELECT count(*), count(DISTINCT id) FROM sessions WHERE user_id = ?", user_id
    ) == [(threads_count, threads_count)]
    assert query(path, "SELECT count(*) FROM sessions") == [(threads_count,)]


def test_sign_in_records_its_event_in_the_same_transaction(path: Path, sessions: Sessions) -> None:
    token = replace(ANN, token_hash=hashlib.sha256(b"one token").digest(), token_expire_ms=2**50)
    event = AuditEvent(time_ms=5, kind="sign_in", ip="192.0.2.1", user_agent="Firefox on Linux")

    new = asyncio.run(sessions.sign_in(token, user_agent="Firefox on Linux", event=event))
    with pytest.raises(InvalidIdToken):  # a replay: refused as a whole, nothing recorded
        asyncio.run(sessions.sign_in(token, user_agent="Firefox on Linux", event=event))

    assert query(path, "SELECT kind, user_id, session_id, ip FROM audit_events") == [
        ("sign_in", new.user.id, new.session.id, "192.0.2.1")
    ]
    assert query(path, "SELECT count(*) FROM sessions") == [(1,)]


def principal_of(store: SQLiteStore, new: NewSession) -> Principal:
    principal = asyncio.run(store.find_principal(hashlib.sha256(new.secret.encode()).digest()))
    assert principal is not None
    return principal


def test_cached_principals_see_this_process_s_writes_at_once(
    store: SQLiteStore, sessions: Sessions
) -> None:
    new = asyncio.run(sessions.sign_in(ANN, user_agent=""))
    assert principal_of(store, new).session.revoke_ms is None  # now cached
    asyncio.run(store.touch_session(new.session.id, last_seen_ms=new.session.last_seen_ms + 5))
    assert principal_of(store, new).session.last_seen_ms == new.session.last_seen_ms + 5
    asyncio.run(store.revoke_session(new.user.id, new.session.id, now_ms=7, idle_cutoff_ms=0))
    assert principal_of(store, new).session.revoke_ms == 7


def test_cached_principals_see_other_connections_writes_at_once(
    path: Path, store: SQLiteStore, sessions: Sessions
) -> None:
    """Another process (the CLI, a second store, sqlite3 by hand) writes: the cache notices."""
    new = asyncio.run(sessions.sign_in(ANN, user_agent=""))
    assert principal_of(store, new).user.disabled_ms is None  # now cached

    other = SQLiteStore(path)
    try:
        asyncio.run(other.set_disabled(new.user.id, disabled=True, now_ms=11, idle_cutoff_ms=0))
    finally:
        other.close()
    assert principal_of(store, new).user.disabled_ms == 11

    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE sessions SET revoke_ms = 12")
    assert principal_of(store, new).session.revoke_ms == 12


def test_cached_principals_of_one_person_share_their_user(
    store: SQLiteStore, sessions: Sessions
) -> None:
    """A person on several devices is held once in the cache, not once per session."""
    phone = asyncio.run(sessions.sign_in(ANN, user_agent="phone"))
    laptop = asyncio.run(sessions.sign_in(ANN, user_agent="laptop"))
    assert phone.session.id != laptop.session.id
    first, second = principal_of(store, phone), principal_of(store, laptop)
    assert first.session.id == phone.session.id and second.session.id == laptop.session.id
    assert first.user is second.user
    assert principal_of(store, laptop).user is first.user  # and so from the cache


def test_cached_principals_in_another_thread_see_writes_made_here(
    store: SQLiteStore, sessions: Sessions
) -> None:
    new = asyncio.run(sessions.sign_in(ANN, user_agent=""))
    with ThreadPoolExecutor(max_workers=1) as worker:  # one thread, its own connection and cache

        def look() -> int | None:
            return worker.submit(principal_of, store, new).result().session.revoke_ms

        assert look() is None  # cached in the worker thread
        asyncio.run(store.revoke_session(new.user.id, new.session.id, now_ms=9, idle_cutoff_ms=0))
        assert look() == 9
