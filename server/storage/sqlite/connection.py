"""Opening the database, and its schema: migrations applied, pending or unknown."""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path

from sqlite_utils import Database

from server.storage.failures import SchemaTooNew
from server.storage.files import private_file
from server.storage.sqlite.migrations import migrations

# How long a call waits for the database's write lock (another process, a
# checkpoint, an operator's `sqlite3`) before it answers `unavailable`.
BUSY_TIMEOUT_MS = 2_000


def connect(path: Path, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """Open the database file with the service's pragmas (autocommit; explicit transactions)."""
    private_file(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: a commit is fsynced before it is acknowledged. NORMAL would survive a
    # process crash but could lose the last commits (a sign-in, a revocation, an
    # account deletion) to a power cut; tests/reliability/test_crash.py checks it.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@functools.cache
def known_migrations() -> tuple[str, ...]:
    """Every migration this version has, in order (all are pending on an empty database)."""
    return tuple(m.name for m in migrations.pending(Database(memory=True)))


def applied_migrations(conn: sqlite3.Connection) -> set[str]:
    """The names of the migrations applied to this database."""
    return {m.name for m in migrations.applied(Database(conn))}


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
        known = set(known_migrations())
        unknown = sorted(applied_migrations(conn) - known)
        if unknown:
            raise SchemaTooNew(
                f"the database has migrations this version does not know: {', '.join(unknown)}"
            )
        return [m.name for m in migrations.pending(Database(conn))]
    finally:
        conn.close()


def check_integrity(path: Path) -> str:
    """ "ok", or what SQLite's quick check finds wrong with the file (or why it cannot run).

    SQLite does not check a file when it opens it: a damaged file would be served,
    and written to, until a query trips over the damage.
    """
    if not path.exists():
        return "ok"  # a new database
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"not a readable database: {exc}"
    return "; ".join(str(row[0]) for row in rows[:5])
