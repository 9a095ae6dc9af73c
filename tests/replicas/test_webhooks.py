"""Webhooks with two replicas on PostgreSQL: each event is delivered once by the cluster,
not once per replica, and a user's events arrive in order whichever replica made them."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from gen.expense.admin.v1.admin_connect import AdminServiceClientSync
from gen.expense.admin.v1.admin_pb import DisableUserRequest, EnableUserRequest
from gen.expense.user.v1.user_pb import DeleteCurrentUserRequest
from tests.replicas.cluster import (
    ADMIN_HEADERS,
    replica_env,
    start_replicas,
    stop_all,
    wait_for,
)
from tests.support import postgres
from tests.support.client import Session
from tests.support.google import FakeGoogle
from tests.support.http import request
from tests.support.redis import RedisServer
from tests.support.server import RunningServer
from tests.support.webhooks import Receiver, new_secret
from tests.webhooks.test_delivery import rename

USERS = 12


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A receiver slow enough that deliveries overlap between the replicas."""
    running = Receiver(new_secret(), delay_s=0.05).start()
    yield running
    running.stop()


@pytest.fixture
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    google: FakeGoogle,
    redis: RedisServer,
    receiver: Receiver,
) -> Iterator[list[RunningServer]]:
    """Two replicas on a fresh database, both sending to `receiver`."""
    with postgres.database(migrated=False) as url:
        servers = start_replicas(
            tmp_path_factory.mktemp("webhook-replicas"),
            replica_env(
                google,
                database_url=url,
                redis_url=redis.url,
                WEBHOOK_URLS=receiver.url,
                WEBHOOK_SECRET=receiver.secret,
                WEBHOOK_MAX_BACKOFF_SECONDS="1",
            ),
        )
        yield servers
        assert stop_all(servers) == []


def delivered_by(server: RunningServer) -> float:
    """The replica's count of delivered events."""
    text = request(server.admin_url, "GET", "/metrics").body.decode()
    prefix = 'expense_auth_webhook_deliveries_total{outcome="delivered"} '
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def lifecycle(replicas: list[RunningServer], google: FakeGoogle, i: int) -> tuple[str, list[str]]:
    """One user's life, each step on the other replica than the last; their id and the
    event types it must produce."""
    a, b = replicas[i % 2], replicas[(i + 1) % 2]
    sub, email = secrets.token_hex(8), f"{secrets.token_hex(8)}@example.com"
    on_a, on_b = Session(a.url), Session(b.url)
    user = on_a.sign_in(google.token(sub=sub, email=email)).user
    assert user is not None
    on_b.sign_in(google.token(sub=sub, email=email))
    rename(on_b, f"Name {i}.1")
    rename(on_a, f"Name {i}.2")
    expected = ["user.created", "user.updated", "user.updated"]
    with (
        AdminServiceClientSync(b.admin_url) as admin_b,
        AdminServiceClientSync(a.admin_url) as admin_a,
    ):
        admin_b.disable_user(DisableUserRequest(user_id=user.id), headers=ADMIN_HEADERS)
        admin_a.enable_user(EnableUserRequest(user_id=user.id), headers=ADMIN_HEADERS)
    expected += ["user.disabled", "user.enabled"]
    if i % 3 == 0:
        on_b.sign_in(google.token(sub=sub, email=email))
        on_b.call(
            on_b.users.delete_current_user,
            DeleteCurrentUserRequest(google_id_token=google.token(sub=sub, email=email)),
        )
        expected.append("user.deleted")
    return user.id, expected


def test_each_event_is_delivered_once_by_the_cluster_in_order_per_user(
    replicas: list[RunningServer], google: FakeGoogle, receiver: Receiver
) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        lives = list(pool.map(lambda i: lifecycle(replicas, google, i), range(USERS)))
    total = sum(len(expected) for _, expected in lives)
    receiver.wait_for(lambda r: len(r.events()) == total, timeout_s=120)
    for user_id, expected in lives:
        assert receiver.events_of(user_id) == expected
    # Once by the cluster: no duplicate ever reached the receiver, and the replicas'
    # delivered counts add up to the number of events.
    assert receiver.verdicts() == ["accepted"] * total
    # (A replica counts a delivery once the receiver's answer is back and recorded.)
    wait_for("the replicas' counts", lambda: sum(map(delivered_by, replicas)) >= total)
    counts = [delivered_by(server) for server in replicas]
    assert sum(counts) == total, counts
