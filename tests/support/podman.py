"""podman for the deployment tests, with this machine's settings (deploy/container/containers.conf).

On the project's machines podman's defaults cannot start a container (why: see that
file); `CONTAINERS_CONF` in the environment overrides it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTAINER_DIR = REPO / "deploy" / "container"


def podman_env() -> dict[str, str]:
    """The environment for podman and the tools that call it (build scripts, compose)."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINER_DIR / "containers.conf"))
    return env


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run podman with this machine's settings; never raises on a non-zero exit."""
    return subprocess.run(
        ["podman", *args],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def checked(result: subprocess.CompletedProcess[str]) -> str:
    """stdout of a command that must succeed."""
    assert result.returncode == 0, f"{result.args}: {result.stderr[-3000:]}"
    return result.stdout
