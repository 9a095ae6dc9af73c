"""Throwaway PostgreSQL databases for the tests, on the machine's server.

Every test (or test server) gets a database of its own, created and dropped here,
so that runs never see each other's rows. TEST_POSTGRES_URL points the tests at
another server (its database part is only used to connect; default: the local
server with trust authentication, as CI has). A PostgreSQL that cannot be reached
fails the run: nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from server.storage.postgres import schema

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _admin(sql: str) -> None:
    try:
        conn = await asyncpg.connect(ADMIN_URL, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(
            f"PostgreSQL is not reachable at TEST_POSTGRES_URL={ADMIN_URL!r}: {exc}; "
            "start it, or point TEST_POSTGRES_URL at one"
        ) from exc
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(*, migrated: bool = True) -> str:
    """A new, empty database (migrated unless told otherwise); returns its URL."""
    name = f"expense_auth_test_{secrets.token_hex(6)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    url = _with_database(ADMIN_URL, name)
    if migrated:
        asyncio.run(schema.migrate(url, timeout_s=10))
    return url


def url_for(name: str) -> str:
    """The URL of database `name` on the tests' server."""
    return _with_database(ADMIN_URL, name)


def drop_database(url: str) -> None:
    """Drop a database made by create_database (disconnecting whoever is still on it)."""
    name = urlsplit(url).path.lstrip("/")
    assert name.startswith("expense_auth_test_"), name
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def database(*, migrated: bool = True) -> Iterator[str]:
    """A throwaway database for the block."""
    url = create_database(migrated=migrated)
    try:
        yield url
    finally:
        drop_database(url)


class Held:
    """A transaction holding what a statement took, until released."""

    def __init__(self) -> None:
        self._release = threading.Event()

    def wait(self, seconds: float) -> None:
        """Keep holding for `seconds` (the caller's thread waits)."""
        self._release.wait(seconds)


@contextlib.contextmanager
def holding(url: str, sql: str) -> Iterator[Held]:
    """Run `sql` in a transaction of another connection (a lock, say) and hold it for
    the block; rolled back after."""
    ready, held, failure = threading.Event(), Held(), []

    async def hold() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            async with conn.transaction():
                await conn.execute(sql)
                ready.set()
                await asyncio.to_thread(done.wait)
                raise _Rollback
        except _Rollback:
            pass
        finally:
            await conn.close()

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
            ready.set()

    done = threading.Event()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(30)
    if failure:
        raise failure[0]
    try:
        yield held
    finally:
        done.set()
        thread.join(timeout=30)


class _Rollback(Exception):
    pass
