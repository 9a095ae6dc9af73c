"""The idle timeout holds for every allowed value, the shortest included.

Last-seen is written at most once per touch interval (so that reads do not
write); with a fixed one-minute interval a 60 s idle timeout ended sessions
that were used every 20 s. The interval is now a quarter of the idle timeout
(at most a minute), so a session used more often than every 3/4 of the idle
timeout never idles out, and one left alone for the whole timeout does.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from connectrpc.errors import ConnectError

from gen.expense.auth.v1.auth_pb import GetSessionRequest
from tests.conftest import server_env
from tests.support.client import Session, code_of
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer, start_server

IDLE_S = 60


@pytest.fixture(scope="module")
def clock(tmp_path_factory: pytest.TempPathFactory) -> FileClock:
    return FileClock(tmp_path_factory.mktemp("clock") / "now")


@pytest.fixture(scope="module")
def short_idle(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle, clock: FileClock
) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("idle"),
        server_env(
            google,
            TEST_CLOCK_FILE=str(clock.path),
            SESSION_IDLE_TIMEOUT_SECONDS=str(IDLE_S),
            SESSION_MAX_AGE_SECONDS="3600",
        ),
        app="tests.support.clock_app:app",
    )
    yield running
    assert running.stop() == 0, running.logs()


def test_a_session_used_every_20_s_outlives_a_60_s_idle_timeout(
    short_idle: RunningServer, google: FakeGoogle, clock: FileClock
) -> None:
    clock.set_ms(clock.now_ms())
    client = Session(short_idle.url)
    client.sign_in(google.token(sub=secrets.token_hex(8)))
    for _ in range(9):  # three idle timeouts' worth of use
        clock.advance(20)
        client.call(client.auth.get_session, GetSessionRequest())
    clock.advance(IDLE_S + 1)
    with pytest.raises(ConnectError) as err:
        client.call(client.auth.get_session, GetSessionRequest())
    assert code_of(err.value) == "unauthenticated"
    assert "inactivity" in err.value.message


def test_a_session_used_at_45_s_intervals_lives_and_idles_out_on_time(
    short_idle: RunningServer, google: FakeGoogle, clock: FileClock
) -> None:
    """45 s is 3/4 of the timeout: the touch interval (15 s) always records the use."""
    clock.set_ms(clock.now_ms())
    client = Session(short_idle.url)
    client.sign_in(google.token(sub=secrets.token_hex(8)))
    for _ in range(4):
        clock.advance(45)
        client.call(client.auth.get_session, GetSessionRequest())
    clock.advance(IDLE_S)
    with pytest.raises(ConnectError):
        client.call(client.auth.get_session, GetSessionRequest())
