"""Queries of the profile, audit and account ports: users, events, export, deletion."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from server.domain.lifecycle import ChangeEvents, no_events
from server.domain.models import AuditEvent, Identity, User, UserExport
from server.domain.preferences import EDITABLE_FIELDS
from server.storage import rows
from server.storage.sqlite import outbox
from server.storage.sqlite.sessions import claim_token

_UPDATABLE = frozenset(EDITABLE_FIELDS)


def get_user(conn: sqlite3.Connection, user_id: str) -> User | None:
    """The user with this id, or None."""
    row = conn.execute(f"SELECT {rows.USER_COLUMNS} FROM users WHERE id = ?", (user_id,)).fetchone()
    return rows.user(row) if row else None


def update_user(
    conn: sqlite3.Connection,
    user_id: str,
    changes: Mapping[str, str],
    *,
    now_ms: int,
    events: ChangeEvents = no_events,
) -> User | None:
    """Set the given profile columns and `update_ms`; write the change's `events`."""
    columns = [name for name in changes if name in _UPDATABLE]
    if len(columns) != len(changes):
        raise ValueError(f"not updatable: {sorted(set(changes) - _UPDATABLE)}")
    assignments = ", ".join(f"{name} = ?" for name in columns)
    before = get_user(conn, user_id)
    row = conn.execute(
        f"UPDATE users SET {assignments}, update_ms = ? WHERE id = ? RETURNING {rows.USER_COLUMNS}",
        (*(changes[name] for name in columns), now_ms, user_id),
    ).fetchone()
    if row is None:
        return None
    after = rows.user(row)
    outbox.insert(conn, events(before, after))
    return after


def record_event(conn: sqlite3.Connection, event: AuditEvent) -> None:
    """Append one audit event."""
    rows.insert_event(conn, event)


def list_events(
    conn: sqlite3.Connection, user_id: str, *, before_id: int | None, limit: int
) -> list[AuditEvent]:
    """The user's events, newest first, keyset-paginated by id."""
    query = f"SELECT {rows.EVENT_COLUMNS} FROM audit_events WHERE user_id = ?"
    params: list[Any] = [user_id]
    if before_id is not None:
        query += " AND id < ?"
        params.append(before_id)
    query += " ORDER BY id DESC LIMIT ?"
    params.append(limit)
    return [rows.event(row) for row in conn.execute(query, params)]


def export_user(conn: sqlite3.Connection, user_id: str) -> UserExport | None:
    """The user, every session and every event, read in one transaction."""
    conn.execute("BEGIN")
    try:
        row = conn.execute(
            f"SELECT {rows.USER_COLUMNS} FROM users WHERE id = ?", (user_id,)
        ).fetchone()
        if row is None:
            return None
        sessions = [
            rows.session(r)
            for r in conn.execute(
                f"SELECT {rows.SESSION_COLUMNS} FROM sessions WHERE user_id = ? "
                "ORDER BY create_ms DESC, id DESC",
                (user_id,),
            )
        ]
        events = [
            rows.event(r)
            for r in conn.execute(
                f"SELECT {rows.EVENT_COLUMNS} FROM audit_events WHERE user_id = ? ORDER BY id DESC",
                (user_id,),
            )
        ]
        return UserExport(user=rows.user(row), sessions=sessions, events=events)
    finally:
        conn.execute("COMMIT")


def delete_user(
    conn: sqlite3.Connection,
    user: User,
    *,
    identity: Identity,
    tombstone: AuditEvent,
    now_ms: int,
    events: ChangeEvents = no_events,
) -> bool:
    """Delete the user, their sessions and events; keep a tombstone and a deletion record.

    The re-authentication token is claimed in the same transaction (once only).
    """
    claim_token(conn, identity, now_ms)
    deleted = conn.execute("DELETE FROM users WHERE id = ?", (user.id,)).rowcount
    if deleted != 1:
        return False
    conn.execute("DELETE FROM audit_events WHERE user_id = ?", (user.id,))
    conn.execute(
        "INSERT INTO deleted_accounts (subject_hash, deleted_ms) VALUES (?, ?) "
        "ON CONFLICT DO NOTHING",
        (tombstone.subject_hash, now_ms),
    )
    conn.execute(
        "INSERT INTO audit_events (time_ms, kind, user_id, reason, session_id, ip, "
        "user_agent, subject_hash) VALUES (?, ?, NULL, ?, '', '', '', ?)",
        (tombstone.time_ms, tombstone.kind, tombstone.reason, tombstone.subject_hash),
    )
    outbox.insert(conn, events(user, None))
    return True
