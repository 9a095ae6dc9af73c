"""Account lifecycle events: what the other services are told when a user changes.

A store calls `LifecycleEvents.changed(before, after)` inside the transaction
that makes the change, and writes what it returns into the outbox in that same
transaction (the outbox pattern): a change is never committed without its event,
and no event goes out for a change that was rolled back. The delivery worker
(server/domain/webhooks.py) sends them later.

The payload follows the Standard Webhooks shape (`type`, `timestamp`, `data`)
and carries ids and the change, never a token, a cookie, a session or the
Google subject. A deletion carries the user's id alone: all the receiver needs
to erase what it holds about them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from server.domain.clock import Clock
from server.domain.models import OutboxEvent, User
from server.domain.tokens import new_public_id

USER_CREATED = "user.created"
USER_UPDATED = "user.updated"
USER_DISABLED = "user.disabled"
USER_ENABLED = "user.enabled"
USER_DELETED = "user.deleted"
TYPES = (USER_CREATED, USER_UPDATED, USER_DISABLED, USER_ENABLED, USER_DELETED)

# The profile fields a receiver may keep (and is told about when they change).
PROFILE_FIELDS = (
    "email",
    "email_verified",
    "display_name",
    "picture_uri",
    "currency_code",
    "time_zone",
    "locale",
)

# What a store calls with the user before and after the change (None: absent).
ChangeEvents = Callable[[User | None, User | None], Sequence[OutboxEvent]]


def no_events(before: User | None, after: User | None) -> Sequence[OutboxEvent]:
    """For stores used without webhooks (the CLI, tests of other parts)."""
    return ()


def rfc3339(ms: int) -> str:
    """`2026-11-27T22:13:57.123Z`: the timestamps of the payload."""
    seconds, millis = divmod(ms, 1000)  # integers: a float could round the milliseconds
    return f"{datetime.fromtimestamp(seconds, tz=UTC):%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"


class LifecycleEvents:
    """Turns a change to a user into one outbox event per configured endpoint."""

    def __init__(self, endpoints: Sequence[str], *, clock: Clock) -> None:
        self._endpoints = tuple(endpoints)
        self._clock = clock

    @property
    def enabled(self) -> bool:
        """Whether any endpoint is configured (else nothing is written)."""
        return bool(self._endpoints)

    def changed(self, before: User | None, after: User | None) -> Sequence[OutboxEvent]:
        """The events that report the change from `before` to `after` (see ChangeEvents)."""
        if not self._endpoints:
            return ()
        described = describe(before, after)
        if described is None:
            return ()
        kind, user_id, data = described
        now = self._clock.now_ms()
        body = {"type": kind, "timestamp": rfc3339(now), "data": data}
        payload = json.dumps(body, separators=(",", ":"), sort_keys=True)
        event_id = new_public_id("evt")
        return [
            OutboxEvent(
                id=event_id,
                user_id=user_id,
                type=kind,
                payload=payload,
                endpoint=endpoint,
                create_ms=now,
            )
            for endpoint in self._endpoints
        ]


def describe(before: User | None, after: User | None) -> tuple[str, str, dict[str, Any]] | None:
    """The event type, the user's id and the `data` for a change; None when nothing a
    receiver cares about changed."""
    if after is None:
        if before is None:
            return None
        return USER_DELETED, before.id, {"user_id": before.id}
    if before is None:
        return USER_CREATED, after.id, {"user": _profile(after)}
    if before.disabled_ms is None and after.disabled_ms is not None:
        return (
            USER_DISABLED,
            after.id,
            {"user_id": after.id, "disable_time": rfc3339(after.disabled_ms)},
        )
    if before.disabled_ms is not None and after.disabled_ms is None:
        return USER_ENABLED, after.id, {"user_id": after.id}
    changes = {
        name: getattr(after, name)
        for name in PROFILE_FIELDS
        if getattr(after, name) != getattr(before, name)
    }
    if not changes:
        return None
    return (
        USER_UPDATED,
        after.id,
        {"user_id": after.id, "changes": changes, "update_time": rfc3339(after.update_ms)},
    )


def _profile(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        **{name: getattr(user, name) for name in PROFILE_FIELDS},
        "create_time": rfc3339(user.create_ms),
        "update_time": rfc3339(user.update_ms),
    }
