"""`expense-auth serve --workers N`: several serving processes on one port, one supervisor.

Every test runs the real `serve` with two workers on SQLite (WAL, one file shared by
the workers) and a redis-server of its own for the shared rate limits. Which worker
served a call is read from the server's log: each worker tags its lines with
`worker=I/N`, and each answer carries the x-request-id its log line names.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.config import load_config
from tests.conftest import server_env
from tests.reliability.harness import AUTH, USER, Conn, Dropped, Reply, sign_in
from tests.support.google import FakeGoogle
from tests.support.promql import value
from tests.support.redis import RedisServer, redis_server
from tests.support.server import BIN, RunningServer, start_server

WORKERS = 2
GET_SESSION = f"{AUTH}/GetSession"
COUNT = "expense_auth_rpc_duration_seconds_count"
# A worker's restart is an Envoy start plus the app's import: seconds, not minutes.
RESTART_TIMEOUT_S = 60


def worker_of(server: RunningServer, reply: Reply) -> str:
    """Which worker ("1/2") logged the call that got `reply`."""
    request_id = next(v for k, v in reply.headers if k == "x-request-id")
    deadline = time.monotonic() + 10
    while True:
        match = re.search(rf"request_id={request_id} .*worker=(\d+/\d+)", server.logs())
        if match:
            return match.group(1)
        assert time.monotonic() < deadline, f"no log line for request {request_id}"
        time.sleep(0.02)


@contextlib.contextmanager
def connection_to_each_worker(server: RunningServer, cookie: str) -> Iterator[dict[str, Conn]]:
    """One keep-alive connection per worker (the kernel picks; we open until both are hit)."""
    found: dict[str, Conn] = {}
    try:
        for _ in range(200):
            conn = Conn(server.port)
            reply = conn.connect_call(GET_SESSION, {}, cookie=cookie)
            assert reply.status == 200, reply
            worker = worker_of(server, reply)
            if worker in found:
                conn.close()
                continue
            found[worker] = conn
            if len(found) == WORKERS:
                break
        assert len(found) == WORKERS, f"200 connections all went to {sorted(found)}"
        yield found
    finally:
        for conn in found.values():
            conn.close()


def signed_in_cookie(server: RunningServer, token: str) -> str:
    conn = Conn(server.port)
    try:
        return sign_in(conn, token).cookie
    finally:
        conn.close()


def envoy_children(server: RunningServer) -> set[int]:
    """The worker processes (Envoy, running the app) of `serve`."""
    out = subprocess.run(
        ["pgrep", "-P", str(server.process.pid), "-x", "envoy"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {int(pid) for pid in out.split()}


def readiness(server: RunningServer) -> dict[str, Any]:
    conn = Conn(server.port)
    try:
        body: dict[str, Any] = conn.request("GET", "/readyz").json()
    finally:
        conn.close()
    return body


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as running:
        yield running


@pytest.fixture
def server(tmp_path: Path, google: FakeGoogle, redis: RedisServer) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path,
        server_env(
            google,
            WORKERS=str(WORKERS),
            RATE_LIMIT_STORAGE_URL=f"{redis.url}/0",
            FORWARD_AUTH_PORT="0",
        ),
    )
    try:
        assert "workers=2" in running.logs()
        yield running
    finally:
        assert running.stop() == 0, running.logs()[-3000:]
    # The workers' metric files and status went with them.
    assert not list((running.data_dir / "run").glob("workers-*"))


def test_workers_share_the_port_and_every_scrape_counts_all_calls(
    server: RunningServer, google: FakeGoogle
) -> None:
    cookie = signed_in_cookie(server, google.token(sub="workers-metrics"))
    with connection_to_each_worker(server, cookie) as conns:
        before = value(server.admin_url, COUNT, procedure=GET_SESSION, code="ok")
        calls = 10
        for conn in conns.values():
            for _ in range(calls):
                assert conn.connect_call(GET_SESSION, {}, cookie=cookie).status == 200
        served = {w: server.logs().count(f"worker={w}") for w in conns}
        assert all(n > calls for n in served.values()), served

        # Each scrape is answered by whichever worker the kernel picks; each one reports
        # the calls of both (prometheus_client's multiprocess files), never its own part.
        assert before is not None
        seen = {value(server.admin_url, COUNT, procedure=GET_SESSION, code="ok") for _ in range(8)}
        assert seen == {before + WORKERS * calls}, (before, seen)


def test_every_worker_answers_on_the_internal_listeners(
    server: RunningServer, google: FakeGoogle
) -> None:
    cookie = signed_in_cookie(server, google.token(sub="workers-internal"))
    assert server.forward_auth_url is not None
    port = int(server.forward_auth_url.rsplit(":", 1)[1])
    for _ in range(10):  # fresh connections: the kernel spreads them over the workers
        conn = Conn(port)
        try:
            reply = conn.request("GET", "/forward-auth", headers=[("cookie", cookie)])
        finally:
            conn.close()
        assert reply.status == 200, reply
        assert any(k == "x-expense-user-id" for k, _ in reply.headers)
    checks = value(server.admin_url, "expense_auth_forward_auth_checks_total", result="ok")
    assert checks == 10.0


def test_every_worker_runs_the_app_on_uvloop(server: RunningServer) -> None:
    # Chosen by measurement (docs/benchmarks.md, "The event loop"), not left to
    # pyvoy's default: uvloop's extension is loaded in each worker.
    workers = envoy_children(server)
    assert len(workers) == WORKERS
    for pid in workers:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "/uvloop/loop." in maps, f"worker {pid} has not loaded uvloop"


def test_a_sign_out_on_one_worker_is_refused_at_once_by_the_other(
    server: RunningServer, google: FakeGoogle
) -> None:
    cookie = signed_in_cookie(server, google.token(sub="workers-cache"))
    with connection_to_each_worker(server, cookie) as conns:
        first, second = (conns[w] for w in sorted(conns))
        for _ in range(5):  # the first worker has the session in its principal cache
            assert first.connect_call(GET_SESSION, {}, cookie=cookie).status == 200
        signed_out = second.connect_call(f"{AUTH}/SignOut", {}, cookie=cookie)
        assert signed_out.status == 200, signed_out

        refused = first.connect_call(f"{USER}/GetCurrentUser", {}, cookie=cookie)
        assert refused.status == 401, refused
        assert refused.connect_code() == "unauthenticated"


def test_a_crashed_worker_is_restarted_while_the_other_serves(
    server: RunningServer, google: FakeGoogle
) -> None:
    cookie = signed_in_cookie(server, google.token(sub="workers-crash"))
    before = envoy_children(server)
    assert len(before) == WORKERS, before
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    # Reaped by `serve` (its log says so): the dead listener's sockets are closed. (A
    # connection the kernel had queued on them before is reset: that is a crash.)
    exited = re.compile(
        rf'"worker exited unexpectedly; starting it again" worker=\d pid={victim} exit_code=-9'
    )
    deadline = time.monotonic() + 10
    while not exited.search(server.logs()):
        assert time.monotonic() < deadline, f"no word of worker {victim}:\n{server.logs()[-2000:]}"
        time.sleep(0.01)
    # Until the worker is back, new connections reach the survivor only: every call
    # on a fresh connection is answered, and readiness says one is missing.
    degraded = False
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while True:
        conn = Conn(server.port)
        try:
            reply = conn.connect_call(GET_SESSION, {}, cookie=cookie)
        except Dropped as exc:
            raise AssertionError(f"a new connection was dropped after the crash: {exc}") from exc
        finally:
            conn.close()
        assert reply.status == 200, reply
        workers = readiness(server)["dependencies"]["workers"]
        degraded = degraded or workers.startswith("degraded: 1 of 2")
        after = envoy_children(server)
        if len(after) == WORKERS and victim not in after and workers == "ok":
            break
        assert time.monotonic() < deadline, f"not restarted: {after}, {workers}"
        time.sleep(0.05)
    assert degraded, "readiness never reported the missing worker"
    assert readiness(server)["status"] == "ready"
    with connection_to_each_worker(server, cookie) as conns:  # both serve again
        assert len(conns) == WORKERS
    # The gauge follows readiness, which each worker computes at most once a second.
    deadline = time.monotonic() + 5
    while value(server.admin_url, "expense_auth_dependency_up", dependency="workers") != 1.0:
        assert time.monotonic() < deadline, "the workers gauge stayed down"
        time.sleep(0.1)


def test_a_second_server_cannot_join_the_workers_port(
    server: RunningServer, google: FakeGoogle, redis: RedisServer, tmp_path: Path
) -> None:
    env = {
        **server.env,
        "DATA_DIR": str(tmp_path / "other"),
        "WORKERS": "2",
        "RATE_LIMIT_STORAGE_URL": f"{redis.url}/1",
    }
    for workers in ("1", "2"):
        result = subprocess.run(
            [str(BIN / "expense-auth"), "serve", "--port", str(server.port), "--workers", workers],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert f"127.0.0.1:{server.port} (port) is already in use" in result.stderr


def test_more_than_one_worker_needs_shared_rate_limits(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "expense-auth"), "serve", "--port", "0", "--workers", "3"],
        env={"PATH": os.environ.get("PATH", ""), "DATA_DIR": str(tmp_path / "var")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "RATE_LIMIT_STORAGE_URL: with WORKERS=3 the rate limits must be shared" in (
        result.stderr
    )
    assert not (tmp_path / "var").exists()  # refused before touching anything


def test_workers_auto_is_one_per_usable_cpu() -> None:
    config = load_config({"WORKERS": "auto", "RATE_LIMIT_STORAGE_URL": "redis://127.0.0.1:1"})
    assert config.workers == len(os.sched_getaffinity(0))
    assert load_config({}).workers == 1
