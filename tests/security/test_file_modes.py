"""The database, its WAL and shared-memory files, and backups are private to the service.

They hold personal data and the audit log: 0600 files in a 0700 directory,
whatever umask the service was started with; a data directory that others can
read gets a warning at start, and database files made earlier with looser modes
are tightened.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import server_env
from tests.support.client import Session
from tests.support.google import FakeGoogle
from tests.support.server import start_server

CLI = str(Path(sys.executable).parent / "expense-auth")
DB = "expense-auth.db"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_database_files_and_backups_are_private(tmp_path: Path, google: FakeGoogle) -> None:
    old_umask = os.umask(0o022)  # the usual default, which made 0644 files
    try:
        server = start_server(tmp_path, server_env(google))
    finally:
        os.umask(old_umask)
    try:
        Session(server.url).sign_in(google.token(sub=secrets.token_hex(8)))
        data = server.data_dir
        assert mode(data) == 0o700
        for name in (DB, f"{DB}-wal", f"{DB}-shm"):
            assert mode(data / name) == 0o600, name
        backups = tmp_path / "backups"
        result = subprocess.run(
            [CLI, "backup", str(backups / "copy.db")],
            env={**server.env, "PATH": os.environ.get("PATH", "")},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert mode(backups / "copy.db") == 0o600
        assert mode(backups) == 0o700
        everything = [p for p in data.rglob("*") if p.is_file()]
        assert everything and all(mode(p) & 0o077 == 0 for p in everything), {
            str(p.relative_to(data)): oct(mode(p)) for p in everything
        }
    finally:
        assert server.stop() == 0, server.logs()


def test_a_loose_data_directory_is_reported_and_old_files_tightened(
    tmp_path: Path, google: FakeGoogle
) -> None:
    data = tmp_path / "var"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    first = start_server(tmp_path, server_env(google), data_dir=data)
    assert first.stop() == 0
    (data / DB).chmod(0o644)  # as an earlier version left it

    server = start_server(tmp_path, server_env(google), data_dir=data)
    try:
        logs = server.logs()
        assert "data directory is open to other users" in logs
        assert "mode=0755" in logs
        assert "database files were readable by others" in logs
        assert mode(data / DB) == 0o600
    finally:
        assert server.stop() == 0, server.logs()
