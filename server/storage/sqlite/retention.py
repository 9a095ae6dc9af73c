"""Queries of the retention port: what the retention windows delete or shorten."""

from __future__ import annotations

import ipaddress
import sqlite3


def shorten_ip(ip: str) -> str:
    """The /24 (IPv4) or /48 (IPv6) network of an address: coarse enough to be anonymous."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


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
    rows = conn.execute(
        "SELECT id, ip FROM audit_events WHERE time_ms < ? AND ip != '' AND ip NOT LIKE '%/%'",
        (ips_before_ms,),
    ).fetchall()
    conn.executemany(
        "UPDATE audit_events SET ip = ? WHERE id = ?",
        [(shorten_ip(ip), event_id) for event_id, ip in rows],
    )
    return {"sessions": sessions, "events": events, "tokens": tokens, "ips": len(rows)}
