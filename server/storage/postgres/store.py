"""The PostgreSQL store: every domain port over a pool of asyncpg connections.

Why asyncpg (over psycopg 3 with psycopg_pool): measured on this engine's own
statements (bench/pg_driver.py, docs/benchmarks.md "PostgreSQL driver"), the
session check costs the same client CPU with both, and a write transaction less
with asyncpg; the client's CPU is what the single-threaded server pays. The
price: asyncpg parses the URL itself and takes the libpq parameters it knows
(host, port, user, password, dbname, sslmode, sslrootcert, sslcert, sslkey,
sslcrl, passfile, target_session_attrs, service...), not every libpq option.

Every session check reads the database: one indexed join, no cache, so a
revocation on any replica is refused by every replica at the very next request
(the SQLite engine's cache is exact only for processes sharing its file). Every
call is bounded: the pool is waited for at most the connect timeout, and every
statement and lock wait at most the statement timeout, after which the call
answers `unavailable` with a Retry-After; the pool replaces broken connections by
itself, so the store recovers when the server is back. A transaction that loses
a race (a serialization failure or a deadlock) is tried again, twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Concatenate, ParamSpec, TypeVar

import asyncpg

from server.domain.errors import DomainError, Unavailable
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
from server.storage.failures import UNREACHABLE, Incidents
from server.storage.postgres import outbox, queries
from server.storage.postgres.failures import RETRYABLE, classify
from server.storage.postgres.schema import applied_migrations, known_migrations
from server.storage.touches import DeferredTouches

P = ParamSpec("P")
T = TypeVar("T")
Query = Callable[Concatenate[Any, P], Awaitable[T]]
ATTEMPTS = 3


class _FloorRetriesOnOneLine(logging.Filter):
    """asyncpg's pool reconnects up to its minimum size by itself while the database
    is down, and logs each failed try (1 s, 2 s, 4 s... apart) with a traceback. The
    error's text says all there is (the store logs the incident itself), and a
    traceback in the log stands for a bug of ours: keep the line, drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and record.getMessage().startswith("Failed to restore the pool"):
            record.error = f"{type(exc).__name__}: {exc}"[:300]
            record.exc_info = None
            record.exc_text = None
        return True


logging.getLogger("asyncpg.pool").addFilter(_FloorRetriesOnOneLine())


class PostgresStore:
    """Users and sessions in a PostgreSQL database."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int,
        connect_timeout_s: float,
        statement_timeout_ms: int,
    ) -> None:
        self._url = url
        self._pool_size = pool_size
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_ms = statement_timeout_ms
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._touches = DeferredTouches(self._write_touches)
        self.incidents = Incidents()
        self.damage = ""

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._url,
                    min_size=1,
                    max_size=self._pool_size,
                    timeout=self._connect_timeout_s,
                    server_settings={
                        "application_name": "expense-auth",
                        "statement_timeout": str(self._statement_timeout_ms),
                        "lock_timeout": str(self._statement_timeout_ms),
                        "idle_in_transaction_session_timeout": str(10 * self._statement_timeout_ms),
                    },
                )
            return self._pool

    async def _call(
        self,
        query: Query[P, T],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        isolation: str | None = None,
        readonly: bool = False,
    ) -> T:
        """Run `query` on a pooled connection, in a transaction when `isolation` is given."""
        for attempt in range(ATTEMPTS):
            try:
                async with asyncio.timeout(
                    self._connect_timeout_s + self._statement_timeout_ms / 1000
                ):
                    pool = await self._get_pool()
                    async with pool.acquire(timeout=self._connect_timeout_s) as conn:
                        if isolation is None:
                            result = await query(conn, *args, **kwargs)
                        else:
                            async with conn.transaction(isolation=isolation, readonly=readonly):
                                result = await query(conn, *args, **kwargs)
            except DomainError:
                raise  # a rule of the domain said no (a replayed token...): not a failure
            except RETRYABLE:
                if attempt + 1 < ATTEMPTS:
                    continue
                raise self._failed(asyncpg.exceptions.SerializationError()) from None
            except Exception as exc:
                if classify(exc) is None:
                    raise  # our own bug: `internal`, with its traceback
                raise self._failed(exc) from None
            write = isolation is not None and not readonly
            self.incidents.succeeded(write=write)
            return result
        raise AssertionError("unreachable")

    def _failed(self, exc: BaseException) -> Unavailable:
        failure = classify(exc) or UNREACHABLE
        self.incidents.failed(failure, exc)
        return failure.error()

    async def _write(self, query: Query[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._call(query, args, kwargs, isolation="read_committed")

    async def _read(self, query: Query[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._call(query, args, kwargs)

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
        """See `SessionStore.sign_in`: one transaction."""
        return await self._write(
            queries.sign_in,
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
        return await self._read(queries.find_user_by_subject, issuer, subject)

    async def find_principal(self, token_hash: bytes, *, fresh: bool = False) -> Principal | None:
        """See `SessionStore.find_principal` (always read: there is no cache)."""
        principal = await self._read(queries.find_principal, token_hash)
        if principal is None:
            return None
        at = self._touches.pending(principal.session.id)
        if at is not None and at > principal.session.last_seen_ms:
            principal = replace(principal, session=replace(principal.session, last_seen_ms=at))
        return principal

    async def touch_session(self, session_id: str, *, last_seen_ms: int) -> None:
        """See `SessionStore.touch_session` (server/storage/touches.py)."""
        await self._touches.touch(session_id, last_seen_ms)

    async def _write_touches(self, last_seen: Mapping[str, int]) -> None:
        await self._write(queries.touch_sessions, last_seen)

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
            queries.revoke_session,
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
            queries.revoke_other_sessions,
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
            queries.list_live_sessions,
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
            queries.update_user, user_id, changes, now_ms=now_ms, events=events
        )

    async def record_event(self, event: AuditEvent) -> None:
        """See `AuditStore.record_event`."""
        await self._write(queries.record_event, event)

    async def list_events(
        self, user_id: str, *, before_id: int | None, limit: int
    ) -> list[AuditEvent]:
        """See `AccountStore.list_events`."""
        return await self._read(queries.list_events, user_id, before_id=before_id, limit=limit)

    async def export_user(self, user_id: str) -> UserExport | None:
        """See `AccountStore.export_user`: one repeatable-read snapshot."""
        return await self._call(
            queries.export_user, (user_id,), {}, isolation="repeatable_read", readonly=True
        )

    async def delete_user(
        self,
        user: User,
        *,
        identity: Identity,
        tombstone: AuditEvent,
        now_ms: int,
        events: ChangeEvents = no_events,
    ) -> bool:
        """See `AccountStore.delete_user`: all or nothing."""
        return await self._write(
            queries.delete_user,
            user,
            identity=identity,
            tombstone=tombstone,
            now_ms=now_ms,
            events=events,
        )

    # AdminStore

    async def get_user(self, user_id: str) -> User | None:
        """See `AdminStore.get_user`."""
        return await self._read(queries.get_user, user_id)

    async def list_users(
        self, *, email_contains: str, after_id: str | None, limit: int
    ) -> list[User]:
        """See `AdminStore.list_users`."""
        return await self._read(
            queries.list_users, email_contains=email_contains, after_id=after_id, limit=limit
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
            queries.set_disabled,
            user_id,
            disabled=disabled,
            now_ms=now_ms,
            idle_cutoff_ms=idle_cutoff_ms,
            events=events,
        )

    async def revoke_all_sessions(self, user_id: str, *, now_ms: int, idle_cutoff_ms: int) -> int:
        """See `AdminStore.revoke_all_sessions`."""
        return await self._write(
            queries.revoke_all_sessions, user_id, now_ms=now_ms, idle_cutoff_ms=idle_cutoff_ms
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
        """See `OutboxStore.claim_outbox`: once per cluster (outbox.py)."""
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

    # RetentionStore, and the jobs

    async def purge(
        self,
        *,
        now_ms: int,
        session_grace_ms: int,
        idle_ms: int,
        events_before_ms: int,
        ips_before_ms: int,
    ) -> dict[str, int]:
        """See `RetentionStore.purge`: one transaction."""
        return await self._write(
            queries.purge,
            now_ms=now_ms,
            session_grace_ms=session_grace_ms,
            idle_ms=idle_ms,
            events_before_ms=events_before_ms,
            ips_before_ms=ips_before_ms,
        )

    async def claim_job(self, name: str, *, now_ms: int, interval_ms: int) -> bool:
        """Claim this period of a periodic job for this process (once per cluster)."""
        return await self._write(queries.claim_job, name, now_ms=now_ms, interval_ms=interval_ms)

    # Operations

    async def probe(self, *, now_ms: int) -> str:
        """ "" when the database takes a real write and is fully migrated; else the problem."""
        try:
            await self._write(queries.write_probe, now_ms)
            applied = await self._read(applied_migrations)
        except Unavailable as exc:
            return f"unavailable ({exc.reason}): {exc.message}"
        missing = [name for name in known_migrations() if name not in applied]
        return f"pending migrations: {', '.join(missing)}" if missing else ""

    async def count_live_sessions(self, *, now_ms: int, idle_cutoff_ms: int) -> int:
        """How many sessions are live (for the active-sessions gauge)."""
        return await self._read(
            queries.count_live_sessions, now_ms=now_ms, idle_cutoff_ms=idle_cutoff_ms
        )

    async def checkpoint(self) -> None:
        """Nothing to fold: PostgreSQL keeps its own write-ahead log."""

    async def aclose(self) -> None:
        """At shutdown: write pending last-seen times, then close the pool."""
        await self._touches.flush()
        if self._pool is not None:
            try:
                async with asyncio.timeout(5):
                    await self._pool.close()
            except TimeoutError:
                self._pool.terminate()
