"""The server's lifecycle on a real process: graceful shutdown, readiness, schema guards.

The shutdown tests send SIGTERM to `expense-auth serve` itself, as an orchestrator
does, and judge the outcome from the clients' side and from the SQLite file left
behind.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from connectrpc.errors import ConnectError

from gen.grpc.health.v1.health_connect import HealthClientSync
from gen.grpc.health.v1.health_pb import HealthCheckRequest, HealthCheckResponse
from server.storage.sqlite import migrate
from tests.conftest import server_env
from tests.support.burst import (
    GET_SESSION,
    NOTICES,
    SIGN_IN,
    WORKERS,
    attempt,
    burst_then_stop,
    describe,
    google_tokens,
)
from tests.support.client import code_of
from tests.support.google import FakeGoogle
from tests.support.http import Response, connect_post, request
from tests.support.redis import redis_server
from tests.support.server import RunningServer, start_server

CLI = str(Path(sys.executable).parent / "expense-auth")
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
DB_NAME = "expense-auth.db"

ServingStatus = HealthCheckResponse.ServingStatus


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        env={"PATH": os.environ.get("PATH", ""), "ADMIN_PORT": "0", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def open_db(path: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(path))


# --- SIGTERM under load -------------------------------------------------------------------
#
# The clients (tests/support/burst.py) behave like a load balancer that is a little slow
# to react; no client may see a refused or dropped connection.

EXIT_TIMEOUT_S = 30


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_a_burst_loses_no_call(
    tmp_path: Path, google: FakeGoogle, workers: int
) -> None:
    with contextlib.ExitStack() as stack:
        env = server_env(google, DRAIN_SECONDS="10")
        if workers > 1:  # `serve --workers 2`: SIGTERM drains both
            redis = stack.enter_context(redis_server(tmp_path))
            env |= {"WORKERS": str(workers), "RATE_LIMIT_STORAGE_URL": redis.url}
        _sigterm_during_a_burst(start_server(tmp_path, env), google)


def _sigterm_during_a_burst(server: RunningServer, google: FakeGoogle) -> None:
    exit_codes: list[int] = []

    def stop() -> None:
        server.process.send_signal(signal.SIGTERM)
        exit_codes.append(server.process.wait(timeout=EXIT_TIMEOUT_S))

    try:
        burst = burst_then_stop(server.url, google_tokens(google), stop)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    calls, sigterm_at, exit_code = burst.calls, burst.sigterm_at, exit_codes[0]
    logs = server.logs()
    after_exit, _ = attempt(server.url, GET_SESSION, {}, subject="")

    db_path = server.data_dir / DB_NAME
    # Looked at before this test opens the file (the last connection to close
    # checkpoints too): only the server's shutdown can have emptied the log.
    wal = db_path.with_name(DB_NAME + "-wal")
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    with open_db(db_path) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchall()
        stored = {row[0] for row in db.execute("SELECT id FROM sessions")}
        subjects = {row[0] for row in db.execute("SELECT subject FROM users")}

    answered = [c for c in calls if c.status is not None]
    assert any(c.started < sigterm_at for c in answered), "the burst never got going"
    # Calls that began after the signal were served: the signal landed mid-burst.
    assert any(c.started > sigterm_at and c.status == 200 for c in answered)
    failed = [c for c in answered if c.status != 200]
    assert not failed, f"{len(failed)} answered calls failed:\n{describe(failed, sigterm_at)}"
    # No answer at all: after a reset or an empty reply the client cannot tell whether
    # its call happened (a sign-in that did happen is a lost answer); a refusal means
    # the server stopped accepting while it was still telling clients to leave.
    unanswered = [c for c in calls if c.status is None]
    executed = [c for c in unanswered if c.procedure == SIGN_IN and c.subject in subjects]
    assert not unanswered, (
        f"{len(unanswered)} calls got no answer ({sum(c.refused for c in unanswered)} "
        f"refused; sign-ins among them the server had carried out: {len(executed)}); "
        f"times from SIGTERM:\n{describe(unanswered, sigterm_at)}\n{logs[-3000:]}"
    )
    assert sum(c.closing for c in answered) >= NOTICES * WORKERS  # every client was told
    assert after_exit.refused, after_exit  # and once it has stopped, nothing connects
    for get in (c for c in answered if c.procedure == GET_SESSION):
        signed = next(s for s in calls if s.procedure == SIGN_IN and s.subject == get.subject)
        assert get.session_id == signed.session_id

    assert exit_code == 0, logs
    assert "shutting down" in logs, logs
    assert "stopped" in logs, logs
    assert "calls in flight" not in logs, logs
    assert "Traceback" not in logs, logs

    assert integrity == [("ok",)]
    assert wal_bytes == 0, f"the write-ahead log still holds {wal_bytes} bytes"
    acknowledged = {c.session_id for c in answered if c.procedure == SIGN_IN}
    assert len(acknowledged) >= WORKERS
    missing = acknowledged - stored
    assert not missing, f"{len(missing)} acknowledged sign-ins have no session row"


# --- Readiness during shutdown ------------------------------------------------------------


@dataclass
class Probe:
    status: int | None
    body: dict[str, Any]
    error: str = ""


def probe(url: str, path: str) -> Probe:
    try:
        response = request(url, "GET", path, timeout=5)
    except (OSError, http.client.HTTPException) as exc:
        return Probe(None, {}, type(exc).__name__)
    try:
        return Probe(response.status, response.json())
    except ValueError:
        return Probe(response.status, {"body": response.body.decode(errors="replace")})


def watch_health(url: str, seen: list[str], serving: threading.Event) -> None:
    """A long-lived Health/Watch stream: a call in flight when SIGTERM arrives."""
    with HealthClientSync(url) as health:
        try:
            for message in health.watch(HealthCheckRequest(service=""), timeout_ms=20_000):
                seen.append(message.status.name)
                if message.status == ServingStatus.SERVING:
                    serving.set()
                elif message.status == ServingStatus.NOT_SERVING:
                    return  # hang up, so that the drain need not wait for this stream
        except ConnectError as exc:
            seen.append(f"error: {code_of(exc)}: {exc.message}")


@pytest.fixture
def draining_server(tmp_path: Path, google: FakeGoogle) -> Iterator[RunningServer]:
    server = start_server(tmp_path, server_env(google, DRAIN_SECONDS="5"))
    yield server
    server.stop()


def test_readiness_turns_not_ready_as_soon_as_shutdown_begins(
    draining_server: RunningServer,
) -> None:
    server = draining_server
    assert probe(server.url, "/readyz").status == 200
    seen: list[str] = []
    serving = threading.Event()
    watcher = threading.Thread(target=watch_health, args=(server.url, seen, serving), daemon=True)
    watcher.start()
    assert serving.wait(timeout=10), seen

    server.process.send_signal(signal.SIGTERM)
    probes: list[Probe] = []
    draining: list[Probe] = []
    check: Response | None = None
    liveness: Probe | None = None
    while server.process.poll() is None:
        ready = probe(server.url, "/readyz")
        probes.append(ready)
        if ready.status is None:
            break  # the listener has closed
        if ready.status == 503 and check is None:
            draining.append(ready)
            # The same answer from the other probes, while the listener still serves.
            check = connect_post(server.url, HEALTH_CHECK, {"service": ""})
            liveness = probe(server.url, "/healthz")
    watcher.join(timeout=10)
    assert server.process.wait(timeout=EXIT_TIMEOUT_S) == 0, server.logs()

    assert draining, [p.status for p in probes]
    body = draining[0].body
    assert body["status"] == "not_ready", body
    assert body["checks"]["shutdown"] == "draining", body
    assert body["checks"]["database"] == "ok", body
    answered = [p.status for p in probes if p.status is not None]
    first = answered.index(503)
    assert set(answered[first:]) == {503}, answered  # never ready again once draining
    assert check is not None and check.status == 200, check
    assert json.loads(check.body) == {"status": "NOT_SERVING"}
    assert liveness is not None and liveness.status == 200  # alive, just not taking traffic
    # The stream in flight was told too, and ended cleanly.
    assert seen == ["SERVING", "NOT_SERVING"]
    assert not watcher.is_alive()
    assert "calls in flight" not in server.logs()


# --- Schema guards ------------------------------------------------------------------------


def migrated(tmp_path: Path) -> dict[str, str]:
    """A data directory with a fully migrated database (what `expense-auth migrate` does)."""
    data_dir = tmp_path / "data"
    migrate(data_dir / DB_NAME)
    return {"DATA_DIR": str(data_dir)}


FUTURE_MIGRATION = "m999_from_a_newer_version"


@pytest.mark.parametrize(
    "args",
    [("serve", "--port", "0"), ("serve", "--port", "0", "--no-migrate"), ("migrate",)],
    ids=["serve", "serve --no-migrate", "migrate"],
)
def test_a_database_from_a_newer_version_is_refused(tmp_path: Path, args: tuple[str, ...]) -> None:
    env = migrated(tmp_path)
    db_path = tmp_path / "data" / DB_NAME
    with open_db(db_path) as db, db:
        db.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES (?, ?, ?)",
            ("expense-auth", FUTURE_MIGRATION, "2099-01-01 00:00:00+00:00"),
        )
    result = run_cli(*args, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert FUTURE_MIGRATION in result.stderr
    assert "upgrade expense-auth" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    with open_db(db_path) as db:  # and nothing was changed
        names = [row[0] for row in db.execute("SELECT name FROM _sqlite_migrations")]
    assert names[-1] == FUTURE_MIGRATION


def test_serve_no_migrate_refuses_pending_migrations(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path / "data")}
    result = run_cli("serve", "--port", "0", "--no-migrate", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "needs migrations" in result.stderr
    assert "expense-auth migrate" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    with open_db(tmp_path / "data" / DB_NAME) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "users" not in tables  # nothing was migrated behind the operator's back
