"""Error tracking (SENTRY_DSN) on the real server, against a local Sentry ingest.

The server's own Sentry SDK sends over HTTP to tests/support/sentry.py. The
unexpected error is a real one: a user row whose `create_ms` lies past year 9999
(as a bad restore or a hand edit could leave it) has no JSON form, so the
response to GetCurrentUser cannot be encoded. A backup job whose BACKUP_DIR is a
file fails for real too.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from starlette.types import Message, Receive, Scope, Send

from server.config import load_config
from server.ops import error_tracking
from server.rpc.errors import INTERNAL_MESSAGE
from tests.conftest import server_env
from tests.support.client import cookie_from
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.http import Response, connect_post, request
from tests.support.sentry import FakeSentry
from tests.support.server import RunningServer, start_server

SIGN_IN = "/expense.auth.v1.AuthService/SignIn"
GET_USER = "/expense.user.v1.UserService/GetCurrentUser"
UPDATE_USER = "/expense.user.v1.UserService/UpdateCurrentUser"
EXPORT = "/expense.user.v1.UserService/ExportCurrentUserData"
# 1 January 10000, in epoch milliseconds: no RFC 3339 timestamp can say it.
PAST_YEAR_9999_MS = 253_402_300_800_000


@pytest.fixture
def sentry() -> Iterator[FakeSentry]:
    fake = FakeSentry().start()
    yield fake
    fake.stop()


def signed_in(server: RunningServer, token: str) -> str:
    """The Cookie header of a fresh session for `token`."""
    reply = connect_post(server.url, SIGN_IN, {"googleIdToken": token})
    assert reply.status == 200, reply.body
    name, value = cookie_from(reply.header("set-cookie") or "")
    return f"{name}={value}"


def corrupt_creation_time(server: RunningServer, email: str) -> None:
    """Give the user a creation time past year 9999, beside the running server."""
    with closing(sqlite3.connect(server.data_dir / "expense-auth.db")) as db, db:
        db.execute("UPDATE users SET create_ms = ? WHERE email = ?", (PAST_YEAR_9999_MS, email))


def code(reply: Response) -> str:
    return str(reply.json().get("code", "ok")) if reply.status != 200 else "ok"


def by_tag(events: list[dict[str, Any]], name: str) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        grouped.setdefault(event.get("tags", {}).get(name, ""), []).append(event)
    return grouped


def test_unexpected_errors_and_a_failed_job_are_reported_once_each_and_scrubbed(
    tmp_path: Path, google: FakeGoogle, sentry: FakeSentry
) -> None:
    session_key = secrets.token_urlsafe(48)
    admin_token = secrets.token_urlsafe(32)
    in_the_way = tmp_path / "not-a-directory"
    in_the_way.write_text("a file where BACKUP_DIR should be")
    server = start_server(
        tmp_path,
        server_env(
            google,
            SENTRY_DSN=sentry.dsn,
            SENTRY_ENVIRONMENT="proof",
            SESSION_SECRET_KEY=session_key,
            ADMIN_TOKEN=admin_token,
            BACKUP_DIR=str(in_the_way),
            BACKUP_INTERVAL_SECONDS="3600",
            RATE_LIMIT_EXPORT_PER_USER="1/hour",
        ),
        clock=FileClock(tmp_path / "now").freeze(),  # no hour's edge between the exports
    )
    email = "sentry-proof@example.com"
    token = google.token(email=email, sub="sentry-proof")
    try:
        # The backup job fails once at start: one event, tagged with the job.
        (job_event,) = sentry.wait_for_events(1)
        assert job_event["tags"] == {"job": "backup"}, job_event

        # Expected errors are answers, not bugs: none is reported.
        assert code(connect_post(server.url, SIGN_IN, {"googleIdToken": "x.y.z"})) in (
            "unauthenticated",
            "invalid_argument",
        )
        assert code(connect_post(server.url, GET_USER, {})) == "unauthenticated"
        cookie = signed_in(server, token)
        bad_zone = {"user": {"timeZone": "Mars/Olympus"}, "updateMask": "timeZone"}
        reply = connect_post(server.url, UPDATE_USER, bad_zone, {"cookie": cookie})
        assert code(reply) == "invalid_argument"
        assert code(connect_post(server.url, EXPORT, {}, {"cookie": cookie})) == "ok"
        assert code(connect_post(server.url, EXPORT, {}, {"cookie": cookie})) == (
            "resource_exhausted"
        )
        # A known fault: another process holds the database's write lock.
        with closing(sqlite3.connect(server.data_dir / "expense-auth.db")) as holder:
            holder.execute("BEGIN IMMEDIATE")
            good_zone = {"user": {"timeZone": "Europe/Paris"}, "updateMask": "timeZone"}
            reply = connect_post(server.url, UPDATE_USER, good_zone, {"cookie": cookie})
            holder.rollback()
        assert code(reply) == "unavailable" and reply.header("retry-after"), reply.body

        # Two unexpected errors, with every secret a request can carry.
        corrupt_creation_time(server, email)
        credentials = {"cookie": cookie, "authorization": f"Bearer {token}"}
        for request_id in ("proof-1", "proof-2"):
            reply = connect_post(
                server.url, GET_USER, {}, {**credentials, "x-request-id": request_id}
            )
            # The client still gets the clean error, with the id to quote.
            assert reply.status == 500, reply.body
            assert reply.json() == {"code": "internal", "message": INTERNAL_MESSAGE}
            assert reply.header("x-request-id") == request_id

        # The server stays up and serves everyone else.
        other = signed_in(server, google.token(email="other@example.com", sub="sentry-other"))
        assert code(connect_post(server.url, GET_USER, {}, {"cookie": other})) == "ok"
        assert request(server.url, "GET", "/healthz").status == 200
    finally:
        assert server.stop() == 0, server.logs()  # flushes what is queued

    events = sentry.events()
    assert sentry.refused == []
    grouped = by_tag(events, "request_id")
    assert sorted(grouped) == ["", "proof-1", "proof-2"], events
    assert len(events) == 3, [e.get("tags") for e in events]
    for request_id in ("proof-1", "proof-2"):
        (event,) = grouped[request_id]
        (exception,) = event["exception"]["values"]
        assert exception["type"] == "ValueError"
        assert event["environment"] == "proof"
        assert event["release"].startswith("expense-auth@")
        assert "request" not in event and "user" not in event
        frames = exception["stacktrace"]["frames"]
        assert frames and all("vars" not in frame for frame in frames)
        assert not event.get("breadcrumbs", {}).get("values")

    cookie_value = cookie.partition("=")[2]
    leaks = {
        "the session cookie": cookie_value,
        "the ID token": token,
        "the ID token's signature": token.rsplit(".", 1)[1],
        "the Authorization header": f"Bearer {token}",
        "the user's email": email,
        "SESSION_SECRET_KEY": session_key,
        "ADMIN_TOKEN": admin_token,
    }
    assert len(sentry.envelopes) >= 3
    for envelope in sentry.envelopes:
        for name, secret in leaks.items():
            for data in (envelope.wire, envelope.body):
                assert secret.encode() not in data, f"{name} was sent to Sentry"
    # The check looks at the right bytes: the exception and the request id are there.
    sent = b"".join(envelope.body for envelope in sentry.envelopes)
    assert b"timestamp seconds out of range" in sent and b"proof-1" in sent


def test_events_queued_at_shutdown_are_flushed_before_the_process_ends(
    tmp_path: Path, google: FakeGoogle
) -> None:
    """Sentry answers slowly, so the second event is still queued in the SDK when
    SIGTERM arrives; the drain sends it before the worker exits."""
    sentry = FakeSentry(answer_after_s=3).start()
    server = start_server(
        tmp_path,
        server_env(google, SENTRY_DSN=sentry.dsn, SENTRY_SHUTDOWN_TIMEOUT_SECONDS="20"),
    )
    try:
        email = "sentry-flush@example.com"
        cookie = signed_in(server, google.token(email=email, sub="sentry-flush"))
        corrupt_creation_time(server, email)
        for request_id in ("queued-1", "queued-2"):
            reply = connect_post(
                server.url, GET_USER, {}, {"cookie": cookie, "x-request-id": request_id}
            )
            assert code(reply) == "internal", reply.body
        assert len(sentry.events()) < 2  # the second waits for Sentry's first answer
    finally:
        assert server.stop() == 0, server.logs()
        sentry.stop()
    assert sorted(e["tags"]["request_id"] for e in sentry.events()) == ["queued-1", "queued-2"]


def test_what_escapes_an_application_is_reported_scrubbed_and_raised_as_before(
    tmp_path: Path, sentry: FakeSentry
) -> None:
    """The outermost layer, with the real SDK set up as the server sets it up (here in
    the test's process), around an application that fails with secrets in its message."""
    secret = secrets.token_urlsafe(32)
    config = load_config({"SENTRY_DSN": sentry.dsn, "DATA_DIR": str(tmp_path)}, env_file=None)
    tracker = error_tracking.start(config, secrets=[secret])
    try:

        async def broken(scope: Scope, receive: Receive, send: Send) -> None:
            raise LookupError(f"no route for {secret} (ann@example.com)")

        async def nothing() -> Message:
            return {"type": "http.disconnect"}

        async def ignore(message: Message) -> None:
            return None

        headers = [(b"x-request-id", b"escape-1"), (b"cookie", f"s={secret}".encode())]
        app = tracker.around(broken, listener="public")

        async def call() -> None:
            await app({"type": "http", "path": "/x", "headers": headers}, nothing, ignore)

        with pytest.raises(LookupError):
            asyncio.run(call())
        asyncio.run(tracker.flush())
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
    (event,) = sentry.events()
    assert event["tags"] == {"listener": "public", "scope": "http", "request_id": "escape-1"}
    (exception,) = event["exception"]["values"]
    assert exception["type"] == "LookupError"
    assert exception["value"] == "no route for [Filtered:secret] ([Filtered:email])"
    for envelope in sentry.envelopes:
        assert secret.encode() not in envelope.body and b"ann@example.com" not in envelope.body
