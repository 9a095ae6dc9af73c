"""grpcurl: real gRPC over h2c, with the schema taken from server reflection only."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.interop.tools import VENV_BIN, assert_session_cookie, cookie_pair, new_sub, run
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer

pytestmark = pytest.mark.interop

# grpcurl exits with 64 + the gRPC status code when the RPC fails.
GRPCURL_RPC_ERROR = 64
UNAUTHENTICATED = 16
NOT_FOUND = 5


@pytest.fixture(scope="module")
def grpcurl() -> str:
    return require_tool(str(VENV_BIN / "grpcurl"), "grpcurl")


def grpcurl_run(
    grpcurl: str, server: RunningServer, *args: str, flags: Sequence[str] = ()
) -> tuple[int, str, str]:
    """`grpcurl -plaintext [flags] ADDRESS [args]`: the exit code, stdout and stderr."""
    # No -import-path/-proto: everything grpcurl knows comes from reflection.
    result = run([grpcurl, "-plaintext", "-format-error", *flags, server.address, *args])
    return result.returncode, result.stdout, result.stderr


def section(verbose_output: str, title: str) -> str:
    """One block of `grpcurl -v` output, e.g. `Response headers received`."""
    match = re.search(rf"^{re.escape(title)}:\n(.*?)(?:\n\n|\Z)", verbose_output, re.M | re.S)
    assert match, f"no {title!r} in {verbose_output}"
    return match.group(1)


def sign_in(
    grpcurl: str, server: RunningServer, google: FakeGoogle, sub: str
) -> tuple[str, dict[str, Any]]:
    """(Set-Cookie, response) of a SignIn made with grpcurl -v."""
    token = google.token(sub=sub, email=f"{sub}@example.com")
    code, out, err = grpcurl_run(
        grpcurl,
        server,
        "expense.auth.v1.AuthService/SignIn",
        flags=["-v", "-d", json.dumps({"google_id_token": token})],
    )
    assert code == 0, err
    headers = section(out, "Response headers received").splitlines()
    set_cookies = [
        line.split(":", 1)[1].strip() for line in headers if line.startswith("set-cookie:")
    ]
    assert len(set_cookies) == 1, headers
    contents = out.split("Response contents:\n", 1)[1].split("\n\nResponse trailers received:")[0]
    response: dict[str, Any] = json.loads(contents)
    return set_cookies[0], response


def test_list_shows_the_services_and_reflection(grpcurl: str, server: RunningServer) -> None:
    code, out, err = grpcurl_run(grpcurl, server, "list")

    assert code == 0, err
    assert out.split() == [
        "expense.auth.v1.AuthService",
        "expense.user.v1.UserService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]


def test_describe_shows_every_rpc_and_the_read_only_ones(
    grpcurl: str, server: RunningServer
) -> None:
    code, out, err = grpcurl_run(grpcurl, server, "describe", "expense.auth.v1.AuthService")

    assert code == 0, err
    rpcs = re.findall(r"rpc (\w+) \( \.expense\.auth\.v1\.(\w+) \) returns", out)
    assert sorted(rpcs) == sorted(
        (name, f"{name}Request")
        for name in (
            "CreateSignInNonce",
            "SignIn",
            "GetSession",
            "SignOut",
            "ListSessions",
            "RevokeSession",
            "RevokeOtherSessions",
        )
    )
    read_only = re.findall(r"rpc (\w+) [^\n]*\{\s*option idempotency_level = NO_SIDE_EFFECTS;", out)
    assert sorted(read_only) == ["GetSession", "ListSessions"]


@pytest.mark.parametrize(
    "service",
    ["", "expense.auth.v1.AuthService", "expense.user.v1.UserService", "grpc.health.v1.Health"],
)
def test_health_check_says_serving(grpcurl: str, server: RunningServer, service: str) -> None:
    code, out, err = grpcurl_run(
        grpcurl,
        server,
        "grpc.health.v1.Health/Check",
        flags=["-d", json.dumps({"service": service})],
    )

    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}


def test_health_check_of_an_unknown_service_is_not_found(
    grpcurl: str, server: RunningServer
) -> None:
    code, _, err = grpcurl_run(
        grpcurl,
        server,
        "grpc.health.v1.Health/Check",
        flags=["-d", '{"service": "no.such.Service"}'],
    )

    assert code == GRPCURL_RPC_ERROR + NOT_FOUND, err
    assert json.loads(err)["code"] == NOT_FOUND


def test_sign_in_cookie_opens_get_session(
    grpcurl: str, server: RunningServer, google: FakeGoogle
) -> None:
    sub = new_sub()
    set_cookie, signed_in = sign_in(grpcurl, server, google, sub)

    assert_session_cookie(set_cookie)
    assert signed_in["user"]["email"] == f"{sub}@example.com"
    assert signed_in["session"]["userAgent"] == "grpcurl"

    code, out, err = grpcurl_run(
        grpcurl,
        server,
        "expense.auth.v1.AuthService/GetSession",
        flags=["-H", f"cookie: {cookie_pair(set_cookie)}"],
    )
    assert code == 0, err
    got = json.loads(out)
    assert got["user"] == signed_in["user"]
    assert got["session"]["id"] == signed_in["session"]["id"]
    assert got["session"]["current"] is True


def test_get_session_without_a_cookie_is_unauthenticated(
    grpcurl: str, server: RunningServer
) -> None:
    code, out, err = grpcurl_run(grpcurl, server, "expense.auth.v1.AuthService/GetSession")

    assert code == GRPCURL_RPC_ERROR + UNAUTHENTICATED, err
    assert out == ""
    error = json.loads(err)
    assert error["code"] == UNAUTHENTICATED
    assert "sign in" in error["message"]


def test_update_current_user_with_a_field_mask(
    grpcurl: str, server: RunningServer, google: FakeGoogle
) -> None:
    set_cookie, signed_in = sign_in(grpcurl, server, google, new_sub())
    # grpcurl 1.8.6 cannot parse a FieldMask in its JSON string form ("displayName"),
    # with reflection or a protoset alike; the object form is accepted.
    request = {"user": {"display_name": "Grace H."}, "update_mask": {"paths": ["display_name"]}}

    code, out, err = grpcurl_run(
        grpcurl,
        server,
        "expense.user.v1.UserService/UpdateCurrentUser",
        flags=["-H", f"cookie: {cookie_pair(set_cookie)}", "-d", json.dumps(request)],
    )

    assert code == 0, err
    user = json.loads(out)["user"]
    assert user["id"] == signed_in["user"]["id"]
    assert user["displayName"] == "Grace H."
