"""The embedded SQLite store (the default engine): every domain port over one file.

One connection per thread (sqlite3 connections are bound to their thread), in
WAL mode with a busy timeout. Every write runs in `BEGIN IMMEDIATE`, which takes
the write lock up front: a deferred transaction that reads and then writes
fails at once with "database is locked" when another writer got in between.
The queries live in one module per port (sessions, accounts, admin,
retention); this class owns the connections, the transactions and the
principal cache.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

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
from server.storage.sqlite import accounts, admin, retention, sessions
from server.storage.sqlite.connection import applied_migrations, connect, known_migrations
from server.storage.sqlite.principals import PrincipalCache

P = ParamSpec("P")
T = TypeVar("T")
Query = Callable[Concatenate[sqlite3.Connection, P], T]


class SQLiteStore:
    """Users and sessions in one SQLite file.

    `find_principal` (every authenticated call) is served from a per-thread
    cache that is exactly as fresh as the database (see principals.py): any
    write transaction of this thread empties it, and `PRAGMA data_version`,
    read on every lookup, changes when any other connection has committed. Only
    `touch_session`, which moves `last_seen_ms` forward, forgets just the
    session it touched.
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
    def _transaction(self, *, forget_principals: bool = True) -> Iterator[sqlite3.Connection]:
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

    async def _write(self, query: Query[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `query` in a write transaction (which empties this thread's principal cache)."""
        with self._transaction() as conn:
            return query(conn, *args, **kwargs)

    async def _read(self, query: Query[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `query` outside a write transaction."""
        return query(self._conn, *args, **kwargs)

    def _principals(self, conn: sqlite3.Connection) -> PrincipalCache:
        """This thread's principal cache, emptied if another connection has written."""
        version: int = conn.execute("PRAGMA data_version").fetchone()[0]
        cache: PrincipalCache | None = getattr(self._local, "principals", None)
        if cache is None or cache.data_version != version:
            cache = self._local.principals = PrincipalCache(version)
        return cache

    # SessionStore

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
        """See `SessionStore.sign_in`: one transaction, one commit."""
        return await self._write(
            sessions.sign_in,
            identity,
            new_user_id=new_user_id,
            defaults=defaults,
            session=session,
            now_ms=now_ms,
            event=event,
            nonce=nonce,
        )

    async def find_user_by_subject(self, issuer: str, subject: str) -> User | None:
        """See `SessionStore.find_user_by_subject`."""
        return await self._read(sessions.find_user_by_subject, issuer, subject)

    async def find_principal(self, token_hash: bytes) -> Principal | None:
        """The session with this token hash, and its user (cached; else one indexed join)."""
        conn = self._conn
        cache = self._principals(conn)
        cached = cache.by_token.get(token_hash)
        if cached is not None:
            return cached
        principal = sessions.find_principal(conn, token_hash)
        if principal is not None:
            cache.add(token_hash, principal)
        return principal

    async def touch_session(self, session_id: str, *, last_seen_ms: int) -> None:
        """Move `last_seen_ms` forward (never back); forgets only this session's cache entry."""
        with self._transaction(forget_principals=False) as conn:
            sessions.touch_session(conn, session_id, last_seen_ms=last_seen_ms)
        cache: PrincipalCache | None = getattr(self._local, "principals", None)
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
        """See `SessionStore.revoke_session`."""
        return await self._write(
            sessions.revoke_session,
            user_id,
            session_id,
            now_ms=now_ms,
            idle_cutoff_ms=idle_cutoff_ms,
            caller_id=caller_id,
        )

    async def revoke_other_sessions(
        self, user_id: str, keep_id: str, *, now_ms: int, idle_cutoff_ms: int
    ) -> int:
        """See `SessionStore.revoke_other_sessions`."""
        return await self._write(
            sessions.revoke_other_sessions,
            user_id,
            keep_id,
            now_ms=now_ms,
            idle_cutoff_ms=idle_cutoff_ms,
        )

    async def list_live_sessions(
        self,
        user_id: str,
        *,
        now_ms: int,
        idle_cutoff_ms: int,
        after: SessionCursor | None,
        limit: int,
    ) -> list[Session]:
        """See `SessionStore.list_live_sessions`."""
        return await self._read(
            sessions.list_live_sessions,
            user_id,
            now_ms=now_ms,
            idle_cutoff_ms=idle_cutoff_ms,
            after=after,
            limit=limit,
        )

    # ProfileStore, AuditStore, AccountStore

    async def update_user(
        self, user_id: str, changes: Mapping[str, str], *, now_ms: int
    ) -> User | None:
        """See `ProfileStore.update_user`."""
        return await self._write(accounts.update_user, user_id, changes, now_ms=now_ms)

    async def record_event(self, event: AuditEvent) -> None:
        """See `AuditStore.record_event`."""
        await self._write(accounts.record_event, event)

    async def list_events(
        self, user_id: str, *, before_id: int | None, limit: int
    ) -> list[AuditEvent]:
        """See `AccountStore.list_events`."""
        return await self._read(accounts.list_events, user_id, before_id=before_id, limit=limit)

    async def export_user(self, user_id: str) -> UserExport | None:
        """See `AccountStore.export_user`: one read transaction."""
        return await self._read(accounts.export_user, user_id)

    async def delete_user(
        self, user: User, *, identity: Identity, tombstone: AuditEvent, now_ms: int
    ) -> bool:
        """See `AccountStore.delete_user`."""
        return await self._write(
            accounts.delete_user, user, identity=identity, tombstone=tombstone, now_ms=now_ms
        )

    # AdminStore

    async def get_user(self, user_id: str) -> User | None:
        """See `AdminStore.get_user`."""
        return await self._read(accounts.get_user, user_id)

    async def list_users(
        self, *, email_contains: str, after_id: str | None, limit: int
    ) -> list[User]:
        """See `AdminStore.list_users`."""
        return await self._read(
            admin.list_users, email_contains=email_contains, after_id=after_id, limit=limit
        )

    async def set_disabled(
        self, user_id: str, *, disabled: bool, now_ms: int, idle_cutoff_ms: int
    ) -> User | None:
        """See `AdminStore.set_disabled`."""
        return await self._write(
            admin.set_disabled,
            user_id,
            disabled=disabled,
            now_ms=now_ms,
            idle_cutoff_ms=idle_cutoff_ms,
        )

    async def revoke_all_sessions(self, user_id: str, *, now_ms: int, idle_cutoff_ms: int) -> int:
        """See `AdminStore.revoke_all_sessions`."""
        return await self._write(
            admin.revoke_all_sessions, user_id, now_ms=now_ms, idle_cutoff_ms=idle_cutoff_ms
        )

    # RetentionStore

    async def purge(
        self,
        *,
        now_ms: int,
        session_grace_ms: int,
        idle_ms: int,
        events_before_ms: int,
        ips_before_ms: int,
    ) -> dict[str, int]:
        """See `RetentionStore.purge`."""
        return await self._write(
            retention.purge,
            now_ms=now_ms,
            session_grace_ms=session_grace_ms,
            idle_ms=idle_ms,
            events_before_ms=events_before_ms,
            ips_before_ms=ips_before_ms,
        )

    # Operations

    async def probe(self) -> str:
        """ "" when the database is reachable, writable and fully migrated; else the problem."""
        try:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            applied = applied_migrations(conn)
        except sqlite3.Error as exc:
            return f"database unavailable: {exc}"
        missing = [name for name in known_migrations() if name not in applied]
        return f"pending migrations: {', '.join(missing)}" if missing else ""

    def count_live_sessions(self, *, now_ms: int, idle_cutoff_ms: int) -> int:
        """How many sessions are live (for the active-sessions gauge)."""
        return sessions.count_live_sessions(
            self._conn, now_ms=now_ms, idle_cutoff_ms=idle_cutoff_ms
        )

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
