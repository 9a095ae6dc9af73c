"""The gauges the alert rules need: readiness checks, last backup, session lifetime, uptime."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import server_env
from tests.support.google import FakeGoogle
from tests.support.promql import value
from tests.support.server import BIN, RunningServer, start_server

LAST_BACKUP = "expense_auth_backup_last_success_timestamp_seconds"
READINESS = "expense_auth_readiness_check"
DEPENDENCY = "expense_auth_dependency_up"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def backup_command(server: RunningServer, dest: Path) -> subprocess.CompletedProcess[str]:
    """`expense-auth backup DEST` with the server's environment, as from cron."""
    return subprocess.run(
        [str(BIN / "expense-auth"), "backup", str(dest)],
        env=server.env,
        cwd=server.data_dir.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_for(admin_url: str, name: str, predicate: float, *, timeout_s: float = 15) -> float:
    """The gauge once it is above `predicate` (or what it is at the deadline)."""
    deadline = time.monotonic() + timeout_s
    current = value(admin_url, name) or 0.0
    while current <= predicate and time.monotonic() < deadline:
        time.sleep(0.2)
        current = value(admin_url, name) or 0.0
    return current


def test_readiness_checks_and_dependencies_are_exported_one_by_one(
    tmp_path: Path, google: FakeGoogle
) -> None:
    (tmp_path / "ready").mkdir()
    (tmp_path / "keyless").mkdir()
    ready = start_server(tmp_path / "ready", server_env(google))
    keyless = start_server(
        tmp_path / "keyless",
        server_env(
            google,
            DEV_IDENTITY_ENABLED="false",
            GOOGLE_CERTS_URL=f"http://127.0.0.1:{closed_port()}/oauth2/v1/certs",
        ),
    )
    try:
        for check in ("shutdown", "database"):
            assert value(ready.admin_url, READINESS, check=check) == 1, check
            assert value(keyless.admin_url, READINESS, check=check) == 1, check
        for dependency in ("identity_keys", "rate_limit_storage"):
            assert value(ready.admin_url, DEPENDENCY, dependency=dependency) == 1, dependency
        # Without Google's keys the server still serves: a dependency, not a check.
        assert value(keyless.admin_url, DEPENDENCY, dependency="identity_keys") == 0
        assert value(keyless.admin_url, READINESS, check="identity_keys") is None
    finally:
        assert ready.stop() == 0, ready.logs()
        assert keyless.stop() == 0, keyless.logs()


def test_the_backup_command_records_its_time_and_a_restart_keeps_it(
    tmp_path: Path, google: FakeGoogle
) -> None:
    env = server_env(google, SESSION_MAX_AGE_SECONDS="7200")
    server = start_server(tmp_path, env)
    try:
        assert value(server.admin_url, LAST_BACKUP) == 0  # none yet: the alert fires
        assert value(server.admin_url, "expense_auth_session_max_age_seconds") == 7200
        started = value(server.admin_url, "process_start_time_seconds")
        assert started is not None
        assert time.time() - 120 < started <= time.time()

        before = time.time()
        made = backup_command(server, tmp_path / "backups")
        assert made.returncode == 0, made.stderr
        recorded = value(server.admin_url, LAST_BACKUP)
        assert recorded is not None
        assert before - 1 <= recorded <= time.time() + 1
    finally:
        assert server.stop() == 0, server.logs()

    again = start_server(tmp_path, env, data_dir=server.data_dir)
    try:
        assert value(again.admin_url, LAST_BACKUP) == recorded
    finally:
        assert again.stop() == 0, again.logs()


def test_scheduled_backups_record_their_time(tmp_path: Path, google: FakeGoogle) -> None:
    before = time.time()
    server = start_server(
        tmp_path,
        server_env(google, BACKUP_DIR=str(tmp_path / "backups"), BACKUP_INTERVAL_SECONDS="1"),
    )
    try:
        first = wait_for(server.admin_url, LAST_BACKUP, 0)
        assert first >= before - 1, server.logs()
        assert wait_for(server.admin_url, LAST_BACKUP, first) > first  # every run moves it
    finally:
        assert server.stop() == 0, server.logs()


def test_a_failed_backup_records_nothing(tmp_path: Path, google: FakeGoogle) -> None:
    in_the_way = tmp_path / "not-a-directory"
    in_the_way.write_text("a file where BACKUP_DIR should be")
    server = start_server(
        tmp_path, server_env(google, BACKUP_DIR=str(in_the_way), BACKUP_INTERVAL_SECONDS="1")
    )
    try:
        deadline = time.monotonic() + 10
        while "background job failed" not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "background job failed" in server.logs()
        assert value(server.admin_url, LAST_BACKUP) == 0
        failed = backup_command(server, in_the_way / "x.db")
        assert failed.returncode != 0
        assert value(server.admin_url, LAST_BACKUP) == 0
    finally:
        assert server.stop() == 0, server.logs()
    assert sorted(server.data_dir.glob("*last-backup*")) == []  # nor a half-written one
