"""The embedded SQLite store (the default engine).

One connection per thread (sqlite3 connections are bound to their thread), in
WAL mode with a busy timeout. Every write runs in `BEGIN IMMEDIATE`, which takes
the write lock up front: a deferred transaction that reads and then writes
fails at once with "database is locked" when another writer got in between.
Calls complete without yielding to the event loop: each is one short
statement or transaction on a local file, cheaper than a hop to a thread pool.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from server.domain.errors import InvalidIdToken, PermissionDenied, Unauthenticated
from server.domain.models import (
    AuditEvent,
    Identity,
    Principal,
    Session,
    SessionCursor,
    SingleUse,
    User,
    UserExport,
)
from server.domain.ports import UserDefaults
from server.domain.preferences import EDITABLE_FIELDS
from server.storage.files import private_file
from server.storage.migrations import migrations

BUSY_TIMEOUT_MS = 5_000

_USER_INSERT_COLUMNS = (
    "id, issuer, subject, email, email_verified, display_name, picture_uri, "
    "currency_code, time_zone, locale, create_ms, update_ms"
)
_USER_COLUMNS = _USER_INSERT_COLUMNS + ", disabled_ms"
_EVENT_COLUMNS = "id, time_ms, kind, user_id, reason, session_id, ip, user_agent, subject_hash"
_SESSION_COLUMNS = (
    "id, user_id, token_hash, create_ms, last_seen_ms, expire_ms, revoke_ms, user_agent"
)
# A live session: parameters (now_ms, idle_cutoff_ms). One definition for every query.
_LIVE = "revoke_ms IS NULL AND expire_ms > ? AND last_seen_ms > ?"
_UPDATABLE = frozenset(EDITABLE_FIELDS)


def shorten_ip(ip: str) -> str:
    """The /24 (IPv4) or /48 (IPv6) network of an address: coarse enough to be anonymous."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


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
        disabled_ms=row[12],
    )


def _event(row: tuple[Any, ...]) -> AuditEvent:
    return AuditEvent(
        id=row[0],
        time_ms=row[1],
        kind=row[2],
        user_id=row[3],
        reason=row[4],
        session_id=row[5],
        ip=row[6],
        user_agent=row[7],
        subject_hash=row[8],
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
    private_file(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: a commit is fsynced before it is acknowledged. NORMAL would survive a
    # process crash but could lose the last commits (a sign-in, a revocation, an
    # account deletion) to a power cut; tests/reliability/test_crash.py checks it.
    conn.execute("PRAGMA synchronous = FULL")
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


def _insert_event(conn: sqlite3.Connection, event: AuditEvent) -> None:
    conn.execute(
        "INSERT INTO audit_events (time_ms, kind, user_id, reason, session_id, ip, "
        "user_agent, subject_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.time_ms,
            event.kind,
            event.user_id,
            event.reason,
            event.session_id,
            event.ip,
            event.user_agent,
            event.subject_hash,
        ),
    )


def _spend(conn: sqlite3.Connection, once: SingleUse) -> bool:
    """Record a single-use value; False when it was recorded before."""
    claimed: int = conn.execute(
        "INSERT INTO used_id_tokens (token_hash, expire_ms) VALUES (?, ?) ON CONFLICT DO NOTHING",
        (once.key, once.expire_ms),
    ).rowcount
    return claimed == 1


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


# Principals cached per thread (see SQLiteStore.find_principal); beyond this many
# the cache starts over, so memory stays bounded (~1 KB per entry).
PRINCIPAL_CACHE_MAX = 10_000


class _PrincipalCache:
    """One thread's principals by token hash, valid for one `PRAGMA data_version`."""

    def __init__(self, data_version: int) -> None:
        self.data_version = data_version
        self.by_token: dict[bytes, Principal] = {}
        self.token_of_session: dict[str, bytes] = {}

    def add(self, token_hash: bytes, principal: Principal) -> None:
        if len(self.by_token) >= PRINCIPAL_CACHE_MAX:
            self.by_token.clear()
            self.token_of_session.clear()
        self.by_token[token_hash] = principal
        self.token_of_session[principal.session.id] = token_hash

    def forget_session(self, session_id: str) -> None:
        token_hash = self.token_of_session.pop(session_id, None)
        if token_hash is not None:
            self.by_token.pop(token_hash, None)


class SQLiteStore:
    """Users and sessions in one SQLite file.

    `find_principal` (every authenticated call) is served from a per-thread cache
    that is exactly as fresh as the database: any write transaction of this
    thread empties it, and `PRAGMA data_version`, read on every lookup, changes
    when any other connection (another thread, the CLI, another process) has
    committed, which empties it too. A revocation therefore takes effect on the
    very next request, as without the cache. Only `touch_session`, which moves
    `last_seen_ms` forward, forgets just the session it touched.
    """

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
    def _write(self, *, forget_principals: bool = True) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if forget_principals:
            self._local.principals = None

    def _principals(self, conn: sqlite3.Connection) -> _PrincipalCache:
        """This thread's principal cache, emptied if another connection has written."""
        version: int = conn.execute("PRAGMA data_version").fetchone()[0]
        cache: _PrincipalCache | None = getattr(self._local, "principals", None)
        if cache is None or cache.data_version != version:
            cache = self._local.principals = _PrincipalCache(version)
        return cache

    async def sign_in(
        self,
        identity: Identity,
        *,
        new_user_id: str,
        defaults: UserDefaults,
        session: Session,
        now_ms: int,
        event: AuditEvent | None = None,
        nonce: SingleUse | None = None,
    ) -> tuple[User, Session]:
        """Upsert the user by (issuer, subject), insert the session and record `event`,
        in one transaction (one commit, and no session without its audit record).

        Raises:
            InvalidIdToken: The identity's token, or the nonce, was used before (a replay).
        """
        with self._write() as conn:
            self._claim_token(conn, identity, now_ms)
            if nonce is not None and not _spend(conn, nonce):
                raise InvalidIdToken(
                    "this sign-in nonce was already used; start again with CreateSignInNonce",
                    reason="nonce_replayed",
                )
            row = conn.execute(
                f"""
                INSERT INTO users ({_USER_INSERT_COLUMNS})
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
            if user.disabled_ms is not None:
                raise PermissionDenied(
                    "this account has been disabled; contact support to have it enabled"
                )
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
            if event is not None:
                _insert_event(conn, replace(event, user_id=user.id, session_id=stored.id))
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
        """The session with this token hash, and its user (cached; else one indexed join)."""
        conn = self._conn
        cache = self._principals(conn)
        cached = cache.by_token.get(token_hash)
        if cached is not None:
            return cached
        row = conn.execute(
            """
            SELECT s.id, s.user_id, s.token_hash, s.create_ms, s.last_seen_ms, s.expire_ms,
                   s.revoke_ms, s.user_agent,
                   u.id, u.issuer, u.subject, u.email, u.email_verified, u.display_name,
                   u.picture_uri, u.currency_code, u.time_zone, u.locale, u.create_ms,
                   u.update_ms, u.disabled_ms
            FROM sessions AS s JOIN users AS u ON u.id = s.user_id
            WHERE s.token_hash = ?
            """,
            (token_hash,),
        ).fetchone()
        if row is None:
            return None
        principal = Principal(session=_session(row[:8]), user=_user(row[8:]))
        cache.add(token_hash, principal)
        return principal

    async def touch_session(self, session_id: str, *, last_seen_ms: int) -> None:
        """Move `last_seen_ms` forward (never back)."""
        with self._write(forget_principals=False) as conn:
            conn.execute(
                "UPDATE sessions SET last_seen_ms = max(last_seen_ms, ?) WHERE id = ?",
                (last_seen_ms, session_id),
            )
        cache: _PrincipalCache | None = getattr(self._local, "principals", None)
        if cache is not None:
            cache.forget_session(session_id)

    async def revoke_session(
        self,
        user_id: str,
        session_id: str,
        *,
        now_ms: int,
        idle_cutoff_ms: int,
        caller_id: str | None = None,
    ) -> bool:
        """Revoke one live session owned by `user_id`.

        Raises:
            Unauthenticated: `caller_id` (the session making the call) was revoked
                or ended meanwhile by a concurrent call; nothing is revoked.
        """
        with self._write() as conn:
            if caller_id is not None and caller_id != session_id:
                alive = conn.execute(
                    f"SELECT 1 FROM sessions WHERE id = ? AND user_id = ? AND {_LIVE}",
                    (caller_id, user_id, now_ms, idle_cutoff_ms),
                ).fetchone()
                if alive is None:
                    raise Unauthenticated(
                        "the session was signed out; sign in again", reason="revoked"
                    )
            cursor = conn.execute(
                f"UPDATE sessions SET revoke_ms = ? WHERE id = ? AND user_id = ? AND {_LIVE}",
                (now_ms, session_id, user_id, now_ms, idle_cutoff_ms),
            )
        return cursor.rowcount == 1

    async def revoke_other_sessions(
        self, user_id: str, keep_id: str, *, now_ms: int, idle_cutoff_ms: int
    ) -> int:
        """Revoke every live session of the user except `keep_id`.

        Raises:
            Unauthenticated: `keep_id` itself was revoked or ended meanwhile (by a
                concurrent call): the caller is signed out and revokes nothing.
        """
        with self._write() as conn:
            alive = conn.execute(
                f"SELECT 1 FROM sessions WHERE id = ? AND user_id = ? AND {_LIVE}",
                (keep_id, user_id, now_ms, idle_cutoff_ms),
            ).fetchone()
            if alive is None:
                raise Unauthenticated("the session was signed out; sign in again", reason="revoked")
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

    async def record_event(self, event: AuditEvent) -> None:
        """Append one audit event."""
        with self._write() as conn:
            _insert_event(conn, event)

    async def list_events(
        self, user_id: str, *, before_id: int | None, limit: int
    ) -> list[AuditEvent]:
        """The user's events, newest first, keyset-paginated by id."""
        query = f"SELECT {_EVENT_COLUMNS} FROM audit_events WHERE user_id = ?"
        params: list[Any] = [user_id]
        if before_id is not None:
            query += " AND id < ?"
            params.append(before_id)
        query += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [_event(row) for row in self._conn.execute(query, params)]

    async def export_user(self, user_id: str) -> UserExport | None:
        """The user, every session and every event, read in one transaction."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            row = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", (user_id,)
            ).fetchone()
            if row is None:
                return None
            sessions = [
                _session(r)
                for r in conn.execute(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user_id = ? "
                    "ORDER BY create_ms DESC, id DESC",
                    (user_id,),
                )
            ]
            events = [
                _event(r)
                for r in conn.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM audit_events WHERE user_id = ? ORDER BY id DESC",
                    (user_id,),
                )
            ]
            return UserExport(user=_user(row), sessions=sessions, events=events)
        finally:
            conn.execute("COMMIT")

    async def find_user_by_subject(self, issuer: str, subject: str) -> User | None:
        """The user signing in as (issuer, subject), or None."""
        row = self._conn.execute(
            f"SELECT {_USER_COLUMNS} FROM users WHERE issuer = ? AND subject = ?",
            (issuer, subject),
        ).fetchone()
        return _user(row) if row else None

    async def delete_user(
        self, user: User, *, identity: Identity, tombstone: AuditEvent, now_ms: int
    ) -> bool:
        """Delete the user, their sessions and events; keep a tombstone and a deletion record.

        The re-authentication token is claimed in the same transaction (once only).
        """
        with self._write() as conn:
            self._claim_token(conn, identity, now_ms)
            deleted = conn.execute("DELETE FROM users WHERE id = ?", (user.id,)).rowcount
            if deleted != 1:
                return False
            conn.execute("DELETE FROM audit_events WHERE user_id = ?", (user.id,))
            conn.execute(
                "INSERT INTO deleted_accounts (subject_hash, deleted_ms) VALUES (?, ?) "
                "ON CONFLICT DO NOTHING",
                (tombstone.subject_hash, now_ms),
            )
            conn.execute(
                "INSERT INTO audit_events (time_ms, kind, user_id, reason, session_id, ip, "
                "user_agent, subject_hash) VALUES (?, ?, NULL, ?, '', '', '', ?)",
                (tombstone.time_ms, tombstone.kind, tombstone.reason, tombstone.subject_hash),
            )
        return True

    async def set_disabled(
        self, user_id: str, *, disabled: bool, now_ms: int, idle_cutoff_ms: int
    ) -> User | None:
        """Disable (revoking every live session at once) or enable a user."""
        with self._write() as conn:
            row = conn.execute(
                # Disabling twice keeps the first time.
                f"UPDATE users SET disabled_ms = CASE WHEN ? THEN coalesce(disabled_ms, ?) END, "
                f"update_ms = ? WHERE id = ? "
                f"RETURNING {_USER_COLUMNS}",
                (disabled, now_ms, now_ms, user_id),
            ).fetchone()
            if row is not None and disabled:
                conn.execute(
                    f"UPDATE sessions SET revoke_ms = ? WHERE user_id = ? AND {_LIVE}",
                    (now_ms, user_id, now_ms, idle_cutoff_ms),
                )
        return _user(row) if row else None

    async def revoke_all_sessions(self, user_id: str, *, now_ms: int, idle_cutoff_ms: int) -> int:
        """Revoke every unrevoked session of the user."""
        with self._write() as conn:
            return conn.execute(
                f"UPDATE sessions SET revoke_ms = ? WHERE user_id = ? AND {_LIVE}",
                (now_ms, user_id, now_ms, idle_cutoff_ms),
            ).rowcount

    async def list_users(
        self, *, email_contains: str, after_id: str | None, limit: int
    ) -> list[User]:
        """Users ordered by id, optionally filtered by a case-insensitive email substring."""
        query = f"SELECT {_USER_COLUMNS} FROM users WHERE instr(lower(email), ?) > 0"
        params: list[Any] = [email_contains.lower()]
        if after_id is not None:
            query += " AND id > ?"
            params.append(after_id)
        query += " ORDER BY id LIMIT ?"
        params.append(limit)
        return [_user(row) for row in self._conn.execute(query, params)]

    async def purge(
        self,
        *,
        now_ms: int,
        session_grace_ms: int,
        idle_ms: int,
        events_before_ms: int,
        ips_before_ms: int,
    ) -> dict[str, int]:
        """Delete ended sessions, old events and spent tokens; shorten old IP addresses.

        A session ended at the earliest of its absolute expiry, its revocation and
        `idle_ms` after it was last seen; it is deleted `session_grace_ms` after that.
        """
        with self._write() as conn:
            cutoff = now_ms - session_grace_ms
            sessions = conn.execute(
                "DELETE FROM sessions WHERE expire_ms < ? OR revoke_ms < ? OR last_seen_ms + ? < ?",
                (cutoff, cutoff, idle_ms, cutoff),
            ).rowcount
            events = conn.execute(
                "DELETE FROM audit_events WHERE time_ms < ? AND kind != 'account_deleted'",
                (events_before_ms,),
            ).rowcount
            tokens = conn.execute(
                "DELETE FROM used_id_tokens WHERE expire_ms < ?", (now_ms,)
            ).rowcount
            rows = conn.execute(
                "SELECT id, ip FROM audit_events WHERE time_ms < ? AND ip != '' "
                "AND ip NOT LIKE '%/%'",
                (ips_before_ms,),
            ).fetchall()
            conn.executemany(
                "UPDATE audit_events SET ip = ? WHERE id = ?",
                [(shorten_ip(ip), event_id) for event_id, ip in rows],
            )
        return {"sessions": sessions, "events": events, "tokens": tokens, "ips": len(rows)}

    def _claim_token(self, conn: sqlite3.Connection, identity: Identity, now_ms: int) -> None:
        if not identity.token_hash:
            return
        conn.execute("DELETE FROM used_id_tokens WHERE expire_ms < ?", (now_ms,))
        if not _spend(conn, SingleUse(identity.token_hash, identity.token_expire_ms)):
            raise InvalidIdToken(
                "this ID token was already used to sign in; get a new one from Google",
                reason="replayed",
            )

    async def probe(self) -> str:
        """ "" when the database is reachable, writable and fully migrated; else the problem."""
        try:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            applied = {
                row[0]
                for row in conn.execute(
                    "SELECT name FROM _sqlite_migrations WHERE migration_set = ?",
                    (migrations.name,),
                )
            }
        except sqlite3.Error as exc:
            return f"database unavailable: {exc}"
        missing = [m.name for m in migrations._migrations if m.name not in applied]
        return f"pending migrations: {', '.join(missing)}" if missing else ""

    def count_live_sessions(self, *, now_ms: int, idle_cutoff_ms: int) -> int:
        """How many sessions are live (for the active-sessions gauge)."""
        row = self._conn.execute(
            f"SELECT count(*) FROM sessions WHERE {_LIVE}", (now_ms, idle_cutoff_ms)
        ).fetchone()
        return int(row[0])

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database file (at shutdown and before backups)."""
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """Close every connection this store opened (call once, at shutdown)."""
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
