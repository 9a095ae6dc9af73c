"""Rows of the schema as domain records (both engines), and pieces the SQLite queries share."""

from __future__ import annotations

import ipaddress
import sqlite3
from typing import Any

from server.domain.models import AuditEvent, OutboxEvent, Session, SingleUse, User, WebhookDelivery

USER_INSERT_COLUMNS = (
    "id, issuer, subject, email, email_verified, display_name, picture_uri, "
    "currency_code, time_zone, locale, create_ms, update_ms"
)
USER_COLUMNS = USER_INSERT_COLUMNS + ", disabled_ms"
EVENT_COLUMNS = "id, time_ms, kind, user_id, reason, session_id, ip, user_agent, subject_hash"
SESSION_COLUMNS = (
    "id, user_id, token_hash, create_ms, last_seen_ms, expire_ms, revoke_ms, user_agent"
)
OUTBOX_COLUMNS = (
    "seq, event_id, endpoint, user_id, type, payload, create_ms, state, attempts, "
    "since_ms, next_attempt_ms, last_error"
)
# A live session: parameters (now_ms, idle_cutoff_ms). One definition for every query.
LIVE = "revoke_ms IS NULL AND expire_ms > ? AND last_seen_ms > ?"


def user(row: tuple[Any, ...]) -> User:
    """A `users` row (USER_COLUMNS) as a User."""
    return User(
        id=row[0],
        issuer=row[1],
        subject=row[2],
        email=row[3],
        email_verified=bool(row[4]),
        display_name=row[5],
        picture_uri=row[6],
        currency_code=row[7],
        time_zone=row[8],
        locale=row[9],
        create_ms=row[10],
        update_ms=row[11],
        disabled_ms=row[12],
    )


def event(row: tuple[Any, ...]) -> AuditEvent:
    """An `audit_events` row (EVENT_COLUMNS) as an AuditEvent."""
    return AuditEvent(
        id=row[0],
        time_ms=row[1],
        kind=row[2],
        user_id=row[3],
        reason=row[4],
        session_id=row[5],
        ip=row[6],
        user_agent=row[7],
        subject_hash=row[8],
    )


def session(row: tuple[Any, ...]) -> Session:
    """A `sessions` row (SESSION_COLUMNS) as a Session."""
    return Session(
        id=row[0],
        user_id=row[1],
        token_hash=row[2],
        create_ms=row[3],
        last_seen_ms=row[4],
        expire_ms=row[5],
        revoke_ms=row[6],
        user_agent=row[7],
    )


def delivery(row: tuple[Any, ...]) -> WebhookDelivery:
    """A `webhook_outbox` row (OUTBOX_COLUMNS) as a WebhookDelivery."""
    return WebhookDelivery(
        seq=row[0],
        event=OutboxEvent(
            id=row[1],
            endpoint=row[2],
            user_id=row[3],
            type=row[4],
            payload=row[5],
            create_ms=row[6],
        ),
        state=row[7],
        attempts=row[8],
        since_ms=row[9],
        next_attempt_ms=row[10],
        last_error=row[11],
    )


def insert_event(conn: sqlite3.Connection, record: AuditEvent) -> None:
    """Append an audit event (its id is assigned by the database)."""
    conn.execute(
        "INSERT INTO audit_events (time_ms, kind, user_id, reason, session_id, ip, "
        "user_agent, subject_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.time_ms,
            record.kind,
            record.user_id,
            record.reason,
            record.session_id,
            record.ip,
            record.user_agent,
            record.subject_hash,
        ),
    )


def spend(conn: sqlite3.Connection, once: SingleUse) -> bool:
    """Record a single-use value; False when it was recorded before."""
    claimed: int = conn.execute(
        "INSERT INTO used_id_tokens (token_hash, expire_ms) VALUES (?, ?) ON CONFLICT DO NOTHING",
        (once.key, once.expire_ms),
    ).rowcount
    return claimed == 1


def shorten_ip(ip: str) -> str:
    """The /24 (IPv4) or /48 (IPv6) network of an address: coarse enough to be anonymous."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
