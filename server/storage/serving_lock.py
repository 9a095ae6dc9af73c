"""Who else serves this database: one server may count rate limits alone, or all share them.

Rate limits kept in a process's memory are that process's alone: two servers on
one database would give a client twice every limit. So `expense-auth serve` locks
the database for as long as it serves: exclusively when its limits are in memory,
shared when they are in shared storage (Redis). Any number of servers with shared
limits can serve one database; one with in-memory limits serves it alone. The
second one is refused at start, with a message naming RATE_LIMIT_STORAGE_URL.

SQLite: an `flock` on a file beside the database, which every process on the host
sees (the file itself is the only way to share a SQLite database). PostgreSQL: a
session-level advisory lock on a connection of its own. If that connection is lost
(the database restarted), the lock is taken again when the database is back; if
another server took it meanwhile, an error is logged every minute until one of the
two stops. Behind PgBouncer in transaction mode a session lock is not held: give
DATABASE_URL the PostgreSQL server itself or a session-mode pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from server.storage.failures import DatabaseUnreachable
from server.storage.postgres.failures import connect

log = logging.getLogger("expense_auth.serving_lock")

# pg_try_advisory_lock key of `serve` (the migrations use another).
SERVING_LOCK = 0x45_58_50_53_45_52_56  # "EXPSERV"
KEEPALIVE_S = 10.0
RETRY_S = 2.0
CONFLICT_LOG_EVERY_S = 60.0


class AnotherServer(Exception):
    """Another server holds the database in a way this one cannot share."""


def _refusal(shared: bool, where: str) -> str:
    if shared:
        return (
            f"RATE_LIMIT_STORAGE_URL: another expense-auth serves {where} with rate limits in "
            "its own memory; every server of one database must share them: set the same "
            "RATE_LIMIT_STORAGE_URL=redis://... on all of them"
        )
    return (
        f"RATE_LIMIT_STORAGE_URL: another expense-auth already serves {where}, and rate "
        "limits kept in memory (memory://) would be counted by each server alone, giving "
        "a client that many times each limit; set RATE_LIMIT_STORAGE_URL=redis://... on "
        "every server"
    )


@contextlib.asynccontextmanager
async def sqlite_serving_lock(database: Path, *, shared: bool) -> AsyncIterator[None]:
    """Hold the SQLite database's serving lock for the block.

    Raises:
        AnotherServer: Another server holds it in a conflicting mode.
    """
    path = database.with_name(database.name + ".serving")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AnotherServer(_refusal(shared, str(database))) from None
        yield
    finally:
        os.close(fd)  # releases the lock


class _PostgresLock:
    def __init__(self, url: str, *, shared: bool, timeout_s: float) -> None:
        self._url = url
        self._shared = shared
        self._timeout_s = timeout_s
        self._conn: asyncpg.Connection | None = None
        function = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
        self._sql = f"SELECT {function}($1)"

    async def take(self) -> bool:
        """Connect and try the lock; True when held."""
        conn = await connect(self._url, timeout_s=self._timeout_s)
        try:
            held = bool(await conn.fetchval(self._sql, SERVING_LOCK, timeout=self._timeout_s))
        except BaseException:
            await conn.close(timeout=self._timeout_s)
            raise
        if not held:
            await conn.close(timeout=self._timeout_s)
            return False
        self._conn = conn
        return True

    async def keep(self) -> None:
        """Check the connection; when it is gone, take the lock again when possible."""
        complained_at = -CONFLICT_LOG_EVERY_S
        loop = asyncio.get_running_loop()
        while True:
            conn = self._conn
            if conn is not None:
                await asyncio.sleep(KEEPALIVE_S)
                try:
                    await conn.fetchval("SELECT 1", timeout=self._timeout_s)
                    continue
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    log.warning("lost the database's serving lock; taking it again")
                    self._conn = None
                    conn.terminate()
            await asyncio.sleep(RETRY_S)
            try:
                if await self.take():
                    log.info("holding the database's serving lock again")
                elif loop.time() - complained_at >= CONFLICT_LOG_EVERY_S:
                    complained_at = loop.time()
                    log.error(
                        "another server took the serving lock while the database was out "
                        "of reach: the two do not share rate limits until one stops",
                        extra={"detail": _refusal(self._shared, "this database")},
                    )
            except (DatabaseUnreachable, OSError, TimeoutError, asyncpg.PostgresError):
                continue  # still out of reach

    async def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError):
                await self._conn.close(timeout=self._timeout_s)
            self._conn = None


@contextlib.asynccontextmanager
async def postgres_serving_lock(url: str, *, shared: bool, timeout_s: float) -> AsyncIterator[None]:
    """Hold the PostgreSQL database's serving lock for the block.

    Raises:
        AnotherServer: Another server holds it in a conflicting mode.
        DatabaseUnreachable: The database cannot be reached.
    """
    lock = _PostgresLock(url, shared=shared, timeout_s=timeout_s)
    if not await lock.take():
        raise AnotherServer(_refusal(shared, "this database (DATABASE_URL)"))
    keeper = asyncio.create_task(lock.keep())
    try:
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await lock.release()
