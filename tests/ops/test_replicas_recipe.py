"""docs/operations.md, "Two replicas on one machine": the recipe runs as written.

The block is read from the document and changed only where this machine's test
must differ: free ports for 8080/8081/8090/8091, a throwaway database name, a Redis
of the test's own, the virtual environment's path. Both replicas are stopped
(SIGTERM) at the end, and must exit 0.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_tool
from tests.support import postgres
from tests.support.redis import redis_server
from tests.support.server import REPO

DOC = REPO / "docs" / "operations.md"
HEADING = "### Two replicas on one machine (the tested recipe)"
VENV_BIN = Path(sys.executable).parent


def recipe() -> str:
    text = DOC.read_text()
    section = text[text.index(HEADING) :]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "the recipe's sh block is missing"
    return match.group(1)


def test_the_two_replica_recipe_runs_as_written(tmp_path: Path) -> None:
    require_tool("createdb", "createdb (postgresql-client)")
    require_tool("curl", "curl")
    script = recipe()
    name = f"expense_auth_test_recipe_{secrets.token_hex(4)}"
    ports = {
        p: str(free) for p, free in zip(("8080", "8081", "8090", "8091"), _free(4), strict=True)
    }
    with redis_server(tmp_path) as redis:
        changed = script.replace("expense_auth_local", name)
        changed = changed.replace("redis://127.0.0.1:6379/5", f"{redis.url}/0")
        changed = changed.replace(".venv/bin/", f"{VENV_BIN}/")
        changed = re.sub(r"\b(8080|8081|8090|8091)\b", lambda m: ports[m.group(1)], changed)
        assert changed.count(f"{VENV_BIN}/expense-auth") == 4
        # After the recipe: stop both replicas as an operator would, and report how.
        harness = f"""set -eu
{changed}
echo
for pid in $(jobs -p); do kill -TERM "$pid"; done
codes=""
for pid in $(jobs -p); do wait "$pid" && codes="$codes 0" || codes="$codes $?"; done
echo "exit codes:$codes"
"""
        try:
            done = subprocess.run(
                ["bash", "-c", harness],
                cwd=tmp_path,
                env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(tmp_path)},
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
        finally:
            postgres.drop_database(postgres.url_for(name))
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) >= 2, out
    signed_in, current = (json.loads(line) for line in lines[-2:])
    assert "user" in signed_in and "user" in current, out
    assert signed_in["user"]["email"] == "you@example.com", out
    assert current["user"]["id"] == signed_in["user"]["id"], out  # the other replica knew
    assert "exit codes: 0 0" in out, out + done.stderr[-3000:]


def _free(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
