"""The service's files are private: directories 0700, files 0600.

The database holds personal data and the audit log, its WAL and shared-memory
files hold recent writes, and backups hold all of it. SQLite gives the -wal and
-shm files the database file's own mode, so creating the database file 0600
keeps all three private; `expense-auth` also runs with umask 077, so anything
else it writes (backups, keys, markers) is private too.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
UMASK = 0o077
DB_SUFFIXES = ("", "-wal", "-shm")


def private_dir(path: Path) -> None:
    """Create `path` (and missing parents) readable by this user only, if absent."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)


def private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if it does not exist (SQLite fills it)."""
    private_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))


def tighten_database(db_path: Path) -> list[str]:
    """Make the database and its -wal/-shm files 0600; returns the names changed."""
    changed = []
    for suffix in DB_SUFFIXES:
        path = db_path.with_name(db_path.name + suffix)
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & ~PRIVATE_FILE_MODE:
            path.chmod(PRIVATE_FILE_MODE)
            changed.append(path.name)
    return changed


def open_to_others(directory: Path) -> int | None:
    """The directory's mode when group or others may enter or read it, else None."""
    try:
        mode = stat.S_IMODE(directory.stat().st_mode)
    except FileNotFoundError:
        return None
    return mode if mode & 0o077 else None
