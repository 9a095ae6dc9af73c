"""HTTPS served directly: TLS_CERT_FILE + TLS_KEY_FILE turn the one port into HTTPS only.

A throwaway CA signs a certificate for localhost and 127.0.0.1; real clients
(grpcurl, curl, the generated Python client) must verify it against that CA.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from connectrpc.client import ResponseMetadata
from pyqwest import SyncClient, SyncHTTPTransport

from gen.expense.auth.v1.auth_connect import AuthServiceClientSync
from gen.expense.auth.v1.auth_pb import GetSessionRequest, SignInRequest
from server.runtime.serve import MAX_REQUEST_HEADERS_KB
from tests.conftest import require_tool, server_env
from tests.support.google import FakeGoogle
from tests.support.pki import Pki, make_pki
from tests.support.server import RunningServer, start_server

TOOL_TIMEOUT_S = 30
VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
AUTH = "expense.auth.v1.AuthService"
# Connect POSTs by hand carry the protocol header, as Connect clients do.
CONNECT_V1 = "connect-protocol-version: 1"
SERVICES = [
    "expense.auth.v1.AuthService",
    "expense.user.v1.UserService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle, pki: Pki
) -> Iterator[RunningServer]:
    """A server given TLS_CERT_FILE and TLS_KEY_FILE."""
    tmp = tmp_path_factory.mktemp("tls-server")
    running = start_server(
        tmp,
        server_env(google, TLS_CERT_FILE=str(pki.server_cert), TLS_KEY_FILE=str(pki.server_key)),
    )
    yield running
    assert running.stop() == 0, running.logs()


@pytest.fixture(scope="module")
def grpcurl() -> str:
    return require_tool(str(VENV_BIN / "grpcurl"), "grpcurl")


@pytest.fixture(scope="module")
def curl() -> str:
    return require_tool(shutil.which("curl"), "curl")


def run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a client tool; never raises on a non-zero exit."""
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )


def new_sub() -> str:
    return str(10**20 + int.from_bytes(os.urandom(8), "big"))


def https_url(server: RunningServer, path: str = "") -> str:
    """The URL by name, so that certificate verification checks the DNS name too."""
    return f"https://localhost:{server.port}{path}"


def curl_status(curl: str, args: Sequence[str]) -> tuple[int, str]:
    """(HTTP status, HTTP version) as curl reports them; asserts that curl succeeded."""
    result = run([curl, "-sS", "-o", os.devnull, "-w", "%{http_code} %{http_version}", *args])
    assert result.returncode == 0, result.stderr
    status, version = result.stdout.split()
    return int(status), version


def test_serving_line_names_https_and_the_bound_port(tls_server: RunningServer) -> None:
    assert tls_server.port > 0
    assert tls_server.url == f"https://127.0.0.1:{tls_server.port}"
    assert "(HTTPS: HTTP/2 and HTTP/1.1 by ALPN)" in tls_server.logs()


def test_grpcurl_lists_services_over_tls_without_plaintext(
    grpcurl: str, tls_server: RunningServer, pki: Pki
) -> None:
    result = run([grpcurl, "-cacert", str(pki.ca_cert), f"localhost:{tls_server.port}", "list"])

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == SERVICES


def test_grpcurl_signs_in_over_tls(
    grpcurl: str, tls_server: RunningServer, pki: Pki, google: FakeGoogle
) -> None:
    sub = new_sub()
    token = google.token(sub=sub, email=f"{sub}@example.com")
    result = run(
        [
            grpcurl,
            "-cacert",
            str(pki.ca_cert),
            "-d",
            json.dumps({"google_id_token": token}),
            f"localhost:{tls_server.port}",
            f"{AUTH}/SignIn",
        ]
    )

    assert result.returncode == 0, result.stderr
    signed_in = json.loads(result.stdout)
    assert signed_in["user"]["email"] == f"{sub}@example.com"
    assert signed_in["session"]["current"] is True


def test_grpcurl_refuses_a_server_it_cannot_verify(grpcurl: str, tls_server: RunningServer) -> None:
    # Without our CA the chain is untrusted: proof that the other tests really verify.
    result = run([grpcurl, "-connect-timeout", "5", f"localhost:{tls_server.port}", "list"])

    assert result.returncode != 0
    assert "certificate" in result.stderr, result.stderr


def test_generated_python_client_signs_in_over_https(
    tls_server: RunningServer, pki: Pki, google: FakeGoogle
) -> None:
    # pyqwest's SyncClient is not a context manager (connectrpc's docstring says it
    # is); the transport is, and it holds the connections.
    with (
        SyncHTTPTransport(tls_ca_cert=pki.ca_cert.read_bytes()) as transport,
        AuthServiceClientSync(https_url(tls_server), http_client=SyncClient(transport)) as auth,
    ):
        sub = new_sub()
        with ResponseMetadata() as meta:
            signed_in = auth.sign_in(
                SignInRequest(google_id_token=google.token(sub=sub, email=f"{sub}@example.com"))
            )
        (set_cookie,) = meta.headers.getall("set-cookie")
        got = auth.get_session(GetSessionRequest(), headers={"cookie": set_cookie.split(";", 1)[0]})

    assert signed_in.user is not None and signed_in.session is not None
    assert signed_in.user.email == f"{sub}@example.com"
    assert got.session is not None and got.session.id == signed_in.session.id


@pytest.mark.parametrize(
    ("flag", "version"), [("--http1.1", "1.1"), ("--http2", "2")], ids=["http1.1", "h2-alpn"]
)
def test_alpn_offers_http2_and_http1(
    curl: str, tls_server: RunningServer, pki: Pki, flag: str, version: str
) -> None:
    # A Connect GET, not a POST: the app refuses a call without a session before
    # reading the body, and curl 7.88 then fails ~10% of h2 POSTs with "Stream error
    # in the HTTP/2 framing layer" (an early response; hyper-based clients are fine).
    url = https_url(tls_server, f"/{AUTH}/GetSession?encoding=json&message=%7B%7D&connect=v1")
    status, got = curl_status(curl, [flag, "--cacert", str(pki.ca_cert), url])

    assert (status, got) == (401, version)  # unauthenticated, answered by the app


@pytest.mark.parametrize("flag", ["--http1.1", "--http2-prior-knowledge"], ids=["http1.1", "h2c"])
def test_nothing_answers_plaintext_on_the_port(
    curl: str, tls_server: RunningServer, flag: str
) -> None:
    result = run(
        [curl, "-sS", "--max-time", "10", flag, f"http://127.0.0.1:{tls_server.port}/{AUTH}/x"]
    )

    assert result.returncode != 0, result.stdout
    assert "HTTP/" not in result.stdout


def test_a_raw_plaintext_request_gets_no_http_answer(tls_server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass

    # The TLS stack drops the connection (at most with a TLS alert); never an HTTP response.
    assert not received.startswith(b"HTTP/"), received[:200]


def _envoy_pids(server: RunningServer) -> list[str]:
    """The server's child processes (Envoy), from Linux /proc."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    if not children.exists():
        pytest.skip("needs Linux /proc to find the Envoy process")
    pids = children.read_text().split()
    assert pids, "no Envoy process found"
    return pids


def _socket_inodes(pid: str) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    return inodes


def test_envoy_has_no_udp_socket(tls_server: RunningServer) -> None:
    # With --port 0 pyvoy would put a QUIC listener on a different random port than
    # the TCP one, so look for any UDP socket of Envoy's, not for the TCP port number.
    pids = _envoy_pids(tls_server)
    udp_inodes = {
        line.split()[9]
        for table in ("/proc/net/udp", "/proc/net/udp6")
        for line in Path(table).read_text().splitlines()[1:]
    }
    for pid in pids:
        assert not _socket_inodes(pid) & udp_inodes, "Envoy listens on UDP (HTTP/3?)"


def test_the_private_key_is_not_on_envoys_command_line(tls_server: RunningServer, pki: Pki) -> None:
    key_body = "".join(pki.server_key.read_text().splitlines()[1:-1]).encode()
    command_lines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _envoy_pids(tls_server)]

    assert any(b"--config-yaml" in line for line in command_lines)
    for line in command_lines:
        assert str(pki.server_key).encode() in line  # a file name, read by Envoy
        assert key_body[:40] not in line
        assert b"inline_bytes" not in line


def _big_headers(total_bytes: int) -> list[str]:
    """curl -H arguments adding about `total_bytes` of header values."""
    chunk = 1000
    return [
        arg for i in range(total_bytes // chunk) for arg in ("-H", f"x-filler-{i}: {'a' * chunk}")
    ]


def test_oversized_request_headers_get_431_on_http1(curl: str, server: RunningServer) -> None:
    url = f"{server.url}/{AUTH}/GetSession"
    post = ["--http1.1", "-X", "POST", "-H", "content-type: application/json", "-H", CONNECT_V1]
    post += ["-d", "{}"]
    limit = MAX_REQUEST_HEADERS_KB * 1024

    assert curl_status(curl, [*post, *_big_headers(limit - 4096), url]) == (401, "1.1")
    assert curl_status(curl, [*post, *_big_headers(20 * 1024), url]) == (431, "1.1")
    # A cookie counts the same as any other header.
    cookie = f"cookie: expense_session={'a' * 20 * 1024}"
    assert curl_status(curl, [*post, "-H", cookie, url]) == (431, "1.1")


def test_oversized_request_headers_are_refused_over_https_too(
    curl: str, tls_server: RunningServer, pki: Pki
) -> None:
    url = https_url(tls_server, f"/{AUTH}/GetSession")
    post = ["--cacert", str(pki.ca_cert), "-X", "POST", "-H", "content-type: application/json"]
    post += ["-H", CONNECT_V1, "-d", "{}"]

    big = _big_headers(20 * 1024)

    assert curl_status(curl, ["--http1.1", *post, *big, url]) == (431, "1.1")
    # HTTP/2 has no 431 from Envoy: it resets the stream before the app sees it.
    refused = run([curl, "-sS", "--http2", "-o", os.devnull, *post, *big, url])
    assert refused.returncode == 92, refused.stderr  # curl: HTTP/2 stream error
    assert "INTERNAL_ERROR" in refused.stderr
