"""A restore keeps deletions deleted for the receivers too: the restored events of a user
deleted again are dropped (they would bring the user's data back to the receivers) and
a `user.deleted` goes out instead."""

from __future__ import annotations

import subprocess
from pathlib import Path

from gen.expense.user.v1.user_pb import DeleteCurrentUserRequest
from tests.support.google import FakeGoogle
from tests.support.server import BIN, start_server
from tests.support.webhooks import Receiver, new_secret
from tests.webhooks.test_delivery import person, webhook_env


def cli(*args: str, env: dict[str, str], cwd: Path) -> str:
    """Run `expense-auth ARGS` with the server's environment; its output."""
    done = subprocess.run(
        [str(BIN / "expense-auth"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_restore_sends_the_deletion_not_the_deleted_users_older_events(
    tmp_path: Path, google: FakeGoogle
) -> None:
    receiver = Receiver(new_secret())  # not listening yet: events wait in the outbox
    receiver.start()
    receiver.stop()
    server = start_server(tmp_path, webhook_env(google, receiver))
    try:
        gus, hal = person(server), person(server)
        gus.sign_in(google)
        hal.sign_in(google)
        backup = tmp_path / "before-deletion.db"
        cli("backup", str(backup), env=server.env, cwd=tmp_path)  # online
        gus.device.call(
            gus.device.users.delete_current_user,
            DeleteCurrentUserRequest(google_id_token=google.token(sub=gus.sub, email=gus.email)),
        )
    finally:
        assert server.stop() == 0, server.logs()
    assert "account deletions re-applied: 1" in cli(
        "restore", str(backup), env=server.env, cwd=tmp_path
    )
    receiver.start()
    server = start_server(tmp_path, webhook_env(google, receiver), data_dir=server.data_dir)
    try:
        receiver.wait_for(lambda r: r.events_of(gus.user_id) == ["user.deleted"])
        receiver.wait_for(lambda r: r.events_of(hal.user_id) == ["user.created"])
        # In order per user: had the restored `user.created` of gus been kept, it would
        # have arrived before the deletion.
        assert [e["data"] for e in receiver.events() if e["type"] == "user.deleted"] == [
            {"user_id": gus.user_id}
        ]
    finally:
        assert server.stop() == 0, server.logs()
        receiver.stop()
