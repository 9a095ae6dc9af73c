"""The example app (examples/web) in headless Chromium, using the client package as packed.

`npm pack` makes the tarball of clients/ts (its prepack script builds it from
the current sources). A copy of examples/web gets its own dependencies from
its lockfile (`npm ci`) and then that tarball (`npm install --no-save`): the
app compiles against the package's published files (dist/*.js, *.d.ts and its
`exports`), never against clients/ts itself. Vite builds the app, which is served
from `app.expense.localhost`, the only origin in the API's CORS_ALLOWED_ORIGIN;
the API is `api.expense.localhost`. The server requires sign-in nonces and
allows two sign-ins a day per account.

`drive_example.ts` (Playwright) clicks through the story as two browsers of one
user and prints what the pages showed and what the browsers received; the
assertions are here, and on what the server stored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.browser.pages import serve_directory
from tests.conftest import require_tool, server_env
from tests.interop.tools import COOKIE_NAME, REPO, new_sub, run
from tests.support.google import FakeGoogle
from tests.support.npm import CLIENT_PACKAGE, npm, run_in, which_npm
from tests.support.server import start_server

pytestmark = pytest.mark.interop

EXAMPLE = REPO / "examples" / "web"
DRIVER = Path(__file__).resolve().parent / "drive_example.ts"
CHROMIUM = "/usr/bin/chromium"
EXPENSE_AUTH = Path(sys.executable).parent / "expense-auth"
GIS_CLIENT_ID = "example-web.apps.googleusercontent.com"
DRIVER_TIMEOUT_S = 120
# Two sign-ins (one per browser) fit; the third is refused. The window is a UTC
# day, so the story must not straddle midnight (see `clear_of_the_day_boundary`).
SIGN_INS_PER_DAY = 2
DAY_S = 86_400
STORY_MARGIN_S = 300

SIGN_IN = "/expense.auth.v1.AuthService/SignIn"
SIGN_OUT = "/expense.auth.v1.AuthService/SignOut"
GET_SESSION = "/expense.auth.v1.AuthService/GetSession"
LIST_SESSIONS = "/expense.auth.v1.AuthService/ListSessions"
REVOKE_SESSION = "/expense.auth.v1.AuthService/RevokeSession"
READS = (GET_SESSION, LIST_SESSIONS, "/expense.user.v1.UserService/GetCurrentUser")

Story = dict[str, Any]


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory, client_tarball: Path) -> Path:
    """A copy of examples/web with its locked dependencies and the packed client installed."""
    npm_path = require_tool(which_npm(), "npm")
    require_tool(str(EXAMPLE / "node_modules" / ".bin" / "vite"), "examples/web (make setup)")
    web = tmp_path_factory.mktemp("example") / "web"
    shutil.copytree(EXAMPLE, web, ignore=shutil.ignore_patterns("node_modules", "dist", ".packed"))
    # `make setup` ran `npm ci` on the same lockfile, so npm's cache has it all.
    npm(npm_path, web, "ci", "--prefer-offline")
    npm(npm_path, web, "install", "--no-save", "--prefer-offline", str(client_tarball))
    return web


@pytest.fixture(scope="module")
def built(example: Path) -> Path:
    """The production build of the example: index.html, assets and config.json."""
    run_in(
        example, [str(example / "node_modules" / ".bin" / "vite"), "build", "--logLevel", "warn"]
    )
    return example / "dist"


@contextmanager
def dev_token_minter(env: Mapping[str, str]) -> Iterator[str]:
    """A URL that answers POST {email, name, nonce} with `expense-auth dev-token`'s token.

    `env` is the server's environment: the development issuer's key is in its DATA_DIR.
    """

    class Mint(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            asked = json.loads(self.rfile.read(int(self.headers["content-length"])))
            result = subprocess.run(
                [
                    str(EXPENSE_AUTH),
                    "dev-token",
                    *("--email", asked["email"]),
                    *("--name", asked["name"]),
                    # One form: a nonce is base64url and may begin with "-", which
                    # argparse would take for an option if it came as its own word.
                    f"--nonce={asked['nonce']}",
                ],
                env=dict(env),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            ok = result.returncode == 0
            body = (result.stdout if ok else result.stderr).encode()
            self.send_response(200 if ok else 500)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Mint)
    thread = threading.Thread(target=httpd.serve_forever, name="dev-token-minter", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def clear_of_the_day_boundary() -> None:
    """Wait out a UTC midnight that the story could straddle.

    The sign-in limit counts per UTC day (a sliding window over day windows): a
    story that began before midnight and ended after it could see its third
    sign-in let through. Rare, but a test must not depend on the hour it runs at.
    """
    left = DAY_S - time.time() % DAY_S
    if left < STORY_MARGIN_S:
        time.sleep(left + 1)


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle, built: Path) -> Story:
    """Run the whole story once; every test reads its part of the result."""
    chromium = require_tool(CHROMIUM, "chromium (apt-get install chromium)")
    tsx = require_tool(str(REPO / "node_modules" / ".bin" / "tsx"), "tsx (npm ci)")
    require_tool(str(REPO / "node_modules" / "playwright-core"), "playwright-core (npm ci)")
    tmp = tmp_path_factory.mktemp("example-story")
    email = f"{new_sub()}@example.com"

    with serve_directory(built) as page_port:
        app_origin = f"http://app.expense.localhost:{page_port}"
        env = server_env(
            google,
            CORS_ALLOWED_ORIGIN=app_origin,
            SIGNIN_NONCE_REQUIRED="true",
            RATE_LIMIT_SIGNIN_PER_SUBJECT=f"{SIGN_INS_PER_DAY}/day",
        )
        server = start_server(tmp, env)
        try:
            api = f"http://api.expense.localhost:{server.port}"
            # The deployment's part: the built page reads where the API is at run time.
            (built / "config.json").write_text(
                json.dumps(
                    {"apiBaseUrl": api, "googleClientId": GIS_CLIENT_ID, "developmentSignIn": True}
                )
            )
            with dev_token_minter(server.env) as mint:
                config = {
                    "app": app_origin,
                    "api": api,
                    "mint": mint,
                    "email": email,
                    "name": "Ann Example",
                    "chromium": chromium,
                }
                clear_of_the_day_boundary()
                result = run([tsx, str(DRIVER), json.dumps(config)], timeout=DRIVER_TIMEOUT_S)
        finally:
            stopped = server.stop()
        logs = server.logs()

    assert result.returncode == 0, f"{result.stderr}\n--- server log ---\n{logs}"
    assert stopped == 0, logs
    parsed: Story = json.loads(result.stdout)
    parsed.update(config=config, database=server.data_dir / "expense-auth.db")
    # The whole record, for a look after a failure (pytest keeps its last temp dirs).
    (tmp / "result.json").write_text(json.dumps(parsed, indent=1, default=str))
    return parsed


def responses(
    story: Story, after_step: str, *, browser: str, procedure: str
) -> list[dict[str, Any]]:
    """The API responses a browser received for one procedure during one step."""
    traffic: list[dict[str, Any]] = story["traffic"]
    start = next(
        i for i, r in enumerate(traffic) if r["method"] == "STEP" and r["procedure"] == after_step
    )
    end = next(
        (i for i, r in enumerate(traffic) if i > start and r["method"] == "STEP"), len(traffic)
    )
    return [
        r
        for r in traffic[start + 1 : end]
        if r["browser"] == browser and r["procedure"] == procedure
    ]


def sessions(view: dict[str, Any]) -> list[tuple[str, bool]]:
    """The session list a page showed: (id, is this browser)."""
    return [(s["id"], s["current"]) for s in view["sessions"]]


def current_session(view: dict[str, Any]) -> str:
    (session_id,) = [s["id"] for s in view["sessions"] if s["current"]]
    return str(session_id)


def stored(story: Story, query: str, *args: object) -> list[tuple[Any, ...]]:
    """Rows from the server's database, read-only, after the server stopped."""
    path: Path = story["database"]
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute(query, args).fetchall()


def test_the_example_installs_the_packed_tarball_not_the_sources(
    example: Path, client_tarball: Path
) -> None:
    installed = example / "node_modules" / "@expense" / "auth-client"
    assert installed.is_dir() and not installed.is_symlink()
    # No path into the repository: not in the manifest, not in the lockfile.
    manifest = json.loads((example / "package.json").read_text())
    declared = {**manifest.get("dependencies", {}), **manifest.get("devDependencies", {})}
    assert CLIENT_PACKAGE not in declared
    assert "clients/ts" not in (example / "package-lock.json").read_text()
    # Every installed file is the tarball's, byte for byte, and nothing else.
    with tarfile.open(client_tarball) as tar:
        packed = {
            member.name.removeprefix("package/"): hashlib.sha256(
                tar.extractfile(member).read()  # type: ignore[union-attr]
            ).hexdigest()
            for member in tar.getmembers()
            if member.isfile()
        }
    on_disk = {
        str(path.relative_to(installed)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in installed.rglob("*")
        if path.is_file()
    }
    assert on_disk == packed
    assert {"dist/index.js", "dist/index.d.ts", "dist/react.js", "dist/react.d.ts"} <= packed.keys()


def test_the_example_type_checks_strict_against_the_installed_package(example: Path) -> None:
    assert json.loads((example / "tsconfig.json").read_text())["compilerOptions"]["strict"] is True
    run_in(example, [str(example / "node_modules" / ".bin" / "tsc"), "--noEmit", "--strict"])


def test_the_driver_type_checks() -> None:
    tsc = require_tool(str(REPO / "node_modules" / ".bin" / "tsc"), "tsc (npm ci)")
    result = run(
        [
            tsc,
            "--noEmit",
            "--strict",
            *("--target", "es2022"),
            *("--module", "nodenext", "--moduleResolution", "nodenext"),
            *("--lib", "es2022,dom,dom.iterable"),
            # playwright-core's declarations refer to @types/node, which the project does not use.
            "--skipLibCheck",
            str(DRIVER),
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sign_in_with_google_identity_services_and_a_nonce(story: Story) -> None:
    before = story["aBeforeSignIn"]
    assert before["state"] == "signed-out"
    # The app gave GIS its client id and the nonce from CreateSignInNonce (the
    # development form shows the same one: one nonce per browser).
    assert before["gis"]["clientIds"][-1] == GIS_CLIENT_ID
    assert before["gis"]["nonces"][-1] == before["devNonce"]
    assert len(before["devNonce"]) >= 32
    (sign_in,) = responses(story, "a-sign-in", browser="A", procedure=SIGN_IN)
    assert sign_in["status"] == 200
    # The server requires the nonce: this cookie is what bound the token to this browser.
    assert "expense_signin_nonce" in sign_in["cookiesSent"]
    signed_in = story["aSignedIn"]
    assert signed_in["state"] == "signed-in"
    assert signed_in["email"] == story["config"]["email"]
    assert signed_in["name"] == "Ann Example"
    assert signed_in["userId"].startswith("usr_")
    assert [current for _, current in sessions(signed_in)] == [True]
    assert "Chrome" in signed_in["sessions"][0]["text"]
    assert signed_in["events"][0] == "SIGN_IN"
    # GIS was the page's own (faked), never fetched from Google.
    assert story["toGoogle"] == []


def test_reads_go_as_connect_get_with_the_cookie_and_writes_as_post(story: Story) -> None:
    seen = [r for r in story["traffic"] if r["method"] != "STEP"]
    reads = [r for r in seen if r["procedure"] in READS and r["status"] == 200]
    assert reads, story["traffic"]
    assert {r["method"] for r in reads} == {"GET"}
    assert all(COOKIE_NAME in r["cookiesSent"] for r in reads)
    writes = [r for r in seen if r["procedure"] in (SIGN_IN, SIGN_OUT, REVOKE_SESSION)]
    assert {r["method"] for r in writes} == {"POST"}


def test_a_second_browser_signs_in_with_the_development_form(story: Story) -> None:
    a, b = story["aSignedIn"], story["bSignedIn"]
    assert b["state"] == "signed-in"
    assert b["userId"] == a["userId"]
    assert current_session(b) != current_session(a)
    assert sorted(sessions(b)) == sorted([(current_session(a), False), (current_session(b), True)])


def test_revoke_the_other_browser_from_the_session_list(story: Story) -> None:
    a_id, b_id = current_session(story["aSignedIn"]), current_session(story["bSignedIn"])
    assert sorted(sessions(story["aBothSessions"])) == sorted([(a_id, True), (b_id, False)])
    (revoke,) = responses(story, "a-revoke", browser="A", procedure=REVOKE_SESSION)
    assert revoke["status"] == 200
    after = story["aAfterRevoke"]
    assert sessions(after) == [(a_id, True)]
    assert after["events"][0] == "SESSION_REVOKED"


def test_the_revoked_browser_is_refused_and_shows_it(story: Story) -> None:
    # B's next call carries its cookie and is refused; the answer also expires the
    # cookie. The app's QueryClient then refetches GetSession, which says B is out.
    (listed,) = responses(story, "b-refresh", browser="B", procedure=LIST_SESSIONS)
    assert (listed["status"], COOKIE_NAME in listed["cookiesSent"]) == (401, True), listed
    (session,) = responses(story, "b-refresh", browser="B", procedure=GET_SESSION)
    assert (session["status"], COOKIE_NAME in session["cookiesSent"]) == (401, False)
    assert COOKIE_NAME not in story["bCookies"]
    assert story["bAfterRevoke"]["state"] == "signed-out"


def test_sign_out(story: Story) -> None:
    (sign_out,) = responses(story, "a-sign-out", browser="A", procedure=SIGN_OUT)
    assert sign_out["status"] == 200
    assert story["aSignedOut"]["state"] == "signed-out"
    assert COOKIE_NAME not in story["aCookies"]
    # As Google asks: no automatic sign-in with One Tap after signing out.
    assert story["aRateLimited"]["gis"]["disableAutoSelect"] == 1
    assert story["aReloaded"]["state"] == "signed-out"


def test_a_rate_limited_sign_in_shows_when_to_retry(story: Story) -> None:
    # A fresh nonce for the new sign-in: the first one was spent.
    assert story["thirdNonce"] != story["aBeforeSignIn"]["devNonce"]
    (refused,) = responses(story, "a-sign-in-again", browser="A", procedure=SIGN_IN)
    assert refused["status"] == 429
    header = refused["retryAfter"]
    assert header is not None and 1 <= int(header) <= DAY_S
    page = story["aRateLimited"]
    assert page["state"] == "signed-out"
    # The page read the header through CORS (Retry-After is exposed) with retryAfterSeconds.
    assert page["signInError"]["code"] == "ResourceExhausted"
    assert page["signInError"]["retryAfter"] == header
    assert page["signInError"]["text"].startswith("Too many sign-ins. Try again in ")


def test_the_server_stored_what_the_pages_showed(story: Story) -> None:
    user_id = story["aSignedIn"]["userId"]
    a_id, b_id = current_session(story["aSignedIn"]), current_session(story["bSignedIn"])
    assert stored(story, "SELECT id FROM users WHERE email = ?", story["config"]["email"]) == [
        (user_id,)
    ]
    # Both sessions ended: B's revoked from A, A's signed out.
    rows = stored(
        story, "SELECT id, revoke_ms IS NOT NULL FROM sessions WHERE user_id = ?", user_id
    )
    assert sorted(rows) == sorted([(a_id, 1), (b_id, 1)])
    events = stored(
        story, "SELECT kind, session_id FROM audit_events WHERE user_id = ? ORDER BY id", user_id
    )
    assert events == [
        ("sign_in", a_id),
        ("sign_in", b_id),
        ("session_revoked", b_id),
        ("sign_out", a_id),
        ("rate_limited", ""),
    ]
