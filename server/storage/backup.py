"""Online backups, their verification, and restores that keep deletions deleted.

A backup copies the live database with SQLite's backup API (a consistent
snapshot, taken while the server keeps serving), then opens the copy and runs
`PRAGMA integrity_check`. A restore first reads the deletion log of the current
database, replaces the database with the backup, and applies that log again, so
that an account deleted after the backup was taken does not come back. The
outbox goes with it: the restored events of a user deleted again are dropped
(sent now, they would bring the user's data back to the receivers) and a
`user.deleted` takes their place (the receivers may never have had it).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from server.domain.lifecycle import ChangeEvents, no_events
from server.domain.models import subject_hash
from server.storage import rows
from server.storage.files import private_file
from server.storage.sqlite import BUSY_TIMEOUT_MS, outbox

BACKUP_PREFIX = "expense-auth-"
BACKUP_SUFFIX = ".db"


class BackupError(Exception):
    """A backup or restore could not be completed; the message says why."""


def integrity(path: Path) -> str:
    """`ok`, or what SQLite's integrity check found wrong."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.Error as exc:
        return f"not a readable database: {exc}"
    return "; ".join(str(r[0]) for r in rows)


def backup(db_path: Path, dest: Path) -> Path:
    """Copy the live database to `dest` (a file, or a directory to put a dated file in).

    Raises:
        BackupError: The copy failed or does not pass the integrity check.
    """
    if dest.is_dir():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = dest / f"{BACKUP_PREFIX}{stamp}-{time.time_ns() % 1_000_000:06d}{BACKUP_SUFFIX}"
    if dest.exists():
        raise BackupError(f"{dest} exists; choose a new file name")
    partial = dest.with_name(dest.name + ".partial")
    private_file(partial)  # a backup holds everything the database does
    source = sqlite3.connect(db_path)
    source.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    try:
        target = sqlite3.connect(partial)
        try:
            source.backup(target)
            # A self-contained file: no -wal/-shm beside the backup.
            target.execute("PRAGMA journal_mode = DELETE")
        finally:
            target.close()
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(f"backup failed: {exc}") from None
    finally:
        source.close()
    result = integrity(partial)
    if result != "ok":
        partial.unlink(missing_ok=True)
        raise BackupError(f"the copy failed its integrity check: {result}")
    partial.rename(dest)
    return dest


def prune(directory: Path, *, keep: int, suffix: str = BACKUP_SUFFIX) -> list[Path]:
    """Delete all but the newest `keep` backups in `directory`; returns what was deleted."""
    backups = sorted(directory.glob(f"{BACKUP_PREFIX}*{suffix}"))
    doomed = backups[:-keep] if keep > 0 else backups
    for path in doomed:
        path.unlink()
    return doomed


@dataclass(frozen=True, slots=True)
class Restored:
    """What a restore did.

    Attributes:
        reapplied: Accounts deleted again (deleted after the backup was taken).
        moved_aside: Where the damaged database went (kept for forensics), if it was.
        deletions_unknown: The damaged file's deletion log could not be read, so
            accounts deleted after the backup may be back: check with support records.
    """

    reapplied: int
    moved_aside: Path | None = None
    deletions_unknown: bool = False


def restore(src: Path, db_path: Path, *, events: ChangeEvents = no_events) -> Restored:
    """Replace the database with the backup `src`, then re-apply later deletions (and
    write their lifecycle `events`).

    A current database that fails its integrity check (or is not a database at
    all) is moved aside with its -wal and -shm, and its deletion log is read if
    it can be. The server must be stopped.

    Raises:
        BackupError: The backup is unusable.
    """
    result = integrity(src)
    if result != "ok":
        raise BackupError(f"{src} failed its integrity check: {result}")
    deletions: list[tuple[str, int]] = []
    moved: Path | None = None
    unknown = False
    if db_path.exists():
        try:
            deletions = _deletion_log(db_path)
        except sqlite3.DatabaseError:
            unknown = True
        if unknown or integrity(db_path) != "ok":
            moved = _move_aside(db_path)
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = sqlite3.connect(db_path)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode = WAL")
        reapplied = _reapply(target, deletions, events)
    finally:
        source.close()
        target.close()
    return Restored(reapplied=reapplied, moved_aside=moved, deletions_unknown=unknown)


def _deletion_log(db_path: Path) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as current:
        has_log = current.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'deleted_accounts'"
        ).fetchone()
        if not has_log:
            return []
        return list(current.execute("SELECT subject_hash, deleted_ms FROM deleted_accounts"))


def _move_aside(db_path: Path) -> Path:
    """Rename the database and its -wal/-shm to `<name>.damaged-<time>`; returns the new
    name of the database."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = db_path.with_name(f"{db_path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        current = db_path.with_name(db_path.name + suffix)
        if current.exists():
            current.rename(aside.with_name(aside.name + suffix))
    return aside


def _reapply(
    conn: sqlite3.Connection, deletions: list[tuple[str, int]], events: ChangeEvents
) -> int:
    if not deletions:
        return 0
    wanted = {h for h, _ in deletions}
    conn.execute("PRAGMA foreign_keys = ON")  # a user's sessions go with them
    conn.create_function("subject_hash", 2, subject_hash, deterministic=True)
    with conn:
        # Only the storage layer's own column list is interpolated.
        query = f"SELECT {rows.USER_COLUMNS}, subject_hash(issuer, subject) FROM users"  # noqa: S608
        doomed = [rows.user(row[:-1]) for row in conn.execute(query) if row[-1] in wanted]
        ids = [(user.id,) for user in doomed]
        conn.executemany("DELETE FROM users WHERE id = ?", ids)
        conn.executemany("DELETE FROM audit_events WHERE user_id = ?", ids)
        # A backup older than the outbox (m006) has none: the server migrates after this.
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'webhook_outbox'").fetchone():
            conn.executemany("DELETE FROM webhook_outbox WHERE user_id = ?", ids)
            outbox.insert(conn, [event for user in doomed for event in events(user, None)])
        conn.executemany(
            "INSERT INTO deleted_accounts (subject_hash, deleted_ms) VALUES (?, ?) "
            "ON CONFLICT DO NOTHING",
            deletions,
        )
    return len(doomed)
