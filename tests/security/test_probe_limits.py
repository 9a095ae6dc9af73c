"""Health checks and reflection are limited too, and probes still pass under load.

- grpc.health.v1 (Check, Watch), /healthz and /readyz have a budget per client
  network of their own: not counted in the global limit, so a load balancer's
  probes pass however busy the server is, and one client cannot flood them.
- Reflection counts against the global limit and the per-network budget of
  calls without a session.
- Watch streams are capped per client network and in all; every stream shares
  one readiness poll; an HTTP/2 connection may hold at most 100 streams.
"""

from __future__ import annotations

import re
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from connectrpc.errors import ConnectError

from gen.grpc.health.v1.health_connect import HealthClientSync
from gen.grpc.health.v1.health_pb import HealthCheckRequest, HealthCheckResponse
from server.rpc.health import MAX_WATCH_STREAMS, MAX_WATCH_STREAMS_PER_CLIENT
from server.runtime.serve import MAX_CONCURRENT_STREAMS
from tests.conftest import require_tool, server_env
from tests.support.client import code_of
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.http import Response, connect_post, request
from tests.support.server import RunningServer, start_server

CHECK = "/grpc.health.v1.Health/Check"
GET_SESSION = "/expense.auth.v1.AuthService/GetSession"
PROBE_LIMIT = 5
SERVING = HealthCheckResponse.ServingStatus.SERVING


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle) -> Iterator[RunningServer]:
    """Small budgets; loopback is a trusted proxy so each test can be its own client."""
    running = start_server(
        tmp_path_factory.mktemp("probed"),
        server_env(
            google,
            TRUSTED_PROXIES="127.0.0.1/32",
            RATE_LIMIT_PROBE_PER_IP=f"{PROBE_LIMIT}/minute",
            RATE_LIMIT_UNAUTHENTICATED_PER_IP="5/minute",
        ),
        # Stopped at the start of every window: counts are exact, whatever the real time.
        clock=FileClock(tmp_path_factory.mktemp("probed-clock") / "now").freeze(),
    )
    yield running
    assert running.stop() == 0, running.logs()


def new_ip() -> str:
    return f"203.0.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


def check(server: RunningServer, ip: str) -> Response:
    return connect_post(server.url, CHECK, {}, headers={"x-forwarded-for": ip})


def get(server: RunningServer, path: str, ip: str) -> Response:
    return request(server.url, "GET", path, headers={"x-forwarded-for": ip})


def assert_limited(response: Response) -> None:
    assert response.status == 429, response.body
    assert response.json()["code"] == "resource_exhausted"
    assert "too many health checks" in response.json()["message"]
    assert 1 <= int(response.header("retry-after") or "0") <= 60


@pytest.mark.parametrize("path", [CHECK, "/healthz", "/readyz"])
def test_health_checks_have_a_budget_per_client(probed: RunningServer, path: str) -> None:
    ip = new_ip()

    def call() -> Response:
        return check(probed, ip) if path == CHECK else get(probed, path, ip)

    responses = [call() for _ in range(PROBE_LIMIT + 1)]
    assert [r.status for r in responses] == [200] * PROBE_LIMIT + [429]
    assert_limited(responses[-1])
    # Another client (the load balancer, say) is not affected.
    assert (check(probed, new_ip()) if path == CHECK else get(probed, path, new_ip())).status == 200


def test_probes_pass_when_the_global_limit_is_exhausted(tmp_path: Path, google: FakeGoogle) -> None:
    busy = start_server(
        tmp_path,
        server_env(google, RATE_LIMIT_GLOBAL="5/minute", TRUSTED_PROXIES="127.0.0.1/32"),
        clock=FileClock(tmp_path / "now").freeze(),
    )
    try:
        statuses = [
            connect_post(busy.url, GET_SESSION, {}, headers={"x-forwarded-for": new_ip()}).status
            for _ in range(6)
        ]
        assert statuses == [401] * 5 + [429]
        balancer = new_ip()
        assert get(busy, "/readyz", balancer).status == 200
        assert get(busy, "/healthz", balancer).status == 200
        assert check(busy, balancer).json() == {"status": "SERVING"}
    finally:
        assert busy.stop() == 0, busy.logs()


def test_reflection_counts_against_the_budget_without_a_session(probed: RunningServer) -> None:
    grpcurl = require_tool(str(Path(sys.executable).parent / "grpcurl"), "grpcurl")
    ip = new_ip()
    results = [
        subprocess.run(
            [grpcurl, "-plaintext", "-H", f"x-forwarded-for: {ip}", probed.address, "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        for _ in range(6)
    ]
    assert [r.returncode for r in results[:5]] == [0] * 5, [r.stderr for r in results]
    assert results[5].returncode != 0
    assert "ResourceExhausted" in results[5].stderr
    assert "too many calls without a valid session" in results[5].stderr


class Watcher(threading.Thread):
    """One Health/Watch stream from `ip`, held open until the server or the timeout ends it."""

    def __init__(self, server: RunningServer, ip: str, *, seconds: float = 15) -> None:
        super().__init__(daemon=True)
        self._server, self._ip, self._seconds = server, ip, seconds
        self.first = threading.Event()
        self.statuses: list[str] = []
        self.error = ""

    def run(self) -> None:
        with HealthClientSync(self._server.url) as health:
            try:
                for message in health.watch(
                    HealthCheckRequest(service=""),
                    headers={"x-forwarded-for": self._ip},
                    timeout_ms=int(self._seconds * 1000),
                ):
                    self.statuses.append(message.status.name)
                    self.first.set()
                    if message.status != SERVING:
                        return  # the server is draining: hang up, as a balancer would
            except ConnectError as exc:
                self.error = code_of(exc) if exc.code.value != "deadline_exceeded" else ""
                if self.error:
                    self.error += ": " + exc.message
            finally:
                self.first.set()


def open_watches(server: RunningServer, ips: list[str]) -> list[Watcher]:
    watchers = [Watcher(server, ip) for ip in ips]
    for watcher in watchers:
        watcher.start()
    for watcher in watchers:
        assert watcher.first.wait(20)
    return watchers


@pytest.fixture
def watch_server(tmp_path: Path, google: FakeGoogle) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path,
        server_env(google, TRUSTED_PROXIES="127.0.0.1/32", RATE_LIMIT_PROBE_PER_IP="5/minute"),
    )
    yield running
    assert running.stop() == 0, running.logs()


def test_watch_streams_are_capped_per_client_and_in_all(watch_server: RunningServer) -> None:
    per_client = MAX_WATCH_STREAMS_PER_CLIENT
    first = open_watches(watch_server, ["198.18.0.1"] * per_client)
    assert all(w.statuses == ["SERVING"] and not w.error for w in first), [w.error for w in first]
    (same_client,) = open_watches(watch_server, ["198.18.0.1"])
    assert same_client.error.startswith("resource_exhausted: your network has"), same_client.error
    ips = [
        f"198.18.{n}.1"
        for n in range(1, MAX_WATCH_STREAMS // per_client)
        for _ in range(per_client)
    ]
    held = open_watches(watch_server, ips)
    assert all(w.statuses == ["SERVING"] and not w.error for w in held), [w.error for w in held]

    (newcomer,) = open_watches(watch_server, ["198.19.0.1"])
    assert newcomer.error.startswith("resource_exhausted: this server has"), newcomer.error
    # Check still answers while every Watch slot is taken.
    assert check(watch_server, "198.19.0.2").json() == {"status": "SERVING"}


def scrape(server: RunningServer, name: str) -> float:
    body = request(server.admin_url, "GET", "/metrics").body.decode()
    match = re.search(rf"^{name} (\S+)$", body, re.MULTILINE)
    assert match, f"{name} is not in /metrics"
    return float(match.group(1))


def test_watch_streams_and_probes_share_one_readiness_poll(watch_server: RunningServer) -> None:
    before = scrape(watch_server, "expense_auth_readiness_checks_total")
    started = time.monotonic()
    ips = [f"198.20.{n}.1" for n in range(10) for _ in range(MAX_WATCH_STREAMS_PER_CLIENT)]
    open_watches(watch_server, ips)
    for n in range(40):
        assert get(watch_server, "/readyz", f"198.21.{n}.1").status == 200
    time.sleep(max(0.0, 3 - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    checks = scrape(watch_server, "expense_auth_readiness_checks_total") - before
    # One computation a second at most (plus one in flight), not one per stream or probe.
    assert 1 <= checks <= elapsed + 2, (checks, elapsed)


def h2_settings(port: int) -> dict[int, int]:
    """The server's HTTP/2 SETTINGS, read from the frames after a client preface."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        empty_settings = b"\x00\x00\x00" + b"\x04" + b"\x00" + b"\x00\x00\x00\x00"
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + empty_settings)
        data = b""
        while True:
            while len(data) < 9:
                data += sock.recv(65536)
            length = int.from_bytes(data[:3], "big")
            kind, flags = data[3], data[4]
            while len(data) < 9 + length:
                data += sock.recv(65536)
            payload, data = data[9 : 9 + length], data[9 + length :]
            if kind == 4 and not flags & 1:  # SETTINGS, not an ACK
                return {
                    struct.unpack(">H", payload[i : i + 2])[0]: struct.unpack(
                        ">I", payload[i + 2 : i + 6]
                    )[0]
                    for i in range(0, len(payload), 6)
                }


def test_an_http2_connection_holds_at_most_100_streams(probed: RunningServer) -> None:
    settings = h2_settings(probed.port)
    assert settings.get(0x3) == MAX_CONCURRENT_STREAMS == 100, settings  # MAX_CONCURRENT_STREAMS
