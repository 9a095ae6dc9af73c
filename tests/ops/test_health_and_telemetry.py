"""Health probes, Prometheus metrics and OpenTelemetry export on the real server."""

from __future__ import annotations

import json
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from connectrpc.errors import ConnectError
from prometheus_client.parser import text_string_to_metric_families

from gen.expense.admin.v1.admin_connect import AdminServiceClientSync
from gen.expense.admin.v1.admin_pb import ListUsersRequest
from gen.expense.auth.v1.auth_pb import GetSessionRequest, SignInRequest, SignOutRequest
from gen.expense.user.v1.user_pb import ExportCurrentUserDataRequest
from tests.conftest import server_env
from tests.ops.conftest import ADMIN_TOKEN, AUTHORIZED, GRPCURL_RPC_ERROR, Grpcurl
from tests.support.client import Session, code_of
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.http import connect_post, request
from tests.support.server import RunningServer, start_server

SIGN_IN = "/expense.auth.v1.AuthService/SignIn"
GET_SESSION = "/expense.auth.v1.AuthService/GetSession"
EXPORT = "/expense.user.v1.UserService/ExportCurrentUserData"
NOT_FOUND = 5

SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-site",
}


@pytest.fixture(scope="module")
def clock(tmp_path_factory: pytest.TempPathFactory) -> FileClock:
    """The metered server's clock, stopped at the start of every rate-limit window (so
    that the export limit's count is exact) until a test moves it."""
    return FileClock(tmp_path_factory.mktemp("metered-clock") / "now").freeze()


@pytest.fixture(scope="module")
def metered(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle, clock: FileClock
) -> Iterator[RunningServer]:
    """A server without OTEL_* variables; exports are limited to one an hour per user."""
    running = start_server(
        tmp_path_factory.mktemp("metered"),
        server_env(
            google,
            ADMIN_TOKEN=ADMIN_TOKEN,
            RATE_LIMIT_EXPORT_PER_USER="1/hour",
            TEST_CLOCK_FILE=str(clock.path),
        ),
        app="tests.support.clock_app:app",
    )
    yield running
    assert running.stop() == 0, running.logs()


def wait_for_log(server: RunningServer, fragment: str, *, timeout_s: float = 10) -> None:
    """Wait until the server has logged `fragment`."""
    deadline = time.monotonic() + timeout_s
    while fragment not in server.logs():
        assert time.monotonic() < deadline, f"{fragment!r} never logged:\n{server.logs()[-2000:]}"
        time.sleep(0.02)


def closed_port() -> int:
    """A local port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def keyless(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle
) -> Iterator[RunningServer]:
    """A server that cannot get any keys to verify ID tokens with (and has none cached)."""
    running = start_server(
        tmp_path_factory.mktemp("keyless"),
        server_env(
            google,
            DEV_IDENTITY_ENABLED="false",
            GOOGLE_CERTS_URL=f"http://127.0.0.1:{closed_port()}/oauth2/v1/certs",
        ),
    )
    yield running
    assert running.stop() == 0, running.logs()


def sign_in(server: RunningServer, google: FakeGoogle, sub: str = "") -> Session:
    """A new session (for a new account unless `sub` is given)."""
    device = Session(server.url)
    sub = sub or secrets.token_hex(8)
    device.sign_in(google.token(sub=sub, email=f"{sub}@example.com"))
    return device


# --- Health --------------------------------------------------------------------------------


def test_healthz_says_the_process_is_alive(metered: RunningServer) -> None:
    for url in (metered.url, metered.admin_url):
        response = request(url, "GET", "/healthz")
        assert response.status == 200, url
        assert response.json() == {"status": "alive"}


def test_readyz_reports_each_check_with_the_security_headers(metered: RunningServer) -> None:
    response = request(metered.url, "GET", "/readyz")

    assert response.status == 200, response.body
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "shutdown": "ok"},
        "dependencies": {"identity_keys": "ok", "rate_limit_storage": "ok"},
    }
    assert response.header("content-type") == "application/json"
    for name, value in SECURITY_HEADERS.items():
        assert response.header(name) == value, name


@pytest.mark.interop
@pytest.mark.parametrize(
    "service", ["", "expense.auth.v1.AuthService", "expense.user.v1.UserService"]
)
def test_grpc_health_is_serving(metered: RunningServer, grpcurl: Grpcurl, service: str) -> None:
    result = grpcurl(
        metered.address,
        "grpc.health.v1.Health/Check",
        flags=["-d", json.dumps({"service": service})],
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


@pytest.mark.interop
def test_grpc_health_does_not_know_other_services(metered: RunningServer, grpcurl: Grpcurl) -> None:
    result = grpcurl(
        metered.address,
        "grpc.health.v1.Health/Check",
        flags=["-d", json.dumps({"service": "expense.admin.v1.AdminService"})],
    )
    assert result.returncode == GRPCURL_RPC_ERROR + NOT_FOUND, result.stderr


@pytest.mark.interop
def test_without_identity_keys_the_server_stays_ready_and_says_why_sign_in_fails(
    keyless: RunningServer, grpcurl: Grpcurl
) -> None:
    """Existing sessions keep working without Google's keys: a Google outage during a
    rollout must not mark every replica unready. The keys are reported, not gated on."""
    assert request(keyless.url, "GET", "/healthz").status == 200

    for _ in range(2):  # still honest when asked again (a failed fetch is not cached as keys)
        response = request(keyless.url, "GET", "/readyz")
        assert response.status == 200, response.body
        body = response.json()
        assert body["status"] == "ready"
        assert body["checks"] == {"database": "ok", "shutdown": "ok"}
        assert body["dependencies"]["identity_keys"].startswith("unavailable: no keys")
        assert response.header("cache-control") == "no-store"

    for service in ("", "expense.auth.v1.AuthService"):
        result = grpcurl(
            keyless.address,
            "grpc.health.v1.Health/Check",
            flags=["-d", json.dumps({"service": service})],
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"status": "SERVING"}, service


# --- Prometheus ----------------------------------------------------------------------------

Labels = frozenset[tuple[str, str]]


class Scrape:
    """One scrape of `/metrics` on the admin listener."""

    def __init__(self, server: RunningServer) -> None:
        response = request(server.admin_url, "GET", "/metrics")  # no credential needed
        assert response.status == 200, response.body
        assert (response.header("content-type") or "").startswith("text/plain; version=0.0.4")
        self.text = response.body.decode()
        self.samples: dict[tuple[str, Labels], float] = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 when it has not been produced yet."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("expense_auth_rpc_duration_seconds", "histogram"),
        ("expense_auth_sign_ins_total", "counter"),
        ("expense_auth_rate_limited_total", "counter"),
        ("expense_auth_active_sessions", "gauge"),
        ("expense_auth_cookie_old_key_verifications_total", "counter"),
    ],
)
def test_metrics_are_exposed_under_their_names(
    metered: RunningServer, name: str, kind: str
) -> None:
    assert f"\n# TYPE {name} {kind}\n" in Scrape(metered).text


def test_metrics_are_not_on_the_public_port(metered: RunningServer) -> None:
    for headers in ({}, AUTHORIZED):
        response = request(metered.url, "GET", "/metrics", headers=headers)
        assert response.status == 404, response.body


def test_rpc_duration_is_labelled_by_procedure_and_code(
    metered: RunningServer, google: FakeGoogle
) -> None:
    before = Scrape(metered)
    device = sign_in(metered, google)
    device.call(device.auth.get_session, GetSessionRequest())
    for _ in range(2):
        assert connect_post(metered.url, GET_SESSION, {}).status == 401
    admin = AdminServiceClientSync(metered.admin_url)
    try:
        admin.list_users(ListUsersRequest(page_size=1), headers=AUTHORIZED)
    finally:
        admin.close()

    after = Scrape(metered)
    count = "expense_auth_rpc_duration_seconds_count"
    for procedure, code, calls in [
        (SIGN_IN, "ok", 1),
        (GET_SESSION, "ok", 1),
        (GET_SESSION, "unauthenticated", 2),
        ("/expense.admin.v1.AdminService/ListUsers", "ok", 1),
    ]:
        delta = after.value(count, procedure=procedure, code=code) - before.value(
            count, procedure=procedure, code=code
        )
        assert delta == calls, (procedure, code)
    slowest = after.value(
        "expense_auth_rpc_duration_seconds_bucket", procedure=SIGN_IN, code="ok", le="+Inf"
    )
    assert slowest == after.value(count, procedure=SIGN_IN, code="ok")
    assert after.value("expense_auth_rpc_duration_seconds_sum", procedure=SIGN_IN, code="ok") > 0


def test_sign_ins_are_counted_by_result(metered: RunningServer, google: FakeGoogle) -> None:
    before = Scrape(metered)
    for _ in range(3):
        sign_in(metered, google)
    expired = google.token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    assert connect_post(metered.url, SIGN_IN, {"googleIdToken": expired}).status == 401

    after = Scrape(metered)
    name = "expense_auth_sign_ins_total"
    assert after.value(name, result="ok") - before.value(name, result="ok") == 3
    assert (
        after.value(name, result="unauthenticated") - before.value(name, result="unauthenticated")
        == 1
    )


def test_rate_limit_refusals_are_counted(metered: RunningServer, google: FakeGoogle) -> None:
    device = sign_in(metered, google)
    before = Scrape(metered)
    device.call(device.users.export_current_user_data, ExportCurrentUserDataRequest())
    with pytest.raises(ConnectError) as err:
        device.call(device.users.export_current_user_data, ExportCurrentUserDataRequest())
    assert code_of(err.value) == "resource_exhausted"

    after = Scrape(metered)
    name = "expense_auth_rate_limited_total"
    assert after.value(name, procedure=EXPORT) - before.value(name, procedure=EXPORT) == 1


def test_active_sessions_follow_sign_ins_sign_outs_and_idling(
    metered: RunningServer, google: FakeGoogle, clock: FileClock
) -> None:
    name = "expense_auth_active_sessions"
    before = Scrape(metered).value(name)
    devices = [sign_in(metered, google) for _ in range(3)]
    assert Scrape(metered).value(name) == before + 3

    devices[0].call(devices[0].auth.sign_out, SignOutRequest())
    assert Scrape(metered).value(name) == before + 2

    try:
        # Past the idle timeout (30 minutes by default) no session is live any more.
        clock.set_ms(clock.now_ms() + 31 * 60 * 1000)
        assert Scrape(metered).value(name) == 0
    finally:
        clock.path.unlink(missing_ok=True)  # back to the real time for the other tests


def test_key_rotation_is_observable(tmp_path: Path, google: FakeGoogle) -> None:
    old_key, new_key = secrets.token_urlsafe(40), secrets.token_urlsafe(40)
    first = start_server(
        tmp_path, server_env(google, ADMIN_TOKEN=ADMIN_TOKEN, SESSION_SECRET_KEY=old_key)
    )
    try:
        old_device = sign_in(first, google)
        assert Scrape(first).value("expense_auth_active_sessions") == 1  # a fresh database
    finally:
        assert first.stop() == 0, first.logs()

    # The same DATA_DIR, now signing with a new key and still accepting the old one.
    rotated = start_server(
        tmp_path,
        server_env(google, ADMIN_TOKEN=ADMIN_TOKEN, SESSION_SECRET_KEY=f"{old_key},{new_key}"),
    )
    try:
        name = "expense_auth_cookie_old_key_verifications_total"
        scrape = Scrape(rotated)
        assert scrape.value(name) == 0
        assert scrape.value("expense_auth_active_sessions") == 1  # it survived the restart

        new_device = sign_in(rotated, google)
        new_device.call(new_device.auth.get_session, GetSessionRequest())
        assert Scrape(rotated).value(name) == 0  # new-key cookies do not count

        old_cookie = old_device.cookie or ""
        response = connect_post(rotated.url, GET_SESSION, {}, headers={"cookie": old_cookie})
        assert response.status == 200, response.body
        assert Scrape(rotated).value(name) >= 1
        assert Scrape(rotated).value("expense_auth_active_sessions") == 2
    finally:
        assert rotated.stop() == 0, rotated.logs()


# --- OpenTelemetry -------------------------------------------------------------------------

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


def exported(server: RunningServer) -> list[dict[str, Any]]:
    """The JSON documents the console exporters wrote among the server's log lines."""
    text = server.logs()
    decoder = json.JSONDecoder()
    documents: list[dict[str, Any]] = []
    for start in re.finditer(r"^\{$", text, re.M):
        try:
            document, _ = decoder.raw_decode(text, start.start())
        except json.JSONDecodeError:
            continue  # another line landed inside it; the next export repeats metrics
        documents.append(document)
    return documents


def spans(server: RunningServer) -> list[dict[str, Any]]:
    """Exported spans."""
    return [d for d in exported(server) if "context" in d and "name" in d]


def duration_points(server: RunningServer) -> list[dict[str, Any]]:
    """Data points of the exported `rpc.server.call.duration` metric."""
    return [
        point
        for document in exported(server)
        for resource in document.get("resource_metrics", [])
        for scope in resource["scope_metrics"]
        for metric in scope["metrics"]
        if metric["name"] == "rpc.server.call.duration"
        for point in metric["data"]["data_points"]
    ]


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle) -> Iterator[RunningServer]:
    """A server exporting traces and metrics to its stdout, metrics every half second."""
    running = start_server(
        tmp_path_factory.mktemp("traced"),
        server_env(
            google,
            OTEL_TRACES_EXPORTER="console",
            OTEL_METRICS_EXPORTER="console",
            OTEL_METRIC_EXPORT_INTERVAL="500",
        ),
    )
    yield running
    assert running.stop() == 0, running.logs()


def test_spans_and_the_duration_metric_are_exported(
    traced: RunningServer, google: FakeGoogle
) -> None:
    token = google.token(sub=secrets.token_hex(8))
    device = Session(traced.url)
    device.call(
        device.auth.sign_in,
        SignInRequest(google_id_token=token),
        headers={**device.headers, "traceparent": TRACEPARENT},
    )
    device.call(device.auth.get_session, GetSessionRequest())
    assert connect_post(traced.url, GET_SESSION, {}).status == 401

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        points = duration_points(traced)
        methods = {p["attributes"].get("rpc.method") for p in points}
        if {SIGN_IN[1:], GET_SESSION[1:]} <= methods:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"no rpc.server.call.duration for the calls in:\n{traced.logs()}")

    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in spans(traced):
        by_name.setdefault(span["name"], []).append(span)
    (signed_in,) = by_name[SIGN_IN[1:]]
    # The caller's W3C trace context is continued.
    assert signed_in["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert signed_in["parent_id"] == f"0x{PARENT_SPAN_ID}"
    assert signed_in["kind"] == "SpanKind.SERVER"

    ok, refused = sorted(by_name[GET_SESSION[1:]], key=lambda s: "error.type" in s["attributes"])
    for span in (ok, refused):
        assert re.fullmatch(r"0x[0-9a-f]{32}", span["context"]["trace_id"])
        assert span["context"]["trace_id"] != f"0x{TRACE_ID}"  # a trace of its own
        assert span["parent_id"] is None
    assert ok["context"]["trace_id"] != refused["context"]["trace_id"]
    assert refused["attributes"]["rpc.response.status_code"] == "unauthenticated"

    point = next(p for p in duration_points(traced) if p["attributes"]["rpc.method"] == SIGN_IN[1:])
    assert point["count"] >= 1 and point["sum"] > 0

    # Neither the ID token nor the session cookie ends up in spans, metrics or logs.
    logs = traced.logs()
    assert "telemetry on" in logs
    assert token not in logs
    assert all(value not in logs for value in device.jar.values())


def test_nothing_is_exported_without_otel_variables(
    metered: RunningServer, google: FakeGoogle
) -> None:
    device = sign_in(metered, google)
    device.call(device.auth.get_session, GetSessionRequest())
    wait_for_log(metered, "AuthService/GetSession")

    assert "OTEL" not in " ".join(metered.env)
    # No SDK was set up: nothing could export later either.
    assert "telemetry off" in metered.logs() and "telemetry on" not in metered.logs()
    assert exported(metered) == []
    logs = metered.logs()
    assert "trace_id" not in logs
    assert "rpc.server.call.duration" not in logs
