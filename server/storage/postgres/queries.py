"""The queries of every port, for PostgreSQL. Each runs on a connection inside the
transaction the store opened (see store.py for the isolation of each).

Where SQLite serializes every write, PostgreSQL runs them side by side; the
meaning of each transaction is kept with the database's own tools: unique
constraints (an ID token is claimed once, one user per subject, under any
concurrency), and row locks taken in one order (a revocation checks that the
caller is still live, and concurrent revocations cannot deadlock).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from asyncpg import Connection as Conn

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
    UserExport,
)
from server.domain.ports import UserDefaults
from server.domain.preferences import EDITABLE_FIELDS
from server.storage import rows
from server.storage.postgres import outbox

_UPDATABLE = frozenset(EDITABLE_FIELDS)
# A live session; $1 = now_ms, $2 = idle_cutoff_ms in every query that uses it.
_LIVE = "revoke_ms IS NULL AND expire_ms > $1 AND last_seen_ms > $2"
_INSERT_EVENT = (
    "INSERT INTO audit_events (time_ms, kind, user_id, reason, session_id, ip, user_agent, "
    "subject_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)


def _event_values(e: AuditEvent) -> tuple[Any, ...]:
    return (
        e.time_ms,
        e.kind,
        e.user_id,
        e.reason,
        e.session_id,
        e.ip,
        e.user_agent,
        e.subject_hash,
    )


async def _spend(conn: Conn, once: SingleUse) -> bool:
    claimed = await conn.fetchval(
        "INSERT INTO used_id_tokens (token_hash, expire_ms) VALUES ($1, $2) "
        "ON CONFLICT DO NOTHING RETURNING 1",
        once.key,
        once.expire_ms,
    )
    return claimed is not None


async def claim_token(conn: Conn, identity: Identity, now_ms: int) -> None:
    """Spend the identity's ID token. Raises InvalidIdToken on a replay."""
    if not identity.token_hash:
        return
    await conn.execute("DELETE FROM used_id_tokens WHERE expire_ms < $1", now_ms)
    if not await _spend(conn, SingleUse(identity.token_hash, identity.token_expire_ms)):
        raise InvalidIdToken(
            "this ID token was already used to sign in; get a new one from Google",
            reason="replayed",
        )


# --- sessions ----------------------------------------------------------------------------


async def sign_in(
    conn: Conn,
    identity: Identity,
    *,
    new_user_id: str,
    defaults: UserDefaults,
    session: Session,
    now_ms: int,
    event: AuditEvent | None,
    nonce: SingleUse | None,
    events: ChangeEvents = no_events,
) -> tuple[User, Session]:
    """See `SessionStore.sign_in`.

    The user is inserted, or else locked and then updated: so the lifecycle event
    knows exactly what was there before, whatever runs beside it.
    """
    await claim_token(conn, identity, now_ms)
    if nonce is not None and not await _spend(conn, nonce):
        raise InvalidIdToken(
            "this sign-in nonce was already used; start again with CreateSignInNonce",
            reason="nonce_replayed",
        )
    before, user = await _upsert_user(
        conn, identity, new_user_id=new_user_id, defaults=defaults, now_ms=now_ms
    )
    if user.disabled_ms is not None:
        raise PermissionDenied("this account has been disabled; contact support to have it enabled")
    stored = replace(session, user_id=user.id, revoke_ms=None)
    await conn.execute(
        f"INSERT INTO sessions ({rows.SESSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        stored.id,
        stored.user_id,
        stored.token_hash,
        stored.create_ms,
        stored.last_seen_ms,
        stored.expire_ms,
        None,
        stored.user_agent,
    )
    if event is not None:
        recorded = replace(event, user_id=user.id, session_id=stored.id)
        await conn.execute(_INSERT_EVENT, *_event_values(recorded))
    await outbox.insert(conn, events(before, user))
    return user, stored


async def _upsert_user(
    conn: Conn, identity: Identity, *, new_user_id: str, defaults: UserDefaults, now_ms: int
) -> tuple[User | None, User]:
    """Insert the user of `identity`, or lock and update it; returns (before, after)."""
    while True:
        # DO NOTHING waits for a concurrent insert of the same subject to commit.
        row = await conn.fetchrow(
            f"""
            INSERT INTO users ({rows.USER_INSERT_COLUMNS})
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
            ON CONFLICT (issuer, subject) DO NOTHING
            RETURNING {rows.USER_COLUMNS}
            """,
            new_user_id,
            identity.issuer,
            identity.subject,
            identity.email,
            identity.email_verified,
            identity.name,
            identity.picture,
            defaults.currency_code,
            defaults.time_zone,
            identity.locale or defaults.locale,
            now_ms,
            now_ms,
        )
        if row is not None:
            return None, rows.user(tuple(row))
        old = await conn.fetchrow(
            f"SELECT {rows.USER_COLUMNS} FROM users WHERE issuer = $1 AND subject = $2 FOR UPDATE",
            identity.issuer,
            identity.subject,
        )
        if old is None:
            continue  # deleted in between: insert it anew
        row = await conn.fetchrow(
            f"""
            UPDATE users SET
                update_ms = CASE
                    WHEN email IS DISTINCT FROM $2 OR email_verified IS DISTINCT FROM $3
                      OR picture_uri IS DISTINCT FROM $4
                    THEN $5 ELSE update_ms END,
                email = $2, email_verified = $3, picture_uri = $4
            WHERE id = $1 RETURNING {rows.USER_COLUMNS}
            """,
            old["id"],
            identity.email,
            identity.email_verified,
            identity.picture,
            now_ms,
        )
        return rows.user(tuple(old)), rows.user(tuple(row))


async def find_user_by_subject(conn: Conn, issuer: str, subject: str) -> User | None:
    """See `SessionStore.find_user_by_subject`."""
    row = await conn.fetchrow(
        f"SELECT {rows.USER_COLUMNS} FROM users WHERE issuer = $1 AND subject = $2",
        issuer,
        subject,
    )
    return rows.user(tuple(row)) if row else None


async def find_principal(conn: Conn, token_hash: bytes) -> Principal | None:
    """The session with this token hash, and its user: one indexed join."""
    row = await conn.fetchrow(
        """
        SELECT s.id, s.user_id, s.token_hash, s.create_ms, s.last_seen_ms, s.expire_ms,
               s.revoke_ms, s.user_agent,
               u.id, u.issuer, u.subject, u.email, u.email_verified, u.display_name,
               u.picture_uri, u.currency_code, u.time_zone, u.locale, u.create_ms,
               u.update_ms, u.disabled_ms
        FROM sessions AS s JOIN users AS u ON u.id = s.user_id
        WHERE s.token_hash = $1
        """,
        token_hash,
    )
    if row is None:
        return None
    values = tuple(row)
    return Principal(session=rows.session(values[:8]), user=rows.user(values[8:]))


async def touch_sessions(conn: Conn, last_seen: Mapping[str, int]) -> None:
    """Move each session's `last_seen_ms` forward (never back)."""
    await conn.executemany(
        "UPDATE sessions SET last_seen_ms = GREATEST(last_seen_ms, $1) WHERE id = $2",
        [(at, session_id) for session_id, at in last_seen.items()],
    )


async def _lock_live(conn: Conn, user_id: str, now_ms: int, idle_cutoff_ms: int) -> set[str]:
    """Lock the user's live sessions, in id order (so that concurrent revocations of one
    user queue instead of deadlocking); returns their ids."""
    locked = await conn.fetch(
        f"SELECT id FROM sessions WHERE user_id = $3 AND {_LIVE} ORDER BY id FOR UPDATE",
        now_ms,
        idle_cutoff_ms,
        user_id,
    )
    return {row[0] for row in locked}


async def revoke_session(
    conn: Conn,
    user_id: str,
    session_id: str,
    *,
    now_ms: int,
    idle_cutoff_ms: int,
    caller_id: str | None,
) -> bool:
    """See `SessionStore.revoke_session`."""
    live = await _lock_live(conn, user_id, now_ms, idle_cutoff_ms)
    if caller_id is not None and caller_id != session_id and caller_id not in live:
        raise Unauthenticated("the session was signed out; sign in again", reason="revoked")
    if session_id not in live:
        return False
    await conn.execute("UPDATE sessions SET revoke_ms = $1 WHERE id = $2", now_ms, session_id)
    return True


async def revoke_other_sessions(
    conn: Conn, user_id: str, keep_id: str, *, now_ms: int, idle_cutoff_ms: int
) -> int:
    """See `SessionStore.revoke_other_sessions`."""
    live = await _lock_live(conn, user_id, now_ms, idle_cutoff_ms)
    if keep_id not in live:
        raise Unauthenticated("the session was signed out; sign in again", reason="revoked")
    others = sorted(live - {keep_id})
    if others:
        await conn.execute(
            "UPDATE sessions SET revoke_ms = $1 WHERE id = ANY($2::text[])", now_ms, others
        )
    return len(others)


async def list_live_sessions(
    conn: Conn,
    user_id: str,
    *,
    now_ms: int,
    idle_cutoff_ms: int,
    after: SessionCursor | None,
    limit: int,
) -> list[Session]:
    """See `SessionStore.list_live_sessions`."""
    query = f"SELECT {rows.SESSION_COLUMNS} FROM sessions WHERE user_id = $3 AND {_LIVE}"
    params: list[Any] = [now_ms, idle_cutoff_ms, user_id]
    if after is not None:
        query += " AND (create_ms < $4 OR (create_ms = $4 AND id < $5))"
        params += [after.create_ms, after.session_id]
    query += f" ORDER BY create_ms DESC, id DESC LIMIT ${len(params) + 1}"
    params.append(limit)
    return [rows.session(tuple(r)) for r in await conn.fetch(query, *params)]


async def count_live_sessions(conn: Conn, *, now_ms: int, idle_cutoff_ms: int) -> int:
    """How many sessions are live (for the active-sessions gauge)."""
    count = await conn.fetchval(
        f"SELECT count(*) FROM sessions WHERE {_LIVE}", now_ms, idle_cutoff_ms
    )
    return int(count)


# --- profile, audit, account ---------------------------------------------------------------


async def get_user(conn: Conn, user_id: str) -> User | None:
    """See `AdminStore.get_user`."""
    row = await conn.fetchrow(f"SELECT {rows.USER_COLUMNS} FROM users WHERE id = $1", user_id)
    return rows.user(tuple(row)) if row else None


async def _lock_user(conn: Conn, user_id: str) -> User | None:
    """The user, locked until the transaction ends (their events are written in order)."""
    row = await conn.fetchrow(
        f"SELECT {rows.USER_COLUMNS} FROM users WHERE id = $1 FOR UPDATE", user_id
    )
    return rows.user(tuple(row)) if row else None


async def update_user(
    conn: Conn,
    user_id: str,
    changes: Mapping[str, str],
    *,
    now_ms: int,
    events: ChangeEvents = no_events,
) -> User | None:
    """See `ProfileStore.update_user`."""
    columns = [name for name in changes if name in _UPDATABLE]
    if len(columns) != len(changes):
        raise ValueError(f"not updatable: {sorted(set(changes) - _UPDATABLE)}")
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(columns, start=3))
    before = await _lock_user(conn, user_id)
    row = await conn.fetchrow(
        f"UPDATE users SET {assignments}, update_ms = $1 WHERE id = $2 "
        f"RETURNING {rows.USER_COLUMNS}",
        now_ms,
        user_id,
        *(changes[name] for name in columns),
    )
    if row is None:
        return None
    after = rows.user(tuple(row))
    await outbox.insert(conn, events(before, after))
    return after


async def record_event(conn: Conn, event: AuditEvent) -> None:
    """See `AuditStore.record_event`."""
    await conn.execute(_INSERT_EVENT, *_event_values(event))


async def list_events(
    conn: Conn, user_id: str, *, before_id: int | None, limit: int
) -> list[AuditEvent]:
    """See `AccountStore.list_events`."""
    query = f"SELECT {rows.EVENT_COLUMNS} FROM audit_events WHERE user_id = $1"
    params: list[Any] = [user_id]
    if before_id is not None:
        query += " AND id < $2"
        params.append(before_id)
    query += f" ORDER BY id DESC LIMIT ${len(params) + 1}"
    params.append(limit)
    return [rows.event(tuple(r)) for r in await conn.fetch(query, *params)]


async def export_user(conn: Conn, user_id: str) -> UserExport | None:
    """See `AccountStore.export_user` (the store runs it in one repeatable-read snapshot)."""
    row = await conn.fetchrow(f"SELECT {rows.USER_COLUMNS} FROM users WHERE id = $1", user_id)
    if row is None:
        return None
    sessions = await conn.fetch(
        f"SELECT {rows.SESSION_COLUMNS} FROM sessions WHERE user_id = $1 "
        "ORDER BY create_ms DESC, id DESC",
        user_id,
    )
    events = await conn.fetch(
        f"SELECT {rows.EVENT_COLUMNS} FROM audit_events WHERE user_id = $1 ORDER BY id DESC",
        user_id,
    )
    return UserExport(
        user=rows.user(tuple(row)),
        sessions=[rows.session(tuple(r)) for r in sessions],
        events=[rows.event(tuple(r)) for r in events],
    )


async def delete_user(
    conn: Conn,
    user: User,
    *,
    identity: Identity,
    tombstone: AuditEvent,
    now_ms: int,
    events: ChangeEvents = no_events,
) -> bool:
    """See `AccountStore.delete_user`."""
    await claim_token(conn, identity, now_ms)
    deleted = await conn.fetchval("DELETE FROM users WHERE id = $1 RETURNING 1", user.id)
    if deleted is None:
        return False
    await conn.execute("DELETE FROM audit_events WHERE user_id = $1", user.id)
    await conn.execute(
        "INSERT INTO deleted_accounts (subject_hash, deleted_ms) VALUES ($1, $2) "
        "ON CONFLICT DO NOTHING",
        tombstone.subject_hash,
        now_ms,
    )
    await conn.execute(
        _INSERT_EVENT,
        tombstone.time_ms,
        tombstone.kind,
        None,
        tombstone.reason,
        "",
        "",
        "",
        tombstone.subject_hash,
    )
    await outbox.insert(conn, events(user, None))
    return True


# --- admin ---------------------------------------------------------------------------------


async def list_users(
    conn: Conn, *, email_contains: str, after_id: str | None, limit: int
) -> list[User]:
    """See `AdminStore.list_users`."""
    query = f"SELECT {rows.USER_COLUMNS} FROM users WHERE strpos(lower(email), $1) > 0"
    params: list[Any] = [email_contains.lower()]
    if after_id is not None:
        query += " AND id > $2"
        params.append(after_id)
    query += f" ORDER BY id LIMIT ${len(params) + 1}"
    params.append(limit)
    return [rows.user(tuple(r)) for r in await conn.fetch(query, *params)]


async def set_disabled(
    conn: Conn,
    user_id: str,
    *,
    disabled: bool,
    now_ms: int,
    idle_cutoff_ms: int,
    events: ChangeEvents = no_events,
) -> User | None:
    """See `AdminStore.set_disabled`."""
    before = await _lock_user(conn, user_id)
    row = await conn.fetchrow(
        # Disabling twice keeps the first time.
        "UPDATE users SET disabled_ms = CASE WHEN $1 THEN coalesce(disabled_ms, $2) END, "
        f"update_ms = $2 WHERE id = $3 RETURNING {rows.USER_COLUMNS}",
        disabled,
        now_ms,
        user_id,
    )
    if row is not None and disabled:
        await conn.execute(
            f"UPDATE sessions SET revoke_ms = $1 WHERE user_id = $3 AND {_LIVE}",
            now_ms,
            idle_cutoff_ms,
            user_id,
        )
    if row is None:
        return None
    after = rows.user(tuple(row))
    await outbox.insert(conn, events(before, after))
    return after


async def revoke_all_sessions(conn: Conn, user_id: str, *, now_ms: int, idle_cutoff_ms: int) -> int:
    """See `AdminStore.revoke_all_sessions`."""
    revoked = await conn.fetch(
        f"UPDATE sessions SET revoke_ms = $1 WHERE user_id = $3 AND {_LIVE} RETURNING 1",
        now_ms,
        idle_cutoff_ms,
        user_id,
    )
    return len(revoked)


# --- retention ------------------------------------------------------------------------------


async def purge(
    conn: Conn,
    *,
    now_ms: int,
    session_grace_ms: int,
    idle_ms: int,
    events_before_ms: int,
    ips_before_ms: int,
) -> dict[str, int]:
    """See `RetentionStore.purge`."""
    cutoff = now_ms - session_grace_ms
    sessions = await conn.fetch(
        "DELETE FROM sessions WHERE expire_ms < $1 OR revoke_ms < $1 OR last_seen_ms + $2 < $1 "
        "RETURNING 1",
        cutoff,
        idle_ms,
    )
    events = await conn.fetch(
        "DELETE FROM audit_events WHERE time_ms < $1 AND kind != 'account_deleted' RETURNING 1",
        events_before_ms,
    )
    tokens = await conn.fetch("DELETE FROM used_id_tokens WHERE expire_ms < $1 RETURNING 1", now_ms)
    old = await conn.fetch(
        "SELECT id, ip FROM audit_events WHERE time_ms < $1 AND ip != '' AND ip NOT LIKE '%/%'",
        ips_before_ms,
    )
    await conn.executemany(
        "UPDATE audit_events SET ip = $1 WHERE id = $2",
        [(rows.shorten_ip(ip), event_id) for event_id, ip in old],
    )
    return {
        "sessions": len(sessions),
        "events": len(events),
        "tokens": len(tokens),
        "ips": len(old),
    }


# --- operations -------------------------------------------------------------------------------


async def write_probe(conn: Conn, now_ms: int) -> None:
    """A real write, for readiness."""
    await conn.execute("UPDATE write_probe SET at_ms = $1 WHERE id = 1", now_ms)


async def claim_job(conn: Conn, name: str, *, now_ms: int, interval_ms: int) -> bool:
    """Claim this period of the job `name`; False when another process ran it already.

    A last run in the future (the wall clock stepped back) does not block the job.
    """
    claimed = await conn.fetchval(
        "INSERT INTO job_runs (name, last_run_ms) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE "
        "SET last_run_ms = excluded.last_run_ms "
        "WHERE job_runs.last_run_ms <= $2 - $3 OR job_runs.last_run_ms > $2 "
        "RETURNING 1",
        name,
        now_ms,
        interval_ms,
    )
    return claimed is not None
