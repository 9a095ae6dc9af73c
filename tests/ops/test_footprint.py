"""A serving process loads only the libraries its configuration uses.

pyvoy's Envoy process imports server/runtime/asgi.py, which builds the whole
service. asyncpg (~3 MiB) is loaded only for a postgresql:// DATABASE_URL,
aiohttp (~8 MiB) only by the webhook sender's first delivery and sentry_sdk only
with SENTRY_DSN, so a SQLite deployment without them carries none.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.server import REPO

WATCHED = ("aiohttp", "asyncpg", "sentry_sdk")
SCRIPT = (
    "import os, sys\n"
    "from server.app import migrate_database\n"
    "from server.config import load_config\n"
    "if not os.environ.get('DATABASE_URL'):\n"
    "    migrate_database(load_config())\n"
    "import server.runtime.asgi\n"
    f"print(sorted({{m.partition('.')[0] for m in sys.modules}} & set({WATCHED!r})))\n"
)


@pytest.mark.parametrize(
    ("extra", "loaded"),
    [
        ({}, "[]"),
        # Webhooks configured: still no aiohttp before a delivery. PostgreSQL (never
        # reached while the app is built) shows that the check sees what is loaded.
        (
            {
                "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/expense_auth",
                "WEBHOOK_URLS": "https://expenses.internal/hooks",
                "WEBHOOK_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            },
            "['asyncpg']",
        ),
        ({"SENTRY_DSN": "http://key@127.0.0.1:9/1"}, "['sentry_sdk']"),
    ],
)
def test_the_app_imports_only_the_libraries_its_configuration_uses(
    tmp_path: Path, extra: dict[str, str], loaded: str
) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO),
        "DATA_DIR": str(tmp_path / "var"),
        **extra,
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == loaded, result.stderr
