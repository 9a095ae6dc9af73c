"""The receiver of docs/integration.md runs as written: examples/webhooks/receiver.py, in
its own process, against the real server."""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from gen.expense.user.v1.user_pb import DeleteCurrentUserRequest
from tests.conftest import server_env
from tests.support.client import Session
from tests.support.google import FakeGoogle
from tests.support.server import REPO, start_server
from tests.support.webhooks import new_secret, post
from tests.webhooks.test_delivery import rename, wait_until

EXAMPLE = REPO / "examples" / "webhooks" / "receiver.py"
DOCS = REPO / "docs" / "integration.md"


def test_the_docs_show_the_example_as_it_is() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    assert EXAMPLE.read_text() in blocks
    for kind in ("created", "updated", "disabled", "enabled", "deleted"):
        assert f"`user.{kind}`" in DOCS.read_text()


@pytest.fixture
def example(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """The example receiver running: (its URL, its secret, its database)."""
    secret = new_secret()
    db = tmp_path / "expenses.db"
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--port", "0", "--db", str(db)],
        env={"WEBHOOK_SECRET": secret, "PATH": ""},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = json.loads(process.stdout.readline())["listening"]
        yield f"http://127.0.0.1:{port}/webhooks", secret, db
    finally:
        process.terminate()
        process.communicate(timeout=30)


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    """The example's own tables, read beside it."""
    with closing(sqlite3.connect(db)) as conn:
        return list(conn.execute(sql))


def test_the_example_applies_each_event_once_and_erases_deleted_users(
    tmp_path: Path, google: FakeGoogle, example: tuple[str, str, Path]
) -> None:
    url, secret, db = example
    server = start_server(tmp_path, server_env(google, WEBHOOK_URLS=url, WEBHOOK_SECRET=secret))
    try:
        sub, email = secrets.token_hex(8), f"{secrets.token_hex(8)}@example.com"
        device = Session(server.url)
        user = device.sign_in(google.token(sub=sub, email=email)).user
        assert user is not None
        rename(device, "Gil")
        wait_until(lambda: rows(db, "SELECT display_name FROM users") == [("Gil",)])
        assert rows(db, "SELECT id, email FROM users") == [(user.id, email)]
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("INSERT INTO expenses VALUES (?, '12.50')", (user.id,))
        # A forged delivery is refused; nothing changes.
        forged = json.dumps({"type": "user.deleted", "timestamp": "", "data": {"user_id": user.id}})
        headers = {"webhook-id": "evt_x", "webhook-timestamp": "1", "webhook-signature": "v1,x"}
        assert post(url, headers, forged.encode()) == 400
        assert rows(db, "SELECT count(*) FROM expenses") == [(1,)]

        device.call(
            device.users.delete_current_user,
            DeleteCurrentUserRequest(google_id_token=google.token(sub=sub, email=email)),
        )
        wait_until(lambda: rows(db, "SELECT count(*) FROM users") == [(0,)])
        assert rows(db, "SELECT count(*) FROM expenses") == [(0,)]
        assert rows(db, "SELECT count(*) FROM applied_events") == [(3,)]
    finally:
        assert server.stop() == 0, server.logs()
