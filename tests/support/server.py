"""Start the real server (`expense-auth serve`) on a real socket, in its own process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.support.clock import FileClock

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
_SERVING = re.compile(r"serving address=(\S+) port=(\d+)")
_ADMIN = re.compile(r"admin address=(\S+) admin_port=(\d+)")
_FORWARD_AUTH = re.compile(r"forward_auth address=(\S+) forward_auth_port=(\d+)")


@dataclass
class RunningServer:
    """A server process and where to reach it."""

    process: subprocess.Popen[bytes]
    url: str
    port: int
    data_dir: Path
    log_path: Path
    env: dict[str, str]
    admin_url: str
    # The forward-auth listener's URL, when FORWARD_AUTH_PORT was set.
    forward_auth_url: str | None = None

    @property
    def address(self) -> str:
        """host:port, for grpcurl and grpcio."""
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        """Everything the server wrote so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    tmp: Path,
    env: Mapping[str, str],
    *,
    app: str | None = None,
    data_dir: Path | None = None,
    timeout_s: float = 60,
    clock: FileClock | None = None,
) -> RunningServer:
    """Run `expense-auth serve --port 0` in `tmp` and wait until it listens.

    With `clock`, the server reads the time from it (tests.support.clock_app).
    """
    data_dir = data_dir or tmp / "var"
    if clock is not None:
        env = {**env, "TEST_CLOCK_FILE": str(clock.path)}
        app = app or "tests.support.clock_app:app"
    log_path = tmp / f"server-{time.monotonic_ns()}.log"
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(tmp)),
        "APP_ENV": "development",
        "DATA_DIR": str(data_dir),
        "LOG_LEVEL": "INFO",
        "ADMIN_PORT": "0",
        "PYTHONPATH": str(REPO),
        **env,
    }
    args = [str(BIN / "expense-auth"), "serve", "--port", "0"]
    if app:
        args += ["--app", app]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args, cwd=tmp, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        match, admin = _SERVING.search(text), _ADMIN.search(text)
        forward_auth = _FORWARD_AUTH.search(text)
        wants_forward_auth = bool(full_env.get("FORWARD_AUTH_PORT"))
        if match and admin and (forward_auth or not wants_forward_auth):
            return RunningServer(
                process=process,
                url=match.group(1),
                port=int(match.group(2)),
                data_dir=data_dir,
                log_path=log_path,
                env=full_env,
                admin_url=admin.group(1),
                forward_auth_url=forward_auth.group(1) if forward_auth else None,
            )
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server did not start:\n{log_path.read_text(errors='replace')}")
