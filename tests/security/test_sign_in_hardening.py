"""Sign-in hardening: nonces bound to a pre-sign-in cookie, and one use per ID token."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from connectrpc.errors import ConnectError

from gen.expense.auth.v1.auth_pb import CreateSignInNonceRequest, GetSessionRequest
from server.rpc.nonces import NONCE_TTL_S
from tests.conftest import server_env
from tests.support.client import Session, code_of
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.http import connect_post
from tests.support.server import RunningServer, start_server

NONCE_COOKIE = "expense_signin_nonce"


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle) -> Iterator[RunningServer]:
    """Nonces required, as in production."""
    running = start_server(
        tmp_path_factory.mktemp("strict"), server_env(google, SIGNIN_NONCE_REQUIRED="true")
    )
    yield running
    assert running.stop() == 0, running.logs()


def refused(client: Session, token: str) -> ConnectError:
    with pytest.raises(ConnectError) as err:
        client.sign_in(token)
    return err.value


def test_sign_in_without_a_nonce_is_refused(strict: RunningServer, google: FakeGoogle) -> None:
    error = refused(Session(strict.url), google.token(sub=secrets.token_hex(8)))
    assert code_of(error) == "unauthenticated"
    assert "CreateSignInNonce" in error.message


def test_nonce_flow(strict: RunningServer, google: FakeGoogle) -> None:
    browser = Session(strict.url)
    issued = browser.call(browser.auth.create_sign_in_nonce, CreateSignInNonceRequest())
    (set_cookie,) = browser.last_set_cookies
    assert set_cookie.startswith(f"{NONCE_COOKIE}=")
    assert "HttpOnly" in set_cookie and "Max-Age=600" in set_cookie
    assert len(issued.nonce) >= 32

    browser.sign_in(google.token(sub=secrets.token_hex(8), nonce=issued.nonce))
    assert NONCE_COOKIE not in browser.jar  # spent
    browser.call(browser.auth.get_session, GetSessionRequest())


def test_a_token_for_another_nonce_is_refused(strict: RunningServer, google: FakeGoogle) -> None:
    """Login CSRF: the attacker's token carries the attacker's nonce, not the victim's."""
    attacker, victim = Session(strict.url), Session(strict.url)
    attacker_nonce = attacker.call(
        attacker.auth.create_sign_in_nonce, CreateSignInNonceRequest()
    ).nonce
    victim.call(victim.auth.create_sign_in_nonce, CreateSignInNonceRequest())
    error = refused(victim, google.token(sub="attacker", nonce=attacker_nonce))
    assert code_of(error) == "unauthenticated"
    assert "nonce does not match" in error.message


def test_the_nonce_cookie_is_signed_and_tamper_evident(
    strict: RunningServer, google: FakeGoogle
) -> None:
    """The cookie carries the nonce in the clear and a signature over it: another nonce
    under the same signature is refused, even with a token minted for that nonce."""
    client = Session(strict.url)
    issued = client.call(client.auth.create_sign_in_nonce, CreateSignInNonceRequest())
    value = client.jar[NONCE_COOKIE]
    nonce, timestamp, signature = value.split(".")
    assert nonce == issued.nonce
    chosen = "x" + nonce[1:]
    client.jar[NONCE_COOKIE] = f"{chosen}.{timestamp}.{signature}"
    error = refused(client, google.token(sub=secrets.token_hex(8), nonce=chosen))
    assert code_of(error) == "unauthenticated"
    assert "CreateSignInNonce" in error.message


def test_the_nonce_cookie_expires_after_ten_minutes(tmp_path: Path, google: FakeGoogle) -> None:
    clock = FileClock(tmp_path / "now").freeze()
    server = start_server(tmp_path, server_env(google, SIGNIN_NONCE_REQUIRED="true"), clock=clock)
    try:
        late, on_time = Session(server.url), Session(server.url)
        late_nonce = late.call(late.auth.create_sign_in_nonce, CreateSignInNonceRequest()).nonce
        clock.advance(NONCE_TTL_S - 1)
        on_time_nonce = on_time.call(
            on_time.auth.create_sign_in_nonce, CreateSignInNonceRequest()
        ).nonce
        clock.advance(2)  # the first nonce is now 601 s old, the second 2 s
        error = refused(late, google.token(sub=secrets.token_hex(8), nonce=late_nonce))
        assert code_of(error) == "unauthenticated"
        assert "missing or expired" in error.message
        on_time.sign_in(google.token(sub=secrets.token_hex(8), nonce=on_time_nonce))
    finally:
        assert server.stop() == 0, server.logs()


def test_a_forged_nonce_cookie_is_refused(strict: RunningServer, google: FakeGoogle) -> None:
    client = Session(strict.url)
    client.jar[NONCE_COOKIE] = "chosen-by-attacker.AAAA.BBBB"
    error = refused(client, google.token(sub=secrets.token_hex(8), nonce="chosen-by-attacker"))
    assert code_of(error) == "unauthenticated"


def test_an_id_token_is_accepted_once(server: RunningServer, google: FakeGoogle) -> None:
    token = google.token(sub=secrets.token_hex(8))
    Session(server.url).sign_in(token)
    error = refused(Session(server.url), token)
    assert code_of(error) == "unauthenticated"
    assert "already used" in error.message


def test_parallel_replays_of_one_token_sign_in_once(
    server: RunningServer, google: FakeGoogle
) -> None:
    token = google.token(sub=secrets.token_hex(8))
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(
            pool.map(
                lambda _: connect_post(
                    server.url, "/expense.auth.v1.AuthService/SignIn", {"googleIdToken": token}
                ),
                range(20),
            )
        )
    assert sorted(r.status for r in responses) == [200] + [401] * 19


def test_an_oversized_token_is_invalid_argument(server: RunningServer) -> None:
    error = refused(Session(server.url), "a" * 5000 + ".b.c")
    assert code_of(error) == "invalid_argument"
    assert "at most 4096" in error.message
