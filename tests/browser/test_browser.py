"""Headless Chromium, the browser path end to end: connect-web, cookies, CORS.

The page (web/app.ts, bundled by esbuild) runs from `app.expense.localhost`, a
different origin of the same site as the API at `api.expense.localhost`, the
only origin in CORS_ALLOWED_ORIGIN. Chromium resolves every `*.localhost` name
to loopback, so real host names, origins and SameSite rules apply without DNS.
While signed in, the same browser also opens the page from
`other.expense.localhost` (same site, not allowed) and `evil.localhost`
(another site). `drive.ts` (Playwright) runs the steps and prints what each one
returned to the page, plus Chromium's own record of the API traffic (DevTools
protocol: headers on the wire, statuses, CORS verdicts); the assertions are here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser.pages import serve_directory
from tests.conftest import require_tool, server_env
from tests.interop.tools import COOKIE_NAME, REPO, new_sub, run
from tests.support.google import FakeGoogle
from tests.support.server import start_server

pytestmark = pytest.mark.interop

HERE = Path(__file__).resolve().parent
APP_SOURCE = HERE / "web" / "app.ts"
INDEX = HERE / "web" / "index.html"
DRIVER = HERE / "drive.ts"
CHROMIUM = "/usr/bin/chromium"
TIMEOUT_S = 60
SIGN_IN_PATH = "/expense.auth.v1.AuthService/SignIn"
SIGN_OUT_PATH = "/expense.auth.v1.AuthService/SignOut"
GET_CURRENT_USER_PATH = "/expense.user.v1.UserService/GetCurrentUser"
NOT_ALLOWED = ("sibling", "evil")
# What a Connect client in a page reports when the browser withholds a response.
NETWORK_ERROR = {
    "code": "Unknown",
    "message": "Failed to fetch",
    "cause": "TypeError: Failed to fetch",
}
# All a page learns from a `mode: "no-cors"` request that the browser did not block.
OPAQUE = {"type": "opaque", "status": 0, "bodyLength": 0}

Run = dict[str, Any]


def bundle(out_dir: Path) -> None:
    """app.ts and its imports (connect-web, gen/ts) as one ES module, beside index.html."""
    esbuild = require_tool(str(REPO / "node_modules" / ".bin" / "esbuild"), "esbuild (npm ci)")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run(
        [
            esbuild,
            str(APP_SOURCE),
            "--bundle",
            "--format=esm",
            "--target=es2022",
            "--log-level=warning",
            f"--outfile={out_dir / 'app.js'}",
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    shutil.copy(INDEX, out_dir / "index.html")


@pytest.fixture(scope="module")
def browser_run(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle) -> Run:
    """Run the whole browser story once; every test reads its part of the result."""
    chromium = require_tool(CHROMIUM, "chromium (apt-get install chromium)")
    tsx = require_tool(str(REPO / "node_modules" / ".bin" / "tsx"), "tsx (npm ci)")
    require_tool(str(REPO / "node_modules" / "playwright-core"), "playwright-core (npm ci)")
    tmp = tmp_path_factory.mktemp("browser")
    started = time.monotonic()
    bundle(tmp / "web")

    with serve_directory(tmp / "web") as page_port:
        app_origin = f"http://app.expense.localhost:{page_port}"
        server = start_server(tmp, server_env(google, CORS_ALLOWED_ORIGIN=app_origin))
        try:
            sub = new_sub()
            email = f"{sub}@example.com"
            config = {
                "api": f"http://api.expense.localhost:{server.port}",
                "app": app_origin,
                "sibling": f"http://other.expense.localhost:{page_port}",
                "evil": f"http://evil.localhost:{page_port}",
                "chromium": chromium,
            }
            env = {**os.environ, "EXPENSE_AUTH_TOKEN": google.token(sub=sub, email=email)}
            result = run([tsx, str(DRIVER), json.dumps(config)], env=env, timeout=TIMEOUT_S)
        finally:
            stopped = server.stop()
        logs = server.logs()

    assert result.returncode == 0, f"{result.stderr}\n--- server log ---\n{logs}"
    assert stopped == 0, logs
    parsed: Run = json.loads(result.stdout)
    parsed.update(config=config, email=email, seconds=time.monotonic() - started)
    # The whole record, for a look after a failure (pytest keeps its last temp dirs).
    (tmp / "result.json").write_text(json.dumps(parsed, indent=1))
    return parsed


def evidence(run: Run) -> str:
    """Chromium's view of the API traffic, one line per request, for assertion messages."""
    api = run["config"]["api"]
    lines = ["--- what Chromium saw (page, request, headers sent -> answer) ---"]
    for x in run["traffic"]:
        sent = x.get("sent", {})
        line = f"{x['page']} {x['method']} {x['url'].removeprefix(api)} [{x['type']}]"
        if sent:
            line += f" cookies={sent['cookies']} {sent['headers']}"
        line += f" -> {x.get('status', 'not sent')} {x.get('received', {})}"
        if "failed" in x:
            line += f" FAILED {x['failed']}"
        lines.append(line)
    lines.append("--- console ---")
    lines += sorted({f"{m['page']} {m['type']}: {m['text']}" for m in run["console"]})
    return "\n".join(lines)


def outcome_at(run: Run, path: tuple[str, ...]) -> dict[str, Any]:
    """The outcome of a step, e.g. ("evil", "signOut")."""
    found: dict[str, Any] = run
    for key in path:
        found = found[key]
    return found


def value(run: Run, *path: str) -> Any:
    """The value of a step that must have succeeded."""
    outcome = outcome_at(run, path)
    assert outcome["ok"], f"{'.'.join(path)} failed: {outcome['error']}\n{evidence(run)}"
    return outcome["value"]


def error(run: Run, *path: str) -> dict[str, str]:
    """The error of a step that must have failed."""
    outcome = outcome_at(run, path)
    assert not outcome["ok"], f"{'.'.join(path)} succeeded: {outcome['value']}"
    failure: dict[str, str] = outcome["error"]
    return failure


def exchanges(run: Run, page: str, method: str, path: str) -> list[dict[str, Any]]:
    """A page's requests to one procedure of the API, as Chromium's network stack saw them."""
    origin, url = run["config"][page], run["config"]["api"] + path
    return [
        x
        for x in run["traffic"]
        if x["page"] == origin and x["method"] == method and x["url"].split("?")[0] == url
    ]


def no_cors_sign_out(run: Run, page: str) -> dict[str, Any]:
    """The page's simple (no-cors) SignOut POST, as Chromium sent it."""
    sent = [
        x
        for x in exchanges(run, page, "POST", SIGN_OUT_PATH)
        if x.get("sent", {}).get("headers", {}).get("sec-fetch-mode") == "no-cors"
    ]
    assert len(sent) == 1, f"expected one no-cors SignOut from {page}\n{evidence(run)}"
    return sent[0]


def test_the_page_and_the_driver_type_check_against_the_generated_code() -> None:
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
            "--lib",
            "es2022,dom,dom.iterable",
            # playwright-core's declarations refer to @types/node, which the project does not use.
            "--skipLibCheck",
            str(APP_SOURCE),
            str(DRIVER),
        ],
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_story_ran_on_the_intended_origins(browser_run: Run) -> None:
    config = browser_run["config"]
    assert browser_run["appOrigin"] == config["app"]
    assert browser_run["sibling"]["origin"] == config["sibling"]
    assert browser_run["evil"]["origin"] == config["evil"]
    # No session from anywhere before SignIn, and the page can read the refusal.
    before = error(browser_run, "beforeSignIn")
    assert before["code"] == "Unauthenticated", f"{before}\n{evidence(browser_run)}"


def test_the_api_answers_the_allowed_page_with_its_exact_origin(browser_run: Run) -> None:
    app = browser_run["config"]["app"]
    for method in ("OPTIONS", "POST"):  # the preflight, then SignIn itself
        answers = [
            x.get("received", {}) for x in exchanges(browser_run, "app", method, SIGN_IN_PATH)
        ]
        assert [
            (a.get("access-control-allow-origin"), a.get("access-control-allow-credentials"))
            for a in answers
        ] == [(app, "true")], f"{method} SignIn\n{evidence(browser_run)}"


def test_sign_in_from_another_origin_of_the_same_site(browser_run: Run) -> None:
    signed_in = value(browser_run, "signIn")
    assert signed_in["user"]["email"] == browser_run["email"]
    assert signed_in["user"]["id"].startswith("usr_")
    assert signed_in["session"]["current"] is True
    assert "Chrome" in signed_in["session"]["userAgent"]
    (cookie,) = browser_run["storedCookies"]
    assert cookie["name"] == COOKIE_NAME
    assert cookie["domain"] == "api.expense.localhost"  # host-only: no Domain attribute
    assert cookie["path"] == "/"
    assert cookie["sameSite"] == "Lax"
    assert cookie["valueLength"] > 40


def test_the_browser_sends_the_cookie_back(browser_run: Run) -> None:
    signed_in = value(browser_run, "signIn")
    user_id = signed_in["user"]["id"]
    assert value(browser_run, "getCurrentUser") == {"id": user_id, "email": browser_run["email"]}
    # Connect GET (no preflight) and gRPC-Web (its status comes in exposed headers) too.
    assert value(browser_run, "getCurrentUserByGet")["id"] == user_id
    for step in ("getSession", "getSessionGrpcWeb"):
        got = value(browser_run, step)
        assert got["user"]["id"] == user_id
        assert got["session"]["id"] == signed_in["session"]["id"]
        assert got["session"]["current"] is True
        assert got["session"]["expiresAfterCreation"] is True


def test_scripts_cannot_read_the_session_cookie(browser_run: Run) -> None:
    (cookie,) = browser_run["storedCookies"]
    assert cookie["httpOnly"] is True
    # The page's own origin: not visible (it would not be even without HttpOnly,
    # the cookie belongs to the API's host).
    assert COOKIE_NAME not in browser_run["appDocumentCookie"]
    # The API's own origin, where only HttpOnly hides it. The control cookie (not
    # HttpOnly) shows that a script there does see cookies.
    probe = browser_run["apiOriginProbe"]
    assert probe["origin"] == browser_run["config"]["api"]
    assert probe["cookie"] == "probe=visible"


def test_list_sessions_in_the_browser(browser_run: Run) -> None:
    session = value(browser_run, "signIn")["session"]
    listed = value(browser_run, "listSessions")
    assert [(s["id"], s["current"]) for s in listed] == [(session["id"], True)]


def test_sign_out_in_the_browser(browser_run: Run) -> None:
    assert value(browser_run, "signOut") is None
    assert browser_run["cookiesAfterSignOut"] == []
    after = error(browser_run, "afterSignOut")
    assert after["code"] == "Unauthenticated", f"{after}\n{evidence(browser_run)}"
    # gRPC-Web reports this error in headers: readable only if grpc-status is exposed.
    assert error(browser_run, "afterSignOutGrpcWeb")["code"] == "Unauthenticated"


@pytest.mark.parametrize("page", NOT_ALLOWED)
@pytest.mark.parametrize(
    "step",
    [
        "getCurrentUser",
        "getCurrentUserByGet",
        "getSessionGrpcWeb",
        "signOut",
        "revokeOtherSessions",
    ],
)
def test_a_page_that_is_not_allowed_reads_no_response(
    browser_run: Run, page: str, step: str
) -> None:
    assert error(browser_run, page, step) == NETWORK_ERROR, evidence(browser_run)


@pytest.mark.parametrize(
    ("page", "seen_by_the_page"),
    [
        ("sibling", {"ok": True, "value": OPAQUE}),
        # Cross-Origin-Resource-Policy: same-site stops even the opaque response.
        ("evil", {"ok": False, "error": NETWORK_ERROR}),
    ],
)
def test_a_simple_post_from_a_page_that_is_not_allowed_reveals_nothing(
    browser_run: Run, page: str, seen_by_the_page: dict[str, Any]
) -> None:
    # A text/plain POST needs no preflight: the browser sends it and the server
    # answers (refusing the content type), but the page learns nothing.
    assert "status" in no_cors_sign_out(browser_run, page), "the server did not answer"
    assert browser_run[page]["noCorsSignOut"] == seen_by_the_page, evidence(browser_run)


def test_the_sibling_page_is_same_site_and_the_evil_page_is_not(browser_run: Run) -> None:
    # The premise of the setup: other.expense.localhost is same-site with the API,
    # so SameSite=Lax lets its requests carry the session cookie; evil.localhost is not.
    sibling = no_cors_sign_out(browser_run, "sibling")["sent"]
    assert sibling["headers"]["sec-fetch-site"] == "same-site"
    assert sibling["cookies"] == [COOKIE_NAME], evidence(browser_run)
    evil = no_cors_sign_out(browser_run, "evil")["sent"]
    assert evil["headers"]["sec-fetch-site"] == "cross-site"
    assert evil["cookies"] == []


def test_a_same_site_page_reads_nothing_even_when_its_request_carries_the_cookie(
    browser_run: Run,
) -> None:
    # A Connect GET is a simple request: Chromium sends it with the cookie and the
    # server answers; only CORS keeps the answer from the page.
    sent = exchanges(browser_run, "sibling", "GET", GET_CURRENT_USER_PATH)
    assert len(sent) == 1, evidence(browser_run)
    assert sent[0]["sent"]["cookies"] == [COOKIE_NAME], evidence(browser_run)
    assert "status" in sent[0], "the server did not answer"
    assert "access-control-allow-origin" not in sent[0]["received"]
    assert sent[0]["failed"]["corsError"] == "MissingAllowOriginHeader"
    assert error(browser_run, "sibling", "getCurrentUserByGet") == NETWORK_ERROR


def test_pages_that_are_not_allowed_change_nothing(browser_run: Run) -> None:
    # They tried SignOut and RevokeOtherSessions, preflighted and as simple POSTs.
    session = value(browser_run, "signIn")["session"]
    assert value(browser_run, "afterAttacks", "getSession")["session"]["id"] == session["id"]
    listed = value(browser_run, "afterAttacks", "listSessions")
    assert [s["id"] for s in listed] == [session["id"]]
