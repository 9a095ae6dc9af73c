"""Session rules on a real server whose clock the test controls: expiry and key rotation."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from connectrpc.errors import ConnectError

from gen.expense.auth.v1.auth_pb import GetSessionRequest, ListSessionsRequest
from tests.conftest import server_env
from tests.support.client import Session, code_of
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer, start_server

IDLE_S = 600
MAX_AGE_S = 3600
KEY_A = "a" * 40
KEY_B = "b" * 40


@pytest.fixture(scope="module")
def clock(tmp_path_factory: pytest.TempPathFactory) -> FileClock:
    return FileClock(tmp_path_factory.mktemp("clock") / "now")


@pytest.fixture(scope="module")
def clocked(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle, clock: FileClock
) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("clocked"),
        server_env(
            google,
            TEST_CLOCK_FILE=str(clock.path),
            SESSION_IDLE_TIMEOUT_SECONDS=str(IDLE_S),
            SESSION_MAX_AGE_SECONDS=str(MAX_AGE_S),
        ),
        app="tests.support.clock_app:app",
    )
    yield running
    assert running.stop() == 0, running.logs()


def signed_in(server: RunningServer, google: FakeGoogle) -> Session:
    session = Session(server.url)
    session.sign_in(google.token(sub=secrets.token_hex(8)))
    return session


def expect_unauthenticated(session: Session, fragment: str) -> None:
    with pytest.raises(ConnectError) as err:
        session.call(session.auth.get_session, GetSessionRequest())
    assert code_of(err.value) == "unauthenticated"
    assert fragment in err.value.message


def test_idle_session_expires(clocked: RunningServer, google: FakeGoogle, clock: FileClock) -> None:
    clock.set_ms(1_800_000_000_000)
    session = signed_in(clocked, google)
    clock.advance(IDLE_S - 1)
    session.call(session.auth.get_session, GetSessionRequest())
    clock.advance(IDLE_S - 1)  # still alive: the last call refreshed last-seen
    session.call(session.auth.get_session, GetSessionRequest())
    clock.advance(IDLE_S + 1)
    expect_unauthenticated(session, "inactivity")


def test_busy_session_still_ends_at_its_absolute_lifetime(
    clocked: RunningServer, google: FakeGoogle, clock: FileClock
) -> None:
    clock.set_ms(1_800_100_000_000)
    session = signed_in(clocked, google)
    for _ in range(MAX_AGE_S // (IDLE_S // 2) - 1):
        clock.advance(IDLE_S // 2)
        session.call(session.auth.get_session, GetSessionRequest())
    clock.advance(IDLE_S // 2)
    expect_unauthenticated(session, "expired")


def test_expired_sessions_leave_the_list(
    clocked: RunningServer, google: FakeGoogle, clock: FileClock
) -> None:
    clock.set_ms(1_800_200_000_000)
    sub = secrets.token_hex(8)
    idle, active = Session(clocked.url), Session(clocked.url)
    idle.sign_in(google.token(sub=sub))
    clock.advance(IDLE_S // 2)
    active.sign_in(google.token(sub=sub))
    listed = active.call(active.auth.list_sessions, ListSessionsRequest())
    assert len(listed.sessions) == 2
    clock.advance(IDLE_S // 2 + 1)
    listed = active.call(active.auth.list_sessions, ListSessionsRequest())
    assert [s.current for s in listed.sessions] == [True]


def test_key_rotation(tmp_path: Path, google: FakeGoogle) -> None:
    data_dir = tmp_path / "var"

    def run(keys: str) -> RunningServer:
        return start_server(
            tmp_path, server_env(google, SESSION_SECRET_KEY=keys), data_dir=data_dir
        )

    server = run(KEY_A)
    old = signed_in(server, google)
    assert server.stop() == 0

    server = run(f"{KEY_A},{KEY_B}")  # B added: it signs, A still verifies
    try:
        old.url = server.url
        old.auth = type(old.auth)(server.url)
        old.call(old.auth.get_session, GetSessionRequest())
        new = signed_in(server, google)
    finally:
        assert server.stop() == 0

    server = run(KEY_B)  # A removed: its cookies die, B's live on
    try:
        for client in (old, new):
            client.auth = type(client.auth)(server.url)
        new.call(new.auth.get_session, GetSessionRequest())
        expect_unauthenticated(old, "not valid")
    finally:
        assert server.stop() == 0
