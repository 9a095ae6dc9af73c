"""The webhook outbox's queries, for PostgreSQL (see the SQLite module for the meaning).

Replicas claim side by side: `FOR UPDATE SKIP LOCKED` lets each take rows no
other claim holds, and a row leased meanwhile fails the re-checked lease
condition, so an event is leased to one process at a time, once per cluster.
A user's events are written under the user's row lock, so when a claim sees a
user's event it also sees every earlier one: "the oldest pending event of the
user" is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

from asyncpg import Connection as Conn

from server.domain.models import OutboxEvent, WebhookDelivery
from server.storage.rows import OUTBOX_COLUMNS as COLUMNS
from server.storage.rows import delivery

_DUE = "state = 'pending' AND next_attempt_ms <= $1 AND lease_until_ms <= $1"


async def insert(conn: Conn, events: Sequence[OutboxEvent]) -> None:
    """Write events into the outbox, in the caller's transaction."""
    if not events:
        return
    await conn.executemany(
        "INSERT INTO webhook_outbox (event_id, endpoint, user_id, type, payload, create_ms, "
        "state, attempts, since_ms, next_attempt_ms, lease_until_ms, lease_owner, last_error) "
        "VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $6, $6, 0, '', '')",
        [(e.id, e.endpoint, e.user_id, e.type, e.payload, e.create_ms) for e in events],
    )


async def due(conn: Conn, *, now_ms: int, endpoints: Sequence[str]) -> bool:
    """See `OutboxStore.outbox_due`."""
    found = await conn.fetchval(
        f"SELECT 1 FROM webhook_outbox WHERE {_DUE} AND endpoint = ANY($2::text[]) LIMIT 1",
        now_ms,
        list(endpoints),
    )
    return found is not None


async def claim(
    conn: Conn,
    *,
    now_ms: int,
    lease_until_ms: int,
    owner: str,
    endpoints: Sequence[str],
    limit: int,
) -> list[WebhookDelivery]:
    """See `OutboxStore.claim_outbox`."""
    rows = await conn.fetch(
        f"""
        WITH heads AS (
            SELECT e.seq FROM webhook_outbox AS e
            WHERE e.state = 'pending' AND e.next_attempt_ms <= $1 AND e.lease_until_ms <= $1
              AND e.endpoint = ANY($2::text[])
              AND NOT EXISTS (
                  SELECT 1 FROM webhook_outbox AS p
                  WHERE p.state = 'pending' AND p.user_id = e.user_id
                    AND p.endpoint = e.endpoint AND p.seq < e.seq)
            ORDER BY e.seq LIMIT $3
            FOR UPDATE OF e SKIP LOCKED)
        UPDATE webhook_outbox AS o SET lease_until_ms = $4, lease_owner = $5
        FROM heads WHERE o.seq = heads.seq
        RETURNING {", ".join(f"o.{c.strip()}" for c in COLUMNS.split(","))}
        """,
        now_ms,
        list(endpoints),
        limit,
        lease_until_ms,
        owner,
    )
    return sorted((delivery(tuple(r)) for r in rows), key=lambda d: d.seq)


async def delivered(conn: Conn, seq: int, *, owner: str) -> None:
    """See `OutboxStore.outbox_delivered`."""
    await conn.execute("DELETE FROM webhook_outbox WHERE seq = $1 AND lease_owner = $2", seq, owner)


async def failed(
    conn: Conn, seq: int, *, owner: str, error: str, next_attempt_ms: int, park: bool
) -> None:
    """See `OutboxStore.outbox_failed`."""
    await conn.execute(
        "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = $1, "
        "next_attempt_ms = $2, state = $3, lease_until_ms = 0, lease_owner = '' "
        "WHERE seq = $4 AND lease_owner = $5",
        error,
        next_attempt_ms,
        "parked" if park else "pending",
        seq,
        owner,
    )


async def list_entries(
    conn: Conn, *, states: Sequence[str], after_seq: int | None, limit: int
) -> list[WebhookDelivery]:
    """See `OutboxStore.list_outbox`."""
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM webhook_outbox WHERE state = ANY($1::text[]) AND seq > $2 "
        "ORDER BY seq LIMIT $3",
        list(states),
        after_seq or 0,
        limit,
    )
    return [delivery(tuple(r)) for r in rows]


async def redeliver(
    conn: Conn, event_id: str, *, now_ms: int
) -> tuple[list[WebhookDelivery], bool]:
    """See `OutboxStore.redeliver_outbox`."""
    pending = await conn.fetchval(
        "SELECT 1 FROM webhook_outbox WHERE event_id = $1 AND state = 'pending' LIMIT 1", event_id
    )
    rows = await conn.fetch(
        "UPDATE webhook_outbox SET state = 'pending', attempts = 0, since_ms = $1, "
        "next_attempt_ms = $1, last_error = '', lease_until_ms = 0, lease_owner = '' "
        f"WHERE event_id = $2 AND state = 'parked' RETURNING {COLUMNS}",
        now_ms,
        event_id,
    )
    return sorted((delivery(tuple(r)) for r in rows), key=lambda d: d.seq), pending is not None


async def count(conn: Conn) -> dict[str, int]:
    """See `OutboxStore.count_outbox`."""
    rows = await conn.fetch("SELECT state, count(*) FROM webhook_outbox GROUP BY state")
    return {state: int(n) for state, n in rows}
