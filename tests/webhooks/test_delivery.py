"""Account lifecycle webhooks, end to end on SQLite: the real server, a real receiver that
verifies with the `standardwebhooks` library, real outages and a SIGKILL."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from connectrpc.errors import ConnectError
from protobuf.wkt.google.protobuf.field_mask_pb import FieldMask

from gen.expense.admin.v1.admin_connect import AdminServiceClientSync
from gen.expense.admin.v1.admin_pb import (
    DisableUserRequest,
    EnableUserRequest,
    ListWebhookEventsRequest,
    RedeliverWebhookEventRequest,
    WebhookEvent,
    WebhookEventState,
)
from gen.expense.user.v1.user_pb import (
    DeleteCurrentUserRequest,
    UpdateCurrentUserRequest,
    User,
)
from tests.conftest import server_env
from tests.ops.conftest import ADMIN_TOKEN, AUTHORIZED
from tests.reliability.harness import kill_hard
from tests.support.client import Session, code_of
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.http import request
from tests.support.redis import redis_server
from tests.support.server import RunningServer, start_server
from tests.support.webhooks import Delivery, Receiver, new_secret, post

RETRY_FOR_S = 60
ALL_TYPES = ["user.created", "user.updated", "user.disabled", "user.enabled", "user.deleted"]


def webhook_env(google: FakeGoogle, receiver: Receiver, **extra: str) -> dict[str, str]:
    """A server that sends its events to `receiver`, retrying briefly."""
    return server_env(
        google,
        ADMIN_TOKEN=ADMIN_TOKEN,
        WEBHOOK_URLS=receiver.url,
        WEBHOOK_SECRET=receiver.secret,
        WEBHOOK_TIMEOUT_SECONDS="5",
        WEBHOOK_MAX_BACKOFF_SECONDS="1",
        WEBHOOK_RETRY_FOR_SECONDS=str(RETRY_FOR_S),
        **extra,
    )


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """The expense service's endpoint."""
    running = Receiver(new_secret()).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def clock(tmp_path_factory: pytest.TempPathFactory) -> FileClock:
    """The server's clock: the real time until a test sets it."""
    return FileClock(tmp_path_factory.mktemp("webhook-clock") / "now")


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    google: FakeGoogle,
    receiver: Receiver,
    clock: FileClock,
) -> Iterator[RunningServer]:
    """A server on SQLite with webhooks to `receiver`."""
    running = start_server(
        tmp_path_factory.mktemp("webhooks"), webhook_env(google, receiver), clock=clock
    )
    yield running
    assert running.stop() == 0, running.logs()
    assert "Traceback" not in running.logs()


@pytest.fixture(scope="module")
def admin(server: RunningServer) -> Iterator[AdminServiceClientSync]:
    """The admin client."""
    client = AdminServiceClientSync(server.admin_url)
    yield client
    client.close()


@dataclass
class Person:
    """A Google account and the device it signs in on."""

    sub: str
    email: str
    device: Session
    user_id: str = ""

    def sign_in(self, google: FakeGoogle, **claims: str) -> None:
        """Sign in (creating the user the first time)."""
        response = self.device.sign_in(
            google.token(**{"sub": self.sub, "email": self.email, **claims})
        )
        assert response.user is not None
        self.user_id = response.user.id


def person(server: RunningServer) -> Person:
    """A new account, not signed in yet."""
    # The email is not made from the subject: the test looks for the subject in payloads.
    return Person(
        sub=secrets.token_hex(8),
        email=f"{secrets.token_hex(8)}@example.com",
        device=Session(server.url),
    )


def rename(device: Session, name: str) -> None:
    """UpdateCurrentUser: a new display name."""
    device.call(
        device.users.update_current_user,
        UpdateCurrentUserRequest(
            user=User(display_name=name), update_mask=FieldMask(paths=["display_name"])
        ),
    )


def listed(admin: AdminServiceClientSync, state: WebhookEventState) -> list[WebhookEvent]:
    """Every event of the outbox in `state`, through every page."""
    events: list[WebhookEvent] = []
    token = ""
    while True:
        page = admin.list_webhook_events(
            ListWebhookEventsRequest(state=state, page_size=2, page_token=token),
            headers=AUTHORIZED,
        )
        events += page.events
        token = page.next_page_token
        if not token:
            return events


def wait_until(condition: object, timeout_s: float = 60) -> None:
    """Wait until the callable `condition` returns true."""
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def metric(server: RunningServer, line_start: str) -> float:
    """One sample of the admin listener's /metrics."""
    text = request(server.admin_url, "GET", "/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_users_lifecycle_arrives_in_order_signed_and_without_secrets(
    server: RunningServer, google: FakeGoogle, receiver: Receiver, admin: AdminServiceClientSync
) -> None:
    ann, bob = person(server), person(server)
    ann.sign_in(google)
    bob.sign_in(google)
    ann.sign_in(google, email=f"new-{ann.email}")  # Google reports a new address
    rename(bob.device, "Bob B.")
    rename(ann.device, "Ann A.")
    admin.disable_user(DisableUserRequest(user_id=ann.user_id), headers=AUTHORIZED)
    admin.disable_user(DisableUserRequest(user_id=ann.user_id), headers=AUTHORIZED)  # no change
    admin.enable_user(EnableUserRequest(user_id=ann.user_id), headers=AUTHORIZED)
    ann.sign_in(google)
    ann.device.call(
        ann.device.users.delete_current_user,
        DeleteCurrentUserRequest(google_id_token=google.token(sub=ann.sub, email=ann.email)),
    )
    expected = ["user.created", "user.updated", "user.updated", "user.disabled"]
    expected += ["user.enabled", "user.updated", "user.deleted"]
    receiver.wait_for(lambda r: len(r.events_of(ann.user_id)) == len(expected))
    receiver.wait_for(lambda r: len(r.events_of(bob.user_id)) == 2)
    assert receiver.events_of(ann.user_id) == expected
    assert receiver.events_of(bob.user_id) == ["user.created", "user.updated"]

    mine = [e for e in receiver.events() if ann.user_id in json.dumps(e)]
    created, email, name, disabled, enabled, back, deleted = mine
    assert created["data"]["user"]["id"] == ann.user_id
    assert created["data"]["user"]["email"] == ann.email
    assert email["data"] == {
        "user_id": ann.user_id,
        "changes": {"email": f"new-{ann.email}"},
        "update_time": email["data"]["update_time"],
    }
    assert name["data"]["changes"] == {"display_name": "Ann A."}
    assert disabled["data"]["user_id"] == ann.user_id and "disable_time" in disabled["data"]
    assert enabled["data"] == {"user_id": ann.user_id}
    assert back["data"]["changes"] == {"email": ann.email}
    # A deletion carries the id alone: what the receiver needs to erase the user.
    assert deleted["data"] == {"user_id": ann.user_id}
    assert all(e["id"].startswith("evt_") for e in mine)
    assert len({e["id"] for e in mine}) == len(mine)
    # Never a token, a cookie, a session or the Google subject.
    for delivery in receiver.deliveries:
        body = delivery.body.decode()
        for secret in (ann.sub, bob.sub, "ses_", "expense_session", "google_id_token"):
            assert secret not in body
        assert ann.device.cookie is None or ann.device.cookie.split("=", 1)[1] not in body
    assert set(receiver.verdicts()) <= {"accepted", "duplicate"}
    wait_until(lambda: not listed(admin, WebhookEventState.UNSPECIFIED))


def test_a_receiver_outage_loses_nothing(
    server: RunningServer, google: FakeGoogle, receiver: Receiver, admin: AdminServiceClientSync
) -> None:
    cy = person(server)
    receiver.stop()
    try:
        cy.sign_in(google)
        for i in range(3):
            rename(cy.device, f"Cy {i}")
        # The first event waits for its retry; the others wait behind it (order).
        wait_until(
            lambda: any(
                e.attempt_count >= 2 and e.user_id == cy.user_id
                for e in listed(admin, WebhookEventState.PENDING)
            )
        )
        pending = [e for e in listed(admin, WebhookEventState.PENDING) if e.user_id == cy.user_id]
        assert [e.type for e in pending] == ["user.created"] + ["user.updated"] * 3
        assert "ClientConnectorError" in pending[0].last_error
        assert [e.attempt_count for e in pending[1:]] == [0, 0, 0]
        assert metric(server, 'expense_auth_webhook_events{state="pending"}') >= 4
    finally:
        receiver.start()
    receiver.wait_for(lambda r: len(r.events_of(cy.user_id)) == 4)
    assert receiver.events_of(cy.user_id) == ["user.created"] + ["user.updated"] * 3
    names = [e["data"]["changes"]["display_name"] for e in receiver.events()[-3:]]
    assert names == ["Cy 0", "Cy 1", "Cy 2"]
    assert metric(server, 'expense_auth_webhook_deliveries_total{outcome="failed"}') >= 2


def test_forged_and_replayed_deliveries_are_rejected_by_the_library(
    server: RunningServer,
    google: FakeGoogle,
    receiver: Receiver,
    admin: AdminServiceClientSync,
    clock: FileClock,
) -> None:
    dee = person(server)
    dee.sign_in(google)
    receiver.wait_for(lambda r: r.events_of(dee.user_id) == ["user.created"])
    genuine = next(d for d in receiver.deliveries if dee.user_id in d.body.decode())
    before = len(receiver.events())

    # The same delivery again, within the replay window: verified, and dropped by its id.
    assert sent(receiver, genuine.headers, genuine.body) == (200, "duplicate")
    # Tampered with, or signed with another secret: no matching signature.
    forged_body = genuine.body.replace(dee.email.encode(), b"mallory@example.com")
    unsigned = "rejected: No matching signature found"
    assert sent(receiver, genuine.headers, forged_body) == (400, unsigned)
    other = Receiver(new_secret())
    resigned = {**genuine.headers, "webhook-signature": _sign(other.secret, genuine, forged_body)}
    assert sent(receiver, resigned, forged_body) == (400, unsigned)
    # A genuine signature moved to a new timestamp: the timestamp is signed too.
    moved = {**genuine.headers, "webhook-timestamp": str(int(time.time()) + 1)}
    assert sent(receiver, moved, genuine.body) == (400, unsigned)
    assert len(receiver.events()) == before

    # A delivery signed ten minutes ago (the server's clock set back) is too old, as a
    # captured delivery replayed ten minutes later would be; the retry, signed anew
    # at its own time, goes through. The clock goes forward only once the server has
    # recorded the failed attempt: recorded at the real time, ten minutes after the
    # event was made, the failure would end its retry window (RETRY_FOR_S) and park it.
    try:
        clock.set_ms(int(time.time() * 1000) - 10 * 60_000)
        admin.disable_user(DisableUserRequest(user_id=dee.user_id), headers=AUTHORIZED)
        receiver.wait_for(lambda r: "rejected: Message timestamp too old" in r.verdicts())
        wait_until(
            lambda: any(
                e.type == "user.disabled" and e.attempt_count >= 1
                for e in listed(admin, WebhookEventState.PENDING)
            )
        )
    finally:
        clock.path.unlink(missing_ok=True)
    stale = next(d for d in receiver.deliveries if d.verdict.endswith("too old"))
    assert int(stale.headers["webhook-timestamp"]) < time.time() - 9 * 60
    receiver.wait_for(lambda r: r.events_of(dee.user_id) == ["user.created", "user.disabled"])
    assert sent(receiver, stale.headers, stale.body) == (400, "rejected: Message timestamp too old")


def sent(receiver: Receiver, headers: dict[str, str], body: bytes) -> tuple[int, str]:
    """POST a delivery to the receiver; its answer's status and the receiver's verdict."""
    status = post(receiver.url, headers, body)
    verdict = next(
        d.verdict
        for d in reversed(receiver.deliveries)
        if d.body == body
        and d.headers["webhook-signature"] == headers["webhook-signature"]
        and d.headers["webhook-timestamp"] == headers["webhook-timestamp"]
    )
    return status, verdict


def _sign(secret: str, genuine: Delivery, body: bytes) -> str:
    from datetime import UTC, datetime

    from standardwebhooks import Webhook

    at = datetime.fromtimestamp(int(genuine.headers["webhook-timestamp"]), tz=UTC)
    return Webhook(secret).sign(genuine.headers["webhook-id"], at, body.decode())


def test_an_event_failing_past_its_retry_window_is_parked_listed_and_redelivered(
    server: RunningServer,
    google: FakeGoogle,
    receiver: Receiver,
    admin: AdminServiceClientSync,
    clock: FileClock,
) -> None:
    eve = person(server)
    eve.sign_in(google)
    receiver.wait_for(lambda r: r.events_of(eve.user_id) == ["user.created"])
    clock.freeze()
    receiver.answer_status = 503
    try:
        admin.disable_user(DisableUserRequest(user_id=eve.user_id), headers=AUTHORIZED)
        receiver.wait_for(lambda r: "refused: HTTP 503" in r.verdicts())
        [pending] = [
            e for e in listed(admin, WebhookEventState.PENDING) if e.user_id == eve.user_id
        ]
        with pytest.raises(ConnectError) as refused:
            admin.redeliver_webhook_event(
                RedeliverWebhookEventRequest(event_id=pending.event_id), headers=AUTHORIZED
            )
        assert code_of(refused.value) == "failed_precondition"
        clock.advance(RETRY_FOR_S + 1)
        wait_until(lambda: listed(admin, WebhookEventState.PARKED))
        [parked] = listed(admin, WebhookEventState.PARKED)
        assert (parked.event_id, parked.type, parked.user_id) == (
            pending.event_id,
            "user.disabled",
            eve.user_id,
        )
        assert parked.last_error == "HTTP 503" and parked.attempt_count >= 2
        assert parked.endpoint == receiver.url
        assert metric(server, 'expense_auth_webhook_events{state="parked"}') == 1
        assert metric(server, 'expense_auth_webhook_deliveries_total{outcome="parked"}') == 1
        # Parked, it no longer holds the user's later events back.
        receiver.answer_status = 200
        admin.enable_user(EnableUserRequest(user_id=eve.user_id), headers=AUTHORIZED)
        receiver.wait_for(lambda r: r.events_of(eve.user_id) == ["user.created", "user.enabled"])

        redelivered = admin.redeliver_webhook_event(
            RedeliverWebhookEventRequest(event_id=parked.event_id), headers=AUTHORIZED
        )
        assert [e.state for e in redelivered.events] == [WebhookEventState.PENDING]
        assert redelivered.events[0].attempt_count == 0
        receiver.wait_for(lambda r: r.events_of(eve.user_id)[-1] == "user.disabled")
        assert receiver.events_of(eve.user_id) == [
            "user.created",
            "user.enabled",
            "user.disabled",
        ]
        assert receiver.events()[-1]["id"] == parked.event_id
        wait_until(lambda: not listed(admin, WebhookEventState.UNSPECIFIED))
        assert metric(server, 'expense_auth_webhook_events{state="parked"}') == 0
    finally:
        receiver.answer_status = 200
        clock.path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (RedeliverWebhookEventRequest(event_id="evt_nothing"), "not_found"),
        (RedeliverWebhookEventRequest(event_id=""), "invalid_argument"),
    ],
)
def test_redelivering_what_is_not_there_is_refused(
    admin: AdminServiceClientSync, request_: RedeliverWebhookEventRequest, code: str
) -> None:
    with pytest.raises(ConnectError) as refused:
        admin.redeliver_webhook_event(request_, headers=AUTHORIZED)
    assert code_of(refused.value) == code


def test_a_bad_page_token_is_refused(admin: AdminServiceClientSync) -> None:
    with pytest.raises(ConnectError) as refused:
        admin.list_webhook_events(
            ListWebhookEventsRequest(page_token="forged.token"), headers=AUTHORIZED
        )
    assert code_of(refused.value) == "invalid_argument"
    assert "page_token" in refused.value.message


def test_events_survive_a_sigkill_mid_delivery_and_arrive_once(
    tmp_path: Path, google: FakeGoogle
) -> None:
    receiver = Receiver(new_secret()).start()
    # A timeout longer than the test takes to kill: the first attempt is still on the wire.
    env = {**webhook_env(google, receiver), "WEBHOOK_TIMEOUT_SECONDS": "10"}
    server = start_server(tmp_path, env)
    try:
        fay = person(server)
        receiver.hold.set()  # the first delivery is received, its answer held
        fay.sign_in(google)
        receiver.wait_for(lambda r: len(r.deliveries) == 1)
        rename(fay.device, "Fay 1")
        rename(fay.device, "Fay 2")
        kill_hard(server)  # Envoy, which runs the app, and its parent
    finally:
        receiver.release()
    # The receiver processed the first event, the server never heard so: it sends it
    # again once its lease has run out, then the rest, in order.
    server = start_server(tmp_path, env, data_dir=server.data_dir)
    try:
        receiver.wait_for(lambda r: len(r.events_of(fay.user_id)) == 3)
        fay.device = Session(server.url)  # the new process listens on a new port
        fay.sign_in(google)  # nothing changed: no event
        rename(fay.device, "Fay 3")
        receiver.wait_for(lambda r: len(r.events_of(fay.user_id)) == 4)
        assert receiver.events_of(fay.user_id) == ["user.created"] + ["user.updated"] * 3
        names = [e["data"]["changes"]["display_name"] for e in receiver.events()[1:]]
        assert names == ["Fay 1", "Fay 2", "Fay 3"]
        assert receiver.verdicts()[:2] == ["accepted", "duplicate"]
        assert set(receiver.verdicts()) == {"accepted", "duplicate"}
    finally:
        assert server.stop() == 0, server.logs()
        receiver.stop()
    assert "Traceback" not in server.logs()


def test_two_workers_on_one_file_deliver_each_event_once(
    tmp_path: Path, google: FakeGoogle
) -> None:
    receiver = Receiver(new_secret(), delay_s=0.05).start()  # deliveries overlap
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as redis:
        env = {**webhook_env(google, receiver), "WORKERS": "2", "RATE_LIMIT_STORAGE_URL": redis.url}
        server = start_server(tmp_path, env)
        try:
            people = [person(server) for _ in range(8)]
            for who in people:
                who.sign_in(google)
            for who in people:
                rename(who.device, "Renamed")
                admin_disable(server, who.user_id)
            receiver.wait_for(lambda r: len(r.events()) == 3 * len(people))
            for who in people:
                assert receiver.events_of(who.user_id) == [
                    "user.created",
                    "user.updated",
                    "user.disabled",
                ]
            # Once by the two processes: no duplicate reached the receiver.
            assert receiver.verdicts() == ["accepted"] * 3 * len(people)
        finally:
            assert server.stop() == 0, server.logs()
            receiver.stop()
    assert "Traceback" not in server.logs()


def admin_disable(server: RunningServer, user_id: str) -> None:
    """DisableUser on the server's admin listener."""
    with AdminServiceClientSync(server.admin_url) as client:
        client.disable_user(DisableUserRequest(user_id=user_id), headers=AUTHORIZED)
