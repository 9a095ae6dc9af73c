"""The embedded SQLite store (the default engine): every domain port over one file.

Nothing here blocks the event loop. Writes run one at a time on a writer
thread, reads on a small pool of reader threads, each thread with its own
connection (sqlite3 connections are bound to their thread). Every call has a
deadline: SQLite's busy handler waits at most what is left of it for another
process's lock, then the call answers `unavailable` with a Retry-After. Every
write runs in `BEGIN IMMEDIATE`, which takes the write lock up front (a deferred
transaction that reads and then writes fails at once when another writer got in
between). SQLite errors become `unavailable` with a message for the client
(failures.py); a connection that may be stale is reopened on the next call, so
the store recovers by itself when the cause (a read-only file, a full disk) is
gone. A database file or -wal that is removed or replaced while the server runs,
or that SQLite reports damaged, marks the store damaged: every call is refused
and readiness fails until an operator restores it.

The queries live in one module per port (sessions, accounts, admin,
retention); this class owns threads, connections, transactions and the
principal cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from server.domain.errors import Unavailable
from server.domain.lifecycle import ChangeEvents, no_events
from server.domain.models import (
    AuditEvent,
    Identity,
    Principal,
    Session,
    SessionCursor,
    SingleUse,
    User,
    UserExport,
    WebhookDelivery,
)
from server.domain.ports import UserDefaults
from server.storage.failures import BUSY, DAMAGED, Failure, Incidents
from server.storage.sqlite import accounts, admin, outbox, retention, sessions
from server.storage.sqlite.connection import (
    BUSY_TIMEOUT_MS,
    applied_migrations,
    connect,
    known_migrations,
)
from server.storage.sqlite.failures import classify
from server.storage.sqlite.principals import PrincipalCache
from server.storage.touches import DeferredTouches

log = logging.getLogger("expense_auth.storage")

P = ParamSpec("P")
T = TypeVar("T")
Query = Callable[Concatenate[sqlite3.Connection, P], T]

READER_THREADS = 4
# Errors of our own code (a constraint we violated, a bad statement): not the
# database's failure, so they stay errors (`internal`), with a traceback.
_OUR_BUGS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)


class SQLiteStore:
    """Users and sessions in one SQLite file.

    `find_principal` (every authenticated call) is served from a cache on the
    event loop that is exactly as fresh as the database: it is valid for one
    value of `principal_generation.n`, which triggers move on any change to a
    user or to a session but its last-seen time, whoever makes the change (this
    process, another one, the CLI, an operator's `sqlite3`). Reading that counter
    is one small indexed read on a connection that never waits for a lock (a
    read in WAL mode does not wait for writers); if it cannot answer at once,
    the lookup goes to a reader thread and skips the cache.
    """

    def __init__(self, path: Path, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self._path = path
        self._wal_path = path.with_name(path.name + "-wal")
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="sqlite-reader")
        self._loop_conn: sqlite3.Connection | None = None
        self._cache = PrincipalCache(-1)
        self._touches = DeferredTouches(self._write_touches)
        self._files: tuple[int, int] | None = None
        self.incidents = Incidents()
        self.damage = ""

    # Threads and transactions

    @property
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self._path, busy_timeout_ms=self._busy_timeout_ms)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    async def _write(self, query: Query[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `query` in a write transaction on the writer thread."""
        return await self._submit(self._writer, query, args, kwargs, write=True)

    async def _read(self, query: Query[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `query` on a reader thread."""
        return await self._submit(self._readers, query, args, kwargs, write=False)

    async def _submit(
        self,
        pool: ThreadPoolExecutor,
        query: Query[P, T],
        args: tuple[object, ...],
        kwargs: Mapping[str, object],
        *,
        write: bool,
        even_if_damaged: bool = False,
    ) -> T:
        wait_s = self._busy_timeout_ms / 1000
        deadline = time.monotonic() + wait_s
        future = pool.submit(
            self._run,
            query,
            args,
            kwargs,
            write=write,
            deadline=deadline,
            even_if_damaged=even_if_damaged,
        )
        try:
            # The thread gives up by the deadline itself; this bounds the wait for a
            # thread that is stuck in the file system (a hung disk).
            async with asyncio.timeout(wait_s + 5):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            self.incidents.failed(BUSY, None)
            raise BUSY.error() from None

    def _run(
        self,
        query: Query[P, T],
        args: tuple[object, ...],
        kwargs: Mapping[str, object],
        *,
        write: bool,
        deadline: float,
        even_if_damaged: bool = False,
    ) -> T:
        if self.damage and not even_if_damaged:
            raise DAMAGED.error()
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:  # queued behind calls that waited for a lock
            self.incidents.failed(BUSY, None)
            raise BUSY.error()
        try:
            conn = self._conn
            conn.execute(f"PRAGMA busy_timeout = {remaining_ms}")
            if write:
                result = self._transaction(conn, query, args, kwargs)
            else:
                result = query(conn, *args, **kwargs)  # type: ignore[arg-type]
        except _OUR_BUGS:
            raise
        except sqlite3.Error as exc:
            failure = classify(exc)
            self._failed(failure, exc)
            raise failure.error() from None
        self.incidents.succeeded(write=write)
        return result

    def _transaction(
        self,
        conn: sqlite3.Connection,
        query: Query[P, T],
        args: tuple[object, ...],
        kwargs: Mapping[str, object],
    ) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._check_files()
            result = query(conn, *args, **kwargs)  # type: ignore[arg-type]
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return result

    def _check_files(self) -> None:
        """Refuse to write once the database or its -wal is not the file we opened.

        Deleting the -wal of a live database does not stop SQLite: it goes on
        writing into the unlinked file, and every write acknowledged after that is
        lost. Checked in each write transaction, after the write lock is taken.
        """
        try:
            files = (os.stat(self._path).st_ino, os.stat(self._wal_path).st_ino)
        except FileNotFoundError as exc:
            missing = Path(exc.filename or "").name
            self._mark_damaged(
                f"{missing} was removed while the server was running; restart the server "
                "(restore a backup if the database is gone)"
            )
            raise DAMAGED.error() from None
        if self._files is None:
            self._files = files
        elif files != self._files:
            self._mark_damaged(
                "the database file or its -wal was replaced while the server was running; "
                "restart the server"
            )
            raise DAMAGED.error()

    def _failed(self, failure: Failure, exc: BaseException) -> None:
        self.incidents.failed(failure, exc)
        if failure.damaged:
            self._mark_damaged(f"SQLite reports the file damaged ({exc})")
        if failure.reconnect:
            self._drop_connection()

    def _mark_damaged(self, why: str) -> None:
        if not self.damage:
            self.damage = (
                f"{why}; the server refuses to use the database until it is restored "
                "(expense-auth restore BACKUP)"
            )
            log.error("database damaged", extra={"why": why})

    # The principal cache, on the event loop

    def _generation(self) -> int | None:
        """The principal generation, read on the event loop without waiting; None if the
        database cannot answer at once (the caller then skips the cache)."""
        if self.damage:
            return None
        try:
            conn = self._loop_conn
            if conn is None:
                conn = sqlite3.connect(self._path, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout = 0")
                conn.execute("PRAGMA query_only = 1")
                self._loop_conn = conn
            return sessions.principal_generation(conn)
        except sqlite3.Error:
            self._close_loop_conn()
            return None

    def _close_loop_conn(self) -> None:
        conn, self._loop_conn = self._loop_conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _with_unwritten_touch(self, principal: Principal) -> Principal:
        at = self._touches.pending(principal.session.id)
        if at is None or at <= principal.session.last_seen_ms:
            return principal
        return replace(principal, session=replace(principal.session, last_seen_ms=at))

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
        events: ChangeEvents = no_events,
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
            events=events,
        )

    async def find_user_by_subject(self, issuer: str, subject: str) -> User | None:
        """See `SessionStore.find_user_by_subject`."""
        return await self._read(sessions.find_user_by_subject, issuer, subject)

    async def find_principal(self, token_hash: bytes, *, fresh: bool = False) -> Principal | None:
        """See `SessionStore.find_principal` (served from the cache unless `fresh`)."""
        generation = None if fresh else self._generation()
        cache = self._cache
        if generation is not None:
            if generation != cache.generation:
                cache = self._cache = PrincipalCache(generation)
            cached = cache.by_token.get(token_hash)
            if cached is not None:
                return self._with_unwritten_touch(cached)
        principal = await self._read(sessions.find_principal, token_hash)
        if principal is None:
            return None
        # Labelled with the generation read before the row: if anything changed in
        # between, the next lookup sees a newer generation and drops it.
        if generation is not None and self._cache is cache:
            principal = cache.add(token_hash, principal)
        return self._with_unwritten_touch(principal)

    async def touch_session(self, session_id: str, *, last_seen_ms: int) -> None:
        """Move `last_seen_ms` forward (never back). Never fails, and waits at most a
        quarter of a second (server/storage/touches.py)."""
        self._cache.forget_session(session_id)
        await self._touches.touch(session_id, last_seen_ms)

    async def _write_touches(self, last_seen: Mapping[str, int]) -> None:
        await self._write(sessions.touch_sessions, last_seen)

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
        self,
        user_id: str,
        changes: Mapping[str, str],
        *,
        now_ms: int,
        events: ChangeEvents = no_events,
    ) -> User | None:
        """See `ProfileStore.update_user`."""
        return await self._write(
            accounts.update_user, user_id, changes, now_ms=now_ms, events=events
        )

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
        self,
        user: User,
        *,
        identity: Identity,
        tombstone: AuditEvent,
        now_ms: int,
        events: ChangeEvents = no_events,
    ) -> bool:
        """See `AccountStore.delete_user`."""
        return await self._write(
            accounts.delete_user,
            user,
            identity=identity,
            tombstone=tombstone,
            now_ms=now_ms,
            events=events,
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
        self,
        user_id: str,
        *,
        disabled: bool,
        now_ms: int,
        idle_cutoff_ms: int,
        events: ChangeEvents = no_events,
    ) -> User | None:
        """See `AdminStore.set_disabled`."""
        return await self._write(
            admin.set_disabled,
            user_id,
            disabled=disabled,
            now_ms=now_ms,
            idle_cutoff_ms=idle_cutoff_ms,
            events=events,
        )

    async def revoke_all_sessions(self, user_id: str, *, now_ms: int, idle_cutoff_ms: int) -> int:
        """See `AdminStore.revoke_all_sessions`."""
        return await self._write(
            admin.revoke_all_sessions, user_id, now_ms=now_ms, idle_cutoff_ms=idle_cutoff_ms
        )

    # OutboxStore

    async def outbox_due(self, *, now_ms: int, endpoints: Sequence[str]) -> bool:
        """See `OutboxStore.outbox_due`."""
        return await self._read(outbox.due, now_ms=now_ms, endpoints=endpoints)

    async def claim_outbox(
        self,
        *,
        now_ms: int,
        lease_until_ms: int,
        owner: str,
        endpoints: Sequence[str],
        limit: int,
    ) -> list[WebhookDelivery]:
        """See `OutboxStore.claim_outbox`."""
        return await self._write(
            outbox.claim,
            now_ms=now_ms,
            lease_until_ms=lease_until_ms,
            owner=owner,
            endpoints=endpoints,
            limit=limit,
        )

    async def outbox_delivered(self, seq: int, *, owner: str) -> None:
        """See `OutboxStore.outbox_delivered`."""
        await self._write(outbox.delivered, seq, owner=owner)

    async def outbox_failed(
        self, seq: int, *, owner: str, error: str, next_attempt_ms: int, park: bool
    ) -> None:
        """See `OutboxStore.outbox_failed`."""
        await self._write(
            outbox.failed, seq, owner=owner, error=error, next_attempt_ms=next_attempt_ms, park=park
        )

    async def list_outbox(
        self, *, states: Sequence[str], after_seq: int | None, limit: int
    ) -> list[WebhookDelivery]:
        """See `OutboxStore.list_outbox`."""
        return await self._read(
            outbox.list_entries, states=states, after_seq=after_seq, limit=limit
        )

    async def redeliver_outbox(
        self, event_id: str, *, now_ms: int
    ) -> tuple[list[WebhookDelivery], bool]:
        """See `OutboxStore.redeliver_outbox`."""
        return await self._write(outbox.redeliver, event_id, now_ms=now_ms)

    async def count_outbox(self) -> dict[str, int]:
        """See `OutboxStore.count_outbox`."""
        return await self._read(outbox.count)

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

    async def claim_job(self, name: str, *, now_ms: int, interval_ms: int) -> bool:
        """Claim this period of a periodic job for this process (once for all workers)."""
        return await self._write(retention.claim_job, name, now_ms=now_ms, interval_ms=interval_ms)

    # Operations

    async def probe(self, *, now_ms: int) -> str:
        """ "" when the database takes a real write and is fully migrated; else the problem."""
        if self.damage:
            return f"damaged: {self.damage}"
        try:
            await self._write(_write_probe, now_ms)
            applied = await self._read(applied_migrations)
        except Unavailable as exc:
            return f"unavailable ({exc.reason}): {exc.message}"
        missing = [name for name in known_migrations() if name not in applied]
        return f"pending migrations: {', '.join(missing)}" if missing else ""

    async def count_live_sessions(self, *, now_ms: int, idle_cutoff_ms: int) -> int:
        """How many sessions are live (for the active-sessions gauge)."""
        return await self._read(
            sessions.count_live_sessions, now_ms=now_ms, idle_cutoff_ms=idle_cutoff_ms
        )

    async def checkpoint(self) -> None:
        """Fold the write-ahead log into the database file (before backups and at shutdown).

        Even when the store is damaged: if the -wal was removed, its frames are still in
        the open (unlinked) file, and this is how they reach the database file.
        """
        await self._submit(self._writer, _checkpoint, (), {}, write=False, even_if_damaged=True)

    async def aclose(self) -> None:
        """At shutdown: write pending last-seen times, fold the -wal into the file,
        stop the threads and close every connection."""
        await self._touches.flush()
        with contextlib.suppress(Unavailable):
            await self.checkpoint()
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the threads and close every connection (once, at exit)."""
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._close_loop_conn()
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()


def _write_probe(conn: sqlite3.Connection, now_ms: int) -> None:
    conn.execute("UPDATE write_probe SET at_ms = ? WHERE id = 1", (now_ms,))


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
