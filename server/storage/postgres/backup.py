"""Backups and restores of the PostgreSQL database with its own tools, deletions kept.

`expense-auth backup` runs `pg_dump --format=custom` and checks the archive with
`pg_restore --list`; `expense-auth restore` reads the current deletion log (when
the database answers), restores the archive with `pg_restore --clean` in one
transaction, and applies the deletion log again, so that an account deleted
after the backup was taken stays deleted, as with SQLite. For point-in-time
recovery use PostgreSQL's own base backups and WAL archiving
(docs/operations.md), with `expense-auth deletions save FILE` before and
`expense-auth deletions apply FILE` after: the same re-application (with the
outbox, as server/storage/backup.py says).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import asyncpg

from server.domain.lifecycle import ChangeEvents, no_events
from server.storage import rows
from server.storage.backup import BACKUP_PREFIX, BackupError, Restored
from server.storage.failures import DatabaseUnreachable
from server.storage.files import private_dir, private_file
from server.storage.postgres import outbox
from server.storage.postgres.failures import connect

SUFFIX = ".pgdump"
TIMEOUT_S = 3600
# The deletion log's digest, as server/domain/models.subject_hash computes it.
_SUBJECT_HASH = "encode(sha256(convert_to(issuer || E'\\n' || subject, 'UTF8')), 'hex')"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupError(
            f"{name} is not installed; install PostgreSQL's client tools (Debian: "
            "postgresql-client) of the server's major version"
        )
    return path


def _run(args: list[str]) -> None:
    result = subprocess.run(  # noqa: S603 (our own arguments)
        args, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        raise BackupError(f"{Path(args[0]).name} failed: {result.stderr.strip()[:500]}")


def backup(url: str, dest: Path) -> Path:
    """Dump the database to `dest` (a file, or a directory to put a dated file in).

    Raises:
        BackupError: pg_dump failed, or the archive does not read back.
    """
    if dest.is_dir():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = dest / f"{BACKUP_PREFIX}{stamp}-{time.time_ns() % 1_000_000:06d}{SUFFIX}"
    if dest.exists():
        raise BackupError(f"{dest} exists; choose a new file name")
    private_dir(dest.parent)
    partial = dest.with_name(dest.name + ".partial")
    private_file(partial)
    try:
        _run([_tool("pg_dump"), "--format=custom", "--no-owner", f"--file={partial}", url])
        _run([_tool("pg_restore"), "--list", str(partial)])
    except BackupError:
        partial.unlink(missing_ok=True)
        raise
    partial.rename(dest)
    return dest


def restore(src: Path, url: str, *, events: ChangeEvents = no_events) -> Restored:
    """Replace the database's contents with the archive `src`, then re-apply deletions.

    Raises:
        BackupError: The archive is unusable, or pg_restore failed.
    """
    _run([_tool("pg_restore"), "--list", str(src)])
    try:
        deletions = asyncio.run(_deletion_log(url))
        unknown = False
    except (DatabaseUnreachable, OSError, asyncpg.PostgresError, TimeoutError):
        deletions, unknown = [], True
    _run(
        [
            _tool("pg_restore"),
            "--clean",
            "--if-exists",
            "--no-owner",
            "--single-transaction",
            f"--dbname={url}",
            str(src),
        ]
    )
    reapplied = asyncio.run(_reapply(url, deletions, events))
    return Restored(reapplied=reapplied, deletions_unknown=unknown)


def save_deletions(url: str, dest: Path) -> int:
    """Write the database's account-deletion log to `dest` (JSON); returns its length.

    Raises:
        BackupError: `dest` exists, or the database cannot be read.
    """
    if dest.exists():
        raise BackupError(f"{dest} exists; choose a new file name")
    try:
        deletions = asyncio.run(_deletion_log(url))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise BackupError(f"cannot read the deletion log: {exc}") from None
    private_file(dest)
    dest.write_text(json.dumps({"deleted_accounts": deletions}))
    return len(deletions)


def apply_deletions(url: str, src: Path, *, events: ChangeEvents = no_events) -> int:
    """Delete again every account the log in `src` records; returns how many were back.

    Raises:
        BackupError: `src` is not a saved deletion log, or the database cannot be written.
    """
    try:
        saved = json.loads(src.read_text())["deleted_accounts"]
        deletions = [(str(digest), int(at)) for digest, at in saved]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{src} is not a deletion log saved by expense-auth: {exc}") from None
    try:
        return asyncio.run(_reapply(url, deletions, events))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise BackupError(f"cannot apply the deletion log: {exc}") from None


async def _deletion_log(url: str) -> list[tuple[str, int]]:
    conn = await connect(url, timeout_s=10)
    try:
        if not await conn.fetchval("SELECT to_regclass('deleted_accounts') IS NOT NULL"):
            return []
        rows = await conn.fetch("SELECT subject_hash, deleted_ms FROM deleted_accounts")
        return [(row[0], row[1]) for row in rows]
    finally:
        await conn.close()


async def _reapply(url: str, deletions: list[tuple[str, int]], events: ChangeEvents) -> int:
    if not deletions:
        return 0
    conn = await connect(url, timeout_s=10)
    try:
        async with conn.transaction():
            doomed = [
                rows.user(tuple(row))
                for row in await conn.fetch(
                    f"SELECT {rows.USER_COLUMNS} FROM users "
                    f"WHERE {_SUBJECT_HASH} = ANY($1::text[]) FOR UPDATE",
                    [digest for digest, _ in deletions],
                )
            ]
            ids = [user.id for user in doomed]
            await conn.execute("DELETE FROM audit_events WHERE user_id = ANY($1::text[])", ids)
            await conn.execute("DELETE FROM users WHERE id = ANY($1::text[])", ids)
            # An archive older than the outbox (m006) has none: serve migrates later.
            if await conn.fetchval("SELECT to_regclass('webhook_outbox') IS NOT NULL"):
                await conn.execute(
                    "DELETE FROM webhook_outbox WHERE user_id = ANY($1::text[])", ids
                )
                await outbox.insert(conn, [e for user in doomed for e in events(user, None)])
            await conn.executemany(
                "INSERT INTO deleted_accounts (subject_hash, deleted_ms) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                deletions,
            )
        return len(ids)
    finally:
        await conn.close()
