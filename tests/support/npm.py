"""npm and the client package (clients/ts) as the tests use them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIENT_PACKAGE = "@expense/auth-client"
NPM_TIMEOUT_S = 240


def run_in(cwd: Path, args: list[str], *, timeout: float = NPM_TIMEOUT_S) -> str:
    """Run a tool in `cwd`; its stdout. A non-zero exit fails with everything it printed."""
    result = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def npm(npm_path: str, cwd: Path, *args: str) -> str:
    """Run npm in `cwd`, quietly."""
    return run_in(cwd, [npm_path, *args, "--no-audit", "--no-fund", "--loglevel=error"])


def pack_client(npm_path: str, out: Path) -> Path:
    """`npm pack` of the client package into `out`; its prepack script builds it first."""
    packed = json.loads(
        npm(
            npm_path,
            REPO,
            "pack",
            "--workspace",
            CLIENT_PACKAGE,
            "--pack-destination",
            str(out),
            "--json",
        )
    )
    (entry,) = packed
    path: Path = out / entry["filename"]
    assert path.is_file(), packed
    return path


def which_npm() -> str | None:
    """npm on PATH, if any."""
    return shutil.which("npm")
