"""deploy/systemd: the unit verifies, and the server runs and stops under real systemd.

No systemd runs as PID 1 on the test machines, so `test_the_service_under_systemd`
boots one: systemd as PID 1 of new PID, mount, UTS and IPC namespaces (as
systemd-nspawn does, without a separate root), with only the unit under test and
empty stand-ins for the targets it orders itself after, so that nothing else of the
machine starts. The unit is the shipped file with two paths replaced (the binary and
the environment file); a drop-in only adds what this machine needs (see `DROP_IN`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gen.expense.auth.v1.auth_pb import CreateSignInNonceRequest, GetSessionRequest
from server.config import load_config
from tests.conftest import require_tool
from tests.interop.tools import REPO
from tests.support.client import Session
from tests.support.google import CLIENT_ID, FakeGoogle
from tests.support.http import request
from tests.support.promql import value
from tests.support.server import BIN

UNIT = REPO / "deploy" / "systemd" / "expense-auth.service"
ENV_EXAMPLE = REPO / "deploy" / "systemd" / "expense-auth.env.example"
INSTALLED_BIN = "/opt/expense-auth/bin/expense-auth"
INSTALLED_ENV = "/etc/expense-auth/expense-auth.env"
SYSTEMD = Path("/lib/systemd/systemd")
SERVICE_UID = 61_234  # the `expense-auth` user, only inside the test's namespaces
# systemd-analyze's exposure score times ten (1.7 when written): a loosened sandbox fails.
MAX_EXPOSURE = 20


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit, in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, setting = line.partition("=")
            settings.setdefault(key.strip(), []).append(setting.strip())
    return settings


def env_file(text: str) -> dict[str, str]:
    """An EnvironmentFile= as systemd reads ours (KEY=value lines; later ones win)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, setting = line.partition("=")
            env[key.strip()] = setting.strip()
    return env


def local_unit(environment_file: Path) -> str:
    """The shipped unit, run from this checkout's .venv with `environment_file`."""
    text = UNIT.read_text()
    assert INSTALLED_BIN in text and INSTALLED_ENV in text
    return text.replace(INSTALLED_BIN, str(BIN / "expense-auth")).replace(
        INSTALLED_ENV, str(environment_file)
    )


def systemd_analyze() -> str:
    return require_tool(shutil.which("systemd-analyze"), "systemd-analyze (Debian systemd)")


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), "verify", str(unit)],
        cwd=unit.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- the files -----------------------------------------------------------------------------


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    environment = tmp_path / "expense-auth.env"
    shutil.copy(ENV_EXAMPLE, environment)
    unit = tmp_path / "expense-auth.service"
    unit.write_text(local_unit(environment))
    result = verify(unit)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_of_the_shipped_file_only_misses_the_installed_binary(tmp_path: Path) -> None:
    unit = tmp_path / "expense-auth.service"
    shutil.copy(UNIT, unit)
    result = verify(unit)
    complaints = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0
    assert complaints == [
        f"{unit.name}: Command {INSTALLED_BIN} is not executable: No such file or directory"
    ]


def test_verify_reports_a_misspelt_setting(tmp_path: Path) -> None:
    unit = tmp_path / "expense-auth.service"
    unit.write_text(local_unit(ENV_EXAMPLE).replace("KillMode=mixed", "KillMod=mixed"))
    assert "Unknown key 'KillMod'" in verify(unit).stderr


def test_the_sandbox_exposure_stays_low(tmp_path: Path) -> None:
    unit = tmp_path / "expense-auth.service"
    unit.write_text(local_unit(ENV_EXAMPLE))
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", f"--threshold={MAX_EXPOSURE}", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Overall exposure level for expense-auth.service" in result.stdout


def test_the_unit_stops_by_draining_the_main_process() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["KillMode"] == ["mixed"]
    assert settings["KillSignal"] == ["SIGTERM"]
    drain = int(env_file(ENV_EXAMPLE.read_text())["DRAIN_SECONDS"])
    assert int(settings["TimeoutStopSec"][0]) >= drain + 5  # + load balancers' second, Envoy
    assert settings["EnvironmentFile"] == [INSTALLED_ENV]
    assert settings["StateDirectory"] == ["expense-auth"]
    assert "DATA_DIR=%S/expense-auth" in settings["Environment"][0]


def test_the_example_environment_refuses_to_start_until_filled_in(tmp_path: Path) -> None:
    env = {
        **env_file(ENV_EXAMPLE.read_text()),
        "PATH": os.environ.get("PATH", ""),
        "DATA_DIR": str(tmp_path / "var"),
    }
    result = subprocess.run(
        [str(BIN / "expense-auth"), "serve", "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    for variable in ("GOOGLE_CLIENT_ID", "SESSION_SECRET_KEY"):
        assert variable in result.stderr


def test_the_example_environment_filled_in_is_a_valid_production_config(tmp_path: Path) -> None:
    """What the systemd test cannot run (its fake Google serves plain HTTP)."""
    env = {
        **env_file(ENV_EXAMPLE.read_text()),
        "GOOGLE_CLIENT_ID": CLIENT_ID,
        "SESSION_SECRET_KEY": secrets.token_urlsafe(48),
        "ADMIN_TOKEN": secrets.token_urlsafe(48),
        "DATA_DIR": "/var/lib/expense-auth",  # what the unit sets
    }
    config = load_config(env, env_file=None)
    assert config.production
    assert config.session_secure_cookie
    assert config.google_certs_url.startswith("https://")  # Google's, by default
    assert config.backup_dir == Path("/var/lib/expense-auth/backups")  # in the state directory


# --- under systemd -------------------------------------------------------------------------

# Empty stand-ins for the units the service orders itself after (default dependencies
# and network-online.target), so that booting it starts nothing else of the machine.
STAND_INS = {
    "sysinit.target": "[Unit]\nDescription=stand-in\nDefaultDependencies=no\n",
    "basic.target": "[Unit]\nDescription=stand-in\nDefaultDependencies=no\n",
    "shutdown.target": "[Unit]\nDescription=stand-in\nDefaultDependencies=no\n",
    "network-online.target": "[Unit]\nDescription=stand-in\nDefaultDependencies=no\n",
    "system.slice": "[Unit]\nDescription=stand-in\nDefaultDependencies=no\n",
}

BOOT = """
set -e
mount -t proc proc /proc
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind "$STATE" /var/lib
mount --bind "$PASSWD" /etc/passwd
mount --bind "$GROUP" /etc/group
exec "$SYSTEMD" --system --unit=expense-auth.service --log-target=console --log-level=info
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def home_paths() -> list[str]:
    """What the service must read under /root or /home (ProtectHome= hides both)."""
    needed = {Path(sys.base_prefix).resolve(), REPO.resolve()}
    return sorted(str(p) for p in needed if p.parts[1:2] in (("root",), ("home",)))


def under_tmp() -> bool:
    """Whether the checkout (its .venv included) is under /tmp, which PrivateTmp= hides."""
    repo = REPO.resolve()
    return repo.is_relative_to("/tmp") or repo.is_relative_to("/var/tmp")  # noqa: S108


STOP_RECORD = "stopped-with"


def drop_in(log: Path) -> str:
    """What this machine needs on top of the unit: the log in a file (no journald
    runs here), this machine's Python, which lives under /root, and a record of how
    the main process ended (systemd forgets a stopped unit's status at once)."""
    lines = [
        "[Service]",
        f"StandardOutput=append:{log}",
        f"StandardError=append:{log}",
        'ExecStopPost=/bin/sh -c \'echo "$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS" '
        f"> %S/expense-auth/{STOP_RECORD}'",
    ]
    if paths := home_paths():
        lines += ["ProtectHome=tmpfs", f"BindReadOnlyPaths={' '.join(paths)}"]
    if under_tmp():
        lines += ["PrivateTmp=no"]  # a checkout under /tmp (as CI's may be)
    return "\n".join(lines) + "\n"


@dataclass
class Booted:
    """systemd as PID 1 of its own namespaces, running expense-auth.service."""

    process: subprocess.Popen[bytes]
    pid1: int
    url: str
    admin_url: str
    state: Path
    environment: Path
    log: Path
    console: Path

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.nsenter("systemctl", "--no-pager", *args)

    def nsenter(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "--target", str(self.pid1), "--mount", "--pid", *command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def show(self, *properties: str) -> dict[str, str]:
        shown = self.systemctl("show", "expense-auth.service", *(f"-p{p}" for p in properties))
        return dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)

    def status(self, pid: int) -> dict[str, str]:
        """/proc/PID/status of a process inside the namespaces."""
        text = self.nsenter("cat", f"/proc/{pid}/status").stdout
        return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}

    def diagnostics(self) -> str:
        status = self.systemctl("status", "expense-auth.service").stdout
        return f"{status}\n--- service log\n{read(self.log)}\n--- systemd\n{read(self.console)}"


def read(path: Path) -> str:
    return path.read_text(errors="replace")[-6000:] if path.exists() else "(none)"


@pytest.fixture
def booted(tmp_path: Path, google: FakeGoogle) -> Iterator[Booted]:
    for tool in ("unshare", "nsenter"):
        require_tool(shutil.which(tool), f"{tool} (Debian util-linux)")
    require_tool(str(SYSTEMD), "systemd (Debian systemd)")
    port, admin_port = free_port(), free_port()
    units, state = tmp_path / "units", tmp_path / "var-lib"
    (units / "expense-auth.service.d").mkdir(parents=True)
    state.mkdir()
    environment = tmp_path / "expense-auth.env"
    environment.write_text(
        ENV_EXAMPLE.read_text()
        + "\n# The test's values, after the example's (the last assignment wins).\n"
        + f"GOOGLE_CLIENT_ID={CLIENT_ID}\nGOOGLE_CERTS_URL={google.certs_url}\n"
        + f"SESSION_SECRET_KEY={secrets.token_urlsafe(48)}\n"
        + f"ADMIN_TOKEN={secrets.token_urlsafe(48)}\n"
        + f"LISTEN_PORT={port}\nADMIN_PORT={admin_port}\n"
        + "RATE_LIMIT_PROBE_PER_IP=1000/second\n"  # the test watches /readyz closely
        # Production refuses a plain-HTTP GOOGLE_CERTS_URL, and the fake Google serves
        # plain HTTP: development mode, with what production would force set by hand.
        + "APP_ENV=development\nSIGNIN_NONCE_REQUIRED=true\nDEV_IDENTITY_ENABLED=false\n"
    )
    (units / "expense-auth.service").write_text(local_unit(environment))
    log, console = tmp_path / "service.log", tmp_path / "systemd.log"
    (units / "expense-auth.service.d" / "test.conf").write_text(drop_in(log))
    for name, text in STAND_INS.items():
        (units / name).write_text(text)
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text(
        Path("/etc/passwd").read_text()
        + f"expense-auth:x:{SERVICE_UID}:{SERVICE_UID}::/nonexistent:/usr/sbin/nologin\n"
    )
    group.write_text(Path("/etc/group").read_text() + f"expense-auth:x:{SERVICE_UID}:\n")

    env = {
        "PATH": os.environ.get("PATH", ""),
        "SYSTEMD_UNIT_PATH": str(units),  # these units only, not the machine's
        "SYSTEMD": str(SYSTEMD),
        "STATE": str(state),
        "PASSWD": str(passwd),
        "GROUP": str(group),
    }
    with console.open("wb") as out:
        process = subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--fork",
                "--mount",
                "--uts",
                "--ipc",
                "--propagation",
                "private",
                "bash",
                "-c",
                BOOT,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pid1 = 0
    try:
        pid1 = child_of(process.pid)
        running = Booted(
            process=process,
            pid1=pid1,
            url=f"http://127.0.0.1:{port}",
            admin_url=f"http://127.0.0.1:{admin_port}",
            state=state,
            environment=environment,
            log=log,
            console=console,
        )
        yield running
    finally:
        # systemd starts a session of its own: kill it, PID 1 of the namespace, by its
        # id, and every process inside ends with it.
        if pid1:
            os.kill(pid1, signal.SIGKILL)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        assert pid1 == 0 or not alive(pid1)


def alive(pid: int, timeout_s: float = 10) -> bool:
    """Whether `pid` still exists after waiting up to `timeout_s` for it to go."""
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return Path(f"/proc/{pid}").exists()


def child_of(pid: int, timeout_s: float = 10) -> int:
    """The process `unshare --fork` started: PID 1 inside the new namespaces."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("unshare did not start systemd")


def wait_ready(booted: Booted, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if request(booted.url, "GET", "/readyz", timeout=2).status == 200:
                return
        except OSError:
            pass
        if booted.show("ActiveState").get("ActiveState") == "failed":
            break
        time.sleep(0.2)
    pytest.fail(f"expense-auth did not get ready under systemd\n{booted.diagnostics()}")


def watch_readiness(url: str, answers: list[str], stopping: threading.Event) -> None:
    """Ask /readyz until told to stop: "ready", "draining", or "refused"."""
    while not stopping.is_set():
        try:
            response = request(url, "GET", "/readyz", timeout=2)
            draining = response.status == 503 and b"draining" in response.body
            answers.append("draining" if draining else "ready")
        except OSError:
            answers.append("refused")
        time.sleep(0.05)


def test_the_service_under_systemd(booted: Booted, google: FakeGoogle) -> None:
    wait_ready(booted)

    # The sandbox is in force on the main process and on Envoy, its child.
    main = int(booted.show("MainPID")["MainPID"])
    envoy = [int(p) for p in booted.nsenter("pgrep", "-P", str(main)).stdout.split()]
    assert envoy, booted.diagnostics()
    for pid in (main, *envoy):
        status = booted.status(pid)
        assert status["Uid"].split()[0] == str(SERVICE_UID), status
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"  # SystemCallFilter and friends: a seccomp filter
        assert int(status["CapBnd"], 16) == 0
        assert int(status["CapEff"], 16) == 0

    # It serves: a sign-in with a nonce (the crypto under
    # MemoryDenyWriteExecute and the system call filter), Google's certs fetched over
    # AF_INET, the database in the state directory, and the metrics on the admin port.
    browser = Session(booted.url)
    nonce = browser.call(browser.auth.create_sign_in_nonce, CreateSignInNonceRequest()).nonce
    browser.sign_in(google.token(sub="systemd-1", email="systemd-1@example.com", nonce=nonce))
    browser.call(browser.auth.get_session, GetSessionRequest())
    assert value(booted.admin_url, "expense_auth_dependency_up", dependency="identity_keys") == 1
    assert value(booted.admin_url, "process_start_time_seconds") is not None
    database = booted.state / "expense-auth" / "expense-auth.db"
    assert database.stat().st_uid == SERVICE_UID
    assert oct(database.parent.stat().st_mode & 0o777) == "0o700"
    assert "backup taken" in read(booted.log)  # BACKUP_DIR in the state directory

    # The command docs/operations.md gives for backups, as the service user. Without
    # its --wait --pipe, which need D-Bus (not running here); the rest is the same.
    before = value(booted.admin_url, "expense_auth_backup_last_success_timestamp_seconds")
    here: list[str] = []
    if home_paths():
        here += ["-p", "ProtectHome=tmpfs", "-p", f"BindReadOnlyPaths={' '.join(home_paths())}"]
    if under_tmp():
        here += ["-p", "PrivateTmp=no"]
    manual = booted.nsenter(
        "systemd-run", "--quiet", "-p", "User=expense-auth",
        "-p", f"EnvironmentFile={booted.environment}",
        "-p", "Environment=DATA_DIR=/var/lib/expense-auth",
        *here,  # as in drop_in(): this machine's Python, a checkout under /tmp
        str(BIN / "expense-auth"), "backup", "/var/lib/expense-auth/backups/manual.db",
    )  # fmt: skip
    assert manual.returncode == 0, manual.stdout + manual.stderr
    copy = booted.state / "expense-auth" / "backups" / "manual.db"
    deadline = time.monotonic() + 30
    after = before
    while after == before and time.monotonic() < deadline:
        time.sleep(0.2)
        after = value(booted.admin_url, "expense_auth_backup_last_success_timestamp_seconds")
    assert before is not None and after is not None and after > before, booted.diagnostics()
    assert copy.stat().st_uid == SERVICE_UID

    # `systemctl stop`: SIGTERM to the main process only (KillMode=mixed). While Envoy
    # still serves, readiness turns to "draining" (load balancers stop sending); then
    # it drains and exits 0 well before TimeoutStopSec: nothing is left to kill.
    answers: list[str] = []
    stopping = threading.Event()
    watcher = threading.Thread(target=watch_readiness, args=(booted.url, answers, stopping))
    watcher.start()
    started = time.monotonic()
    stopped = booted.systemctl("stop", "expense-auth.service")
    took = time.monotonic() - started
    stopping.set()
    watcher.join()
    assert "draining" in answers, answers
    assert stopped.returncode == 0, stopped.stderr
    assert booted.show("ActiveState") == {"ActiveState": "inactive"}
    # "exited 0": it ended by itself, not by a signal (SIGTERM would be "killed TERM",
    # SIGKILL after the timeout "timeout killed KILL").
    ended = (booted.state / "expense-auth" / STOP_RECORD).read_text().split()
    assert ended == ["success", "exited", "0"], booted.diagnostics()
    assert took < 25, took
    log = read(booted.log)
    assert re.search(r"shutting down.*\n(.*\n)*.*stopped", log), log
