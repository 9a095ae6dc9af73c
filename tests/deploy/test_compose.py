"""compose.yaml, started with podman-compose as an operator would, and a smoke test of it.

The images are built by deploy/compose/build.sh (PostgreSQL, Redis and the OTLP stand-in
from Debian's packages on the service's own base: no registry is reachable here). The
stack runs under a project name of its own, with the replicas published on free ports
of the host's loopback (the host's own PostgreSQL and Redis hold 5432 and 6379, which
the stack never publishes), and is always taken down with its volumes and network.

Debian 12's podman-compose (1.0.3) ignores `depends_on` conditions and profiles, and
podman runs no health checks without systemd: the stack must converge anyway (see the
header of compose.yaml; the last test makes PostgreSQL come up last on purpose), and the
collector of the `otel` profile starts with the rest.
"""

from __future__ import annotations

import http.client
import json
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import pytest

from tests.conftest import require_tool
from tests.support.burst import GET_SESSION, SIGN_IN, session_cookie
from tests.support.http import connect_post, request
from tests.support.podman import REPO, checked, podman, podman_env
from tests.support.ports import free_port

BUILD_TIMEOUT_S = 1200  # the cold build of four images; see docs/operations.md for figures
UP_TIMEOUT_S = 300
READY_TIMEOUT_S = 240  # PostgreSQL's first start, then migrate, then the replicas
TELEMETRY_TIMEOUT_S = 60  # spans are exported in batches every 5 s
POSTGRES_MIGRATIONS = "server/storage/postgres/migrations"
SIGN_OUT = "/expense.auth.v1.AuthService/SignOut"
REPLICAS = ("expense-auth-1", "expense-auth-2")


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """compose.yaml's image variables, set to the ids deploy/compose/build.sh built."""
    for tool in ("podman", "podman-compose", "mmdebstrap", "runc", "curl"):
        require_tool(tool, tool)
    started = time.monotonic()
    result = subprocess.run(
        [str(REPO / "deploy" / "compose" / "build.sh"), "--tag", "test"],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    print(f"images built in {time.monotonic() - started:.0f} s")
    # By id, not tag: another checkout on this machine may retag them meanwhile.
    built = dict(line.split("=", 1) for line in result.stdout.split())
    assert set(built) == {
        "EXPENSE_AUTH_IMAGE",
        "POSTGRES_IMAGE",
        "REDIS_IMAGE",
        "OTEL_COLLECTOR_IMAGE",
    }
    return built


@dataclass
class Stack:
    """A running compose project and where the host reaches its replicas."""

    project: str
    env: dict[str, str]
    urls: dict[str, str]  # replica service -> its published public port

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman-compose", "-p", self.project, "-f", str(REPO / "compose.yaml"), *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def container(self, service: str) -> str:
        """The name of the service's container, found by compose's labels."""
        names = checked(
            podman(
                "ps",
                "--all",
                f"--filter=label=com.docker.compose.project={self.project}",
                f"--filter=label=com.docker.compose.service={service}",
                "--format={{.Names}}",
            )
        ).split()
        assert len(names) == 1, (service, names)
        return names[0]

    def logs(self, service: str) -> str:
        return _logs(self.container(service))

    def state(self, service: str, field: str) -> str:
        template = f"{{{{.State.{field}}}}}"
        return checked(podman("inspect", f"--format={template}", self.container(service))).strip()

    def exec(self, service: str, *args: str) -> str:
        return checked(podman("exec", self.container(service), *args))

    def everything_logged(self) -> str:
        """The tail of every container's log, for a failure's message."""
        label = f"label=com.docker.compose.project={self.project}"
        names = podman("ps", "--all", f"--filter={label}", "--format={{.Names}}").stdout.split()
        return "\n".join(f"--- {name}:\n{_logs(name)[-2000:]}" for name in names)


def _logs(container: str) -> str:
    result = podman("logs", container)
    return result.stdout + result.stderr


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def ready(url: str) -> bool:
    try:
        return request(url, "GET", "/readyz", timeout=2).status == 200
    except (OSError, http.client.HTTPException):
        return False


def tear_down(stack: Stack) -> None:
    """Everything the project made: containers, volumes, and the network 1.0.3 leaves."""
    stack.compose("down", "-v", "-t", "5", timeout=180)
    label = f"label=com.docker.compose.project={stack.project}"
    left = podman("ps", "--all", "--quiet", f"--filter={label}").stdout.split()
    if left:
        podman("rm", "--force", "--volumes", "--time=0", *left)
    volumes = podman("volume", "ls", "--quiet", f"--filter={label}").stdout.split()
    if volumes:
        podman("volume", "rm", "--force", *volumes)
    podman("network", "rm", "--force", f"{stack.project}_default")


def new_stack(images: dict[str, str], **env: str) -> Stack:
    """A project of its own, its replicas on free ports; nothing started yet."""
    ports = {replica: free_port() for replica in REPLICAS}
    return Stack(
        project=f"expense-auth-test-{secrets.token_hex(4)}",
        env={
            **podman_env(),
            **images,
            "SESSION_SECRET_KEY": secrets.token_urlsafe(48),
            "POSTGRES_PASSWORD": secrets.token_urlsafe(24),
            "EXPENSE_AUTH_1_PORT": str(ports["expense-auth-1"]),
            "EXPENSE_AUTH_2_PORT": str(ports["expense-auth-2"]),
            **env,
        },
        urls={replica: f"http://127.0.0.1:{port}" for replica, port in ports.items()},
    )


def wait_until_ready(stack: Stack) -> None:
    try:
        for replica, url in stack.urls.items():
            wait_for(partial(ready, url), READY_TIMEOUT_S, f"{replica}'s /readyz")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.everything_logged()}") from None


@pytest.fixture(scope="module")
def stack(images: dict[str, str]) -> Iterator[Stack]:
    """compose.yaml up, with the `otel` profile and telemetry on, until both replicas are ready."""
    # COMPOSE_PROFILES rather than --profile, which podman-compose 1.0.3 does not know.
    stack = new_stack(
        images,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://otel-collector:4318",
        COMPOSE_PROFILES="otel",
    )
    try:
        started = time.monotonic()
        up = stack.compose("up", "-d", timeout=UP_TIMEOUT_S)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        wait_until_ready(stack)
        print(f"both replicas ready {time.monotonic() - started:.0f} s after `up`")
        yield stack
    finally:
        tear_down(stack)


def test_migrate_ran_to_completion_and_the_replicas_did_not_migrate(stack: Stack) -> None:
    assert stack.state("migrate", "Status") == "exited"
    assert stack.state("migrate", "ExitCode") == "0", stack.logs("migrate")
    # Every migration of the tree, so the image holds them (the SQL files are package data).
    migrations = sorted(p.stem for p in (REPO / POSTGRES_MIGRATIONS).glob("m*.sql"))
    assert migrations
    assert f"migrations={','.join(migrations)}" in stack.logs("migrate"), stack.logs("migrate")
    for replica in REPLICAS:
        assert "migrations applied" not in stack.logs(replica)
        assert stack.state(replica, "Running") == "true"


def test_readiness_of_both_replicas(stack: Stack) -> None:
    for url in stack.urls.values():
        body = request(url, "GET", "/readyz").json()
        assert body["status"] == "ready", body
        assert body["checks"]["database"] == "ok", body
        # Redis answers: "degraded: ..." while it does not (docs/operations.md).
        assert body["dependencies"]["rate_limit_storage"] == "ok", body


def test_a_session_made_on_one_replica_works_and_ends_on_the_other(stack: Stack) -> None:
    one, two = (stack.urls[replica] for replica in REPLICAS)
    token = stack.exec(
        "expense-auth-1", "expense-auth", "dev-token", "--email", "ann@example.com"
    ).strip()
    signed = connect_post(one, SIGN_IN, {"googleIdToken": token})
    assert signed.status == 200, signed.body
    session_id = signed.json()["session"]["id"]
    cookie = {"cookie": session_cookie(signed)}

    # One PostgreSQL and one SESSION_SECRET_KEY: the other replica knows the session.
    got = connect_post(two, GET_SESSION, {}, headers=cookie)
    assert got.status == 200, got.body
    assert got.json()["session"]["id"] == session_id

    signed_out = connect_post(two, SIGN_OUT, {}, headers=cookie)
    assert signed_out.status == 200, signed_out.body
    for url in (one, two):
        refused = connect_post(url, GET_SESSION, {}, headers=cookie)
        assert refused.status == 401, refused.body
        assert refused.json()["code"] == "unauthenticated"


def test_rate_limits_are_counted_in_the_compose_redis(stack: Stack) -> None:
    # Every request above went through the limits; their windows are Redis keys. (Two
    # servers on one database with in-memory limits would also be refused at start.)
    connect_post(stack.urls["expense-auth-2"], GET_SESSION, {})
    keys = stack.exec("redis", "redis-cli", "--scan").split()
    assert any(key.startswith("LIMITS") for key in keys), keys[:20]


def test_postgres_health_check_passes(stack: Stack) -> None:
    # podman runs no periodic health checks without systemd; the check itself works.
    for service in ("postgres", "redis"):
        result = podman("healthcheck", "run", stack.container(service))
        assert result.returncode == 0, (service, result.stdout, result.stderr)


def test_spans_of_both_replicas_reach_the_collector(stack: Stack) -> None:
    for url in stack.urls.values():
        assert request(url, "GET", "/readyz").status == 200
        connect_post(url, GET_SESSION, {})  # a call: a span

    def instances() -> set[str]:
        logged = stack.logs("otel-collector").splitlines()
        lines = [json.loads(line) for line in logged if line.startswith("{")]
        return {line["instance"] for line in lines if line["signal"] == "span"}

    wait_for(lambda: instances() >= set(REPLICAS), TELEMETRY_TIMEOUT_S, "spans from both replicas")


def restarted(stack: Stack, service: str) -> bool:
    count = checked(podman("inspect", "--format={{.RestartCount}}", stack.container(service)))
    return int(count) >= 1


def test_the_stack_converges_when_postgres_comes_up_last(images: dict[str, str]) -> None:
    # What podman-compose 1.0.3 does when PostgreSQL is slow to start: it waits for no
    # condition, so `migrate` and the replicas start before the database answers. They
    # must say why they exit, be restarted (restart: on-failure), and end up serving.
    stack = new_stack(images)
    try:
        created = stack.compose("up", "--no-start", timeout=UP_TIMEOUT_S)
        assert created.returncode == 0, created.stdout[-3000:] + created.stderr[-3000:]
        early = ("redis", "migrate", *REPLICAS)
        checked(podman("start", *(stack.container(service) for service in early)))
        for service in ("migrate", *REPLICAS):
            wait_for(partial(restarted, stack, service), READY_TIMEOUT_S, f"{service} to restart")
        checked(podman("start", stack.container("postgres")))
        wait_until_ready(stack)
        wait_for(
            lambda: stack.state("migrate", "Status") == "exited",
            READY_TIMEOUT_S,
            "migrate to finish",
        )
        assert stack.state("migrate", "ExitCode") == "0", stack.logs("migrate")
        unreachable = "expense-auth: cannot connect to the PostgreSQL database at postgres:5432"
        assert unreachable in stack.logs("migrate")
        assert "migrations applied" in stack.logs("migrate")
        for replica in REPLICAS:
            logged = stack.logs(replica)
            assert unreachable in logged or "the database needs migrations" in logged, logged
            assert "Traceback" not in logged.split("serving address=")[0], logged
    finally:
        tear_down(stack)
