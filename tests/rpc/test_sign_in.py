"""SignIn, GetSession and SignOut through the generated Python client on a real socket."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from connectrpc.errors import ConnectError

from gen.expense.auth.v1.auth_pb import GetSessionRequest, SignInRequest, SignOutRequest
from gen.expense.user.v1.user_pb import GetCurrentUserRequest
from tests.conftest import server_env
from tests.support.client import Session, code_of
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer, start_server


def new_sub() -> str:
    return str(10**20 + secrets.randbelow(10**20))


@pytest.fixture
def client(server: RunningServer) -> Iterator[Session]:
    session = Session(server.url)
    yield session
    session.close()


def test_sign_in_creates_user_session_and_http_only_cookie(
    client: Session, google: FakeGoogle
) -> None:
    sub = new_sub()
    response = client.sign_in(google.token(sub=sub, email=f"{sub}@example.com", name="Zoë"))

    assert response.user is not None and response.session is not None
    assert response.user.email == f"{sub}@example.com"
    assert response.user.display_name == "Zoë"
    assert response.user.locale == "en-GB"
    assert response.user.id.startswith("usr_")
    assert response.session.current
    (set_cookie,) = client.last_set_cookies
    attributes = {part.strip().split("=")[0] for part in set_cookie.split(";")[1:]}
    assert attributes == {"Path", "Max-Age", "HttpOnly", "SameSite"}
    assert "SameSite=Lax" in set_cookie and "Max-Age=43200" in set_cookie

    got = client.call(client.auth.get_session, GetSessionRequest())
    assert got.user == response.user
    assert got.session is not None and got.session.id == response.session.id
    me = client.call(client.users.get_current_user, GetCurrentUserRequest())
    assert me.user is not None and me.user.id == response.user.id


def test_users_are_keyed_by_subject_not_email(client: Session, google: FakeGoogle) -> None:
    sub = new_sub()
    first = client.sign_in(google.token(sub=sub, email="old@example.com"))
    renamed = client.sign_in(google.token(sub=sub, email="new@example.com"))
    other = client.sign_in(google.token(sub=new_sub(), email="new@example.com"))

    assert first.user is not None and renamed.user is not None and other.user is not None
    assert renamed.user.id == first.user.id
    assert renamed.user.email == "new@example.com"
    assert other.user.id != first.user.id


def test_sign_in_never_reuses_the_callers_session(client: Session, google: FakeGoogle) -> None:
    sub = new_sub()
    first = client.sign_in(google.token(sub=sub))
    first_cookie = client.cookie
    second = client.sign_in(google.token(sub=sub))

    assert first.session is not None and second.session is not None
    assert second.session.id != first.session.id
    assert client.cookie != first_cookie


def test_calls_without_a_session_are_unauthenticated(client: Session) -> None:
    with pytest.raises(ConnectError) as err:
        client.call(client.auth.get_session, GetSessionRequest())
    assert code_of(err.value) == "unauthenticated"
    assert "sign in" in err.value.message


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda v: v[:-5] + ("A" if v[-5] != "A" else "B") + v[-4:], id="signature"),
        pytest.param(lambda v: "x" + v, id="secret"),
        pytest.param(lambda v: v.split(".")[0], id="unsigned"),
        pytest.param(lambda v: "", id="empty"),
        pytest.param(lambda v: v + "." * 300, id="oversized"),
    ],
)
def test_tampered_cookies_are_refused_and_cleared(
    client: Session, google: FakeGoogle, mangle: object
) -> None:
    client.sign_in(google.token(sub=new_sub()))
    assert client.cookie is not None
    name, _, value = client.cookie.partition("=")
    assert callable(mangle)
    client.cookie = f"{name}={mangle(value)}"

    with pytest.raises(ConnectError) as err:
        client.call(client.auth.get_session, GetSessionRequest())
    assert code_of(err.value) == "unauthenticated"
    assert any("Max-Age=0" in c for c in client.last_set_cookies)


def test_sign_out_revokes_on_the_very_next_request(client: Session, google: FakeGoogle) -> None:
    client.sign_in(google.token(sub=new_sub()))
    cookie = client.cookie
    client.call(client.auth.sign_out, SignOutRequest())
    assert any("Max-Age=0" in c for c in client.last_set_cookies)

    client.cookie = cookie  # a client that ignores the expired cookie
    with pytest.raises(ConnectError) as err:
        client.call(client.auth.get_session, GetSessionRequest())
    assert code_of(err.value) == "unauthenticated"
    assert "signed out" in err.value.message


def test_logs_carry_no_cookie_or_token(
    client: Session, google: FakeGoogle, server: RunningServer
) -> None:
    token = google.token(sub=new_sub())
    client.sign_in(token)
    assert client.cookie is not None
    client.call(client.auth.get_session, GetSessionRequest())
    logs = server.logs()
    secret = client.cookie.partition("=")[2]
    assert "GetSession" in logs
    assert secret.split(".")[0] not in logs
    assert token.split(".")[1] not in logs
    assert "Traceback" not in logs


def test_sign_in_requires_a_token(client: Session) -> None:
    with pytest.raises(ConnectError) as err:
        client.call(client.auth.sign_in, SignInRequest(google_id_token=""))
    assert code_of(err.value) == "invalid_argument"
    assert "google_id_token" in err.value.message


BAD_TOKENS: dict[str, Callable[[FakeGoogle], str]] = {
    "wrong audience": lambda g: g.token(aud="someone-else.apps.googleusercontent.com"),
    "wrong issuer": lambda g: g.token(iss="https://evil.example.com"),
    "expired": lambda g: g.token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
    "issued in the future": lambda g: g.token(iat=int(time.time()) + 3600),
    "alg none": lambda g: g.unsigned_token(),
    "unknown key id": lambda g: g.token_with_header({"kid": "f" * 40}),
    "bad signature": lambda g: g.token().rsplit(".", 1)[0] + ".AAAA" + g.token()[-20:],
    "not a jwt": lambda g: "hello.world",
}


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
def test_bad_tokens_are_unauthenticated_never_internal(
    client: Session, google: FakeGoogle, kind: str
) -> None:
    with pytest.raises(ConnectError) as err:
        client.sign_in(BAD_TOKENS[kind](google))
    assert code_of(err.value) == "unauthenticated", err.value.message
    assert "token" in err.value.message.lower()
    assert client.cookie is None


def test_unverified_email_is_refused(client: Session, google: FakeGoogle) -> None:
    with pytest.raises(ConnectError) as err:
        client.sign_in(google.token(sub=new_sub(), email_verified=False))
    assert code_of(err.value) == "permission_denied"
    assert "not verified" in err.value.message


def test_google_down_is_unavailable_until_keys_are_cached(
    tmp_path: Path, google: FakeGoogle
) -> None:
    fresh = start_server(tmp_path, server_env(google))
    try:
        client = Session(fresh.url)
        with google.outage():
            with pytest.raises(ConnectError) as err:
                client.sign_in(google.token(sub=new_sub()))
            assert code_of(err.value) == "unavailable"
        # Once Google is back, sign-in works again as soon as the server's back-off
        # (a second) allows a fetch: until then, still `unavailable`.
        deadline = time.monotonic() + 10
        codes: list[str] = []
        while not codes or codes[-1] != "ok":
            assert time.monotonic() < deadline, f"sign-in did not recover: {codes[-5:]}"
            try:
                client.sign_in(google.token(sub=new_sub()))
                codes.append("ok")
            except ConnectError as exc:
                codes.append(code_of(exc))
                time.sleep(0.05)
        assert set(codes) <= {"unavailable", "ok"}, codes
        with google.outage():
            client.sign_in(google.token(sub=new_sub()))  # cached keys keep working
    finally:
        assert fresh.stop() == 0


def test_client_address_is_the_tcp_peer_not_a_forged_header(
    server: RunningServer, google: FakeGoogle
) -> None:
    client = Session(server.url)
    client.sign_in(google.token(sub=new_sub()))
    request_id = f"xff-{secrets.token_hex(6)}"
    client.call(
        client.auth.get_session,
        GetSessionRequest(),
        headers={**client.headers, "x-forwarded-for": "6.6.6.6", "x-request-id": request_id},
    )
    (line,) = [line for line in server.logs().splitlines() if request_id in line]
    assert "client=127.0.0.1 " in line
    assert "6.6.6.6" not in line
