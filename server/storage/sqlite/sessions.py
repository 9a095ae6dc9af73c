"""Queries of the session port: sign-in, principals, touches, revocations, listing.

Each function runs on a connection inside the transaction the store opened.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from server.domain.errors import InvalidIdToken, PermissionDenied, Unauthenticated
from server.domain.lifecycle import ChangeEvents, no_events
from server.domain.models import (
    AuditEvent,
    Identity,
    Principal,
    Session,
    SessionCursor,
    SingleUse,
    User,
)
from server.domain.ports import UserDefaults
from server.storage import rows
from server.storage.sqlite import outbox


def claim_token(conn: sqlite3.Connection, identity: Identity, now_ms: int) -> None:
    """Spend the identity's ID token (dropping spent tokens that expired).

    Raises:
        InvalidIdToken: It was spent before: a replay.
    """
    if not identity.token_hash:
        return
    conn.execute("DELETE FROM used_id_tokens WHERE expire_ms < ?", (now_ms,))
    if not rows.spend(conn, SingleUse(identity.token_hash, identity.token_expire_ms)):
        raise InvalidIdToken(
            "this ID token was already used to sign in; get a new one from Google",
            reason="replayed",
        )


def sign_in(
    conn: sqlite3.Connection,
    identity: Identity,
    *,
    new_user_id: str,
    defaults: UserDefaults,
    session: Session,
    now_ms: int,
    event: AuditEvent | None = None,
    nonce: SingleUse | None = None,
    events: ChangeEvents = no_events,
) -> tuple[User, Session]:
    """Upsert the user by (issuer, subject), insert the session and record `event`
    and the user's lifecycle `events`, in one transaction (one commit, and no session
    without its audit record).

    Raises:
        InvalidIdToken: The identity's token, or the nonce, was used before (a replay).
    """
    claim_token(conn, identity, now_ms)
    if nonce is not None and not rows.spend(conn, nonce):
        raise InvalidIdToken(
            "this sign-in nonce was already used; start again with CreateSignInNonce",
            reason="nonce_replayed",
        )
    # Exact: BEGIN IMMEDIATE serializes every write to the file.
    before = find_user_by_subject(conn, identity.issuer, identity.subject)
    row = conn.execute(
        f"""
        INSERT INTO users ({rows.USER_INSERT_COLUMNS})
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (issuer, subject) DO UPDATE SET
            update_ms = CASE
                WHEN users.email IS NOT excluded.email
                  OR users.email_verified IS NOT excluded.email_verified
                  OR users.picture_uri IS NOT excluded.picture_uri
                THEN excluded.update_ms ELSE users.update_ms END,
            email = excluded.email,
            email_verified = excluded.email_verified,
            picture_uri = excluded.picture_uri
        RETURNING {rows.USER_COLUMNS}
        """,
        (
            new_user_id,
            identity.issuer,
            identity.subject,
            identity.email,
            int(identity.email_verified),
            identity.name,
            identity.picture,
            defaults.currency_code,
            defaults.time_zone,
            identity.locale or defaults.locale,
            now_ms,
            now_ms,
        ),
    ).fetchone()
    user = rows.user(row)
    if user.disabled_ms is not None:
        raise PermissionDenied("this account has been disabled; contact support to have it enabled")
    stored = Session(
        id=session.id,
        user_id=user.id,
        token_hash=session.token_hash,
        create_ms=session.create_ms,
        last_seen_ms=session.last_seen_ms,
        expire_ms=session.expire_ms,
        revoke_ms=None,
        user_agent=session.user_agent,
    )
    conn.execute(
        f"INSERT INTO sessions ({rows.SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            stored.id,
            stored.user_id,
            stored.token_hash,
            stored.create_ms,
            stored.last_seen_ms,
            stored.expire_ms,
            None,
            stored.user_agent,
        ),
    )
    if event is not None:
        rows.insert_event(conn, replace(event, user_id=user.id, session_id=stored.id))
    outbox.insert(conn, events(before, user))
    return user, stored


def find_user_by_subject(conn: sqlite3.Connection, issuer: str, subject: str) -> User | None:
    """The user signing in as (issuer, subject), or None."""
    row = conn.execute(
        f"SELECT {rows.USER_COLUMNS} FROM users WHERE issuer = ? AND subject = ?",
        (issuer, subject),
    ).fetchone()
    return rows.user(row) if row else None


def find_principal(conn: sqlite3.Connection, token_hash: bytes) -> Principal | None:
    """The session with this token hash, and its user (one indexed join)."""
    row = conn.execute(
        """
        SELECT s.id, s.user_id, s.token_hash, s.create_ms, s.last_seen_ms, s.expire_ms,
               s.revoke_ms, s.user_agent,
               u.id, u.issuer, u.subject, u.email, u.email_verified, u.display_name,
               u.picture_uri, u.currency_code, u.time_zone, u.locale, u.create_ms,
               u.update_ms, u.disabled_ms
        FROM sessions AS s JOIN users AS u ON u.id = s.user_id
        WHERE s.token_hash = ?
        """,
        (token_hash,),
    ).fetchone()
    if row is None:
        return None
    return Principal(session=rows.session(row[:8]), user=rows.user(row[8:]))


def touch_sessions(conn: sqlite3.Connection, last_seen: Mapping[str, int]) -> None:
    """Move each session's `last_seen_ms` forward (never back)."""
    conn.executemany(
        "UPDATE sessions SET last_seen_ms = max(last_seen_ms, ?) WHERE id = ?",
        [(at, session_id) for session_id, at in last_seen.items()],
    )


def principal_generation(conn: sqlite3.Connection) -> int:
    """The counter every change to a cached principal moves (migration m004)."""
    row = conn.execute("SELECT n FROM principal_generation WHERE id = 1").fetchone()
    return int(row[0])


def revoke_session(
    conn: sqlite3.Connection,
    user_id: str,
    session_id: str,
    *,
    now_ms: int,
    idle_cutoff_ms: int,
    caller_id: str | None = None,
) -> bool:
    """Revoke one live session owned by `user_id`.

    Raises:
        Unauthenticated: `caller_id` (the session making the call) was revoked
            or ended meanwhile by a concurrent call; nothing is revoked.
    """
    if caller_id is not None and caller_id != session_id:
        alive = conn.execute(
            f"SELECT 1 FROM sessions WHERE id = ? AND user_id = ? AND {rows.LIVE}",
            (caller_id, user_id, now_ms, idle_cutoff_ms),
        ).fetchone()
        if alive is None:
            raise Unauthenticated("the session was signed out; sign in again", reason="revoked")
    cursor = conn.execute(
        f"UPDATE sessions SET revoke_ms = ? WHERE id = ? AND user_id = ? AND {rows.LIVE}",
        (now_ms, session_id, user_id, now_ms, idle_cutoff_ms),
    )
    return cursor.rowcount == 1


def revoke_other_sessions(
    conn: sqlite3.Connection, user_id: str, keep_id: str, *, now_ms: int, idle_cutoff_ms: int
) -> int:
    """Revoke every live session of the user except `keep_id`.

    Raises:
        Unauthenticated: `keep_id` itself was revoked or ended meanwhile (by a
            concurrent call): the caller is signed out and revokes nothing.
    """
    alive = conn.execute(
        f"SELECT 1 FROM sessions WHERE id = ? AND user_id = ? AND {rows.LIVE}",
        (keep_id, user_id, now_ms, idle_cutoff_ms),
    ).fetchone()
    if alive is None:
        raise Unauthenticated("the session was signed out; sign in again", reason="revoked")
    cursor = conn.execute(
        f"UPDATE sessions SET revoke_ms = ? WHERE user_id = ? AND id != ? AND {rows.LIVE}",
        (now_ms, user_id, keep_id, now_ms, idle_cutoff_ms),
    )
    return cursor.rowcount


def list_live_sessions(
    conn: sqlite3.Connection,
    user_id: str,
    *,
    now_ms: int,
    idle_cutoff_ms: int,
    after: SessionCursor | None,
    limit: int,
) -> list[Session]:
    """Live sessions of the user, newest first, keyset-paginated."""
    query = f"SELECT {rows.SESSION_COLUMNS} FROM sessions WHERE user_id = ? AND {rows.LIVE}"
    params: list[Any] = [user_id, now_ms, idle_cutoff_ms]
    if after is not None:
        query += " AND (create_ms < ? OR (create_ms = ? AND id < ?))"
        params += [after.create_ms, after.create_ms, after.session_id]
    query += " ORDER BY create_ms DESC, id DESC LIMIT ?"
    params.append(limit)
    return [rows.session(row) for row in conn.execute(query, params)]


def count_live_sessions(conn: sqlite3.Connection, *, now_ms: int, idle_cutoff_ms: int) -> int:
    """How many sessions are live (for the active-sessions gauge)."""
    row = conn.execute(
        f"SELECT count(*) FROM sessions WHERE {rows.LIVE}", (now_ms, idle_cutoff_ms)
    ).fetchone()
    return int(row[0])
