"""One value, one spelling: re-encoding a token, nonce, cookie or page token buys nothing.

Base64 decoders accept padding, `+`/`/` for `-`/`_`, and set bits in the unused
low part of the last character, so one signed value has many spellings. An ID
token was accepted once per spelling; now every signed value is accepted only in
its canonical spelling, "accepted once" is keyed on the decoded signature, and a
sign-in nonce is spent by the sign-in that uses it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest
from connectrpc.errors import ConnectError

from gen.expense.auth.v1.auth_pb import (
    CreateSignInNonceRequest,
    GetSessionRequest,
    ListSessionsRequest,
)
from tests.conftest import server_env
from tests.support.client import Session, code_of
from tests.support.google import FakeGoogle
from tests.support.http import connect_post
from tests.support.server import RunningServer, start_server

SIGN_IN = "/expense.auth.v1.AuthService/SignIn"
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def padded(value: str) -> str:
    return value + "=="


def respelled(value: str) -> str:
    """The same bytes, with a spare low bit of the last character set.

    The values here end in a 32-byte HMAC (43 characters, 2 spare bits) or a
    256-byte RSA signature (342 characters, 2 spare bits): the lowest bit of the
    last character is always unused.
    """
    last = value[-1]
    return value[:-1] + ALPHABET[ALPHABET.index(last) ^ 0b01]


def standard_alphabet(value: str) -> str:
    """`-` and `_` as `+` and `/`: an ID token (~1,000 characters) always has some."""
    assert "-" in value or "_" in value
    return value.replace("-", "+").replace("_", "/")


# Spellings that exist for every signed value; an ID token has one more.
SPELLINGS: list[Callable[[str], str]] = [padded, respelled]
TOKEN_SPELLINGS = [*SPELLINGS, standard_alphabet]


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle) -> Iterator[RunningServer]:
    """Nonces required, as in production."""
    running = start_server(
        tmp_path_factory.mktemp("strict"), server_env(google, SIGNIN_NONCE_REQUIRED="true")
    )
    yield running
    assert running.stop() == 0, running.logs()


@pytest.mark.parametrize("spell", TOKEN_SPELLINGS, ids=lambda f: f.__name__)
def test_a_respelled_id_token_is_not_a_new_token(
    server: RunningServer, google: FakeGoogle, spell: Callable[[str], str]
) -> None:
    token = google.token(sub=secrets.token_hex(8))
    first = connect_post(server.url, SIGN_IN, {"googleIdToken": token})
    assert first.status == 200, first.body
    for attempt in (token, spell(token)):
        again = connect_post(server.url, SIGN_IN, {"googleIdToken": attempt})
        assert again.status == 401, again.body
        assert again.json()["code"] == "unauthenticated"


@pytest.mark.parametrize("spell", TOKEN_SPELLINGS, ids=lambda f: f.__name__)
def test_a_respelled_id_token_is_refused_even_unused(
    server: RunningServer, google: FakeGoogle, spell: Callable[[str], str]
) -> None:
    """The canonical form is required before anything else: no spelling gets a session."""
    token = google.token(sub=secrets.token_hex(8))
    response = connect_post(server.url, SIGN_IN, {"googleIdToken": spell(token)})
    assert response.status == 401, response.body
    assert "base64url without padding" in response.json()["message"]
    # The token itself is still good: the refusal did not spend it.
    assert connect_post(server.url, SIGN_IN, {"googleIdToken": token}).status == 200


def test_a_nonce_is_spent_by_the_sign_in_that_uses_it(
    strict: RunningServer, google: FakeGoogle
) -> None:
    """A copied nonce cookie (and a second token minted for its nonce) signs in once."""
    victim = Session(strict.url)
    nonce = victim.call(victim.auth.create_sign_in_nonce, CreateSignInNonceRequest()).nonce
    nonce_cookie = dict(victim.jar)
    sub = secrets.token_hex(8)
    victim.sign_in(google.token(sub=sub, nonce=nonce))

    replayer = Session(strict.url)
    replayer.jar = dict(nonce_cookie)
    with pytest.raises(ConnectError) as err:
        replayer.sign_in(google.token(sub=sub, nonce=nonce))
    assert code_of(err.value) == "unauthenticated"
    assert "nonce was already used" in err.value.message
    with pytest.raises(ConnectError):
        replayer.call(replayer.auth.get_session, GetSessionRequest())


def test_a_respelled_nonce_cookie_is_refused(strict: RunningServer, google: FakeGoogle) -> None:
    client = Session(strict.url)
    nonce = client.call(client.auth.create_sign_in_nonce, CreateSignInNonceRequest()).nonce
    (name,) = client.jar
    client.jar[name] = padded(client.jar[name])
    with pytest.raises(ConnectError) as err:
        client.sign_in(google.token(sub=secrets.token_hex(8), nonce=nonce))
    assert code_of(err.value) == "unauthenticated"
    assert "CreateSignInNonce" in err.value.message


@pytest.mark.parametrize("spell", SPELLINGS, ids=lambda f: f.__name__)
def test_a_respelled_session_cookie_is_not_a_session(
    server: RunningServer, google: FakeGoogle, spell: Callable[[str], str]
) -> None:
    client = Session(server.url)
    client.sign_in(google.token(sub=secrets.token_hex(8)))
    ((name, value),) = client.jar.items()
    client.call(client.auth.get_session, GetSessionRequest())  # the canonical cookie works
    client.jar[name] = spell(value)
    with pytest.raises(ConnectError) as err:
        client.call(client.auth.get_session, GetSessionRequest())
    assert code_of(err.value) == "unauthenticated"


@pytest.mark.parametrize("spell", SPELLINGS, ids=lambda f: f.__name__)
def test_a_respelled_page_token_is_invalid(
    server: RunningServer, google: FakeGoogle, spell: Callable[[str], str]
) -> None:
    sub = secrets.token_hex(8)
    for _ in range(2):
        Session(server.url).sign_in(google.token(sub=sub))
    me = Session(server.url)
    me.sign_in(google.token(sub=sub))
    page = me.call(me.auth.list_sessions, ListSessionsRequest(page_size=1))
    assert page.next_page_token
    me.call(
        me.auth.list_sessions, ListSessionsRequest(page_size=1, page_token=page.next_page_token)
    )
    with pytest.raises(ConnectError) as err:
        me.call(
            me.auth.list_sessions,
            ListSessionsRequest(page_size=1, page_token=spell(page.next_page_token)),
        )
    assert code_of(err.value) == "invalid_argument"
    assert "page_token is not valid" in err.value.message
