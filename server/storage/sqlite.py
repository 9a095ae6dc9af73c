"""The embedded SQLite store (the default engine).

One connection per thread (sqlite3 connections are bound to their thread), in
WAL mode with a busy timeout. Every write runs in `BEGIN IMMEDIATE`, which takes
the write lock up front: a deferred transaction that reads and then writes
fails at once with "database is locked" when another writer got in between.
Calls complete without yielding to the event loop: each is one short
statement or transaction on a local file, cheaper than a hop to a thread pool.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from server.domain.errors import InvalidIdToken
from server.domain.models import Identity, Principal, Session, SessionCursor, User
from server.storage.base import UserDefaults
from server.storage.migrations import migrations

BUSY_TIMEOUT_MS = 5_000

_USER_COLUMNS = (
    "id, issuer, subject, email, email_verified, display_name, picture_uri, "
    "currency_code, time_zone, locale, create_ms, update_ms"
)
_SESSION_COLUMNS = (
    "id, user_id, token_hash, create_ms, last_seen_ms, expire_ms, revoke_ms, user_agent"
)
# A live session: parameters (now_ms, idle_cutoff_ms). One definition for every query.
_LIVE = "revoke_ms IS NULL AND expire_ms > ? AND last_seen_ms > ?"
_UPDATABLE = frozenset({"display_name", "currency_code", "time_zone", "locale"})


class SchemaTooNew(Exception):
    """The database was migrated by a newer version of the service."""


def _user(row: tuple[Any, ...]) -> User:
    return User(
        id=row[0],
        issuer=row[1],
        subject=row[2],
        email=row[3],
        email_verified=bool(row[4]),
        display_name=row[5],
        picture_uri=row[6],
        currency_code=row[7],
        time_zone=row[8],
        locale=row[9],
        create_ms=row[10],
        update_ms=row[11],
    )


def _session(row: tuple[Any, ...]) -> Session:
    return Session(
        id=row[0],
        user_id=row[1],
        token_hash=row[2],
        create_ms=row[3],
        last_seen_ms=row[4],
        expire_ms=row[5],
        revoke_ms=row[6],
        user_agent=row[7],
    )


def connect(path: Path) -> sqlite3.Connection:
    """Open the database file with the service's pragmas (autocommit; explicit transactions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def migrate(path: Path) -> list[str]:
    """Apply pending migrations; returns the names applied."""
    check_schema(path)  # refuses a database migrated by a newer version
    conn = connect(path)
    try:
        db = Database(conn)
        pending = [m.name for m in migrations.pending(db)]
        migrations.apply(db)
        return pending
    finally:
        conn.close()


def check_schema(path: Path) -> list[str]:
    """The migrations not yet applied; raises SchemaTooNew for unknown applied ones."""
    conn = connect(path)
    try:
        db = Database(conn)
        known = {m.name for m in migrations._migrations}
        unknown = [m.name for m in migrations.applied(db) if m.name not in known]
        if unknown:
            raise SchemaTooNew(
                f"the database has migrations this version does not know: {', '.join(unknown)}"
            )
        return [m.name for m in migrations.pending(db)]
    finally:
        conn.close()


class SQLiteStore:
    """Users and sessions in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    @property
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self._path)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def sign_in(
        self,
        identity: Identity,
        *,
        new_user_id: str,
        defaults: UserDefaults,
        session: Session,
        now_ms: int,
    ) -> tuple[User, Session]:
        """Upsert the user by (issuer, subject) and insert the session, in one transaction.

        Raises:
            InvalidIdToken: The identity's token was used before (a replay).
        """
        with self._write() as conn:
            if identity.token_hash:
                conn.execute("DELETE FROM used_id_tokens WHERE expire_ms < ?", (now_ms,))
                claimed = conn.execute(
                    "INSERT INTO used_id_tokens (token_hash, expire_ms) VALUES (?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (identity.token_hash, identity.token_expire_ms),
                ).rowcount
                if claimed != 1:
                    raise InvalidIdToken(
                        "this ID token was already used to sign in; get a new one from Google",
                        reason="replayed",
                    )
            row = conn.execute(
                f"""
                INSERT INTO users ({_USER_COLUMNS})
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (issuer, subject) DO UPDATE SET
                    update_ms = CASE
                        WHEN users.email IS NOT excluded.email
                          OR users.email_verified IS NOT excluded.email_verified
                          OR users.picture_uri IS NOT excluded.picture_uri
                        THEN excluded.update_ms ELSE users.update_ms END,
                    email = excluded.email,
                    email_verified = excluded.email_verified,
                    picture_uri = excluded.picture_uri
                RETURNING {_USER_COLUMNS}
                """,
                (
                    new_user_id,
                    identity.issuer,
                    identity.subject,
                    identity.email,
                    int(identity.email_verified),
                    identity.name,
                    identity.picture,
                    defaults.currency_code,
                    defaults.time_zone,
                    identity.locale or defaults.locale,
                    now_ms,
                    now_ms,
                ),
            ).fetchone()
            user = _user(row)
            stored = Session(
                id=session.id,
                user_id=user.id,
                token_hash=session.token_hash,
                create_ms=session.create_ms,
                last_seen_ms=session.last_seen_ms,
                expire_ms=session.expire_ms,
                revoke_ms=None,
                user_agent=session.user_agent,
            )
            conn.execute(
                f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    stored.id,
                    stored.user_id,
                    stored.token_hash,
                    stored.create_ms,
                    stored.last_seen_ms,
                    stored.expire_ms,
                    None,
                    stored.user_agent,
                ),
            )
        return user, stored

    async def get_user(self, user_id: str) -> User | None:
        """The user with this id, or None."""
        row = self._conn.execute(
            f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", (user_id,)
        ).fetchone()
        return _user(row) if row else None

    async def update_user(
        self, user_id: str, changes: Mapping[str, str], *, now_ms: int
    ) -> User | None:
        """Set the given profile columns and `update_ms`."""
        columns = [name for name in changes if name in _UPDATABLE]
        if len(columns) != len(changes):
            raise ValueError(f"not updatable: {sorted(set(changes) - _UPDATABLE)}")
        assignments = ", ".join(f"{name} = ?" for name in columns)
        with self._write() as conn:
            row = conn.execute(
                f"UPDATE users SET {assignments}, update_ms = ? WHERE id = ? "
                f"RETURNING {_USER_COLUMNS}",
                (*(changes[name] for name in columns), now_ms, user_id),
            ).fetchone()
        return _user(row) if row else None

    async def find_principal(self, token_hash: bytes) -> Principal | None:
        """The session with this token hash, and its user (one indexed join)."""
        row = self._conn.execute(
            """
            SELECT s.id, s.user_id, s.token_hash, s.create_ms, s.last_seen_ms, s.expire_ms,
                   s.revoke_ms, s.user_agent,
                   u.id, u.issuer, u.subject, u.email, u.email_verified, u.display_name,
                   u.picture_uri, u.currency_code, u.time_zone, u.locale, u.create_ms,
                   u.update_ms
            FROM sessions AS s JOIN users AS u ON u.id = s.user_id
            WHERE s.token_hash = ?
            """,
            (token_hash,),
        ).fetchone()
        if row is None:
            return None
        return Principal(session=_session(row[:8]), user=_user(row[8:]))

    async def touch_session(self, session_id: str, *, last_seen_ms: int) -> None:
        """Move `last_seen_ms` forward (never back)."""
        with self._write() as conn:
            conn.execute(
                "UPDATE sessions SET last_seen_ms = max(last_seen_ms, ?) WHERE id = ?",
                (last_seen_ms, session_id),
            )

    async def revoke_session(
        self, user_id: str, session_id: str, *, now_ms: int, idle_cutoff_ms: int
    ) -> bool:
        """Revoke one live session owned by `user_id`."""
        with self._write() as conn:
            cursor = conn.execute(
                f"UPDATE sessions SET revoke_ms = ? WHERE id = ? AND user_id = ? AND {_LIVE}",
                (now_ms, session_id, user_id, now_ms, idle_cutoff_ms),
            )
        return cursor.rowcount == 1

    async def revoke_other_sessions(
        self, user_id: str, keep_id: str, *, now_ms: int, idle_cutoff_ms: int
    ) -> int:
        """Revoke every live session of the user except `keep_id`."""
        with self._write() as conn:
            cursor = conn.execute(
                f"UPDATE sessions SET revoke_ms = ? WHERE user_id = ? AND id != ? AND {_LIVE}",
                (now_ms, user_id, keep_id, now_ms, idle_cutoff_ms),
            )
        return cursor.rowcount

    async def list_live_sessions(
        self,
        user_id: str,
        *,
        now_ms: int,
        idle_cutoff_ms: int,
        after: SessionCursor | None,
        limit: int,
    ) -> list[Session]:
        """Live sessions of the user, newest first, keyset-paginated."""
        query = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user_id = ? AND {_LIVE}"
        params: list[Any] = [user_id, now_ms, idle_cutoff_ms]
        if after is not None:
            query += " AND (create_ms < ? OR (create_ms = ? AND id < ?))"
            params += [after.create_ms, after.create_ms, after.session_id]
        query += " ORDER BY create_ms DESC, id DESC LIMIT ?"
        params.append(limit)
        return [_session(row) for row in self._conn.execute(query, params)]

    def close(self) -> None:
        """Close every connection this store opened (call once, at shutdown)."""
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
