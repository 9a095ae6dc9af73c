"""Which change makes which event, and the back-off between attempts."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from server.domain.lifecycle import PROFILE_FIELDS, LifecycleEvents, describe, rfc3339
from server.domain.models import User
from server.domain.webhooks import DeliveryPolicy
from tests.support.clock import ManualClock

ANN = User(
    id="usr_ann",
    issuer="https://accounts.google.com",
    subject="110169484474386276334",
    email="ann@example.com",
    email_verified=True,
    display_name="Ann",
    picture_uri="",
    currency_code="EUR",
    time_zone="Europe/Paris",
    locale="fr",
    create_ms=1_767_225_600_000,
    update_ms=1_767_225_600_000,
)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (None, None, None),
        (ANN, ANN, None),
        (ANN, replace(ANN, update_ms=ANN.update_ms + 1), None),  # a touch, not a change
        (ANN, replace(ANN, subject="other"), None),  # never told
        (None, ANN, "user.created"),
        (ANN, replace(ANN, display_name="Ann A."), "user.updated"),
        (ANN, replace(ANN, disabled_ms=5), "user.disabled"),
        (replace(ANN, disabled_ms=5), replace(ANN, disabled_ms=9), None),  # disabled twice
        (replace(ANN, disabled_ms=5), ANN, "user.enabled"),
        (ANN, None, "user.deleted"),
    ],
)
def test_each_change_has_its_event(before: User | None, after: User | None, expected: str) -> None:
    described = describe(before, after)
    assert (described[0] if described else None) == expected


def test_payloads_carry_ids_and_the_change_only() -> None:
    clock = ManualClock()
    events = LifecycleEvents(["https://a/h", "https://b/h"], clock=clock)
    created = events.changed(None, ANN)
    assert [e.endpoint for e in created] == ["https://a/h", "https://b/h"]
    assert created[0].id == created[1].id and created[0].id.startswith("evt_")
    body = json.loads(created[0].payload)
    assert body == {
        "type": "user.created",
        "timestamp": rfc3339(clock.now_ms()),
        "data": {
            "user": {
                "id": "usr_ann",
                **{name: getattr(ANN, name) for name in PROFILE_FIELDS},
                "create_time": "2026-01-01T00:00:00.000Z",
                "update_time": "2026-01-01T00:00:00.000Z",
            }
        },
    }
    assert ANN.subject not in created[0].payload and ANN.issuer not in created[0].payload
    [deleted, _] = events.changed(ANN, None)
    assert json.loads(deleted.payload)["data"] == {"user_id": "usr_ann"}
    assert LifecycleEvents([], clock=clock).changed(None, ANN) == ()


def test_back_off_doubles_with_jitter_up_to_its_cap() -> None:
    policy = DeliveryPolicy(retry_for_ms=60_000, max_backoff_ms=10_000, lease_ms=15_000)
    for attempts, full in [(1, 1000), (2, 2000), (3, 4000), (4, 8000), (5, 10_000), (60, 10_000)]:
        waits = {policy.backoff_ms(attempts) for _ in range(200)}
        assert min(waits) >= full // 2 and max(waits) <= full
        assert len(waits) > 1  # jittered
