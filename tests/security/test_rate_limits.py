"""Rate limits on the real server: per policy, atomic under concurrency, no lockout."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType

from gen.expense.auth.v1.auth_connect import AuthServiceClientSync
from gen.expense.auth.v1.auth_pb import GetSessionRequest, SignInRequest
from tests.conftest import require_tool, server_env
from tests.support.client import Session, code_of
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.http import Response, connect_post
from tests.support.server import RunningServer, start_server

SIGN_IN = "/expense.auth.v1.AuthService/SignIn"
GET_SESSION = "/expense.auth.v1.AuthService/GetSession"


@pytest.fixture(scope="module")
def clock(tmp_path_factory: pytest.TempPathFactory) -> FileClock:
    """Stopped at the start of every window: counts are exact, whatever the real time."""
    return FileClock(tmp_path_factory.mktemp("clock") / "now").freeze()


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle, clock: FileClock
) -> Iterator[RunningServer]:
    """Small limits; loopback is a trusted proxy so each test can be its own client IP."""
    running = start_server(
        tmp_path_factory.mktemp("limited"),
        server_env(
            google,
            TRUSTED_PROXIES="127.0.0.1/32",
            RATE_LIMIT_SIGNIN_PER_IP="10/minute",
            RATE_LIMIT_SIGNIN_PER_SUBJECT="2/2 seconds",
            RATE_LIMIT_FAILED_SIGNIN_PER_IP="3/minute",
            RATE_LIMIT_UNAUTHENTICATED_PER_IP="5/minute",
            RATE_LIMIT_PER_SESSION="5/minute",
            RATE_LIMIT_PER_USER="8/minute",
        ),
        clock=clock,
    )
    yield running
    assert running.stop() == 0, running.logs()


def new_ip() -> str:
    """A random documentation-range address, as a trusted proxy would forward it."""
    return f"198.51.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


def sign_in(server: RunningServer, token: str, ip: str) -> Response:
    return connect_post(
        server.url, SIGN_IN, {"googleIdToken": token}, headers={"x-forwarded-for": ip}
    )


def assert_limited(response: Response, fragment: str) -> None:
    assert response.status == 429, response.body
    assert response.json()["code"] == "resource_exhausted"
    assert fragment in response.json()["message"]
    assert 1 <= int(response.header("retry-after") or "0") <= 3600


def test_sign_in_per_ip_holds_under_50_parallel_attempts(
    limited: RunningServer, google: FakeGoogle
) -> None:
    ip = new_ip()
    tokens = [google.token(sub=secrets.token_hex(8)) for _ in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda t: sign_in(limited, t, ip), tokens))
    statuses = sorted(r.status for r in responses)
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 40
    assert_limited(next(r for r in responses if r.status == 429), "sign-in attempts")
    # Another client IP is not affected.
    assert sign_in(limited, google.token(sub=secrets.token_hex(8)), new_ip()).status == 200


def test_sign_in_per_subject_then_the_window_passes_no_lockout(
    limited: RunningServer, google: FakeGoogle, clock: FileClock
) -> None:
    sub = secrets.token_hex(8)
    assert [sign_in(limited, google.token(sub=sub), new_ip()).status for _ in range(2)] == [
        200,
        200,
    ]
    refused = sign_in(limited, google.token(sub=sub), new_ip())
    assert_limited(refused, "for this account")
    clock.advance(4)  # two windows of 2 s: the previous one no longer weighs
    assert sign_in(limited, google.token(sub=sub), new_ip()).status == 200


def test_calls_without_a_session_per_ip(limited: RunningServer) -> None:
    ip = new_ip()
    statuses = [
        connect_post(limited.url, GET_SESSION, {}, headers={"x-forwarded-for": ip}).status
        for _ in range(6)
    ]
    assert statuses == [401] * 5 + [429]


def test_per_session_and_per_user(limited: RunningServer, google: FakeGoogle) -> None:
    sub = secrets.token_hex(8)
    first, second = Session(limited.url), Session(limited.url)
    for client in (first, second):
        client.sign_in(google.token(sub=sub))  # loopback, trusted, no XFF: IP 127.0.0.1

    def calls(client: Session, n: int) -> list[str]:
        codes = []
        for _ in range(n):
            try:
                client.call(client.auth.get_session, GetSessionRequest())
                codes.append("ok")
            except ConnectError as exc:
                codes.append(code_of(exc))
        return codes

    assert calls(first, 6) == ["ok"] * 5 + ["resource_exhausted"]  # per session: 5
    assert calls(second, 4) == ["ok"] * 3 + ["resource_exhausted"]  # per user: 8 in all


def test_grpc_web_gets_resource_exhausted_too(limited: RunningServer, google: FakeGoogle) -> None:
    ip = new_ip()
    client = AuthServiceClientSync(limited.url, protocol=ProtocolType.GRPC_WEB)
    codes = []
    for _ in range(4):
        try:
            client.sign_in(
                SignInRequest(google_id_token=google.token(aud="nope")),
                headers={"x-forwarded-for": ip},
            )
        except ConnectError as exc:
            codes.append(code_of(exc))
    assert codes == ["unauthenticated"] * 3 + ["resource_exhausted"]


def test_grpc_gets_resource_exhausted_too(limited: RunningServer, google: FakeGoogle) -> None:
    grpcurl = require_tool(str(Path(sys.executable).parent / "grpcurl"), "grpcurl")
    ip = new_ip()
    exits = []
    for _ in range(4):
        result = subprocess.run(
            [
                grpcurl,
                "-plaintext",
                "-H",
                f"x-forwarded-for: {ip}",
                "-d",
                json.dumps({"google_id_token": google.token(aud="nope")}),
                limited.address,
                "expense.auth.v1.AuthService/SignIn",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        exits.append(result.returncode)
    # grpcurl exits with 64 + the gRPC status code.
    assert exits == [64 + 16] * 3 + [64 + 8], exits
    assert "ResourceExhausted" in result.stderr and "try again in" in result.stderr


def test_a_forged_forwarded_for_from_an_untrusted_peer_changes_nothing(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle
) -> None:
    direct = start_server(
        tmp_path_factory.mktemp("direct"),
        server_env(google, RATE_LIMIT_SIGNIN_PER_IP="3/minute"),
        clock=FileClock(tmp_path_factory.mktemp("direct-clock") / "now").freeze(),
    )
    try:
        statuses = [
            sign_in(direct, google.token(sub=secrets.token_hex(8)), new_ip()).status
            for _ in range(5)
        ]
        assert statuses == [200, 200, 200, 429, 429]
    finally:
        assert direct.stop() == 0


def test_global_ceiling(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle) -> None:
    busy = start_server(
        tmp_path_factory.mktemp("busy"),
        server_env(google, RATE_LIMIT_GLOBAL="20/minute", TRUSTED_PROXIES="127.0.0.1/32"),
        clock=FileClock(tmp_path_factory.mktemp("busy-clock") / "now").freeze(),
    )
    try:
        responses = [
            connect_post(busy.url, GET_SESSION, {}, headers={"x-forwarded-for": new_ip()})
            for _ in range(25)
        ]
        assert [r.status for r in responses] == [401] * 20 + [429] * 5
        assert_limited(responses[-1], "server is busy")
    finally:
        assert busy.stop() == 0
