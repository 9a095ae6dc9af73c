"""CORS, CSRF layers and security headers, on a real server with real HTTP."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import require_tool, server_env
from tests.support.client import Session
from tests.support.google import FakeGoogle
from tests.support.http import Response, connect_post, request
from tests.support.server import RunningServer, start_server

APP = "https://app.example.com"
GET_SESSION = "/expense.auth.v1.AuthService/GetSession"
SIGN_OUT = "/expense.auth.v1.AuthService/SignOut"
HEALTH = "/grpc.health.v1.Health/Check"
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-site",
}
HOSTILE_ORIGINS = [
    "https://evil.example.com",
    "https://app.example.com.evil.com",
    "https://evilapp.example.com",
    "http://app.example.com",  # scheme downgrade
    "https://app.example.com:8443",
    "null",
    "https://app.example.co",
    "https://APP.EXAMPLE.COM.evil",
]


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("edge"), server_env(google, CORS_ALLOWED_ORIGIN=APP)
    )
    yield running
    assert running.stop() == 0, running.logs()


def preflight(server: RunningServer, origin: str, headers: str = "content-type") -> Response:
    return request(
        server.url,
        "OPTIONS",
        GET_SESSION,
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": headers,
        },
    )


def assert_security_headers(response: Response, *, hsts: bool = False) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.header(name) == value, (name, response.headers)
    assert any("Origin" in v for v in response.all("vary")), response.headers
    if hsts:
        hsts_value = response.header("strict-transport-security") or ""
        assert int(hsts_value.split("max-age=")[1].split(";")[0]) >= 365 * 24 * 3600
    else:
        assert response.header("strict-transport-security") is None


# CORS ---------------------------------------------------------------------------------


def test_preflight_from_the_frontend_is_allowed_with_credentials(edge: RunningServer) -> None:
    wanted = "content-type,connect-protocol-version,connect-timeout-ms,x-grpc-web,x-user-agent"
    response = preflight(edge, APP, wanted)
    assert response.status == 200
    assert response.header("access-control-allow-origin") == APP
    assert response.header("access-control-allow-credentials") == "true"
    allowed = (response.header("access-control-allow-headers") or "").lower()
    for header in wanted.split(","):
        assert header in allowed
    assert int(response.header("access-control-max-age") or 0) >= 600
    assert_security_headers(response)


@pytest.mark.parametrize("origin", HOSTILE_ORIGINS)
def test_preflight_from_other_origins_gets_nothing(edge: RunningServer, origin: str) -> None:
    response = preflight(edge, origin)
    assert response.header("access-control-allow-origin") is None
    assert response.status >= 400


def test_responses_to_the_frontend_expose_the_rpc_status_headers(edge: RunningServer) -> None:
    response = connect_post(edge.url, GET_SESSION, {}, headers={"origin": APP})
    assert response.status == 401  # an error response carries CORS headers too
    assert response.header("access-control-allow-origin") == APP
    assert response.header("access-control-allow-credentials") == "true"
    exposed = (response.header("access-control-expose-headers") or "").lower()
    for header in ("grpc-status", "grpc-message", "grpc-status-details-bin", "x-request-id"):
        assert header in exposed
    assert_security_headers(response)


@pytest.mark.parametrize("origin", HOSTILE_ORIGINS)
def test_calls_from_other_origins_are_refused_and_unreadable(
    edge: RunningServer, origin: str
) -> None:
    response = connect_post(edge.url, GET_SESSION, {}, headers={"origin": origin})
    assert response.status == 403
    assert response.json()["code"] == "permission_denied"
    assert response.header("access-control-allow-origin") is None
    assert_security_headers(response)


# CSRF ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_simple_content_types_are_refused(edge: RunningServer, content_type: str) -> None:
    response = request(
        edge.url, "POST", SIGN_OUT, body=b"{}", headers={"content-type": content_type}
    )
    assert response.status == 415
    assert_security_headers(response)


def test_connect_posts_need_the_protocol_header(edge: RunningServer) -> None:
    response = request(
        edge.url,
        "POST",
        GET_SESSION,
        body=b"{}",
        headers={"content-type": "application/json"},
    )
    assert response.status == 400
    assert response.json() == {
        "code": "invalid_argument",
        "message": "missing required header: set Connect-Protocol-Version to 1",
    }


def test_get_is_served_only_for_read_only_procedures(edge: RunningServer) -> None:
    query = "?encoding=json&message=%7B%7D&connect=v1"
    assert request(edge.url, "GET", GET_SESSION + query).status == 401
    refused = request(edge.url, "GET", SIGN_OUT + query)
    assert refused.status == 405
    assert_security_headers(refused)


@pytest.fixture
def signed_in(edge: RunningServer, google: FakeGoogle) -> Session:
    client = Session(edge.url)
    client.sign_in(google.token(sub=secrets.token_hex(8)))
    return client


@pytest.mark.parametrize(
    ("fetch_site", "origin", "status"),
    [
        ("cross-site", None, 403),
        ("cross-site", "https://evil.example.net", 403),
        ("cross-site", APP, 200),  # the frontend on another site, allowlisted
        ("same-site", APP, 200),
        ("same-origin", None, 200),
        ("none", None, 200),
        (None, None, 200),  # not a browser: grpcurl, service clients
    ],
)
def test_fetch_metadata_refuses_cross_site_cookie_calls(
    edge: RunningServer,
    signed_in: Session,
    fetch_site: str | None,
    origin: str | None,
    status: int,
) -> None:
    headers = {"cookie": signed_in.cookie or ""}
    if fetch_site:
        headers["sec-fetch-site"] = fetch_site
    if origin:
        headers["origin"] = origin
    response = connect_post(edge.url, GET_SESSION, {}, headers=headers)
    assert response.status == status, response.body
    if status == 403:
        assert response.json()["code"] == "permission_denied"


def test_the_servers_own_origin_is_accepted(edge: RunningServer, signed_in: Session) -> None:
    headers = {"cookie": signed_in.cookie or "", "origin": f"http://{edge.address}"}
    assert connect_post(edge.url, GET_SESSION, {}, headers=headers).status == 200


# Security headers ------------------------------------------------------------------------


def test_security_headers_on_success_not_found_and_health(
    edge: RunningServer, signed_in: Session
) -> None:
    ok = connect_post(edge.url, GET_SESSION, {}, headers={"cookie": signed_in.cookie or ""})
    assert ok.status == 200
    assert_security_headers(ok)
    missing = request(edge.url, "GET", "/nope")
    assert missing.status == 404
    assert_security_headers(missing)
    health = connect_post(edge.url, HEALTH, {})
    assert health.status == 200
    assert_security_headers(health)


@pytest.mark.parametrize("protocol", ["grpc", "grpc-web"])
def test_security_headers_on_grpc_and_grpc_web(edge: RunningServer, protocol: str) -> None:
    curl = require_tool("curl", "curl")
    args = [curl, "-s", "-i", "-X", "POST", "--data-binary", "@-", "-o", "-"]
    if protocol == "grpc":
        args += [
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
        ]
    else:
        args += ["-H", "content-type: application/grpc-web+proto", "-H", "x-grpc-web: 1"]
    result = subprocess.run(
        [*args, f"{edge.url}{HEALTH}"],
        input=b"\x00\x00\x00\x00\x00",  # one empty HealthCheckRequest
        capture_output=True,
        timeout=20,
        check=True,
    )
    head = result.stdout.split(b"\r\n\r\n", 1)[0].decode(errors="replace").lower()
    for name, value in SECURITY_HEADERS.items():
        assert f"{name}: {value.lower()}" in head, head


def test_sign_out_clears_site_data(edge: RunningServer, signed_in: Session) -> None:
    response = connect_post(edge.url, SIGN_OUT, {}, headers={"cookie": signed_in.cookie or ""})
    assert response.status == 200
    assert response.header("clear-site-data") == '"cache", "storage"'
    assert any("Max-Age=0" in c for c in response.all("set-cookie"))


def test_hsts_when_a_tls_proxy_is_declared(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle
) -> None:
    proxied = start_server(
        tmp_path_factory.mktemp("hsts"), server_env(google, BEHIND_TLS_PROXY="true")
    )
    try:
        for response in (
            request(proxied.url, "GET", "/nope"),
            connect_post(proxied.url, HEALTH, {}),
        ):
            assert_security_headers(response, hsts=True)
    finally:
        assert proxied.stop() == 0
