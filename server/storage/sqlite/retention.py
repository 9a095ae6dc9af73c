"""Queries of the retention port: what the retention windows delete or shorten."""

from __future__ import annotations

import sqlite3

from server.storage import rows


def purge(
    conn: sqlite3.Connection,
    *,
    now_ms: int,
    session_grace_ms: int,
    idle_ms: int,
    events_before_ms: int,
    ips_before_ms: int,
) -> dict[str, int]:
    """Delete ended sessions, old events and spent tokens; shorten old IP addresses.

    A session ended at the earliest of its absolute expiry, its revocation and
    `idle_ms` after it was last seen; it is deleted `session_grace_ms` after that.
    """
    cutoff = now_ms - session_grace_ms
    sessions = conn.execute(
        "DELETE FROM sessions WHERE expire_ms < ? OR revoke_ms < ? OR last_seen_ms + ? < ?",
        (cutoff, cutoff, idle_ms, cutoff),
    ).rowcount
    events = conn.execute(
        "DELETE FROM audit_events WHERE time_ms < ? AND kind != 'account_deleted'",
        (events_before_ms,),
    ).rowcount
    tokens = conn.execute("DELETE FROM used_id_tokens WHERE expire_ms < ?", (now_ms,)).rowcount
    old = conn.execute(
        "SELECT id, ip FROM audit_events WHERE time_ms < ? AND ip != '' AND ip NOT LIKE '%/%'",
        (ips_before_ms,),
    ).fetchall()
    conn.executemany(
        "UPDATE audit_events SET ip = ? WHERE id = ?",
        [(rows.shorten_ip(ip), event_id) for event_id, ip in old],
    )
    return {"sessions": sessions, "events": events, "tokens": tokens, "ips": len(old)}


def claim_job(conn: sqlite3.Connection, name: str, *, now_ms: int, interval_ms: int) -> bool:
    """Claim this period of the job `name`; False when another process ran it already.

    A last run in the future (the wall clock stepped back) does not block the job.
    """
    claimed = conn.execute(
        "INSERT INTO job_runs (name, last_run_ms) VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
        "SET last_run_ms = excluded.last_run_ms "
        "WHERE job_runs.last_run_ms <= ? OR job_runs.last_run_ms > excluded.last_run_ms "
        "RETURNING 1",
        (name, now_ms, now_ms - interval_ms),
    ).fetchone()
    return claimed is not None
