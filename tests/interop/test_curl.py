"""curl speaks the Connect protocol by hand: JSON over HTTP/1.1, POST and GET."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence

import pytest

from tests.conftest import require_tool
from tests.interop.tools import (
    HttpResponse,
    assert_session_cookie,
    cookie_pair,
    new_sub,
    parse_http_response,
    run,
)
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer

pytestmark = pytest.mark.interop

AUTH = "expense.auth.v1.AuthService"
# A Connect GET: the request message, JSON-encoded, in the query string.
GET_QUERY = "?encoding=json&message=%7B%7D&connect=v1"


@pytest.fixture(scope="module")
def curl() -> str:
    return require_tool(shutil.which("curl"), "curl")


def call(curl: str, args: Sequence[str]) -> HttpResponse:
    result = run([curl, "-s", "-i", "--http1.1", *args])
    assert result.returncode == 0, result.stderr
    return parse_http_response(result.stdout)


def post(
    curl: str, url: str, body: str, *, cookie: str | None = None, content_type: str | None = None
) -> HttpResponse:
    args = [
        "-X",
        "POST",
        url,
        "-H",
        f"content-type: {content_type or 'application/json'}",
        "-H",
        "connect-protocol-version: 1",
    ]
    if cookie:
        args += ["-H", f"cookie: {cookie}"]
    return call(curl, [*args, "--data-binary", body])


def get(curl: str, url: str, *, cookie: str | None = None) -> HttpResponse:
    return call(curl, [url, *(["-H", f"cookie: {cookie}"] if cookie else [])])


def sign_in(curl: str, server: RunningServer, google: FakeGoogle, sub: str) -> HttpResponse:
    token = google.token(sub=sub, email=f"{sub}@example.com")
    return post(curl, f"{server.url}/{AUTH}/SignIn", json.dumps({"googleIdToken": token}))


def test_sign_in_sets_a_cookie_that_get_session_accepts(
    curl: str, server: RunningServer, google: FakeGoogle
) -> None:
    sub = new_sub()
    signed_in = sign_in(curl, server, google, sub)

    assert (signed_in.version, signed_in.status) == ("HTTP/1.1", 200), signed_in
    assert signed_in.header("content-type") == "application/json"
    (set_cookie,) = signed_in.headers_named("set-cookie")
    assert_session_cookie(set_cookie)
    body = signed_in.json()
    assert body["user"]["email"] == f"{sub}@example.com"
    assert body["user"]["id"].startswith("usr_")
    assert body["session"]["current"] is True
    assert body["session"]["userAgent"] == "curl"

    got = post(curl, f"{server.url}/{AUTH}/GetSession", "{}", cookie=cookie_pair(set_cookie))
    assert got.status == 200, got
    assert got.json()["user"] == body["user"]
    assert got.json()["session"]["id"] == body["session"]["id"]
    assert got.headers_named("set-cookie") == []


def test_connect_get_reads_the_session(
    curl: str, server: RunningServer, google: FakeGoogle
) -> None:
    signed_in = sign_in(curl, server, google, new_sub())
    cookie = cookie_pair(signed_in.headers_named("set-cookie")[0])
    url = f"{server.url}/{AUTH}/GetSession{GET_QUERY}"

    got = get(curl, url, cookie=cookie)
    assert got.status == 200, got
    assert got.header("content-type") == "application/json"
    assert got.json()["session"]["id"] == signed_in.json()["session"]["id"]
    assert got.json()["user"]["id"] == signed_in.json()["user"]["id"]

    anonymous = get(curl, url)
    assert anonymous.status == 401, anonymous
    assert anonymous.json()["code"] == "unauthenticated"
    assert "sign in" in anonymous.json()["message"]


def test_connect_get_on_a_state_changing_rpc_is_refused(
    curl: str, server: RunningServer, google: FakeGoogle
) -> None:
    signed_in = sign_in(curl, server, google, new_sub())
    cookie = cookie_pair(signed_in.headers_named("set-cookie")[0])

    refused = get(curl, f"{server.url}/{AUTH}/SignOut{GET_QUERY}", cookie=cookie)
    assert refused.status == 405, refused
    assert refused.header("allow") == "POST"
    assert refused.headers_named("set-cookie") == []

    # The refused GET did not sign the session out.
    still = post(curl, f"{server.url}/{AUTH}/GetSession", "{}", cookie=cookie)
    assert still.status == 200, still
    assert still.json()["session"]["id"] == signed_in.json()["session"]["id"]


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code", "message"),
    [
        pytest.param(
            "application/json", "{}", 400, "invalid_argument", "google_id_token is required",
            id="no-token",
        ),
        pytest.param(
            "application/json", '{"googleIdToken": "a.b.c"}', 401, "unauthenticated",
            "not a well-formed JWT", id="malformed-token",
        ),
        pytest.param(
            "application/json", "not json", 400, "invalid_argument", "unmarshal", id="bad-json"
        ),
        pytest.param("text/plain", "{}", 415, None, None, id="text-plain"),
    ],
)  # fmt: skip
def test_bad_sign_in_requests_get_connect_errors(
    curl: str,
    server: RunningServer,
    content_type: str,
    body: str,
    status: int,
    code: str | None,
    message: str | None,
) -> None:
    response = post(curl, f"{server.url}/{AUTH}/SignIn", body, content_type=content_type)

    assert response.status == status, response
    assert response.headers_named("set-cookie") == []
    if code is None:
        assert response.body == ""
    else:
        assert message is not None
        assert response.json()["code"] == code
        assert message in response.json()["message"]
