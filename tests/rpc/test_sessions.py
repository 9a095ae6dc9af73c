"""ListSessions, RevokeSession and RevokeOtherSessions on the real server."""

from __future__ import annotations

import secrets

import pytest
from connectrpc.errors import ConnectError

from gen.expense.auth.v1.auth_pb import (
    GetSessionRequest,
    ListSessionsRequest,
    RevokeOtherSessionsRequest,
    RevokeSessionRequest,
)
from tests.support.client import Session, code_of
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer

BROWSERS = [
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36",
        "Chrome on macOS",
    ),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0", "Firefox on Linux"),
    ("grpc-python/1.85.1 grpc-c/50.0.0 (linux; chttp2)", "grpc-python on Linux"),
    ("curl/8.5.0", "curl"),
    ("", "unknown client"),
]


def devices(server: RunningServer, google: FakeGoogle, count: int) -> list[Session]:
    """`count` clients of one user, signed in in order (oldest first)."""
    sub = secrets.token_hex(8)
    clients = []
    for i in range(count):
        client = Session(server.url, user_agent=BROWSERS[i % len(BROWSERS)][0])
        client.sign_in(google.token(sub=sub))
        clients.append(client)
    return clients


def test_list_sessions_pages_newest_first(server: RunningServer, google: FakeGoogle) -> None:
    clients = devices(server, google, 7)
    me = clients[-1]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = me.call(me.auth.list_sessions, ListSessionsRequest(page_size=3, page_token=token))
        seen += [s.id for s in page.sessions]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 7
    full = me.call(me.auth.list_sessions, ListSessionsRequest())
    assert [s.id for s in full.sessions] == seen
    assert [s.current for s in full.sessions] == [True] + [False] * 6
    created = [s.create_time.to_datetime() for s in full.sessions if s.create_time]
    assert created == sorted(created, reverse=True)


def test_sessions_describe_their_client(server: RunningServer, google: FakeGoogle) -> None:
    clients = devices(server, google, len(BROWSERS))
    listed = clients[0].call(clients[0].auth.list_sessions, ListSessionsRequest())
    summaries = [s.user_agent for s in reversed(listed.sessions)]
    assert summaries == [summary for _, summary in BROWSERS]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ListSessionsRequest(page_size=101), "page_size must be between 0 and 100, got 101"),
        (ListSessionsRequest(page_size=-1), "page_size must be between 0 and 100, got -1"),
        (ListSessionsRequest(page_token="not-a-token"), "page_token is not valid"),
        (ListSessionsRequest(page_token="x" * 5000), "page_token is not valid"),
    ],
)
def test_list_sessions_rejects_bad_paging(
    server: RunningServer, google: FakeGoogle, request_: ListSessionsRequest, field: str
) -> None:
    (me,) = devices(server, google, 1)
    with pytest.raises(ConnectError) as err:
        me.call(me.auth.list_sessions, request_)
    assert code_of(err.value) == "invalid_argument"
    assert field in err.value.message


def test_page_tokens_belong_to_their_user(server: RunningServer, google: FakeGoogle) -> None:
    alice = devices(server, google, 3)[-1]
    (bob,) = devices(server, google, 1)
    page = alice.call(alice.auth.list_sessions, ListSessionsRequest(page_size=1))
    with pytest.raises(ConnectError) as err:
        bob.call(bob.auth.list_sessions, ListSessionsRequest(page_token=page.next_page_token))
    assert code_of(err.value) == "invalid_argument"


def test_revoke_session_ends_it_at_once(server: RunningServer, google: FakeGoogle) -> None:
    laptop, phone = devices(server, google, 2)
    phone_id = phone.call(phone.auth.get_session, GetSessionRequest()).session
    assert phone_id is not None
    laptop.call(laptop.auth.revoke_session, RevokeSessionRequest(session_id=phone_id.id))
    with pytest.raises(ConnectError) as err:
        phone.call(phone.auth.get_session, GetSessionRequest())
    assert code_of(err.value) == "unauthenticated"
    laptop.call(laptop.auth.get_session, GetSessionRequest())


def test_another_users_session_looks_missing(server: RunningServer, google: FakeGoogle) -> None:
    (alice,) = devices(server, google, 1)
    (bob,) = devices(server, google, 1)
    bob_session = bob.call(bob.auth.get_session, GetSessionRequest()).session
    assert bob_session is not None
    errors = []
    for target in (bob_session.id, "ses_doesnotexist"):
        with pytest.raises(ConnectError) as err:
            alice.call(alice.auth.revoke_session, RevokeSessionRequest(session_id=target))
        errors.append(err.value)
    assert [code_of(e) for e in errors] == ["not_found", "not_found"]
    assert errors[0].message.replace(bob_session.id, "X") == errors[1].message.replace(
        "ses_doesnotexist", "X"
    )
    bob.call(bob.auth.get_session, GetSessionRequest())  # untouched


def test_revoke_other_sessions_keeps_only_the_current(
    server: RunningServer, google: FakeGoogle
) -> None:
    clients = devices(server, google, 4)
    me = clients[0]
    response = me.call(me.auth.revoke_other_sessions, RevokeOtherSessionsRequest())
    assert response.revoked_count == 3
    for other in clients[1:]:
        with pytest.raises(ConnectError) as err:
            other.call(other.auth.get_session, GetSessionRequest())
        assert code_of(err.value) == "unauthenticated"
    listed = me.call(me.auth.list_sessions, ListSessionsRequest())
    assert [s.current for s in listed.sessions] == [True]
