"""DeleteCurrentUser, ExportCurrentUserData and ListSecurityEvents on the real server."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from connectrpc.errors import ConnectError

from gen.expense.auth.v1.auth_pb import (
    GetSessionRequest,
    RevokeSessionRequest,
    SignOutRequest,
)
from gen.expense.user.v1.user_pb import (
    DeleteCurrentUserRequest,
    ExportCurrentUserDataRequest,
    GetCurrentUserRequest,
    ListSecurityEventsRequest,
    SecurityEvent,
)
from server.domain.models import subject_hash
from tests.conftest import server_env
from tests.support.client import Session, code_of
from tests.support.clock import FileClock
from tests.support.database import everything, rows
from tests.support.google import ISSUER, FakeGoogle
from tests.support.http import Response, connect_post
from tests.support.server import RunningServer, start_server

EXPORT = "/expense.user.v1.UserService/ExportCurrentUserData"
LIST_EVENTS = "/expense.user.v1.UserService/ListSecurityEvents"
LOCAL_IP = "127.0.0.1"

CHROME = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
CURL = "curl/8.5.0"
# (User-Agent header, the summary the server stores), one per device.
DEVICES = [(CHROME, "Chrome on macOS"), (FIREFOX, "Firefox on Linux"), (CURL, "curl")]

Kind = SecurityEvent.Kind


@dataclass
class Account:
    """One Google account signed in on several devices (oldest first)."""

    sub: str
    email: str
    user_id: str
    devices: list[Session]
    session_ids: list[str]
    tokens: list[str]

    def token(self, google: FakeGoogle, **overrides: Any) -> str:
        """A fresh ID token for this account."""
        return google.token(sub=self.sub, email=self.email, **overrides)


def sign_in_account(server: RunningServer, google: FakeGoogle, count: int) -> Account:
    """A new account with a unique subject and email, signed in on `count` devices."""
    sub = secrets.token_hex(8)
    email = f"{sub}@example.com"
    devices, session_ids, tokens = [], [], []
    user_id = ""
    for i in range(count):
        device = Session(server.url, user_agent=DEVICES[i % len(DEVICES)][0])
        token = google.token(sub=sub, email=email)
        response = device.sign_in(token)
        assert response.user is not None and response.session is not None
        user_id = response.user.id
        devices.append(device)
        session_ids.append(response.session.id)
        tokens.append(token)
    return Account(sub, email, user_id, devices, session_ids, tokens)


def raw_call(server: RunningServer, procedure: str, device: Session, **message: Any) -> Response:
    """A Connect JSON call as a browser makes it, with the device's cookie."""
    return connect_post(server.url, procedure, message, headers={"cookie": device.cookie or ""})


def list_events(device: Session, **fields: Any) -> list[SecurityEvent]:
    """One page of the device's security events, through the generated client."""
    page = device.call(device.users.list_security_events, ListSecurityEventsRequest(**fields))
    return list(page.security_events)


# --- DeleteCurrentUser --------------------------------------------------------------------


REFUSED_DELETIONS: list[tuple[str, Callable[[Account, FakeGoogle], str], str, str]] = [
    (
        "another account",
        lambda me, google: google.token(sub=secrets.token_hex(8)),
        "permission_denied",
        "another Google account",
    ),
    (
        "issued 10 minutes ago",
        lambda me, google: me.token(google, iat=int(time.time()) - 600),
        "permission_denied",
        "old",
    ),
    ("empty", lambda me, google: "", "invalid_argument", "google_id_token is required"),
    ("already used", lambda me, google: me.tokens[0], "unauthenticated", "already used"),
]


@pytest.mark.parametrize(
    ("token_for", "code", "message"),
    [case[1:] for case in REFUSED_DELETIONS],
    ids=[case[0] for case in REFUSED_DELETIONS],
)
def test_delete_needs_a_fresh_reauthentication_of_the_same_account(
    server: RunningServer,
    google: FakeGoogle,
    token_for: Callable[[Account, FakeGoogle], str],
    code: str,
    message: str,
) -> None:
    me = sign_in_account(server, google, 1)
    (device,) = me.devices
    with pytest.raises(ConnectError) as err:
        device.call(
            device.users.delete_current_user,
            DeleteCurrentUserRequest(google_id_token=token_for(me, google)),
        )
    assert code_of(err.value) == code
    assert message in err.value.message
    user = device.call(device.users.get_current_user, GetCurrentUserRequest()).user
    assert user is not None and user.id == me.user_id  # nothing was deleted


def test_delete_ends_every_session_and_leaves_only_a_tombstone(
    server: RunningServer, google: FakeGoogle
) -> None:
    me = sign_in_account(server, google, 3)
    me.devices[0].call(me.devices[0].users.export_current_user_data, ExportCurrentUserDataRequest())
    cookies = [device.cookie for device in me.devices]
    assert all(cookies)
    (cookie_name,) = me.devices[0].jar

    deleter = me.devices[1]
    deleter.call(
        deleter.users.delete_current_user,
        DeleteCurrentUserRequest(google_id_token=me.token(google)),
    )
    assert any(
        c.startswith(f"{cookie_name}=;") and "Max-Age=0" in c for c in deleter.last_set_cookies
    ), deleter.last_set_cookies
    assert "clear-site-data" in deleter.last_headers
    assert '"storage"' in deleter.last_headers["clear-site-data"]

    # Each old cookie is refused on its very next request, whatever it calls.
    probe = Session(server.url)
    next_calls: list[tuple[Callable[..., object], object]] = [
        (probe.auth.get_session, GetSessionRequest()),
        (probe.users.get_current_user, GetCurrentUserRequest()),
        (probe.users.export_current_user_data, ExportCurrentUserDataRequest()),
    ]
    for cookie, (fn, request) in zip(cookies, next_calls, strict=True):
        with pytest.raises(ConnectError) as err:
            probe.call(fn, request, headers={"cookie": cookie or ""})
        assert code_of(err.value) == "unauthenticated", cookie

    hashed = subject_hash(ISSUER, me.sub)
    for query in (
        "SELECT count(*) FROM users WHERE id = ?",
        "SELECT count(*) FROM sessions WHERE user_id = ?",
        "SELECT count(*) FROM audit_events WHERE user_id = ?",
    ):
        assert rows(server, query, me.user_id) == [(0,)], query
    tombstones = rows(
        server,
        "SELECT kind, user_id, reason, session_id, ip, user_agent FROM audit_events "
        "WHERE subject_hash = ?",
        hashed,
    )
    assert tombstones == [("account_deleted", None, "", "", "", "")]
    assert rows(server, "SELECT count(*) FROM deleted_accounts WHERE subject_hash = ?", hashed) == [
        (1,)
    ]
    dump = everything(server)
    for trace in (me.email, me.sub, me.user_id, *me.session_ids):
        assert trace not in dump, f"{trace!r} is still in the database"

    again = Session(server.url)
    response = again.sign_in(me.token(google))
    assert response.user is not None and response.session is not None
    assert response.user.id != me.user_id
    exported = again.call(again.users.export_current_user_data, ExportCurrentUserDataRequest())
    assert [s.id for s in exported.sessions] == [response.session.id]
    assert [e.kind for e in exported.security_events] == [Kind.DATA_EXPORTED, Kind.SIGN_IN]


# --- ExportCurrentUserData ----------------------------------------------------------------


def test_export_holds_exactly_the_callers_data(server: RunningServer, google: FakeGoogle) -> None:
    alice = sign_in_account(server, google, 3)
    bob = sign_in_account(server, google, 3)
    for account in (alice, bob):
        first = account.devices[0]
        first.call(
            first.auth.revoke_session, RevokeSessionRequest(session_id=account.session_ids[2])
        )
    bob.devices[1].call(
        bob.devices[1].users.export_current_user_data, ExportCurrentUserDataRequest()
    )

    response = raw_call(server, EXPORT, alice.devices[0])
    assert response.status == 200, response.body
    text = response.body.decode()
    document = json.loads(text)

    assert set(document) == {"exportTime", "user", "linkedAccount", "sessions", "securityEvents"}
    assert datetime.fromisoformat(document["exportTime"]).tzinfo is not None
    user = document["user"]
    assert (user["id"], user["email"], user["emailVerified"]) == (alice.user_id, alice.email, True)
    assert {"displayName", "currencyCode", "timeZone", "locale", "createTime"} <= set(user)
    assert document["linkedAccount"] == {"issuer": ISSUER, "subject": alice.sub}

    sessions = document["sessions"]
    assert [s["id"] for s in sessions] == alice.session_ids[::-1]  # newest first
    revoked = {s["id"] for s in sessions if "revokeTime" in s}
    assert revoked == {alice.session_ids[2]}
    assert [s["userAgent"] for s in sessions] == [summary for _, summary in DEVICES][::-1]
    for s in sessions:
        assert {"createTime", "lastSeenTime", "maxExpireTime"} <= set(s)

    a0, a1, a2 = alice.session_ids
    events = [
        (e["kind"], e.get("sessionId", ""), e.get("reason", ""), e.get("ipAddress"))
        for e in document["securityEvents"]
    ]
    assert events == [
        ("KIND_DATA_EXPORTED", a0, "", LOCAL_IP),
        ("KIND_SESSION_REVOKED", a2, f"by:{a0}", LOCAL_IP),
        ("KIND_SIGN_IN", a2, "", LOCAL_IP),
        ("KIND_SIGN_IN", a1, "", LOCAL_IP),
        ("KIND_SIGN_IN", a0, "", LOCAL_IP),
    ]

    for trace in (bob.user_id, bob.email, bob.sub, *bob.session_ids):
        assert trace not in text, f"Bob's {trace!r} is in Alice's export"


@pytest.fixture(scope="module")
def export_limited(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle
) -> Iterator[RunningServer]:
    """A server that allows two exports per user and hour."""
    tmp = tmp_path_factory.mktemp("export-limited")
    running = start_server(
        tmp,
        server_env(google, RATE_LIMIT_EXPORT_PER_USER="2/hour"),
        # Stopped at the start of the hour's window: the count cannot straddle its edge.
        clock=FileClock(tmp / "now").freeze(),
    )
    yield running
    assert running.stop() == 0, running.logs()


def test_export_is_rate_limited_per_user(export_limited: RunningServer, google: FakeGoogle) -> None:
    me = sign_in_account(export_limited, google, 2)
    statuses = [raw_call(export_limited, EXPORT, device).status for device in me.devices]
    assert statuses == [200, 200]  # two sessions, one user: the budget is the user's

    refused = raw_call(export_limited, EXPORT, me.devices[0])
    assert refused.status == 429, refused.body
    assert refused.json()["code"] == "resource_exhausted"
    assert "too many data exports" in refused.json()["message"]
    retry_after = refused.header("retry-after")
    assert retry_after is not None and 0 < int(retry_after) <= 3600

    other = sign_in_account(export_limited, google, 1)
    assert raw_call(export_limited, EXPORT, other.devices[0]).status == 200


def test_refused_export_is_in_the_security_history(
    export_limited: RunningServer, google: FakeGoogle
) -> None:
    me = sign_in_account(export_limited, google, 1)
    (device,) = me.devices
    for _ in range(2):
        device.call(device.users.export_current_user_data, ExportCurrentUserDataRequest())
    with pytest.raises(ConnectError) as err:
        device.call(device.users.export_current_user_data, ExportCurrentUserDataRequest())
    assert code_of(err.value) == "resource_exhausted"
    kinds = [e.kind for e in list_events(device)]
    assert kinds == [Kind.RATE_LIMITED, Kind.DATA_EXPORTED, Kind.DATA_EXPORTED, Kind.SIGN_IN]


# --- ListSecurityEvents -------------------------------------------------------------------


def test_security_history_newest_first(server: RunningServer, google: FakeGoogle) -> None:
    me = sign_in_account(server, google, 3)
    laptop, desktop, _ = me.devices
    s1, s2, s3 = me.session_ids
    cookie_values = [value for device in me.devices for value in device.jar.values()]

    # A replayed token for this account: refused, and recorded in its history.
    stranger = Session(server.url, user_agent=CURL)
    with pytest.raises(ConnectError) as err:
        stranger.sign_in(me.tokens[0])
    assert code_of(err.value) == "unauthenticated"
    desktop.call(desktop.auth.sign_out, SignOutRequest())
    laptop.call(laptop.auth.revoke_session, RevokeSessionRequest(session_id=s3))

    events = list_events(laptop)
    assert [(e.kind, e.session_id, e.reason, e.user_agent) for e in events] == [
        (Kind.SESSION_REVOKED, s3, f"by:{s1}", "Chrome on macOS"),
        (Kind.SIGN_OUT, s2, "", "Firefox on Linux"),
        (Kind.SIGN_IN_FAILED, "", "replayed", "curl"),
        (Kind.SIGN_IN, s3, "", "curl"),
        (Kind.SIGN_IN, s2, "", "Firefox on Linux"),
        (Kind.SIGN_IN, s1, "", "Chrome on macOS"),
    ]
    assert {e.ip_address for e in events} == {LOCAL_IP}
    times = [e.time.to_datetime() for e in events if e.time is not None]
    assert len(times) == len(events) and times == sorted(times, reverse=True)

    # Nothing secret in what the user sees, nor in what the server stored.
    raw = raw_call(server, LIST_EVENTS, laptop)
    assert raw.status == 200, raw.body
    stored = repr(rows(server, "SELECT * FROM audit_events WHERE user_id = ?", me.user_id))
    for secret in [*cookie_values, *me.tokens]:
        for part in {secret, *secret.split(".")}:
            if len(part) >= 16:
                assert part not in raw.body.decode()
                assert part not in stored


def test_refused_sign_in_with_unverified_email_is_in_the_history(
    server: RunningServer, google: FakeGoogle
) -> None:
    me = sign_in_account(server, google, 1)
    (device,) = me.devices
    other = Session(server.url, user_agent=FIREFOX)
    with pytest.raises(ConnectError) as err:
        other.sign_in(me.token(google, email_verified=False))
    assert code_of(err.value) == "permission_denied"
    newest = list_events(device)[0]
    assert (newest.kind, newest.reason, newest.user_agent, newest.ip_address) == (
        Kind.SIGN_IN_FAILED,
        "email_not_verified",
        "Firefox on Linux",
        LOCAL_IP,
    )


def test_security_history_pages_without_duplicates(
    server: RunningServer, google: FakeGoogle
) -> None:
    me = sign_in_account(server, google, 3)
    first = me.devices[0]
    first.call(first.auth.revoke_session, RevokeSessionRequest(session_id=me.session_ids[1]))
    first.call(first.users.export_current_user_data, ExportCurrentUserDataRequest())
    full = list_events(first)
    assert len(full) == 5

    seen: list[SecurityEvent] = []
    token = ""
    pages = 0
    while True:
        page = first.call(
            first.users.list_security_events,
            ListSecurityEventsRequest(page_size=2, page_token=token),
        )
        assert len(page.security_events) <= 2
        seen += page.security_events
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == full


@pytest.mark.parametrize(
    ("page_size", "message"),
    [
        (101, "page_size must be between 0 and 100, got 101"),
        (-1, "page_size must be between 0 and 100, got -1"),
    ],
)
def test_security_history_rejects_bad_page_sizes(
    server: RunningServer, google: FakeGoogle, page_size: int, message: str
) -> None:
    (device,) = sign_in_account(server, google, 1).devices
    with pytest.raises(ConnectError) as err:
        list_events(device, page_size=page_size)
    assert code_of(err.value) == "invalid_argument"
    assert message in err.value.message


def test_security_history_page_tokens_belong_to_their_user(
    server: RunningServer, google: FakeGoogle
) -> None:
    alice = sign_in_account(server, google, 3).devices[0]
    (bob,) = sign_in_account(server, google, 1).devices
    page = alice.call(alice.users.list_security_events, ListSecurityEventsRequest(page_size=1))
    assert page.next_page_token
    with pytest.raises(ConnectError) as err:
        list_events(bob, page_token=page.next_page_token)
    assert code_of(err.value) == "invalid_argument"
    assert "page_token is not valid" in err.value.message
