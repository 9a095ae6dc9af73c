"""Queries of the webhook outbox: writing events with changes, claiming, outcomes, listing.

The store runs every write in `BEGIN IMMEDIATE`, so a claim is one writer at a
time across every process on the file: two processes cannot lease one event.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from server.domain.models import OutboxEvent, WebhookDelivery
from server.storage.rows import OUTBOX_COLUMNS as COLUMNS
from server.storage.rows import delivery

# A due event: pending, its time has come, no live lease. Parameters (now, now).
_DUE = "state = 'pending' AND next_attempt_ms <= ? AND lease_until_ms <= ?"


def insert(conn: sqlite3.Connection, events: Sequence[OutboxEvent]) -> None:
    """Write events into the outbox, in the caller's transaction."""
    conn.executemany(
        "INSERT INTO webhook_outbox (event_id, endpoint, user_id, type, payload, create_ms, "
        "state, attempts, since_ms, next_attempt_ms, lease_until_ms, lease_owner, last_error) "
        "VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, 0, '', '')",
        [
            (e.id, e.endpoint, e.user_id, e.type, e.payload, e.create_ms, e.create_ms, e.create_ms)
            for e in events
        ],
    )


def due(conn: sqlite3.Connection, *, now_ms: int, endpoints: Sequence[str]) -> bool:
    """See `OutboxStore.outbox_due`."""
    row = conn.execute(
        f"SELECT 1 FROM webhook_outbox WHERE {_DUE} "
        "AND endpoint IN (SELECT value FROM json_each(?)) LIMIT 1",
        (now_ms, now_ms, json.dumps(list(endpoints))),
    ).fetchone()
    return row is not None


def claim(
    conn: sqlite3.Connection,
    *,
    now_ms: int,
    lease_until_ms: int,
    owner: str,
    endpoints: Sequence[str],
    limit: int,
) -> list[WebhookDelivery]:
    """See `OutboxStore.claim_outbox`."""
    rows = conn.execute(
        f"""
        UPDATE webhook_outbox SET lease_until_ms = ?, lease_owner = ?
        WHERE seq IN (
            SELECT e.seq FROM webhook_outbox AS e
            WHERE e.state = 'pending' AND e.next_attempt_ms <= ? AND e.lease_until_ms <= ?
              AND e.endpoint IN (SELECT value FROM json_each(?))
              AND NOT EXISTS (
                  SELECT 1 FROM webhook_outbox AS p
                  WHERE p.state = 'pending' AND p.user_id = e.user_id
                    AND p.endpoint = e.endpoint AND p.seq < e.seq)
            ORDER BY e.seq LIMIT ?)
        RETURNING {COLUMNS}
        """,
        (lease_until_ms, owner, now_ms, now_ms, json.dumps(list(endpoints)), limit),
    ).fetchall()
    return sorted((delivery(row) for row in rows), key=lambda d: d.seq)


def delivered(conn: sqlite3.Connection, seq: int, *, owner: str) -> None:
    """See `OutboxStore.outbox_delivered`."""
    conn.execute("DELETE FROM webhook_outbox WHERE seq = ? AND lease_owner = ?", (seq, owner))


def failed(
    conn: sqlite3.Connection, seq: int, *, owner: str, error: str, next_attempt_ms: int, park: bool
) -> None:
    """See `OutboxStore.outbox_failed`."""
    conn.execute(
        "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = ?, "
        "next_attempt_ms = ?, state = ?, lease_until_ms = 0, lease_owner = '' "
        "WHERE seq = ? AND lease_owner = ?",
        (error, next_attempt_ms, "parked" if park else "pending", seq, owner),
    )


def list_entries(
    conn: sqlite3.Connection, *, states: Sequence[str], after_seq: int | None, limit: int
) -> list[WebhookDelivery]:
    """See `OutboxStore.list_outbox`."""
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM webhook_outbox "
        "WHERE state IN (SELECT value FROM json_each(?)) AND seq > ? ORDER BY seq LIMIT ?",
        (json.dumps(list(states)), after_seq or 0, limit),
    )
    return [delivery(row) for row in rows]


def redeliver(
    conn: sqlite3.Connection, event_id: str, *, now_ms: int
) -> tuple[list[WebhookDelivery], bool]:
    """See `OutboxStore.redeliver_outbox`."""
    pending = conn.execute(
        "SELECT 1 FROM webhook_outbox WHERE event_id = ? AND state = 'pending'", (event_id,)
    ).fetchone()
    rows = conn.execute(
        "UPDATE webhook_outbox SET state = 'pending', attempts = 0, since_ms = ?, "
        "next_attempt_ms = ?, last_error = '', lease_until_ms = 0, lease_owner = '' "
        f"WHERE event_id = ? AND state = 'parked' RETURNING {COLUMNS}",
        (now_ms, now_ms, event_id),
    ).fetchall()
    return sorted((delivery(row) for row in rows), key=lambda d: d.seq), pending is not None


def count(conn: sqlite3.Connection) -> dict[str, int]:
    """See `OutboxStore.count_outbox`."""
    return {
        state: int(n)
        for state, n in conn.execute("SELECT state, count(*) FROM webhook_outbox GROUP BY state")
    }
