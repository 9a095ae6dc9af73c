"""A complete receiver of expense-auth's account lifecycle webhooks, as the expense
service would run it (docs/integration.md, "Account lifecycle webhooks").

Standard library plus `standardwebhooks` (pip install standardwebhooks). It
verifies every delivery (signature and timestamp), applies each event once (the
`webhook-id` is recorded in the same transaction as the change it causes), and
answers 2xx only once the change is committed: anything else makes expense-auth
try again later.

    WEBHOOK_SECRET=whsec_... python receiver.py --port 9000 --db expenses.db
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

MAX_BODY = 64 * 1024
_writing = threading.Lock()  # one transaction at a time on the shared connection


def open_db(path: str) -> sqlite3.Connection:
    """The expense service's own tables (here: its copy of the users) and the ids of
    the events already applied."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE IF NOT EXISTS applied_events (id TEXT PRIMARY KEY)")
    db.execute(
        "CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, email TEXT, "
        "display_name TEXT, currency_code TEXT, disabled INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute("CREATE TABLE IF NOT EXISTS expenses (user_id TEXT, amount TEXT)")
    return db


def apply(db: sqlite3.Connection, event_id: str, event: dict[str, Any]) -> None:
    """Apply one verified event, once: a repeated `webhook-id` changes nothing."""
    with _writing:
        _apply(db, event_id, event["type"], event["data"])


def _apply(db: sqlite3.Connection, event_id: str, kind: str, data: dict[str, Any]) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        seen = db.execute("INSERT OR IGNORE INTO applied_events (id) VALUES (?)", (event_id,))
        if seen.rowcount == 0:
            db.execute("COMMIT")
            return  # a duplicate (at-least-once delivery): already applied
        if kind == "user.created":
            user = data["user"]
            db.execute(
                "INSERT OR REPLACE INTO users (id, email, display_name, currency_code) "
                "VALUES (?, ?, ?, ?)",
                (user["id"], user["email"], user["display_name"], user["currency_code"]),
            )
        elif kind == "user.updated":
            changes = {
                k: v
                for k, v in data["changes"].items()
                if k in ("email", "display_name", "currency_code")
            }
            for column, value in changes.items():
                db.execute(
                    f"UPDATE users SET {column} = ? WHERE id = ?",  # noqa: S608 (known names)
                    (value, data["user_id"]),
                )
        elif kind in ("user.disabled", "user.enabled"):
            db.execute(
                "UPDATE users SET disabled = ? WHERE id = ?",
                (kind == "user.disabled", data["user_id"]),
            )
        elif kind == "user.deleted":
            # Erase everything held about the user.
            db.execute("DELETE FROM expenses WHERE user_id = ?", (data["user_id"],))
            db.execute("DELETE FROM users WHERE id = ?", (data["user_id"],))
        # Unknown types are acknowledged and ignored: new ones may be added.
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def handler(webhook: Webhook, db: sqlite3.Connection) -> type[BaseHTTPRequestHandler]:
    """The HTTP handler: verify, apply, answer."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length > MAX_BODY:
                self.answer(413)
                return
            body = self.rfile.read(length)
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                # Checks the signature and that webhook-timestamp is within 5 minutes
                # (a captured delivery cannot be replayed later).
                event = webhook.verify(body, headers)
            except WebhookVerificationError:
                self.answer(400)
                return
            try:
                apply(db, headers["webhook-id"], event)
            except sqlite3.Error:
                self.answer(503)  # not applied: expense-auth will retry
                return
            self.answer(204)

        def answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def main() -> None:
    """Serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--db", default="expenses.db")
    args = parser.parse_args()
    # The same secret as expense-auth's WEBHOOK_SECRET (during a rotation, either one).
    webhook = Webhook(os.environ["WEBHOOK_SECRET"])
    db = open_db(args.db)
    server = ThreadingHTTPServer((args.host, args.port), handler(webhook, db))
    print(json.dumps({"listening": server.server_address[1]}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
