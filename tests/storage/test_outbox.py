"""The webhook outbox on both engines: written with the change or not at all, and claimed
head of line per user, one lease at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from server.domain.lifecycle import LifecycleEvents
from server.domain.models import Identity, OutboxEvent, Principal, User
from server.domain.sessions import NewSession, SessionPolicy, Sessions
from server.domain.users import Users
from server.storage.postgres.store import PostgresStore
from server.storage.sqlite import SQLiteStore, migrate
from tests.support import postgres
from tests.support.clock import ManualClock

MINUTE = 60_000
ENDPOINT = "https://expenses.example/hooks"
POLICY = SessionPolicy(idle_ms=30 * MINUTE, max_age_ms=12 * 60 * MINUTE)
Store = SQLiteStore | PostgresStore


def identity(n: int) -> Identity:
    """A Google account."""
    return Identity(
        issuer="https://accounts.google.com",
        subject=f"sub-{n}",
        email=f"user{n}@example.com",
        email_verified=True,
        name=f"User {n}",
        picture="",
        locale="en",
    )


Scenario = Callable[[Store], Awaitable[None]]


@pytest.fixture(params=["sqlite", "postgres"])
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[Scenario], None]]:
    """Runs a scenario against a migrated store of each engine (opened and closed on the
    scenario's own event loop, which the PostgreSQL pool belongs to)."""

    def opened(make: Callable[[], Store]) -> Callable[[Scenario], None]:
        def runner(scenario: Scenario) -> None:
            async def main() -> None:
                store = make()
                try:
                    await scenario(store)
                finally:
                    await store.aclose()

            asyncio.run(main())

        return runner

    if request.param == "sqlite":
        path = tmp_path / "auth.db"
        migrate(path)
        yield opened(lambda: SQLiteStore(path))
        return
    with postgres.database() as url:
        yield opened(
            lambda: PostgresStore(url, pool_size=4, connect_timeout_s=10, statement_timeout_ms=5000)
        )


def principal(new: NewSession) -> Principal:
    """The caller a sign-in made."""
    return Principal(session=new.session, user=new.user)


class Boom(Exception):
    """The event writer failing, inside the change's transaction."""


def failing(before: User | None, after: User | None) -> Sequence[OutboxEvent]:
    """An event writer that fails."""
    raise Boom


def test_a_change_and_its_event_commit_together_or_not_at_all(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(store: Store) -> None:
        clock = ManualClock()
        events = LifecycleEvents([ENDPOINT], clock=clock).changed
        sessions = Sessions(store, clock=clock, policy=POLICY, events=events)
        new = await sessions.sign_in(identity(1), user_agent="")
        assert await store.count_outbox() == {"pending": 1}

        # The event cannot be written: the change is rolled back with it.
        with pytest.raises(Boom):
            await Sessions(store, clock=clock, policy=POLICY, events=failing).sign_in(
                identity(2), user_agent=""
            )
        assert await store.find_user_by_subject("https://accounts.google.com", "sub-2") is None
        with pytest.raises(Boom):
            await store.update_user(
                new.user.id, {"display_name": "Changed"}, now_ms=clock.now_ms(), events=failing
            )
        user = await store.get_user(new.user.id)
        assert user is not None and user.display_name == "User 1"
        assert await store.count_outbox() == {"pending": 1}

        await Users(store, clock=clock, events=events).update(
            principal(new), {"display_name": "Changed"}
        )
        assert await store.count_outbox() == {"pending": 2}

    run(scenario)


def test_only_the_oldest_pending_event_of_a_user_is_claimed_and_by_one_owner(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(store: Store) -> None:
        clock = ManualClock()
        events = LifecycleEvents([ENDPOINT], clock=clock).changed
        sessions = Sessions(store, clock=clock, policy=POLICY, events=events)
        users = Users(store, clock=clock, events=events)
        ann = await sessions.sign_in(identity(1), user_agent="")
        bob = await sessions.sign_in(identity(2), user_agent="")
        await users.update(principal(ann), {"display_name": "Ann 2"})
        now = clock.now_ms()

        async def claim(owner: str) -> list[tuple[str, str]]:
            claimed = await store.claim_outbox(
                now_ms=now, lease_until_ms=now + MINUTE, owner=owner, endpoints=[ENDPOINT], limit=8
            )
            return [(d.event.user_id, d.event.type) for d in claimed]

        first = await claim("a")
        assert first == [(ann.user.id, "user.created"), (bob.user.id, "user.created")]
        assert await claim("b") == []  # leased to a, and ann's update waits behind hers
        [head] = await store.list_outbox(states=["pending"], after_seq=None, limit=1)
        await store.outbox_delivered(head.seq, owner="b")  # not b's lease: nothing happens
        assert await claim("b") == []
        await store.outbox_delivered(head.seq, owner="a")
        assert await claim("b") == [(ann.user.id, "user.updated")]
        # Endpoints this process does not know are not its business.
        assert (
            await store.claim_outbox(
                now_ms=now + 2 * MINUTE,
                lease_until_ms=now + 3 * MINUTE,
                owner="c",
                endpoints=["https://other.example/"],
                limit=8,
            )
            == []
        )

    run(scenario)
