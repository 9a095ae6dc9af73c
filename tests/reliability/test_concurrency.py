"""Races: 50 clients at once on one user's sign-ins and sessions.

Each scenario releases 50 threads from a barrier, each on its own connection,
so that the calls are in the server together. The outcome is checked from both
sides: the answers the clients got, and the database itself, read beside the
server. Every scenario runs on each engine: SQLite serializes the writes,
PostgreSQL runs them side by side under row locks and unique constraints.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from tests.conftest import server_env
from tests.interop.tools import new_sub
from tests.reliability.harness import (
    AUTH,
    ENGINES,
    Conn,
    Reply,
    SignedIn,
    engine_env,
    live_session_ids,
    log_faults,
    sign_in,
    signed_in,
    store_problems,
)
from tests.support.database import rows
from tests.support.google import ISSUER, FakeGoogle
from tests.support.server import RunningServer, start_server

pytestmark = pytest.mark.reliability

PARALLEL = 50
T = TypeVar("T")


@pytest.fixture(scope="module", params=ENGINES)
def race_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle
) -> Iterator[RunningServer]:
    """A server of this module's own, on each engine in turn; its log must stay clean."""
    with engine_env(request.param) as env:
        tmp = tmp_path_factory.mktemp(f"concurrency-{request.param}")
        running = start_server(tmp, server_env(google, **env))
        yield running
        assert running.stop() == 0, running.logs()[-3000:]


def all_at_once(server: RunningServer, calls: list[Callable[[Conn], T]]) -> list[T]:
    """Run each call on its own connection, all released together; results in order."""
    barrier = threading.Barrier(len(calls))
    conns = [Conn(server.port) for _ in calls]

    def run(i: int) -> T:
        # Connect before the barrier, so that the calls, not the handshakes, race.
        conns[i].request("GET", "/healthz")
        barrier.wait(timeout=30)
        return calls[i](conns[i])

    try:
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            return list(pool.map(run, range(len(calls))))
    finally:
        for conn in conns:
            conn.close()


def sessions_of_one_user(server: RunningServer, google: FakeGoogle, count: int) -> list[SignedIn]:
    """`count` sessions of one new user, signed in one after another."""
    sub = new_sub()
    conn = Conn(server.port)
    try:
        sessions = [
            sign_in(conn, google.token(sub=sub, email=f"{sub}@example.com")) for _ in range(count)
        ]
    finally:
        conn.close()
    assert len({s.user_id for s in sessions}) == 1
    return sessions


def outcome(reply: Reply) -> str:
    """`ok`, or the Connect error code; anything else is spelled out."""
    if reply.status == 200:
        return "ok"
    return reply.connect_code() or f"HTTP {reply.status} {reply.body[:200]!r}"


def works(server: RunningServer, session: SignedIn) -> bool:
    """Whether GetSession with the session's cookie succeeds (else it must be refused)."""
    conn = Conn(server.port)
    try:
        reply = conn.connect_call(f"{AUTH}/GetSession", {}, cookie=session.cookie)
    finally:
        conn.close()
    assert reply.status in (200, 401), reply
    return reply.status == 200


def test_parallel_first_sign_ins_of_one_new_user_create_one_user(
    race_server: RunningServer, google: FakeGoogle
) -> None:
    sub = new_sub()
    tokens = [google.token(sub=sub, email=f"{sub}@example.com") for _ in range(PARALLEL)]
    assert len(set(tokens)) == PARALLEL

    replies = all_at_once(
        race_server,
        [call(f"{AUTH}/SignIn", {"googleIdToken": token}) for token in tokens],
    )

    assert Counter(outcome(r) for r in replies) == {"ok": PARALLEL}, [str(r) for r in replies]
    sessions = [signed_in(r) for r in replies]
    user_ids = {s.user_id for s in sessions if s is not None}
    session_ids = {s.session_id for s in sessions if s is not None}
    assert len(user_ids) == 1, user_ids
    user_id = user_ids.pop()
    assert len(session_ids) == PARALLEL
    users = rows(race_server, "SELECT id FROM users WHERE issuer = ? AND subject = ?", ISSUER, sub)
    stored = {
        row[0] for row in rows(race_server, "SELECT id FROM sessions WHERE user_id = ?", user_id)
    }
    assert [row[0] for row in users] == [user_id]
    assert stored == session_ids
    assert live_session_ids(race_server, user_id) == session_ids
    print(f"\nconcurrency: {PARALLEL} parallel first sign-ins -> 1 user, {len(stored)} sessions")


def call(procedure: str, message: object, *, cookie: str | None = None) -> Callable[[Conn], Reply]:
    """A Connect call, to be made on a connection later."""
    return lambda conn: conn.connect_call(procedure, message, cookie=cookie)


def revoke(session_id: str, cookie: str) -> Callable[[Conn], Reply]:
    """A RevokeSession call from the session with `cookie`."""
    return call(f"{AUTH}/RevokeSession", {"sessionId": session_id}, cookie=cookie)


def test_parallel_self_revocations_leave_no_live_session(
    race_server: RunningServer, google: FakeGoogle
) -> None:
    sessions = sessions_of_one_user(race_server, google, PARALLEL)

    replies = all_at_once(race_server, [revoke(s.session_id, s.cookie) for s in sessions])

    assert Counter(outcome(r) for r in replies) == {"ok": PARALLEL}, [str(r) for r in replies]
    assert all(r.header("set-cookie") for r in replies)  # each cookie expired
    assert live_session_ids(race_server, sessions[0].user_id) == set()
    assert not any(works(race_server, s) for s in sessions)


def test_parallel_ring_of_revocations_revokes_exactly_what_was_acknowledged(
    race_server: RunningServer, google: FakeGoogle
) -> None:
    """Session i revokes session i+1 (mod 50), all at once.

    A call whose own session has been revoked when it acts is refused as
    `unauthenticated`; every other call succeeds. So afterwards session i+1 is
    revoked exactly when the call from session i succeeded. And some order of the
    calls must explain the answers: they cannot all succeed, since in any order one
    of them runs after its own session was revoked by its predecessor.
    """
    sessions = sessions_of_one_user(race_server, google, PARALLEL)
    ring = [(s, sessions[(i + 1) % PARALLEL]) for i, s in enumerate(sessions)]

    replies = all_at_once(
        race_server, [revoke(target.session_id, caller.cookie) for caller, target in ring]
    )

    outcomes = [outcome(r) for r in replies]
    print(f"\nconcurrency: ring of {PARALLEL} revocations -> {Counter(outcomes)}")
    assert set(outcomes) <= {"ok", "unauthenticated"}, outcomes
    revoked = {
        target.session_id for (_, target), o in zip(ring, outcomes, strict=True) if o == "ok"
    }
    live = live_session_ids(race_server, sessions[0].user_id)
    assert live == {s.session_id for s in sessions} - revoked
    assert {s.session_id for s in sessions if works(race_server, s)} == live
    assert "unauthenticated" in outcomes, (
        f"all {PARALLEL} calls succeeded, so at least one acted after its own session had "
        "been revoked: the session check happens when the call starts, not when it acts"
    )


def test_parallel_revocations_of_one_session_succeed_once(
    race_server: RunningServer, google: FakeGoogle
) -> None:
    *callers, target = sessions_of_one_user(race_server, google, PARALLEL + 1)

    replies = all_at_once(race_server, [revoke(target.session_id, c.cookie) for c in callers])

    assert Counter(outcome(r) for r in replies) == {"ok": 1, "not_found": PARALLEL - 1}
    live = live_session_ids(race_server, target.user_id)
    assert live == {c.session_id for c in callers}
    assert not works(race_server, target)


def revoke_other_sessions_at_once(
    server: RunningServer, google: FakeGoogle
) -> tuple[list[SignedIn], list[Reply], set[str]]:
    """50 sessions of one user call RevokeOtherSessions together: sessions, replies, live ids."""
    sessions = sessions_of_one_user(server, google, PARALLEL)
    replies = all_at_once(
        server, [call(f"{AUTH}/RevokeOtherSessions", {}, cookie=s.cookie) for s in sessions]
    )
    live = live_session_ids(server, sessions[0].user_id)
    outcomes = Counter(outcome(r) for r in replies)
    print(f"\nconcurrency: {PARALLEL} RevokeOtherSessions -> {outcomes}, {len(live)} live")
    return sessions, replies, live


def test_parallel_revoke_other_sessions_leaves_at_most_one_live_session(
    race_server: RunningServer, google: FakeGoogle
) -> None:
    sessions, replies, live = revoke_other_sessions_at_once(race_server, google)

    assert {outcome(r) for r in replies} <= {"ok", "unauthenticated"}, [str(r) for r in replies]
    assert len(live) <= 1, live
    # Each session is revoked once, by exactly one of the calls that succeeded.
    counted = sum(r.json().get("revokedCount", 0) for r in replies if r.status == 200)
    assert counted == PARALLEL - len(live)
    assert {s.session_id for s in sessions if works(race_server, s)} == live


def test_parallel_revoke_other_sessions_keeps_each_caller_it_answered_ok_signed_in(
    race_server: RunningServer, google: FakeGoogle
) -> None:
    """The contract: RevokeOtherSessions revokes every session "except the one making the call".

    So a caller told `ok` is still signed in afterwards; with the previous test,
    at most one caller may be told `ok`, and the others `unauthenticated`.
    """
    sessions, replies, live = revoke_other_sessions_at_once(race_server, google)

    told_ok = {s.session_id for s, r in zip(sessions, replies, strict=True) if r.status == 200}
    assert told_ok <= live, (
        f"{len(told_ok)} callers were told `ok` (their other sessions revoked, theirs kept), "
        f"but {len(told_ok - live)} of them were signed out by a concurrent call; "
        f"{len(live)} live sessions remain"
    )


def test_database_and_log_are_sound_after_the_races(race_server: RunningServer) -> None:
    assert store_problems(race_server) == []
    assert log_faults(race_server) == []
