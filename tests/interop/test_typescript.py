"""The TypeScript client (@connectrpc/connect-node, protoc-gen-es code) over three protocols.

`ts/client.ts` runs the whole session story per protocol and prints a JSON summary;
the assertions are here.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.interop.tools import COOKIE_NAME, REPO, new_sub, run
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer

pytestmark = pytest.mark.interop

CLIENT = REPO / "tests" / "interop" / "ts" / "client.ts"
PROTOCOLS = ("connect-json-h1", "grpc-h2", "grpc-web-h1")
TIMEOUT_S = 60


def token_variable(protocol: str, n: int) -> str:
    return f"TOKEN_{protocol.upper().replace('-', '_')}_{n}"


@pytest.fixture(scope="module")
def summary(server: RunningServer, google: FakeGoogle) -> dict[str, Any]:
    """Run the client once for every protocol; one user per protocol, two tokens each."""
    tsx = require_tool(str(REPO / "node_modules" / ".bin" / "tsx"), "tsx (npm ci)")
    version = run([tsx, "--version"])
    # npm can skip esbuild's install script, leaving tsx present but unable to run.
    assert version.returncode == 0, f"tsx does not run:\n{version.stderr}"
    env = dict(os.environ)
    emails = {}
    for protocol in PROTOCOLS:
        sub = new_sub()
        emails[protocol] = f"{sub}@example.com"
        for n in (1, 2):
            env[token_variable(protocol, n)] = google.token(sub=sub, email=emails[protocol])

    result = run([tsx, str(CLIENT), server.url, *PROTOCOLS], env=env, timeout=TIMEOUT_S)

    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    assert sorted(parsed) == sorted(PROTOCOLS)
    for protocol, email in emails.items():
        parsed[protocol]["expectedEmail"] = email
    return parsed


@pytest.fixture(params=PROTOCOLS)
def run_of(request: pytest.FixtureRequest, summary: dict[str, Any]) -> dict[str, Any]:
    """The summary of one protocol."""
    result: dict[str, Any] = summary[request.param]
    return result


def test_the_client_type_checks_against_the_generated_code() -> None:
    # tsx strips types without checking them; tsc proves client.ts matches gen/ts.
    tsc = require_tool(str(REPO / "node_modules" / ".bin" / "tsc"), "tsc (npm ci)")
    result = run(
        [
            tsc,
            "--noEmit",
            "--strict",
            "--target",
            "es2022",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            # Headers (and getSetCookie) come from the DOM library; Node has them too.
            "--lib",
            "es2022,dom",
            # connect-node's declarations need @types/node, which the project does not use.
            "--skipLibCheck",
            str(CLIENT),
        ],
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sign_in_sets_the_session_cookie(run_of: dict[str, Any]) -> None:
    sign_in = run_of["signIn"]
    assert sign_in["email"] == run_of["expectedEmail"]
    assert sign_in["userId"].startswith("usr_")
    assert sign_in["current"] is True
    (cookie,) = sign_in["setCookies"]
    assert cookie["name"] == COOKIE_NAME
    assert cookie["valueLength"] > 40
    assert {a.split("=")[0] for a in cookie["attributes"]} == {
        "Path",
        "Max-Age",
        "HttpOnly",
        "SameSite",
    }
    assert "SameSite=Lax" in cookie["attributes"]
    assert sign_in["hasCookie"] is True


def test_the_cookie_opens_get_session_and_get_current_user(run_of: dict[str, Any]) -> None:
    sign_in, got = run_of["signIn"], run_of["getSession"]
    assert got["userId"] == sign_in["userId"]
    assert got["email"] == run_of["expectedEmail"]
    assert got["sessionId"] == sign_in["sessionId"]
    assert got["current"] is True
    assert got["userAgent"] == "connect-es"
    assert got["expiresAfterCreation"] is True
    assert run_of["getCurrentUser"]["userId"] == sign_in["userId"]


def test_list_sessions_shows_both_devices_newest_first(run_of: dict[str, Any]) -> None:
    first, second = run_of["signIn"], run_of["secondSignIn"]
    assert second["userId"] == first["userId"]
    assert second["sessionId"] != first["sessionId"]
    listed = run_of["listSessions"]
    assert listed["ids"] == [second["sessionId"], first["sessionId"]]
    assert listed["currentIds"] == [first["sessionId"]]


def test_update_current_user_and_a_refused_update(run_of: dict[str, Any]) -> None:
    assert run_of["updateCurrentUser"]["displayName"].startswith("TS ")
    bad = run_of["badUpdate"]
    assert bad["code"] == "InvalidArgument"
    assert "'email'" in bad["message"] and "cannot be changed" in bad["message"]


def test_revoke_session_ends_the_other_device(run_of: dict[str, Any]) -> None:
    assert run_of["revokedCall"]["code"] == "Unauthenticated"
    assert run_of["revokedCookieCleared"] is True
    assert run_of["revokeAgain"]["code"] == "NotFound"
    assert run_of["secondSignIn"]["sessionId"] in run_of["revokeAgain"]["message"]
    assert run_of["listAfterRevoke"]["ids"] == [run_of["signIn"]["sessionId"]]


def test_sign_out_expires_the_cookie_and_ends_the_session(run_of: dict[str, Any]) -> None:
    sign_out = run_of["signOut"]
    (cookie,) = sign_out["setCookies"]
    assert cookie["name"] == COOKIE_NAME
    assert cookie["valueLength"] == 0
    assert "Max-Age=0" in cookie["attributes"]
    assert sign_out["clearedByServer"] is True
    # The client replayed its old cookie after SignOut.
    assert run_of["afterSignOut"]["code"] == "Unauthenticated"
    assert "signed out" in run_of["afterSignOut"]["message"]
    assert run_of["withoutCookie"]["code"] == "Unauthenticated"
    assert "sign in" in run_of["withoutCookie"]["message"]
