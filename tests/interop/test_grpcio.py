"""The gRPC reference implementation (grpcio) as client, with stubs generated at test time."""

from __future__ import annotations

import importlib
import importlib.util
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.conftest import require_tool
from tests.interop.tools import PROTO_DIR, REPO, assert_session_cookie, cookie_pair, new_sub
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer

pytestmark = pytest.mark.interop

TIMEOUT_S = 10
EXPENSE_PROTOS = ("expense/auth/v1/auth.proto", "expense/user/v1/user.proto")
HEALTH_PROTO = "grpc/health/v1/health.proto"


@dataclass(frozen=True)
class Stubs:
    """The grpcio-generated modules (untyped, hence Any)."""

    auth_pb2: Any
    auth_grpc: Any
    user_pb2: Any
    user_grpc: Any
    health_pb2: Any


def protoc(out: Path, *protos: str) -> None:
    out.mkdir(parents=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *(str(PROTO_DIR / proto) for proto in protos),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def load_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stubs]:
    """google.protobuf + grpc stubs for the three protos, generated now by grpc_tools.protoc."""
    if importlib.util.find_spec("grpc_tools") is None:
        require_tool(None, "grpcio-tools")
    root = tmp_path_factory.mktemp("grpcio-stubs")
    protoc(root / "expense", *EXPENSE_PROTOS)
    # The health stubs live in a `grpc.health.v1` package, which would shadow the real
    # `grpc` module on sys.path: generate them apart and load the message module by file.
    protoc(root / "health", HEALTH_PROTO)
    sys.path.insert(0, str(root / "expense"))
    try:
        yield Stubs(
            auth_pb2=importlib.import_module("expense.auth.v1.auth_pb2"),
            auth_grpc=importlib.import_module("expense.auth.v1.auth_pb2_grpc"),
            user_pb2=importlib.import_module("expense.user.v1.user_pb2"),
            user_grpc=importlib.import_module("expense.user.v1.user_pb2_grpc"),
            health_pb2=load_file(
                "interop_grpcio_health_pb2", root / "health" / "grpc/health/v1/health_pb2.py"
            ),
        )
    finally:
        sys.path.remove(str(root / "expense"))


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def sign_in(stubs: Stubs, channel: grpc.Channel, google: FakeGoogle) -> tuple[Any, list[Any]]:
    """SignIn over gRPC; returns (response, metadata carrying the session cookie)."""
    sub = new_sub()
    auth = stubs.auth_grpc.AuthServiceStub(channel)
    request = stubs.auth_pb2.SignInRequest(
        google_id_token=google.token(sub=sub, email=f"{sub}@example.com")
    )
    response, call = auth.SignIn.with_call(request, timeout=TIMEOUT_S)
    set_cookies = [value for key, value in call.initial_metadata() if key == "set-cookie"]
    assert len(set_cookies) == 1, call.initial_metadata()
    assert_session_cookie(set_cookies[0])
    return response, [("cookie", cookie_pair(set_cookies[0]))]


def test_health_check_over_grpcio(stubs: Stubs, channel: grpc.Channel) -> None:
    health = stubs.health_pb2
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health.HealthCheckRequest.SerializeToString,
        response_deserializer=health.HealthCheckResponse.FromString,
    )

    response = check(
        health.HealthCheckRequest(service="expense.auth.v1.AuthService"), timeout=TIMEOUT_S
    )
    assert response.status == health.HealthCheckResponse.SERVING

    with pytest.raises(grpc.RpcError) as err:
        check(health.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_sign_in_cookie_in_initial_metadata_opens_get_session(
    stubs: Stubs, channel: grpc.Channel, google: FakeGoogle
) -> None:
    signed_in, metadata = sign_in(stubs, channel, google)
    auth = stubs.auth_grpc.AuthServiceStub(channel)
    users = stubs.user_grpc.UserServiceStub(channel)

    got = auth.GetSession(stubs.auth_pb2.GetSessionRequest(), metadata=metadata, timeout=TIMEOUT_S)
    assert got.user == signed_in.user
    assert got.session.id == signed_in.session.id
    assert got.session.current
    assert got.session.user_agent.startswith("grpc-python")
    assert got.session.expire_time.ToMilliseconds() > got.session.create_time.ToMilliseconds()

    me = users.GetCurrentUser(
        stubs.user_pb2.GetCurrentUserRequest(), metadata=metadata, timeout=TIMEOUT_S
    )
    assert me.user.id == signed_in.user.id


def test_calls_without_a_cookie_are_unauthenticated(stubs: Stubs, channel: grpc.Channel) -> None:
    auth = stubs.auth_grpc.AuthServiceStub(channel)

    with pytest.raises(grpc.RpcError) as err:
        auth.GetSession(stubs.auth_pb2.GetSessionRequest(), timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "sign in" in err.value.details()


def test_update_current_user_applies_the_field_mask(
    stubs: Stubs, channel: grpc.Channel, google: FakeGoogle
) -> None:
    signed_in, metadata = sign_in(stubs, channel, google)
    users = stubs.user_grpc.UserServiceStub(channel)
    request = stubs.user_pb2.UpdateCurrentUserRequest(
        user=stubs.user_pb2.User(display_name="Ada L.", time_zone="Europe/Paris", email="no"),
        update_mask={"paths": ["display_name", "time_zone"]},
    )

    updated = users.UpdateCurrentUser(request, metadata=metadata, timeout=TIMEOUT_S)

    assert updated.user.id == signed_in.user.id
    assert (updated.user.display_name, updated.user.time_zone) == ("Ada L.", "Europe/Paris")
    assert updated.user.email == signed_in.user.email  # not in the mask: unchanged


@pytest.mark.parametrize(
    ("user", "paths", "expected"),
    [
        pytest.param(
            {"email": "x@example.com"}, ["email"],
            ["update_mask", "'email'", "cannot be changed", "display_name"], id="read-only-field",
        ),
        pytest.param({}, [], ["update_mask must name at least one field"], id="empty-mask"),
        pytest.param(
            {"currency_code": "ZZZ"}, ["currency_code"],
            ["currency_code", "ISO 4217", "'ZZZ'"], id="bad-currency",
        ),
        pytest.param(
            {"time_zone": "Mars/Olympus"}, ["time_zone"],
            ["time_zone", "IANA", "'Mars/Olympus'"], id="bad-time-zone",
        ),
        pytest.param(
            {"display_name": "x" * 101}, ["display_name"],
            ["display_name", "at most 100", "got 101"], id="long-name",
        ),
    ],
)  # fmt: skip
def test_invalid_update_is_invalid_argument_with_a_helpful_message(
    stubs: Stubs,
    channel: grpc.Channel,
    google: FakeGoogle,
    user: dict[str, str],
    paths: list[str],
    expected: list[str],
) -> None:
    _, metadata = sign_in(stubs, channel, google)
    users = stubs.user_grpc.UserServiceStub(channel)
    request = stubs.user_pb2.UpdateCurrentUserRequest(
        user=stubs.user_pb2.User(**user), update_mask={"paths": paths}
    )

    with pytest.raises(grpc.RpcError) as err:
        users.UpdateCurrentUser(request, metadata=metadata, timeout=TIMEOUT_S)

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    for fragment in expected:
        assert fragment in details


def test_many_calls_on_one_channel_leave_no_traceback(
    stubs: Stubs, channel: grpc.Channel, google: FakeGoogle, server: RunningServer
) -> None:
    log_start = len(server.logs())
    signed_in, metadata = sign_in(stubs, channel, google)
    auth = stubs.auth_grpc.AuthServiceStub(channel)
    users = stubs.user_grpc.UserServiceStub(channel)
    get_session = stubs.auth_pb2.GetSessionRequest()

    # 100 calls one after another, then 100 in flight at once on the same HTTP/2 connection.
    for _ in range(100):
        got = auth.GetSession(get_session, metadata=metadata, timeout=TIMEOUT_S)
        assert got.session.id == signed_in.session.id
    futures = [
        users.GetCurrentUser.future(
            stubs.user_pb2.GetCurrentUserRequest(), metadata=metadata, timeout=TIMEOUT_S
        )
        for _ in range(100)
    ]
    assert {future.result(timeout=TIMEOUT_S).user.id for future in futures} == {signed_in.user.id}

    # A traceback logged by a callback after the calls returned must be caught too: one
    # more call, and its log line, come after everything the earlier calls scheduled.
    marker = f"marker-{secrets.token_hex(6)}"
    auth.GetSession(get_session, metadata=[*metadata, ("x-request-id", marker)], timeout=TIMEOUT_S)
    deadline = time.monotonic() + TIMEOUT_S
    while f"request_id={marker}" not in server.logs():
        assert time.monotonic() < deadline, "the marker call was never logged"
        time.sleep(0.02)
    logs = server.logs()[log_start:]
    assert logs.count("AuthService/GetSession") >= 100
    assert "Traceback" not in logs
    assert "InvalidStateError" not in logs
