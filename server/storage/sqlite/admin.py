"""Queries of the admin port: listing users, disabling them, ending their sessions."""

from __future__ import annotations

import sqlite3
from typing import Any

from server.domain.lifecycle import ChangeEvents, no_events
from server.domain.models import User
from server.storage import rows
from server.storage.sqlite import outbox
from server.storage.sqlite.accounts import get_user


def list_users(
    conn: sqlite3.Connection, *, email_contains: str, after_id: str | None, limit: int
) -> list[User]:
    """Users ordered by id, optionally filtered by a case-insensitive email substring."""
    query = f"SELECT {rows.USER_COLUMNS} FROM users WHERE instr(lower(email), ?) > 0"
    params: list[Any] = [email_contains.lower()]
    if after_id is not None:
        query += " AND id > ?"
        params.append(after_id)
    query += " ORDER BY id LIMIT ?"
    params.append(limit)
    return [rows.user(row) for row in conn.execute(query, params)]


def set_disabled(
    conn: sqlite3.Connection,
    user_id: str,
    *,
    disabled: bool,
    now_ms: int,
    idle_cutoff_ms: int,
    events: ChangeEvents = no_events,
) -> User | None:
    """Disable (revoking every live session at once) or enable a user; write the
    change's `events`."""
    before = get_user(conn, user_id)
    row = conn.execute(
        # Disabling twice keeps the first time.
        f"UPDATE users SET disabled_ms = CASE WHEN ? THEN coalesce(disabled_ms, ?) END, "
        f"update_ms = ? WHERE id = ? "
        f"RETURNING {rows.USER_COLUMNS}",
        (disabled, now_ms, now_ms, user_id),
    ).fetchone()
    if row is not None and disabled:
        conn.execute(
            f"UPDATE sessions SET revoke_ms = ? WHERE user_id = ? AND {rows.LIVE}",
            (now_ms, user_id, now_ms, idle_cutoff_ms),
        )
    if row is None:
        return None
    after = rows.user(row)
    outbox.insert(conn, events(before, after))
    return after


def revoke_all_sessions(
    conn: sqlite3.Connection, user_id: str, *, now_ms: int, idle_cutoff_ms: int
) -> int:
    """Revoke every unrevoked session of the user."""
    return conn.execute(
        f"UPDATE sessions SET revoke_ms = ? WHERE user_id = ? AND {rows.LIVE}",
        (now_ms, user_id, now_ms, idle_cutoff_ms),
    ).rowcount
