"""The forward-auth endpoint itself: where it listens, how it reads a gateway's request,
its rate limits, what it never sends. (End to end behind real gateways: tests/gateways.)"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import ConfigError, load_config
from tests.conftest import server_env
from tests.gateways.harness import free_port
from tests.support import postgres
from tests.support.client import Session
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.http import Response, connect_post, request
from tests.support.redis import redis_server
from tests.support.server import REPO, RunningServer, start_server

CLI = str(Path(sys.executable).parent / "expense-auth")
EVIL = "https://evil.example.net"
GET_SESSION = "/expense.auth.v1.AuthService/GetSession"


@pytest.fixture(scope="module")
def clock(tmp_path_factory: pytest.TempPathFactory) -> FileClock:
    """Stopped at the start of every window: counts are exact, whatever the real time."""
    return FileClock(tmp_path_factory.mktemp("fa-clock") / "now").freeze()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle, clock: FileClock
) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("forward-auth"),
        server_env(
            google,
            FORWARD_AUTH_PORT="0",
            TRUSTED_PROXIES="127.0.0.1/32",
            RATE_LIMIT_UNAUTHENTICATED_PER_IP="3/minute",
            RATE_LIMIT_PER_SESSION="5/minute",
            RATE_LIMIT_PER_USER="100/minute",
        ),
        clock=clock,
    )
    yield running
    assert running.stop() == 0, running.logs()


def forward_auth_url(server: RunningServer) -> str:
    assert server.forward_auth_url is not None
    return server.forward_auth_url


def check(
    server: RunningServer,
    *,
    method: str = "GET",
    path: str = "/forward-auth",
    cookie: str | None = None,
    client_ip: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A check as a gateway sends it: the client's headers, the client's address."""
    sent = dict(headers or {})
    if cookie:
        sent["cookie"] = cookie
    sent["x-forwarded-for"] = client_ip or new_ip()
    return request(forward_auth_url(server), method, path, headers=sent)


def new_ip() -> str:
    return f"203.0.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


@pytest.fixture
def cookie(server: RunningServer, google: FakeGoogle) -> str:
    client = Session(server.url)
    client.sign_in(google.token(sub=secrets.token_hex(8)))
    assert client.cookie
    return client.cookie


# Where it listens --------------------------------------------------------------------


def test_only_on_its_own_listener(server: RunningServer, cookie: str) -> None:
    for url in (server.url, server.admin_url):
        response = request(url, "GET", "/forward-auth", headers={"cookie": cookie})
        assert response.status == 404, url
    assert check(server, cookie=cookie).status == 200
    assert request(forward_auth_url(server), "GET", "/healthz").json() == {"status": "alive"}
    other = request(forward_auth_url(server), "GET", "/expense.auth.v1.AuthService/GetSession")
    assert other.status == 404


def test_a_port_given_to_two_listeners_is_refused(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO),
        "DATA_DIR": str(tmp_path / "var"),
        "ADMIN_PORT": "0",
        "FORWARD_AUTH_PORT": str(port),
    }
    result = subprocess.run(
        [CLI, "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"127.0.0.1:{port} is given for both port and FORWARD_AUTH_PORT" in result.stderr


def test_no_listener_unless_configured() -> None:
    config = load_config({}, env_file=None)
    assert config.forward_auth_port is None
    assert load_config({"FORWARD_AUTH_PORT": ""}, env_file=None).forward_auth_port is None


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"FORWARD_AUTH_PORT": "8081"}, "FORWARD_AUTH_PORT: 8081 is ADMIN_PORT too"),
        ({"FORWARD_AUTH_PORT": "70000"}, "FORWARD_AUTH_PORT: Input should be less than"),
        ({"FORWARD_AUTH_PORT": "auth"}, "FORWARD_AUTH_PORT: Input should be a valid integer"),
    ],
)
def test_bad_settings_are_refused(environ: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ, env_file=None)
    assert any(problem.startswith(says) for problem in raised.value.problems), raised.value


# The answer --------------------------------------------------------------------------


def test_the_answer_names_the_user_and_the_session(
    server: RunningServer, google: FakeGoogle
) -> None:
    client = Session(server.url)
    signed = client.sign_in(google.token(sub=secrets.token_hex(8)))
    assert signed.user is not None and signed.session is not None
    # Envoy's path_prefix appends the original path: any path under /forward-auth.
    response = check(server, path="/forward-auth/receipts/42?x=1", cookie=client.cookie)
    assert response.status == 200
    assert response.header("x-expense-user-id") == signed.user.id
    assert response.header("x-expense-session-id") == signed.session.id
    assert response.body == b""
    assert response.header("cache-control") == "no-store"


@pytest.mark.parametrize(
    "cookie_value", [None, "expense_session=bm90LWEtc2Vzc2lvbg.forged"], ids=["none", "forged"]
)
def test_refusals_echo_nothing_and_set_nothing(
    server: RunningServer, cookie_value: str | None
) -> None:
    response = check(server, cookie=cookie_value)
    assert response.status == 401
    assert response.json()["code"] == "unauthenticated"
    assert "sign in" in response.json()["message"]
    assert not response.all("set-cookie")
    assert b"forged" not in response.body and b"bm90" not in response.body
    assert response.header("x-expense-user-id") is None


# How a gateway tells the original method --------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("POST", {}),  # Envoy: the check keeps the original method
        ("GET", {"x-forwarded-method": "POST"}),  # Traefik, Caddy
        ("GET", {"x-original-method": "DELETE"}),  # nginx, as docs/integration.md sets it
        ("POST", {"x-forwarded-method": "GET"}),  # the strictest account wins
        ("GET", {"x-forwarded-method": "GET", "x-original-method": "PUT"}),
    ],
)
def test_a_state_change_from_another_site_is_refused(
    server: RunningServer, cookie: str, method: str, headers: dict[str, str]
) -> None:
    for browser in ({"origin": EVIL}, {"sec-fetch-site": "cross-site"}):
        response = check(server, method=method, cookie=cookie, headers={**headers, **browser})
        assert response.status == 403, (browser, response.body)
        assert response.json()["code"] == "permission_denied"


@pytest.mark.parametrize(
    "headers",
    [
        {"x-forwarded-method": "GET", "origin": EVIL},  # a safe request from anywhere
        {"x-forwarded-method": "POST"},  # not a browser
        {"x-forwarded-method": "POST", "origin": "http://expenses.example.com"},
    ],
)
def test_safe_or_same_site_requests_pass(
    server: RunningServer, cookie: str, headers: dict[str, str]
) -> None:
    host = {"x-forwarded-host": "expenses.example.com"}
    assert check(server, cookie=cookie, headers={**host, **headers}).status == 200


# Rate limits ---------------------------------------------------------------------------


def test_unauthenticated_checks_are_budgeted_per_client_network(
    server: RunningServer, cookie: str
) -> None:
    ip = new_ip()
    for _ in range(3):
        assert check(server, client_ip=ip).status == 401
    refused = check(server, client_ip=ip)
    assert refused.status == 429, refused.body
    assert refused.json()["code"] == "resource_exhausted"
    assert 1 <= int(refused.header("retry-after") or "0") <= 60
    # Another client behind the same gateway has its own budget, and a signed-in
    # request from the exhausted one is not counted against it.
    assert check(server, client_ip=new_ip()).status == 401
    assert check(server, client_ip=ip, cookie=cookie).status == 200


def test_a_session_shares_one_budget_between_the_api_and_forward_auth(
    server: RunningServer, cookie: str
) -> None:
    for _ in range(4):
        assert check(server, cookie=cookie).status == 200
    assert connect_post(server.url, GET_SESSION, {}, headers={"cookie": cookie}).status == 200
    refused = check(server, cookie=cookie)
    assert refused.status == 429
    assert "too many calls from this session" in refused.json()["message"]
    api = connect_post(server.url, GET_SESSION, {}, headers={"cookie": cookie})
    assert api.status == 429


def test_checks_are_counted_in_the_metrics(server: RunningServer, cookie: str) -> None:
    check(server, cookie=cookie)
    check(server)
    metrics = request(server.admin_url, "GET", "/metrics").body.decode()
    assert 'expense_auth_forward_auth_checks_total{result="ok"}' in metrics
    assert 'expense_auth_forward_auth_checks_total{result="unauthenticated"}' in metrics


# Its own listener, its own event loop -----------------------------------------------------


def test_checks_and_api_calls_at_once_on_postgres_and_redis(
    tmp_path: Path, google: FakeGoogle
) -> None:
    """pyvoy runs each listener's app on an event loop of its own; the asyncpg pool and
    the Redis client belong to the public app's. Checks and API calls at the same time
    must all be answered as when alone (server/runtime/home_loop.py)."""
    with postgres.database(migrated=False) as url, redis_server(tmp_path) as redis:
        running = start_server(
            tmp_path,
            server_env(
                google, DATABASE_URL=url, RATE_LIMIT_STORAGE_URL=redis.url, FORWARD_AUTH_PORT="0"
            ),
        )
        try:
            client = Session(running.url)
            client.sign_in(google.token(sub=secrets.token_hex(8)))
            assert client.cookie
            cookie = client.cookie
            statuses: list[int] = []

            def checks() -> None:
                for _ in range(40):
                    statuses.append(check(running, cookie=cookie).status)

            def api() -> None:
                for _ in range(40):
                    response = connect_post(
                        running.url, GET_SESSION, {}, headers={"cookie": cookie}
                    )
                    statuses.append(response.status)

            threads = [threading.Thread(target=work) for work in (checks, checks, api, api)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert statuses.count(200) == 160, Counter(statuses)
        finally:
            assert running.stop() == 0, running.logs()[-3000:]
        assert "Traceback" not in running.logs()
