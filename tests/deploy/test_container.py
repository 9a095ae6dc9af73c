"""The container image, built with podman from deploy/container/ and run as an operator would.

The image is built by deploy/container/build.sh (the Debian base made with mmdebstrap,
cached in podman's store; see docs/operations.md). Containers run with a read-only root
filesystem and DATA_DIR bind-mounted from the test's directory, and are judged from
outside: published ports, `podman exec`, `podman top`, the engine's stop, and the SQLite
file left behind. On this machine podman needs deploy/container/containers.conf (why:
see there); `CONTAINERS_CONF` in the environment overrides it.
"""

from __future__ import annotations

import http.client
import json
import secrets
import sqlite3
import subprocess
import time
import tomllib
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import GENEROUS_LIMITS, require_tool
from tests.support.burst import (
    GET_SESSION,
    NOTICES,
    SIGN_IN,
    WORKERS,
    attempt,
    burst_then_stop,
    describe,
    listed_tokens,
    session_cookie,
)
from tests.support.http import connect_post, request
from tests.support.podman import CONTAINER_DIR, REPO, checked, podman, podman_env

BUILD_TIMEOUT_S = 900  # a cold build (base rootfs and every wheel) took under 3 minutes
DATA_DIR = "/var/lib/expense-auth"
UID = 10001
DB_NAME = "expense-auth.db"
READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30  # podman stop --time: above DRAIN_SECONDS plus the readiness grace
# Inside a container the public port must listen on every interface to be published.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104
EXIT_BY_SIGTERM = 128 + 15
EXIT_BY_SIGKILL = 128 + 9

# Development mode: the development issuer signs tokens inside the container.
DEV_ENV = {"APP_ENV": "development", "DRAIN_SECONDS": "10", **GENEROUS_LIMITS}


@pytest.fixture(scope="module")
def image() -> str:
    """The image id, built (or taken from podman's cache) by deploy/container/build.sh."""
    for tool in ("podman", "mmdebstrap", "runc", "curl"):
        require_tool(tool, tool)
    result = subprocess.run(
        [str(CONTAINER_DIR / "build.sh"), "--tag", "localhost/expense-auth:test"],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    # By id, not tag: another checkout on this machine may retag it meanwhile.
    return result.stdout.split()[-1]


@dataclass
class Container:
    """A running container and where the host reaches it."""

    name: str
    data_dir: Path
    url: str  # the public port, published on the host's loopback
    admin_port: int  # the container's 8081, published on the host's loopback

    def exec(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`podman exec` as the image's user."""
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
        return podman("exec", *flags, self.name, *args)

    def logs(self) -> str:
        """Everything the container wrote."""
        result = podman("logs", self.name)
        return result.stdout + result.stderr

    def state(self, field: str) -> str:
        """A field of `podman inspect`'s State, e.g. ExitCode."""
        return checked(podman("inspect", "--format", f"{{{{.State.{field}}}}}", self.name)).strip()


def published(name: str, port: int) -> int:
    address = checked(podman("port", name, f"{port}/tcp")).split()[0]
    return int(address.rsplit(":", 1)[1])


def run_container(image: str, tmp: Path, env: dict[str, str]) -> Container:
    """Start the image's own command, read-only, with DATA_DIR from `tmp`; wait until ready."""
    name = f"expense-auth-test-{secrets.token_hex(4)}"
    data_dir = tmp / "data"
    data_dir.mkdir()
    checked(
        podman(
            "run",
            "--detach",
            f"--name={name}",
            "--read-only",
            # :U gives the directory to the image's user (uid 10001).
            f"--volume={data_dir}:{DATA_DIR}:U",
            "--publish=127.0.0.1::8080",
            "--publish=127.0.0.1::8081",
            *[f"--env={k}={v}" for k, v in env.items()],
            image,
        )
    )
    container = Container(name, data_dir, "", 0)
    try:
        container.url = f"http://127.0.0.1:{published(name, 8080)}"
        container.admin_port = published(name, 8081)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if request(container.url, "GET", "/readyz", timeout=2).status == 200:
                    return container
            except (OSError, http.client.HTTPException):
                pass
            if container.state("Running") != "true":
                break
            time.sleep(0.2)
    except BaseException:
        remove(container)
        raise
    logs = container.logs()
    remove(container)
    raise AssertionError(f"the container did not become ready:\n{logs[-3000:]}")


def remove(container: Container) -> None:
    podman("rm", "--force", "--volumes", "--time=0", container.name)


@pytest.fixture(scope="module")
def served(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """One container for the read-only checks, in development mode."""
    container = run_container(image, tmp_path_factory.mktemp("container"), DEV_ENV)
    yield container
    remove(container)


# --- The image -----------------------------------------------------------------------------


def test_image_config(image: str) -> None:
    inspected = json.loads(checked(podman("image", "inspect", image)))[0]
    config = inspected["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "/opt/expense-auth/bin/expense-auth"]
    assert config["Cmd"] == ["serve", "--host", ALL_INTERFACES, "--port", "8080"]
    assert config["StopSignal"] == "SIGTERM"
    assert set(config["Volumes"]) == {DATA_DIR}
    assert set(config["ExposedPorts"]) == {"8080/tcp"}  # not the admin port
    assert env["DATA_DIR"] == DATA_DIR
    assert env["APP_ENV"] == "production"
    assert env["ADMIN_HOST"] == "127.0.0.1"
    check = inspected["Healthcheck"]["Test"]
    assert check[0] == "CMD" and check[-1] == "/opt/expense-auth/healthcheck.py", check
    print(f"image size: {inspected['Size'] / 1e6:.0f} MB")


# What the image has installed: Python distributions, the ones the service needs (the
# closure of its requirements, extras aside), and commands on PATH.
INVENTORY = """
import importlib.metadata as md, json, re, shutil

def key(name):
    return re.split(r"[\\s\\[=<>!~;(]", name, maxsplit=1)[0].lower().replace("_", "-")

names = {key(d.metadata["Name"]) for d in md.distributions()}
needed, todo = set(), ["expense-auth"]
while todo:
    name = todo.pop()
    if name in needed or name not in names:
        continue
    needed.add(name)
    todo += [key(r) for r in md.requires(name) or [] if "extra ==" not in r]
tools = ("node", "npm", "gcc", "cc", "pip", "pip3", "buf", "git", "curl")
tools = {t: shutil.which(t) for t in tools}
print(json.dumps({"names": sorted(names), "needed": sorted(needed), "tools": tools}))
"""


def requirement_name(requirement: str) -> str:
    for stop in "[=<>!~; ":
        requirement = requirement.split(stop, 1)[0]
    return requirement.lower().replace("_", "-")


def test_only_runtime_dependencies_are_inside(image: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {requirement_name(r) for r in project["dependencies"]}
    extras = {
        requirement_name(r) for extra in project["optional-dependencies"].values() for r in extra
    }
    result = checked(
        podman("run", "--rm", "--entrypoint=/opt/expense-auth/bin/python", image, "-c", INVENTORY)
    )
    inventory = json.loads(result.splitlines()[-1])
    names, needed = set(inventory["names"]), set(inventory["needed"])
    assert runtime <= names, runtime - names
    assert "expense-auth" in names
    # No dev or bench tool, unless a runtime dependency needs it (protobuf: OpenTelemetry).
    assert not (names & extras) - needed, (names & extras) - needed
    assert "pytest" not in names and "mypy" not in names  # the check above sees them
    assert not names & {"pip", "setuptools", "wheel"}, names
    assert not {tool: path for tool, path in inventory["tools"].items() if path}


def test_production_rules_apply_unless_told_otherwise(image: str) -> None:
    result = podman("run", "--rm", image, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    for variable in ("GOOGLE_CLIENT_ID", "SESSION_SECRET_KEY", "SESSION_SECURE_COOKIE"):
        assert variable in result.stderr, result.stderr[-2000:]


# --- A running container -------------------------------------------------------------------


def test_ready_and_healthy(served: Container) -> None:
    ready = request(served.url, "GET", "/readyz")
    assert ready.status == 200, ready.body
    assert ready.json()["status"] == "ready"
    assert podman("healthcheck", "run", served.name).returncode == 0
    # The check itself can fail: pointed at a port where nothing listens, it says so.
    broken = served.exec(
        "python",
        "-I",
        "/opt/expense-auth/healthcheck.py",
        env={"HEALTHCHECK_URL": "http://127.0.0.1:9/healthz"},
    )
    assert broken.returncode == 1, broken


def test_sign_in_with_the_development_issuer(served: Container) -> None:
    token = checked(
        served.exec("expense-auth", "dev-token", "--email", "ann@example.com", "--name", "Ann")
    ).strip()
    signed = connect_post(served.url, SIGN_IN, {"googleIdToken": token})
    assert signed.status == 200, signed.body
    body = signed.json()
    assert body["user"]["email"] == "ann@example.com"
    got = connect_post(served.url, GET_SESSION, {}, headers={"cookie": session_cookie(signed)})
    assert got.status == 200, got.body
    assert got.json()["session"]["id"] == body["session"]["id"]


def test_no_process_runs_as_root(served: Container) -> None:
    rows = [
        line.split(None, 3)
        for line in checked(
            podman("top", served.name, "user", "huser", "pid", "args")
        ).splitlines()[1:]
    ]
    assert rows
    assert {(user, huser) for user, huser, _, _ in rows} == {("expense-auth", str(UID))}, rows
    args = {int(pid): command for _, _, pid, command in rows}
    assert args[1].startswith("/usr/bin/tini -- "), args  # PID 1 hands signals on
    assert any("expense-auth serve" in command for command in args.values()), args
    assert any("/envoy " in command for command in args.values()), args
    assert checked(served.exec("id", "-u")).strip() == str(UID)


METRICS_FROM_INSIDE = """
import urllib.request
with urllib.request.urlopen("http://127.0.0.1:8081/metrics", timeout=5) as r:
    print(r.status, b"expense_auth_" in r.read())
"""


def test_admin_listener_is_reachable_from_the_pod_only(served: Container) -> None:
    # Published or not, the host cannot reach it: it listens on the container's loopback.
    with pytest.raises((OSError, http.client.HTTPException)):
        request(f"http://127.0.0.1:{served.admin_port}", "GET", "/healthz", timeout=5)
    # A process in the same network namespace (a sidecar, `podman exec`) can.
    assert checked(served.exec("python", "-c", METRICS_FROM_INSIDE)).split() == ["200", "True"]


def test_admin_listener_opens_when_configured(image: str, tmp_path: Path) -> None:
    container = run_container(image, tmp_path, {**DEV_ENV, "ADMIN_HOST": ALL_INTERFACES})
    try:
        metrics = request(f"http://127.0.0.1:{container.admin_port}", "GET", "/metrics")
    finally:
        remove(container)
    assert metrics.status == 200
    assert b"expense_auth_" in metrics.body


# --- Stopping -------------------------------------------------------------------------------

MINT = """
import os, pathlib, secrets, sys
from server.identity.dev_issuer import DEV_AUDIENCE, DevIssuer
issuer = DevIssuer.load_or_create(pathlib.Path(os.environ["DATA_DIR"]))
for _ in range(int(sys.argv[1])):
    subject = "dev-" + secrets.token_hex(8)
    email = subject + "@example.com"
    print(subject, issuer.mint(email=email, subject=subject, audience=DEV_AUDIENCE))
"""
TOKENS = 1000  # more than the burst's clients can use before they are told to leave


def open_db(path: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(path))


def test_podman_stop_drains_calls_in_flight(image: str, tmp_path: Path) -> None:
    container = run_container(image, tmp_path, DEV_ENV)
    try:
        minted = checked(container.exec("python", "-c", MINT, str(TOKENS)))
        pairs = [(s, t) for s, t in (line.split() for line in minted.splitlines())]
        stopped: list[subprocess.CompletedProcess[str]] = []
        burst = burst_then_stop(
            container.url,
            listed_tokens(pairs),
            lambda: stopped.append(
                podman("stop", f"--time={STOP_TIMEOUT_S}", container.name, timeout=90)
            ),
        )
        exit_code = int(container.state("ExitCode"))
        logs = container.logs()
    finally:
        remove(container)
    after_exit, _ = attempt(container.url, GET_SESSION, {}, subject="")

    db_path = container.data_dir / DB_NAME
    wal = db_path.with_name(DB_NAME + "-wal")
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    with open_db(db_path) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchall()
        stored = {row[0] for row in db.execute("SELECT id FROM sessions")}

    calls, answered, since = burst.calls, burst.answered, burst.sigterm_at
    assert stopped[0].returncode == 0, stopped[0].stderr
    assert any(c.started < since for c in answered), "the burst never got going"
    assert any(c.started > since and c.status == 200 for c in answered)
    failed = [c for c in answered if c.status != 200]
    assert not failed, f"{len(failed)} answered calls failed:\n{describe(failed, since)}"
    unanswered = burst.unanswered
    assert not unanswered, (
        f"{len(unanswered)} calls got no answer ({sum(c.refused for c in unanswered)} "
        f"refused); times from SIGTERM:\n{describe(unanswered, since)}\n{logs[-3000:]}"
    )
    assert sum(c.closing for c in answered) >= NOTICES * WORKERS  # every client was told
    assert after_exit.refused, after_exit  # and once it has stopped, nothing connects
    for get in (c for c in answered if c.procedure == GET_SESSION):
        signed = next(s for s in calls if s.procedure == SIGN_IN and s.subject == get.subject)
        assert get.session_id == signed.session_id

    # SIGTERM reached `expense-auth serve` through tini, and it drained and exited cleanly.
    assert exit_code == 0, logs[-3000:]
    assert "shutting down" in logs, logs[-3000:]
    assert "stopped" in logs, logs[-3000:]
    assert "calls in flight" not in logs, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    assert integrity == [("ok",)]
    assert wal_bytes == 0, f"the write-ahead log still holds {wal_bytes} bytes"
    acknowledged = {c.session_id for c in answered if c.procedure == SIGN_IN}
    assert len(acknowledged) >= WORKERS
    assert not acknowledged - stored, "acknowledged sign-ins have no session row"


def test_a_stop_during_start_up_is_not_ignored(image: str, tmp_path: Path) -> None:
    # As PID 1, Python would ignore SIGTERM until `serve` installs its handler, and the
    # engine would SIGKILL after --time (exit 137). tini hands the signal on at once.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    name = f"expense-auth-test-{secrets.token_hex(4)}"
    checked(
        podman(
            "run",
            "--detach",
            f"--name={name}",
            f"--volume={data_dir}:{DATA_DIR}:U",
            *[f"--env={k}={v}" for k, v in DEV_ENV.items()],
            image,
        )
    )
    try:
        checked(podman("stop", f"--time={STOP_TIMEOUT_S}", name, timeout=90))
        exit_code = int(checked(podman("inspect", "--format", "{{.State.ExitCode}}", name)))
    finally:
        podman("rm", "--force", "--volumes", "--time=0", name)
    # Killed by the SIGTERM itself, or (if it was quicker than us) drained and exited.
    assert exit_code in (EXIT_BY_SIGTERM, 0), f"exit code {exit_code}" + (
        " (SIGKILL after --time)" if exit_code == EXIT_BY_SIGKILL else ""
    )
