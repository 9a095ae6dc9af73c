"""What reaches the account from a token, and what the cookie parser tolerates.

- The `name` claim follows the display-name rules of UpdateCurrentUser (no bidi
  overrides or control characters); only https picture URLs are kept.
- Numeric claims are bounded (an `exp` of 10**30 was `internal`) and `nbf` is
  honoured.
- A Cookie header made large by the site's other cookies still carries the
  session (up to Envoy's header limit), and the session cookie is never expired
  because of cookies that are not ours.
"""

from __future__ import annotations

import secrets
import time

import pytest

from tests.support.client import Session
from tests.support.google import FakeGoogle
from tests.support.http import connect_post, request
from tests.support.server import RunningServer

SIGN_IN = "/expense.auth.v1.AuthService/SignIn"
GET_SESSION = "/expense.auth.v1.AuthService/GetSession"
GET_CURRENT_USER = "/expense.user.v1.UserService/GetCurrentUser"


def test_a_hostile_name_and_picture_are_not_stored(
    server: RunningServer, google: FakeGoogle
) -> None:
    token = google.token(
        sub=secrets.token_hex(8), name="abc\u202egnp.exe", picture="javascript:alert(1)"
    )
    signed_in = connect_post(server.url, SIGN_IN, {"googleIdToken": token})
    assert signed_in.status == 200, signed_in.body
    user = signed_in.json()["user"]
    assert user["displayName"] == "abcgnp.exe"
    assert "pictureUri" not in user or user["pictureUri"] == ""
    cookie = (signed_in.header("set-cookie") or "").split(";", 1)[0]
    again = connect_post(server.url, GET_CURRENT_USER, {}, headers={"cookie": cookie})
    assert again.json()["user"]["displayName"] == "abcgnp.exe"


@pytest.mark.parametrize(
    ("claims", "fragment"),
    [
        ({"exp": 10**30}, "exp claim is not a valid time"),
        ({"iat": 10**30}, "iat claim is not a valid time"),
        ({"exp": -1}, "exp claim is not a valid time"),
        ({"nbf": 10**18}, "nbf claim is not a valid time"),
        ({"nbf": "tomorrow"}, "nbf claim is not a valid time"),
    ],
)
def test_out_of_range_time_claims_are_unauthenticated_not_internal(
    server: RunningServer, google: FakeGoogle, claims: dict[str, object], fragment: str
) -> None:
    response = connect_post(
        server.url, SIGN_IN, {"googleIdToken": google.token(sub=secrets.token_hex(8), **claims)}
    )
    assert response.status == 401, response.body
    assert response.json()["code"] == "unauthenticated"
    assert fragment in response.json()["message"]
    assert request(server.url, "GET", "/healthz").status == 200


def test_a_token_not_valid_before_later_is_refused(
    server: RunningServer, google: FakeGoogle
) -> None:
    soon = int(time.time()) + 3600
    response = connect_post(
        server.url, SIGN_IN, {"googleIdToken": google.token(sub=secrets.token_hex(8), nbf=soon)}
    )
    assert response.status == 401, response.body
    assert "nbf is in the future" in response.json()["message"]


def test_a_large_cookie_header_still_carries_the_session(
    server: RunningServer, google: FakeGoogle
) -> None:
    client = Session(server.url)
    client.sign_in(google.token(sub=secrets.token_hex(8)))
    ours = client.cookie
    assert ours is not None
    # 12 KiB of the site's other cookies, ours last; Envoy accepts 16 KiB of headers.
    others = "; ".join(f"analytics_{n}={'x' * 100}" for n in range(120))
    response = connect_post(server.url, GET_SESSION, {}, headers={"cookie": f"{others}; {ours}"})
    assert response.status == 200, response.body
    assert response.all("set-cookie") == []


@pytest.mark.parametrize(
    "cookie", ["xexpense_session=1", "expense_session_old=1", "a=expense_session=1"]
)
def test_other_cookies_never_expire_the_session_cookie(server: RunningServer, cookie: str) -> None:
    response = connect_post(server.url, GET_SESSION, {}, headers={"cookie": cookie})
    assert response.status == 401
    assert response.json()["message"] == "sign in first: this call needs a session"
    assert response.all("set-cookie") == []
