"""PostgreSQL's schema: versioned SQL migrations, the same names and order as SQLite's.

`migrate` takes an advisory lock first, so that ten replicas starting at once
migrate once: the others wait for the lock, then find nothing pending. Each
migration and its record are one transaction. `check_schema` refuses a database
migrated by a newer version, as for SQLite.
"""

from __future__ import annotations

import functools
from pathlib import Path

import asyncpg

from server.storage.failures import BrokenInstallation, SchemaTooNew
from server.storage.postgres.failures import connect

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# pg_advisory_lock key of expense-auth's migrations (any fixed 64-bit number).
MIGRATION_LOCK = 0x45_58_50_41_55_54_48  # "EXPAUTH"
_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name TEXT PRIMARY KEY,
    applied_ms BIGINT NOT NULL
)
"""


@functools.cache
def known_migrations() -> tuple[str, ...]:
    """Every migration this version has, in order.

    Raises:
        BrokenInstallation: The SQL files are not installed (a packaging fault: `migrate`
            would otherwise apply nothing and `serve` run on an empty schema).
    """
    names = tuple(sorted(path.stem for path in MIGRATIONS_DIR.glob("m*.sql")))
    if not names:
        raise BrokenInstallation(
            f"this installation of expense-auth has no PostgreSQL migrations (no m*.sql in "
            f"{MIGRATIONS_DIR}); reinstall it from a complete package"
        )
    return names


async def applied_migrations(conn: asyncpg.Connection) -> set[str]:
    """The names of the migrations applied to this database."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {row[0] for row in await conn.fetch("SELECT name FROM schema_migrations")}


async def _pending(conn: asyncpg.Connection) -> list[str]:
    applied = await applied_migrations(conn)
    unknown = sorted(applied - set(known_migrations()))
    if unknown:
        raise SchemaTooNew(
            f"the database has migrations this version does not know: {', '.join(unknown)}"
        )
    return [name for name in known_migrations() if name not in applied]


async def check_schema(url: str, *, timeout_s: float) -> list[str]:
    """The migrations not yet applied; raises SchemaTooNew for unknown applied ones."""
    conn = await connect(url, timeout_s=timeout_s)
    try:
        return await _pending(conn)
    finally:
        await conn.close()


async def migrate(url: str, *, timeout_s: float) -> list[str]:
    """Apply pending migrations, one replica at a time; returns the names applied."""
    conn = await connect(url, timeout_s=timeout_s)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(_TABLE)
            pending = await _pending(conn)
            for name in pending:
                async with conn.transaction():
                    await conn.execute((MIGRATIONS_DIR / f"{name}.sql").read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (name, applied_ms) "
                        "VALUES ($1, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)",
                        name,
                    )
            return pending
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()
