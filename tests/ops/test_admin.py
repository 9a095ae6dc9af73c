"""expense.admin.v1.AdminService on the real server: its own listener, its own credential."""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from connectrpc.errors import ConnectError

from gen.expense.admin.v1.admin_connect import AdminServiceClientSync
from gen.expense.admin.v1.admin_pb import (
    DisableUserRequest,
    EnableUserRequest,
    GetUserRequest,
    ListUsersRequest,
    ManagedUser,
    RevokeUserSessionsRequest,
)
from gen.expense.auth.v1.auth_pb import GetSessionRequest
from gen.expense.user.v1.user_pb import ListSecurityEventsRequest, SecurityEvent
from tests.conftest import server_env
from tests.ops.conftest import ADMIN_TOKEN, AUTHORIZED, GRPCURL_RPC_ERROR, Grpcurl
from tests.support.client import Session, code_of
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.http import connect_post, request
from tests.support.server import RunningServer, start_server

LIST_USERS = "/expense.admin.v1.AdminService/ListUsers"
ADMIN_PROTO = "expense/admin/v1/admin.proto"
PERMISSION_DENIED = 7
UNAUTHENTICATED = "unauthenticated"
Kind = SecurityEvent.Kind


@pytest.fixture(scope="module")
def clock(tmp_path_factory: pytest.TempPathFactory) -> FileClock:
    """The admin server's clock: the real time until a test sets it."""
    return FileClock(tmp_path_factory.mktemp("admin-clock") / "now")


@pytest.fixture(scope="module")
def admin_server(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle, clock: FileClock
) -> Iterator[RunningServer]:
    """A server whose admin token this module knows; ADMIN_HOST is left at its default."""
    running = start_server(
        tmp_path_factory.mktemp("admin"),
        server_env(google, ADMIN_TOKEN=ADMIN_TOKEN, TEST_CLOCK_FILE=str(clock.path)),
        app="tests.support.clock_app:app",
    )
    yield running
    assert running.stop() == 0, running.logs()


@pytest.fixture(scope="module")
def admin(admin_server: RunningServer) -> Iterator[AdminServiceClientSync]:
    """The generated admin client, pointed at the admin listener."""
    client = AdminServiceClientSync(admin_server.admin_url)
    yield client
    client.close()


@dataclass
class Account:
    """A Google account signed in on some devices."""

    sub: str
    email: str
    user_id: str
    devices: list[Session]


def sign_in(server: RunningServer, google: FakeGoogle, *, devices: int, email: str = "") -> Account:
    """A new account (unique subject), signed in on `devices` devices."""
    sub = secrets.token_hex(8)
    email = email or f"{sub}@example.com"
    account = Account(sub, email, "", [])
    for _ in range(devices):
        device = Session(server.url)
        response = device.sign_in(google.token(sub=sub, email=email))
        assert response.user is not None
        account.user_id = response.user.id
        account.devices.append(device)
    return account


def refused(call: Callable[[], object]) -> ConnectError:
    """The error `call` fails with (it must fail)."""
    with pytest.raises(ConnectError) as err:
        call()
    return err.value


def session_state(device: Session) -> str:
    """What GetSession says of the device's cookie: `ok` or the error code."""
    try:
        device.call(device.auth.get_session, GetSessionRequest())
    except ConnectError as exc:
        return code_of(exc)
    return "ok"


def history(device: Session) -> list[SecurityEvent]:
    """The device's account's security events (newest first)."""
    page = device.call(device.users.list_security_events, ListSecurityEventsRequest(page_size=100))
    return list(page.security_events)


def managed_user(admin: AdminServiceClientSync, user_id: str) -> ManagedUser:
    """GetUser."""
    user = admin.get_user(GetUserRequest(user_id=user_id), headers=AUTHORIZED).user
    assert user is not None
    return user


def read_only_db(server: RunningServer) -> closing[sqlite3.Connection]:
    """The server's database, opened read-only while it serves."""
    path: Path = server.data_dir / "expense-auth.db"
    return closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True))


# --- Its own listener ----------------------------------------------------------------------


def test_admin_api_is_not_on_the_public_port(admin_server: RunningServer) -> None:
    # Even with the right credential: the public listener has no such procedure.
    response = connect_post(admin_server.url, LIST_USERS, {}, headers=AUTHORIZED)
    assert response.status == 404, response.body
    assert response.json()["code"] == "not_found"

    # The sanity check: the same call on the admin port works.
    assert connect_post(admin_server.admin_url, LIST_USERS, {}, headers=AUTHORIZED).status == 200


@pytest.mark.parametrize(
    "procedure",
    [
        "/expense.auth.v1.AuthService/SignIn",
        "/expense.auth.v1.AuthService/GetSession",
        "/expense.user.v1.UserService/GetCurrentUser",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ],
)
def test_public_api_is_not_on_the_admin_port(admin_server: RunningServer, procedure: str) -> None:
    response = connect_post(admin_server.admin_url, procedure, {}, headers=AUTHORIZED)
    assert response.status == 404, response.body


def test_admin_listener_binds_loopback_by_default(admin_server: RunningServer) -> None:
    logged = [line for line in admin_server.logs().splitlines() if " admin address=" in line]
    assert len(logged) == 1, admin_server.logs()
    assert f"address={admin_server.admin_url} " in logged[0]
    parts = urlsplit(admin_server.admin_url)
    assert parts.hostname == "127.0.0.1"
    assert parts.port is not None

    # What the kernel says is listening on that port: loopback only, no wildcard.
    tcp = Path("/proc/net/tcp")
    if not tcp.exists():
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    listening: list[str] = []
    for table in (tcp, Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for row in table.read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, _, port = local.rpartition(":")
            if state == "0A" and int(port, 16) == parts.port:  # 0A: LISTEN
                listening.append(address)
    assert listening, f"nothing listens on {parts.port}"
    assert set(listening) == {"0100007F"}, listening  # 127.0.0.1, little-endian hex


# --- Its own credential --------------------------------------------------------------------

BAD_CREDENTIALS: list[tuple[str, dict[str, str]]] = [
    ("none", {}),
    ("wrong token", {"authorization": f"Bearer {'b' * 40}"}),
    ("token without scheme", {"authorization": ADMIN_TOKEN}),
    ("token with a suffix", {"authorization": f"Bearer {ADMIN_TOKEN}x"}),
    ("prefix of the token", {"authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}),
    ("empty bearer", {"authorization": "Bearer "}),
    ("basic auth", {"authorization": "Basic YWRtaW46YWRtaW4="}),
    ("token in a cookie", {"cookie": f"authorization=Bearer {ADMIN_TOKEN}"}),
]


@pytest.mark.parametrize(
    "headers", [case[1] for case in BAD_CREDENTIALS], ids=[case[0] for case in BAD_CREDENTIALS]
)
def test_admin_calls_without_the_credential_are_refused(
    admin: AdminServiceClientSync, headers: dict[str, str]
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: admin.list_users(ListUsersRequest(), headers=headers),
        lambda: admin.get_user(GetUserRequest(user_id="usr_x"), headers=headers),
        lambda: admin.disable_user(DisableUserRequest(user_id="usr_x"), headers=headers),
        lambda: admin.enable_user(EnableUserRequest(user_id="usr_x"), headers=headers),
        lambda: admin.revoke_user_sessions(
            RevokeUserSessionsRequest(user_id="usr_x"), headers=headers
        ),
    ]
    for call in calls:
        error = refused(call)
        assert code_of(error) == "permission_denied"
        assert "Authorization: Bearer <ADMIN_TOKEN>" in error.message


def test_admin_credential_never_reaches_the_logs(admin_server: RunningServer) -> None:
    wrong = "c" * 40
    connect_post(
        admin_server.admin_url, LIST_USERS, {}, headers={"authorization": f"Bearer {wrong}"}
    )
    connect_post(admin_server.admin_url, LIST_USERS, {}, headers=AUTHORIZED)

    logs = admin_server.logs()
    assert f"procedure={LIST_USERS}" in logs and "code=permission_denied" in logs
    assert ADMIN_TOKEN not in logs
    assert wrong not in logs


@pytest.mark.interop
def test_grpc_clients_need_the_credential_too(
    admin_server: RunningServer, google: FakeGoogle, grpcurl: Grpcurl
) -> None:
    account = sign_in(admin_server, google, devices=1)
    address = urlsplit(admin_server.admin_url).netloc
    method = "expense.admin.v1.AdminService/ListUsers"
    flags = ["-d", json.dumps({"email_contains": account.email})]

    without = grpcurl(address, method, flags=flags, proto=ADMIN_PROTO)
    assert without.returncode == GRPCURL_RPC_ERROR + PERMISSION_DENIED, without.stderr
    assert "Authorization: Bearer" in json.loads(without.stderr)["message"]

    wrong = grpcurl(
        address,
        method,
        flags=[*flags, "-H", f"authorization: Bearer {'d' * 40}"],
        proto=ADMIN_PROTO,
    )
    assert wrong.returncode == GRPCURL_RPC_ERROR + PERMISSION_DENIED, wrong.stderr

    right = grpcurl(
        address,
        method,
        flags=[*flags, "-H", f"authorization: Bearer {ADMIN_TOKEN}"],
        proto=ADMIN_PROTO,
    )
    assert right.returncode == 0, right.stderr
    (listed,) = json.loads(right.stdout)["users"]
    assert listed["user"]["id"] == account.user_id


@pytest.mark.interop
def test_without_admin_token_the_admin_api_is_disabled(
    tmp_path: Path, google: FakeGoogle, grpcurl: Grpcurl
) -> None:
    # No ADMIN_TOKEN at all: fail closed, whatever is presented.
    running = start_server(tmp_path, server_env(google))
    try:
        for headers in ({}, AUTHORIZED, {"authorization": "Bearer "}):
            response = connect_post(running.admin_url, LIST_USERS, {}, headers=headers)
            assert response.status == 403, response.body
            assert response.json()["code"] == "permission_denied"
            assert "the admin API is disabled" in response.json()["message"]

        over_grpc = grpcurl(
            urlsplit(running.admin_url).netloc,
            "expense.admin.v1.AdminService/ListUsers",
            flags=["-H", f"authorization: Bearer {ADMIN_TOKEN}"],
            proto=ADMIN_PROTO,
        )
        assert over_grpc.returncode == GRPCURL_RPC_ERROR + PERMISSION_DENIED, over_grpc.stderr
        assert "the admin API is disabled" in json.loads(over_grpc.stderr)["message"]

        # The rest of the service is unaffected.
        assert request(running.url, "GET", "/healthz").status == 200
    finally:
        assert running.stop() == 0, running.logs()


# --- ListUsers and GetUser -----------------------------------------------------------------


def test_list_users_pages_through_a_filter_with_opaque_tokens(
    admin_server: RunningServer, admin: AdminServiceClientSync, google: FakeGoogle
) -> None:
    tag = secrets.token_hex(4)
    # Mixed case in the stored addresses; the filter below is in another case.
    created = {
        sign_in(admin_server, google, devices=1, email=f"Ops.{tag.upper()}.{i}@Example.COM").user_id
        for i in range(5)
    }
    sign_in(admin_server, google, devices=1, email=f"other.{secrets.token_hex(4)}@example.com")

    pages: list[list[str]] = []
    tokens: list[str] = []
    token = ""
    while True:
        response = admin.list_users(
            ListUsersRequest(page_size=2, page_token=token, email_contains=f"  ops.{tag}.  "),
            headers=AUTHORIZED,
        )
        pages.append([u.user.id for u in response.users if u.user is not None])
        token = response.next_page_token
        if not token:
            break
        tokens.append(token)
        assert len(pages) < 10, "pagination does not end"

    assert [len(page) for page in pages] == [2, 2, 1]
    listed = [user_id for page in pages for user_id in page]
    assert listed == sorted(created)  # ordered by id, each exactly once
    for token, page in zip(tokens, pages, strict=False):
        # Opaque: neither the cursor's id nor JSON is visible in the token.
        assert page[-1] not in token and "usr_" not in token

    nothing = admin.list_users(
        ListUsersRequest(email_contains=f"no-such-{tag}"), headers=AUTHORIZED
    )
    assert list(nothing.users) == [] and nothing.next_page_token == ""


def test_list_users_returns_the_profile_and_state(
    admin_server: RunningServer, admin: AdminServiceClientSync, google: FakeGoogle
) -> None:
    account = sign_in(admin_server, google, devices=1)
    response = admin.list_users(ListUsersRequest(email_contains=account.email), headers=AUTHORIZED)
    (listed,) = response.users
    assert listed.user is not None
    assert (listed.user.id, listed.user.email) == (account.user_id, account.email)
    assert listed.disable_time is None
    assert managed_user(admin, account.user_id) == listed


@pytest.fixture(scope="module")
def real_page_token(
    admin_server: RunningServer, admin: AdminServiceClientSync, google: FakeGoogle
) -> str:
    """A genuine next_page_token, to be tampered with."""
    sign_in(admin_server, google, devices=1)
    sign_in(admin_server, google, devices=1)
    token = admin.list_users(ListUsersRequest(page_size=1), headers=AUTHORIZED).next_page_token
    assert token
    return token


def _tampered(token: str) -> str:
    """The token with the first character of its signature changed.

    (Not the last one: the final base64 character carries padding bits that
    decoding ignores, so changing it may leave the same signature.)
    """
    payload, _, signature = token.rpartition(".")
    assert payload and signature, token
    return f"{payload}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}"


BAD_LISTS: list[tuple[str, Callable[[str], ListUsersRequest], str]] = [
    ("garbage token", lambda real: ListUsersRequest(page_token="not-a-token"), "page_token"),
    ("tampered token", lambda real: ListUsersRequest(page_token=_tampered(real)), "page_token"),
    ("oversized token", lambda real: ListUsersRequest(page_token=real * 20), "page_token"),
    ("page_size too big", lambda real: ListUsersRequest(page_size=101), "got 101"),
    ("negative page_size", lambda real: ListUsersRequest(page_size=-1), "got -1"),
]


@pytest.mark.parametrize(
    ("make", "message"),
    [case[1:] for case in BAD_LISTS],
    ids=[case[0] for case in BAD_LISTS],
)
def test_list_users_refuses_bad_pages(
    admin: AdminServiceClientSync,
    real_page_token: str,
    make: Callable[[str], ListUsersRequest],
    message: str,
) -> None:
    # The genuine token works; its variants do not.
    admin.list_users(ListUsersRequest(page_token=real_page_token), headers=AUTHORIZED)

    error = refused(lambda: admin.list_users(make(real_page_token), headers=AUTHORIZED))
    assert code_of(error) == "invalid_argument"
    assert message in error.message


UNKNOWN_USER_CALLS: list[tuple[str, Callable[[AdminServiceClientSync, str], object]]] = [
    ("GetUser", lambda a, uid: a.get_user(GetUserRequest(user_id=uid), headers=AUTHORIZED)),
    (
        "DisableUser",
        lambda a, uid: a.disable_user(DisableUserRequest(user_id=uid), headers=AUTHORIZED),
    ),
    (
        "EnableUser",
        lambda a, uid: a.enable_user(EnableUserRequest(user_id=uid), headers=AUTHORIZED),
    ),
    (
        "RevokeUserSessions",
        lambda a, uid: a.revoke_user_sessions(
            RevokeUserSessionsRequest(user_id=uid), headers=AUTHORIZED
        ),
    ),
]


@pytest.mark.parametrize(
    ("user_id", "code"),
    [("usr_doesnotexist0000000000", "not_found"), ("", "invalid_argument")],
    ids=["unknown", "empty"],
)
@pytest.mark.parametrize(
    "call", [case[1] for case in UNKNOWN_USER_CALLS], ids=[case[0] for case in UNKNOWN_USER_CALLS]
)
def test_calls_naming_no_user_are_refused(
    admin: AdminServiceClientSync,
    call: Callable[[AdminServiceClientSync, str], object],
    user_id: str,
    code: str,
) -> None:
    error = refused(lambda: call(admin, user_id))
    assert code_of(error) == code
    if code == "not_found":
        assert user_id in error.message


# --- Disable, enable, revoke ---------------------------------------------------------------


def test_disable_ends_every_session_and_refuses_sign_in_until_enabled(
    admin_server: RunningServer, admin: AdminServiceClientSync, google: FakeGoogle
) -> None:
    account = sign_in(admin_server, google, devices=2)
    bystander = sign_in(admin_server, google, devices=1)
    assert [session_state(device) for device in account.devices] == ["ok", "ok"]

    disabled = admin.disable_user(
        DisableUserRequest(user_id=account.user_id), headers=AUTHORIZED
    ).user
    assert disabled is not None and disabled.user is not None
    assert disabled.user.id == account.user_id
    assert disabled.disable_time is not None
    assert managed_user(admin, account.user_id).disable_time == disabled.disable_time

    # Every session of the account ends at once; other accounts are untouched.
    assert [session_state(device) for device in account.devices] == [UNAUTHENTICATED] * 2
    assert session_state(bystander.devices[0]) == "ok"

    # Signing in again is refused while disabled.
    fresh = Session(admin_server.url)
    error = refused(lambda: fresh.sign_in(google.token(sub=account.sub, email=account.email)))
    assert code_of(error) == "permission_denied"
    assert "disabled" in error.message
    assert fresh.cookie is None

    enabled = admin.enable_user(EnableUserRequest(user_id=account.user_id), headers=AUTHORIZED).user
    assert enabled is not None and enabled.disable_time is None
    assert managed_user(admin, account.user_id).disable_time is None

    fresh.sign_in(google.token(sub=account.sub, email=account.email))
    assert session_state(fresh) == "ok"
    # Enabling does not bring the ended sessions back.
    assert [session_state(device) for device in account.devices] == [UNAUTHENTICATED] * 2

    # Audited, in the account's own security history.
    kinds = [event.kind for event in history(fresh)]
    assert kinds.index(Kind.ACCOUNT_ENABLED) < kinds.index(Kind.ACCOUNT_DISABLED)  # newest first
    assert Kind.SIGN_IN_FAILED in kinds  # the refused attempt while disabled


def test_revoke_user_sessions_ends_them_all_and_counts_them(
    admin_server: RunningServer, admin: AdminServiceClientSync, google: FakeGoogle
) -> None:
    account = sign_in(admin_server, google, devices=3)

    revoked = admin.revoke_user_sessions(
        RevokeUserSessionsRequest(user_id=account.user_id), headers=AUTHORIZED
    )
    assert revoked.revoked_count == 3
    assert [session_state(device) for device in account.devices] == [UNAUTHENTICATED] * 3

    again = admin.revoke_user_sessions(
        RevokeUserSessionsRequest(user_id=account.user_id), headers=AUTHORIZED
    )
    assert again.revoked_count == 0

    # Not disabled: the user can sign in again.
    assert managed_user(admin, account.user_id).disable_time is None
    fresh = Session(admin_server.url)
    fresh.sign_in(google.token(sub=account.sub, email=account.email))
    assert session_state(fresh) == "ok"

    revocations = [event for event in history(fresh) if event.kind == Kind.SESSION_REVOKED]
    assert len(revocations) == 2
    assert all("admin" in event.reason for event in revocations)


def test_revoke_user_sessions_counts_only_the_sessions_it_ends(
    admin_server: RunningServer, admin: AdminServiceClientSync, google: FakeGoogle, clock: FileClock
) -> None:
    account = sign_in(admin_server, google, devices=1)
    try:
        # The first session idles out (30 minutes by default); then a second one starts.
        clock.set_ms(clock.now_ms() + 31 * 60 * 1000)
        assert session_state(account.devices[0]) == UNAUTHENTICATED
        live = Session(admin_server.url)
        live.sign_in(google.token(sub=account.sub, email=account.email))

        revoked = admin.revoke_user_sessions(
            RevokeUserSessionsRequest(user_id=account.user_id), headers=AUTHORIZED
        )
        assert session_state(live) == UNAUTHENTICATED
        # "The number of sessions revoked": the session that had already ended is not one.
        assert revoked.revoked_count == 1
    finally:
        clock.path.unlink(missing_ok=True)  # back to the real time for the other tests


def test_admin_actions_are_in_the_audit_log(
    admin_server: RunningServer, admin: AdminServiceClientSync, google: FakeGoogle
) -> None:
    account = sign_in(admin_server, google, devices=2)
    admin.revoke_user_sessions(
        RevokeUserSessionsRequest(user_id=account.user_id), headers=AUTHORIZED
    )
    admin.disable_user(DisableUserRequest(user_id=account.user_id), headers=AUTHORIZED)
    admin.enable_user(EnableUserRequest(user_id=account.user_id), headers=AUTHORIZED)

    with read_only_db(admin_server) as db:
        rows = db.execute(
            "SELECT kind, reason, ip FROM audit_events WHERE user_id = ? AND kind != 'sign_in' "
            "ORDER BY id",
            (account.user_id,),
        ).fetchall()
    assert rows == [
        ("session_revoked", "admin:2", "127.0.0.1"),
        ("account_disabled", "admin", "127.0.0.1"),
        ("account_enabled", "admin", "127.0.0.1"),
    ]
