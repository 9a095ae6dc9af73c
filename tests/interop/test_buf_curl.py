"""`buf curl` with the repository's proto files: Connect, gRPC and gRPC-Web on one port."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.interop.tools import (
    PROTO_DIR,
    VENV_BIN,
    assert_session_cookie,
    cookie_pair,
    new_sub,
    run,
)
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer

pytestmark = pytest.mark.interop

AUTH = "expense.auth.v1.AuthService"


@dataclass(frozen=True)
class Protocol:
    """How `buf curl` is told to use a protocol, and what `-v` then shows."""

    flags: tuple[str, ...]
    http_version: str
    content_type: str
    # The session's user_agent: the server's summary of buf's User-Agent header.
    user_agent: str


PROTOCOLS = {
    "connect": Protocol((), "HTTP/1.1", "application/proto", "connect-go"),
    "grpcweb": Protocol((), "HTTP/1.1", "application/grpc-web+proto", "grpc-go-connect"),
    "grpc": Protocol(
        ("--http2-prior-knowledge",), "HTTP/2.0", "application/grpc+proto", "grpc-go-connect"
    ),
}


@pytest.fixture(scope="module")
def buf() -> str:
    return require_tool(str(VENV_BIN / "buf"), "buf")


def buf_curl(
    buf: str, server: RunningServer, protocol: str, method: str, *args: str
) -> tuple[int, str, str]:
    result = run(
        [
            buf,
            "curl",
            "--schema",
            str(PROTO_DIR),
            "--protocol",
            protocol,
            *PROTOCOLS[protocol].flags,
            *args,
            f"{server.url}/{AUTH}/{method}",
        ]
    )
    return result.returncode, result.stdout, result.stderr


def response_headers(verbose: str) -> dict[str, list[str]]:
    """The response headers (and trailers) that `buf curl -v` logged, lower-cased names."""
    headers: dict[str, list[str]] = {}
    for name, value in re.findall(r"^buf: < \(#\d+\) ([\w-]+): (.*)$", verbose, re.M):
        headers.setdefault(name.lower(), []).append(value)
    return headers


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_sign_in_then_get_session(
    buf: str, server: RunningServer, google: FakeGoogle, protocol: str
) -> None:
    expected = PROTOCOLS[protocol]
    sub = new_sub()
    token = google.token(sub=sub, email=f"{sub}@example.com")

    code, out, err = buf_curl(
        buf, server, protocol, "SignIn", "-v", "-d", json.dumps({"googleIdToken": token})
    )

    assert code == 0, err
    assert re.search(rf"^buf: < \(#1\) {re.escape(expected.http_version)} 200 OK$", err, re.M), err
    headers = response_headers(err)
    assert headers["content-type"] == [expected.content_type]
    (set_cookie,) = headers["set-cookie"]
    assert_session_cookie(set_cookie)
    signed_in: dict[str, Any] = json.loads(out)
    assert signed_in["user"]["email"] == f"{sub}@example.com"
    assert signed_in["session"]["userAgent"] == expected.user_agent

    code, out, err = buf_curl(
        buf, server, protocol, "GetSession", "-H", f"cookie: {cookie_pair(set_cookie)}"
    )
    assert code == 0, err
    got = json.loads(out)
    assert got["user"] == signed_in["user"]
    assert got["session"]["id"] == signed_in["session"]["id"]
    assert got["session"]["current"] is True


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_get_session_without_a_cookie_is_unauthenticated(
    buf: str, server: RunningServer, protocol: str
) -> None:
    code, out, err = buf_curl(buf, server, protocol, "GetSession")

    assert code != 0
    assert out == ""
    error = json.loads(err)
    assert error["code"] == "unauthenticated"
    assert "sign in" in error["message"]


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_sign_in_with_a_bad_token_is_refused_without_a_cookie(
    buf: str, server: RunningServer, protocol: str
) -> None:
    code, out, err = buf_curl(
        buf, server, protocol, "SignIn", "-v", "-d", '{"googleIdToken": "a.b.c"}'
    )

    assert code != 0
    assert out == ""
    assert "set-cookie" not in response_headers(err)
    error = json.loads(err[err.index("\n{") :])
    assert error["code"] == "unauthenticated"
    assert "google_id_token" in error["message"]


@pytest.mark.parametrize("reflect", ["grpc-v1", "grpc-v1alpha"])
def test_reflection_lists_the_services_in_both_versions(
    buf: str, server: RunningServer, reflect: str
) -> None:
    # Without --schema, buf asks the server: each reflection version is its own service.
    result = run(
        [
            buf,
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--reflect-protocol",
            reflect,
            "--list-services",
            server.url,
        ]
    )
    assert result.returncode == 0, result.stderr
    assert {AUTH, "expense.user.v1.UserService", "grpc.health.v1.Health"} <= set(
        result.stdout.split()
    ), result.stdout
