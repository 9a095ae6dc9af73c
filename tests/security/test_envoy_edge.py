"""Envoy as an attacker on the host sees it: its admin interface, its ports, its own replies.

- Envoy's admin interface can change log levels (which wrote session cookies to
  stderr) and stop the process. No TCP port of the server answers it; it sits on
  a Unix socket only the service's user can open.
- A second server on a port in use fails to start instead of sharing the port.
- The replies Envoy makes itself (431, 400, 501) carry the security headers, and
  nothing says `server: envoy`.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.edge.middleware import HSTS, SECURITY_HEADERS
from tests.conftest import server_env
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer, start_server

CLI = str(Path(sys.executable).parent / "expense-auth")
# Paths of Envoy's admin API that an attacker would try, with the method.
ADMIN_PATHS = [
    ("GET", "/server_info"),
    ("GET", "/stats"),
    ("GET", "/config_dump"),
    ("GET", "/listeners"),
    ("POST", "/logging?level=debug"),
    ("POST", "/logging?http=debug"),
    ("POST", "/quitquitquit"),
]


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("edge"), server_env(google))
    yield running
    assert running.stop() == 0, running.logs()


def envoy_pid(server: RunningServer) -> int:
    """The Envoy process that `expense-auth serve` runs (its child)."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    pids = [int(p) for p in children.read_text().split()]
    envoys = [p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "envoy"]
    assert len(envoys) == 1, (pids, envoys)
    return envoys[0]


def listening_tcp_ports(pid: int) -> set[int]:
    """Every TCP port the process listens on, IPv4 and IPv6, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def raw_http(port: int, request: bytes, *, timeout: float = 10) -> bytes:
    """Send bytes to the port and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def headers_of(response: bytes) -> dict[str, str]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


def test_no_tcp_port_of_the_process_answers_envoy_admin(edge: RunningServer) -> None:
    pid = envoy_pid(edge)
    ports = listening_tcp_ports(pid)
    admin_port = int(edge.admin_url.rsplit(":", 1)[1])
    # The public port and our own admin listener (AdminService, /metrics): nothing else.
    assert ports == {edge.port, admin_port}, ports
    for port in ports:
        for method, path in ADMIN_PATHS:
            reply = raw_http(
                port,
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode(),
            )
            status = reply.split(b"\r\n", 1)[0]
            assert status == b"HTTP/1.1 404 Not Found", (port, path, reply[:300])
            assert b"no such procedure or route" in reply, (port, path, reply[:300])
    assert edge.process.poll() is None, "a request stopped the server"


def test_the_admin_socket_is_for_the_service_user_only(edge: RunningServer) -> None:
    pid = envoy_pid(edge)
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    config = json.loads(args[args.index(b"--config-yaml") + 1])
    path = Path(config["admin"]["address"]["pipe"]["path"])
    socket_mode = path.stat()
    directory = path.parent.stat()
    assert stat.S_ISSOCK(socket_mode.st_mode)
    assert stat.S_IMODE(socket_mode.st_mode) == 0o600
    assert stat.S_IMODE(directory.st_mode) == 0o700
    owner = Path(f"/proc/{pid}").stat().st_uid
    assert socket_mode.st_uid == directory.st_uid == owner
    # It is Envoy's admin interface (so the server can still drain through it).
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(b"GET /server_info HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b'"state": "LIVE"' in sock.recv(65536)


def test_a_second_server_on_a_port_in_use_refuses_to_start(
    edge: RunningServer, tmp_path: Path
) -> None:
    env = {**edge.env, "DATA_DIR": str(tmp_path / "var")}
    try:
        second = subprocess.run(
            [CLI, "serve", "--port", str(edge.port)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a second server started on a port that was in use")
    assert second.returncode == 2, second.stderr
    assert f"127.0.0.1:{edge.port} (port) is already in use" in second.stderr
    assert "Traceback" not in second.stderr
    # The admin port too.
    admin_port = edge.admin_url.rsplit(":", 1)[1]
    second = subprocess.run(
        [CLI, "serve", "--port", "0"],
        env={**env, "ADMIN_PORT": admin_port},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 2, second.stderr
    assert f"127.0.0.1:{admin_port} (ADMIN_PORT) is already in use" in second.stderr


# Requests Envoy answers itself, before the app sees anything.
LOCAL_REPLIES = [
    pytest.param(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        431,
        id="headers_too_large",
    ),
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="malformed"),
    pytest.param(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        400,
        id="conflicting_lengths",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        501,
        id="unsupported_transfer_coding",
    ),
    pytest.param(
        b"GET /x%FF HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        400,
        id="non_ascii_path_escape",
    ),
]


@pytest.mark.parametrize(("request_bytes", "status"), LOCAL_REPLIES)
def test_envoys_own_replies_carry_the_security_headers(
    edge: RunningServer, request_bytes: bytes, status: int
) -> None:
    reply = raw_http(edge.port, request_bytes)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    headers = headers_of(reply)
    for name, value in SECURITY_HEADERS:
        assert headers.get(name) == value, (name, headers)
    assert "server" not in headers, headers
    assert "strict-transport-security" not in headers  # plain HTTP, no TLS proxy declared


def test_app_responses_say_nothing_of_envoy(edge: RunningServer) -> None:
    reply = raw_http(edge.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert "server" not in headers_of(reply)


def test_local_replies_carry_hsts_behind_a_tls_proxy(tmp_path: Path, google: FakeGoogle) -> None:
    proxied = start_server(tmp_path, server_env(google, BEHIND_TLS_PROXY="true"))
    try:
        started = time.monotonic()
        reply = raw_http(proxied.port, b"GARBAGE\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
        assert headers_of(reply)["strict-transport-security"] == HSTS
        assert time.monotonic() - started < 5
    finally:
        assert proxied.stop() == 0, proxied.logs()
