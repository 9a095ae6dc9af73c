"""The session rules over both storage engines (a real SQLite file and a real PostgreSQL
database), with a clock that moves only when told: the storage contract, as the domain
uses it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from server.domain.errors import InvalidArgument, NotFound, Unauthenticated
from server.domain.models import Identity, Principal, SessionCursor
from server.domain.sessions import NewSession, SessionPolicy, Sessions
from server.domain.tokens import hash_secret, new_public_id, new_secret
from server.storage.postgres.store import PostgresStore
from server.storage.sqlite import SQLiteStore, migrate
from tests.support import postgres
from tests.support.clock import ManualClock

T = TypeVar("T")
SECOND = 1000
MINUTE = 60 * SECOND
IDLE_MS = 30 * MINUTE
MAX_AGE_MS = 120 * MINUTE
TOUCH_MS = MINUTE
START_MS = 1_767_225_600_000

Store = SQLiteStore | PostgresStore
# One event loop per test (asyncpg's pool belongs to the loop that made it).
_runner: asyncio.Runner | None = None


def run(coro: Coroutine[Any, Any, T]) -> T:
    assert _runner is not None
    return _runner.run(coro)


@pytest.fixture(autouse=True)
def loop() -> Iterator[None]:
    global _runner
    with asyncio.Runner() as runner:
        _runner = runner
        yield
        _runner = None


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path, loop: None) -> Iterator[Store]:
    if request.param == "sqlite":
        path = tmp_path / "auth.sqlite3"
        migrate(path)
        sqlite = SQLiteStore(path)
        yield sqlite
        run(sqlite.aclose())
        return
    with postgres.database() as url:
        store = PostgresStore(url, pool_size=4, connect_timeout_s=5, statement_timeout_ms=5000)
        yield store
        run(store.aclose())


@pytest.fixture
def sessions(store: Store, clock: ManualClock) -> Sessions:
    policy = SessionPolicy(idle_ms=IDLE_MS, max_age_ms=MAX_AGE_MS, touch_interval_ms=TOUCH_MS)
    return Sessions(store, clock=clock, policy=policy)


def identity(subject: str = "110169484474386276334", **changes: object) -> Identity:
    fields: dict[str, object] = {
        "issuer": "https://accounts.google.com",
        "subject": subject,
        "email": f"{subject}@example.com",
        "email_verified": True,
        "name": "Ann Example",
        "picture": "https://lh3.googleusercontent.com/a/photo",
        "locale": "en-GB",
        **changes,
    }
    return Identity(**fields)  # type: ignore[arg-type]


def sign_in(sessions: Sessions, subject: str = "110169484474386276334") -> NewSession:
    return run(sessions.sign_in(identity(subject), user_agent="Firefox on Linux"))


def authenticate(sessions: Sessions, new: NewSession) -> Principal:
    return run(sessions.authenticate(new.secret))


def rejection(sessions: Sessions, new: NewSession) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        authenticate(sessions, new)
    return caught.value


def stored_last_seen(store: Store, new: NewSession) -> int:
    principal = run(store.find_principal(hash_secret(new.secret)))
    assert principal is not None
    return principal.session.last_seen_ms


# ---------------------------------------------------------------------------
# Sign-in and authentication


def test_sign_in_creates_the_user_and_a_session(
    sessions: Sessions, store: Store, clock: ManualClock
) -> None:
    new = run(sessions.sign_in(identity("sub-1"), user_agent="x" * 500))

    user, session = new.user, new.session
    assert user.id.startswith("usr_")
    assert (user.issuer, user.subject, user.email) == (
        "https://accounts.google.com",
        "sub-1",
        "sub-1@example.com",
    )
    assert user.display_name == "Ann Example"
    assert (user.currency_code, user.time_zone, user.locale) == ("USD", "UTC", "en-GB")
    assert user.create_ms == user.update_ms == clock.now_ms()
    assert run(store.get_user(user.id)) == user

    assert session.id.startswith("ses_")
    assert session.user_id == user.id
    assert session.token_hash == hash_secret(new.secret)
    assert session.create_ms == session.last_seen_ms == clock.now_ms()
    assert session.expire_ms == clock.now_ms() + MAX_AGE_MS
    assert session.revoke_ms is None
    assert session.user_agent == "x" * 64
    assert new.secret not in (session.id, user.id)


def test_a_new_user_without_a_locale_gets_the_default(sessions: Sessions) -> None:
    new = run(sessions.sign_in(identity("sub-2", locale=""), user_agent=""))

    assert new.user.locale == "en"


def test_signing_in_again_reuses_the_user_and_starts_a_new_session(
    sessions: Sessions, clock: ManualClock
) -> None:
    first = sign_in(sessions, "sub-3")
    clock.advance_ms(MINUTE)
    again = run(sessions.sign_in(identity("sub-3", email="new@example.com"), user_agent=""))
    stranger = run(sessions.sign_in(identity("sub-4", email="new@example.com"), user_agent=""))

    assert again.user.id == first.user.id
    assert again.user.email == "new@example.com"
    assert again.user.update_ms == clock.now_ms()
    assert again.session.id != first.session.id
    assert again.secret != first.secret
    assert stranger.user.id != first.user.id


def test_authenticate_returns_the_principal(sessions: Sessions) -> None:
    new = sign_in(sessions)

    principal = authenticate(sessions, new)

    assert principal.session == new.session
    assert principal.user == new.user


@pytest.mark.parametrize("secret", ["", new_secret(), "not-a-secret"])
def test_an_unknown_secret_is_unauthenticated(sessions: Sessions, secret: str) -> None:
    sign_in(sessions)

    with pytest.raises(Unauthenticated) as caught:
        run(sessions.authenticate(secret))

    assert caught.value.reason == "unknown"
    assert "sign in" in caught.value.message


# ---------------------------------------------------------------------------
# Expiry


def test_a_session_unused_for_the_idle_timeout_ends(sessions: Sessions, clock: ManualClock) -> None:
    new = sign_in(sessions)
    clock.advance_ms(IDLE_MS)

    error = rejection(sessions, new)

    assert error.reason == "idle"
    assert "inactivity" in error.message


def test_a_session_used_just_before_the_idle_timeout_lives(
    sessions: Sessions, clock: ManualClock
) -> None:
    new = sign_in(sessions)
    clock.advance_ms(IDLE_MS - 1)

    assert authenticate(sessions, new).session.id == new.session.id


def test_last_seen_is_written_at_most_once_per_touch_interval(
    sessions: Sessions, store: Store, clock: ManualClock
) -> None:
    new = sign_in(sessions)
    signed_in_at = clock.now_ms()

    clock.advance_ms(TOUCH_MS - 1)
    assert authenticate(sessions, new).session.last_seen_ms == signed_in_at
    assert stored_last_seen(store, new) == signed_in_at

    clock.advance_ms(1)
    assert authenticate(sessions, new).session.last_seen_ms == signed_in_at + TOUCH_MS
    assert stored_last_seen(store, new) == signed_in_at + TOUCH_MS

    clock.advance_ms(TOUCH_MS // 2)
    assert authenticate(sessions, new).session.last_seen_ms == signed_in_at + TOUCH_MS
    assert stored_last_seen(store, new) == signed_in_at + TOUCH_MS


def test_activity_within_the_idle_timeout_extends_the_session(
    sessions: Sessions, clock: ManualClock
) -> None:
    new = sign_in(sessions)
    for _ in range(3):
        clock.advance_ms(20 * MINUTE)
        authenticate(sessions, new)

    clock.advance_ms(IDLE_MS - 1)  # 89 minutes after sign-in, 29:59 after the last use
    authenticate(sessions, new)
    clock.advance_ms(IDLE_MS)

    assert rejection(sessions, new).reason == "idle"


def test_a_session_ends_at_its_max_age_however_busy(sessions: Sessions, clock: ManualClock) -> None:
    new = sign_in(sessions)
    for _ in range(MAX_AGE_MS // (10 * MINUTE) - 1):
        clock.advance_ms(10 * MINUTE)
        authenticate(sessions, new)
    clock.advance_ms(10 * MINUTE - 1)
    authenticate(sessions, new)
    clock.advance_ms(1)

    error = rejection(sessions, new)

    assert error.reason == "max_age"
    assert "expired" in error.message


# ---------------------------------------------------------------------------
# Revocation


def test_a_revoked_session_is_refused(sessions: Sessions) -> None:
    mine = sign_in(sessions)
    other = sign_in(sessions)

    run(sessions.revoke(authenticate(sessions, mine), other.session.id))

    error = rejection(sessions, other)
    assert error.reason == "revoked"
    assert "signed out" in error.message
    assert authenticate(sessions, mine).session.id == mine.session.id


def test_sign_out_revokes_the_callers_own_session(sessions: Sessions) -> None:
    new = sign_in(sessions)

    run(sessions.sign_out(authenticate(sessions, new)))

    assert rejection(sessions, new).reason == "revoked"


def test_revoking_twice_is_not_found(sessions: Sessions) -> None:
    mine = sign_in(sessions)
    other = sign_in(sessions)
    principal = authenticate(sessions, mine)
    run(sessions.revoke(principal, other.session.id))

    with pytest.raises(NotFound):
        run(sessions.revoke(principal, other.session.id))


def test_another_users_session_looks_exactly_like_an_unknown_one(sessions: Sessions) -> None:
    mine = authenticate(sessions, sign_in(sessions, "sub-ann"))
    theirs = sign_in(sessions, "sub-bob")
    made_up = new_public_id("ses")

    with pytest.raises(NotFound) as foreign:
        run(sessions.revoke(mine, theirs.session.id))
    with pytest.raises(NotFound) as unknown:
        run(sessions.revoke(mine, made_up))

    assert foreign.value.message.replace(theirs.session.id, "<id>") == (
        unknown.value.message.replace(made_up, "<id>")
    )
    assert theirs.session.id in foreign.value.message
    assert authenticate(sessions, theirs).session.id == theirs.session.id


def test_an_empty_session_id_is_an_invalid_argument(sessions: Sessions) -> None:
    principal = authenticate(sessions, sign_in(sessions))

    with pytest.raises(InvalidArgument) as caught:
        run(sessions.revoke(principal, ""))

    assert caught.value.field == "session_id"


def test_a_session_that_ended_by_inactivity_cannot_be_revoked(
    sessions: Sessions, clock: ManualClock
) -> None:
    idle = sign_in(sessions)
    clock.advance_ms(IDLE_MS)
    current = authenticate(sessions, sign_in(sessions))
    assert rejection(sessions, idle).reason == "idle"

    with pytest.raises(NotFound):  # "already ended" (Sessions.revoke's contract)
        run(sessions.revoke(current, idle.session.id))


def test_revoke_others_revokes_the_other_live_sessions_and_counts_them(
    sessions: Sessions, clock: ManualClock
) -> None:
    too_old = sign_in(sessions)
    clock.advance_ms(MAX_AGE_MS - 10 * MINUTE)
    current = sign_in(sessions)
    already_revoked = sign_in(sessions)
    others = [sign_in(sessions) for _ in range(3)]
    stranger = sign_in(sessions, "sub-stranger")
    principal = authenticate(sessions, current)
    run(sessions.revoke(principal, already_revoked.session.id))
    clock.advance_ms(11 * MINUTE)  # `too_old` is now past its max age
    assert rejection(sessions, too_old).reason == "max_age"

    count = run(sessions.revoke_others(authenticate(sessions, current)))

    assert count == 3
    for new in others:
        assert rejection(sessions, new).reason == "revoked"
    assert authenticate(sessions, current).session.id == current.session.id
    assert authenticate(sessions, stranger).session.id == stranger.session.id
    assert run(sessions.revoke_others(authenticate(sessions, current))) == 0


def test_revoke_others_counts_what_the_session_list_shows(
    sessions: Sessions, clock: ManualClock
) -> None:
    gone_idle = sign_in(sessions)
    clock.advance_ms(IDLE_MS)
    current = authenticate(sessions, sign_in(sessions))
    live_other = sign_in(sessions)
    listed, _ = run(sessions.list_live(current, page_size=0, after=None))
    assert {s.id for s in listed} == {current.session.id, live_other.session.id}
    assert rejection(sessions, gone_idle).reason == "idle"

    count = run(sessions.revoke_others(current))

    assert count == 1  # the idle session had already ended: nothing to revoke there


# ---------------------------------------------------------------------------
# Listing


@pytest.mark.parametrize("gap_ms", [SECOND, 0], ids=["distinct_times", "same_millisecond"])
def test_list_live_pages_newest_first_without_duplicates_or_gaps(
    sessions: Sessions, clock: ManualClock, gap_ms: int
) -> None:
    made = []
    for _ in range(7):
        made.append(sign_in(sessions, "sub-lister"))
        clock.advance_ms(gap_ms)
    sign_in(sessions, "sub-someone-else")
    principal = authenticate(sessions, made[-1])
    expected = sorted(made, key=lambda n: (n.session.create_ms, n.session.id), reverse=True)

    pages: list[list[str]] = []
    cursor: SessionCursor | None = None
    while True:
        page, cursor = run(sessions.list_live(principal, page_size=3, after=cursor))
        pages.append([s.id for s in page])
        if cursor is None:
            break
        assert len(pages) < 5, "pagination does not end"

    assert [len(page) for page in pages] == [3, 3, 1]
    listed = [session_id for page in pages for session_id in page]
    assert listed == [n.session.id for n in expected]
    if gap_ms:
        assert listed == [n.session.id for n in reversed(made)]


def test_list_live_leaves_out_revoked_idle_and_too_old_sessions(
    sessions: Sessions, clock: ManualClock
) -> None:
    too_old = sign_in(sessions)
    for _ in range(4):  # kept busy, so that it ends by max age, not by inactivity
        clock.advance_ms(20 * MINUTE)
        authenticate(sessions, too_old)
    clock.advance_ms(5 * MINUTE)  # t0 + 85 min
    gone_idle = sign_in(sessions)
    clock.advance_ms(15 * MINUTE)  # t0 + 100 min
    authenticate(sessions, too_old)
    clock.advance_ms(MINUTE)  # t0 + 101 min
    revoked = sign_in(sessions)
    live = [sign_in(sessions)]
    clock.advance_ms(SECOND)
    live.append(sign_in(sessions))
    principal = authenticate(sessions, live[0])
    run(sessions.revoke(principal, revoked.session.id))
    clock.advance_ms(20 * MINUTE)  # t0 + 121 min: too_old past max age, gone_idle idle 36 min

    page, cursor = run(sessions.list_live(principal, page_size=0, after=None))

    assert [s.id for s in page] == [live[1].session.id, live[0].session.id]
    assert cursor is None
    assert rejection(sessions, too_old).reason == "max_age"
    assert rejection(sessions, gone_idle).reason == "idle"
    assert rejection(sessions, revoked).reason == "revoked"


@pytest.mark.parametrize("page_size", [0, 1, 100])
def test_page_sizes_from_0_to_100_are_accepted(sessions: Sessions, page_size: int) -> None:
    principal = authenticate(sessions, sign_in(sessions))

    page, cursor = run(sessions.list_live(principal, page_size=page_size, after=None))

    assert [s.id for s in page] == [principal.session.id]
    assert cursor is None


@pytest.mark.parametrize("page_size", [101, -1, 10_000])
def test_a_page_size_out_of_range_is_an_invalid_argument(
    sessions: Sessions, page_size: int
) -> None:
    principal = authenticate(sessions, sign_in(sessions))

    with pytest.raises(InvalidArgument) as caught:
        run(sessions.list_live(principal, page_size=page_size, after=None))

    assert caught.value.field == "page_size"
    assert caught.value.message == f"page_size must be between 0 and 100, got {page_size}"
