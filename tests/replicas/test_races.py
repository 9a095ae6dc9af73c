"""Races between replicas: 50 calls released together, split across both processes.

Within one process an in-memory lock could serialise these; across two, only
the database can. Each call has its own connection, opened before the barrier,
so that the calls themselves race.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable

from tests.reliability.harness import Conn, Reply, signed_in
from tests.replicas.cluster import SERVER_FAULTS, SIGN_IN, Database, all_at_once, outcome
from tests.replicas.conftest import Pair
from tests.support.google import ISSUER, FakeGoogle
from tests.support.server import RunningServer

PARALLEL = 50


def sign_in_with(token: str) -> Callable[[Conn], Reply]:
    """A SignIn call with `token`, to be made on a connection later."""
    return lambda conn: conn.connect_call(SIGN_IN, {"googleIdToken": token})


def split(
    pair: Pair, calls: list[Callable[[Conn], Reply]]
) -> list[tuple[RunningServer, Callable[[Conn], Reply]]]:
    """Even calls to A, odd calls to B."""
    return [(pair.servers[i % 2], call) for i, call in enumerate(calls)]


def test_one_id_token_replayed_on_both_replicas_signs_in_once(
    pair: Pair, google: FakeGoogle
) -> None:
    sub = secrets.token_hex(8)
    token = google.token(sub=sub, email=f"{sub}@example.com")

    replies = all_at_once(split(pair, [sign_in_with(token)] * PARALLEL))

    outcomes = Counter(outcome(r) for r in replies)
    assert outcomes == {"ok": 1, "unauthenticated": PARALLEL - 1}, outcomes
    refusals = [r.json()["message"] for r in replies if r.status != 200]
    assert all("already used" in message for message in refusals), set(refusals)
    (winner,) = [signed_in(r) for r in replies if r.status == 200]
    assert winner is not None
    db = Database(pair.database_url)
    try:
        sessions = db.fetch("SELECT id FROM sessions WHERE user_id = $1", winner.user_id)
    finally:
        db.close()
    assert sessions == [(winner.session_id,)]


def test_parallel_first_sign_ins_of_one_user_on_both_replicas_make_one_user(
    pair: Pair, google: FakeGoogle
) -> None:
    sub = secrets.token_hex(8)
    tokens = [google.token(sub=sub, email=f"{sub}@example.com") for _ in range(PARALLEL)]

    replies = all_at_once(split(pair, [sign_in_with(token) for token in tokens]))

    outcomes = Counter(outcome(r) for r in replies)
    print(f"\nreplicas: {PARALLEL} parallel first sign-ins of one user -> {dict(outcomes)}")
    # Clean answers only: a success, or a refusal a client can act on (retry later).
    assert set(outcomes) <= {"ok", "unavailable", "aborted"}, outcomes
    assert not set(outcomes) & SERVER_FAULTS
    sessions = [s for s in (signed_in(r) for r in replies) if s is not None]
    assert sessions, outcomes
    user_ids = {s.user_id for s in sessions}
    assert len(user_ids) == 1, user_ids
    db = Database(pair.database_url)
    try:
        users = db.fetch("SELECT id FROM users WHERE issuer = $1 AND subject = $2", ISSUER, sub)
        stored = db.fetch("SELECT id FROM sessions WHERE user_id = $1", user_ids.pop())
    finally:
        db.close()
    assert len(users) == 1, users
    assert {s.session_id for s in sessions} == {row[0] for row in stored}
