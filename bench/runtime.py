"""The environment the servers under test run from: the runtime dependencies only.

The bench's own virtualenv holds matplotlib (and so numpy), py-spy, psycopg and the
dev tools. A server started from it would import some of them (sqlite-utils imports
numpy whenever it can), which production never does. So the servers run from a
second virtualenv that holds exactly `[project].dependencies` of pyproject.toml,
created by the bench on first use and kept in bench/results/tmp/ (gitignored),
keyed by the Python version and the dependency list. The service's code itself
comes from the working tree (PYTHONPATH), so that every run measures the code as
it is, with nothing installed over it.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENVS = REPO / "bench" / "results" / "tmp" / "runtime"


def dependencies() -> list[str]:
    """The service's runtime requirements, as pyproject.toml pins them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def python() -> Path:
    """The interpreter of the runtime-only virtualenv, creating it when missing."""
    deps = dependencies()
    key = hashlib.sha256(
        "\n".join([platform.python_version(), sys.base_prefix, *deps]).encode()
    ).hexdigest()[:12]
    venv = VENVS / key
    interpreter = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return interpreter
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    # From the base interpreter, so that nothing of the bench's venv leaks in.
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    subprocess.run([str(base), "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [str(interpreter), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *deps],
        check=True,
        timeout=1800,
    )
    (venv / ".complete").write_text("\n".join(deps) + "\n")
    return interpreter


def serve_command(interpreter: Path) -> list[str]:
    """`expense-auth` as the runtime venv runs it (the console script's entry point)."""
    return [str(interpreter), "-m", "server.cli"]
