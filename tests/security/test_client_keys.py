"""Who a rate limit counts: networks, not spellings; failures, not the people next to them.

- IPv6 clients are keyed by their /64: a host picks any address in it at will.
- The budget for calls without a session counts calls that end unauthenticated:
  a cookie header that merely contains the session cookie's name (or a forged
  or dead cookie) is no exemption; a live session is.
- Failed sign-ins are refused past a budget per network and per account, but a
  valid sign-in from the same network passes: a stranger cannot lock an office
  out by sending bad tokens from behind its NAT.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterator

import pytest
from connectrpc.errors import ConnectError

from gen.expense.auth.v1.auth_pb import GetSessionRequest, SignInRequest, SignOutRequest
from tests.conftest import server_env
from tests.support.client import Session
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.http import Response, connect_post
from tests.support.server import RunningServer, start_server

SIGN_IN = "/expense.auth.v1.AuthService/SignIn"
GET_SESSION = "/expense.auth.v1.AuthService/GetSession"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle) -> Iterator[RunningServer]:
    """Small limits; loopback is a trusted proxy so each test can be its own client."""
    running = start_server(
        tmp_path_factory.mktemp("keyed"),
        server_env(
            google,
            TRUSTED_PROXIES="127.0.0.1/32",
            RATE_LIMIT_SIGNIN_PER_IP="10/minute",
            RATE_LIMIT_UNAUTHENTICATED_PER_IP="5/minute",
            RATE_LIMIT_FAILED_SIGNIN_PER_IP="3/minute",
            RATE_LIMIT_FAILED_SIGNIN_PER_SUBJECT="2/minute",
        ),
        # Stopped at the start of every window: counts are exact, whatever the real time.
        clock=FileClock(tmp_path_factory.mktemp("keyed-clock") / "now").freeze(),
    )
    yield running
    assert running.stop() == 0, running.logs()


def v4() -> str:
    return f"198.51.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


def v6_network() -> str:
    """A fresh /64 of the documentation range, as its first four groups and a `:`."""
    return f"2001:db8:{secrets.randbelow(0xFFFF):x}:{secrets.randbelow(0xFFFF):x}:"


def sign_in(server: RunningServer, token: str, ip: str) -> Response:
    ipaddress.ip_address(ip)  # a bad hop would silently fall back to the proxy's address
    return connect_post(
        server.url, SIGN_IN, {"googleIdToken": token}, headers={"x-forwarded-for": ip}
    )


def signed_in(server: RunningServer, google: FakeGoogle) -> Session:
    """A browser signed in from an address of its own (not loopback's budget)."""
    client = Session(server.url)
    client.call(
        client.auth.sign_in,
        SignInRequest(google_id_token=google.token(sub=secrets.token_hex(8))),
        headers={**client.headers, "x-forwarded-for": v4()},
    )
    return client


def call(server: RunningServer, ip: str, cookie: str | None = None) -> Response:
    ipaddress.ip_address(ip)
    headers = {"x-forwarded-for": ip}
    if cookie is not None:
        headers["cookie"] = cookie
    return connect_post(server.url, GET_SESSION, {}, headers=headers)


def test_an_ipv6_client_is_its_64(keyed: RunningServer, google: FakeGoogle) -> None:
    network = v6_network()
    addresses = [f"{network}{secrets.randbelow(0xFFFF):x}:{n:x}:1:2" for n in range(7)]
    assert [call(keyed, a).status for a in addresses] == [401] * 5 + [429] * 2
    # The next /64 over is another client.
    assert call(keyed, v6_network() + ":1").status == 401
    # Sign-in attempts too (10 a minute per network here).
    network = v6_network()
    statuses = [
        sign_in(keyed, google.token(sub=secrets.token_hex(8)), f"{network}:{n:x}").status
        for n in range(1, 12)
    ]
    assert statuses == [200] * 10 + [429]


def test_an_ipv4_mapped_address_is_the_ipv4_client(keyed: RunningServer) -> None:
    ip = v4()
    spellings = [ip, f"::ffff:{ip}"] * 3
    assert [call(keyed, a).status for a in spellings] == [401] * 5 + [429]


@pytest.mark.parametrize(
    "cookie",
    [
        "xexpense_session=1",
        "other=expense_session=1",
        "expense_session=forged.AAAA",
        None,
    ],
)
def test_only_a_live_session_is_exempt_from_the_budget_without_one(
    keyed: RunningServer, cookie: str | None
) -> None:
    ip = v4()
    statuses = [call(keyed, ip, cookie).status for _ in range(6)]
    assert statuses == [401] * 5 + [429], statuses
    assert "too many calls without a valid session" in call(keyed, ip, cookie).json()["message"]


def test_a_dead_session_counts_and_a_live_one_does_not(
    keyed: RunningServer, google: FakeGoogle
) -> None:
    ip = v4()
    alive, dead = signed_in(keyed, google), signed_in(keyed, google)
    dead_cookie = dead.cookie
    dead.call(dead.auth.sign_out, SignOutRequest())
    assert [call(keyed, ip, dead_cookie).status for _ in range(6)] == [401] * 5 + [429]
    # Someone signed in behind the same address is not refused.
    headers = {**alive.headers, "x-forwarded-for": ip}
    for _ in range(10):
        alive.call(alive.auth.get_session, GetSessionRequest(), headers=headers)


def test_failed_sign_ins_are_refused_past_the_budget_but_a_valid_one_passes(
    keyed: RunningServer, google: FakeGoogle
) -> None:
    office = v4()
    bad = [sign_in(keyed, google.token(aud="someone-else"), office) for _ in range(5)]
    assert [r.status for r in bad] == [401] * 3 + [429] * 2
    assert "too many failed sign-ins from your network" in bad[-1].json()["message"]
    assert 1 <= int(bad[-1].header("retry-after") or "0") <= 60
    # A colleague behind the same NAT signs in.
    colleague = sign_in(keyed, google.token(sub=secrets.token_hex(8)), office)
    assert colleague.status == 200, colleague.body


def test_failed_sign_ins_for_one_account_are_limited_per_account(
    keyed: RunningServer, google: FakeGoogle
) -> None:
    """A stolen, spent token replayed from many addresses: refused per account, and
    the owner still signs in with a fresh token."""
    sub = secrets.token_hex(8)
    stolen = google.token(sub=sub)
    assert sign_in(keyed, stolen, v4()).status == 200
    replays = [sign_in(keyed, stolen, v4()) for _ in range(4)]
    assert [r.status for r in replays] == [401] * 2 + [429] * 2
    assert "too many failed sign-ins for this account" in replays[-1].json()["message"]
    assert sign_in(keyed, google.token(sub=sub), v4()).status == 200


def test_signed_in_calls_never_touch_the_budget(keyed: RunningServer, google: FakeGoogle) -> None:
    ip = v4()
    client = signed_in(keyed, google)
    headers = {**client.headers, "x-forwarded-for": ip}
    for _ in range(20):
        client.call(client.auth.get_session, GetSessionRequest(), headers=headers)
    with pytest.raises(ConnectError):
        client.call(client.auth.get_session, GetSessionRequest(), headers={"x-forwarded-for": ip})
    assert call(keyed, ip).status == 401  # the budget was untouched: 1 of 5 used
