"""Test data for the bench: seeded databases, signed cookies and development tokens.

Users and sessions are bulk-inserted straight into the database (after the
service's own migrations), with the same shapes the service writes: SQLite with
`executemany`, PostgreSQL with COPY. Every user has at least one session; when
there are fewer users than the session pool, users get several (the pool is
spread over as many users as there are). The secrets of the pool's sessions are
kept, so that their cookies can be signed with the bench's SESSION_SECRET_KEY
exactly as the server would sign them, and each request can name a different
session: one cookie would be answered from the server's session cache after its
first call.
"""

from __future__ import annotations

import os
import random
import secrets
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from server.domain.sessions import MAX_TOUCH_INTERVAL_MS
from server.domain.tokens import hash_secret
from server.identity.dev_issuer import DEV_AUDIENCE, DevIssuer
from server.rpc.signing import CookieSigner

DB_NAME = "expense-auth.db"
BATCH = 50_000
SESSION_LIFETIME_MS = 12 * 3600 * 1000
USER_AGENT = "bench"
# Distinct sessions the signed-in cells choose from, one at random per request.
POOL = 10_000
USER_COLUMNS = (
    "id, issuer, subject, email, email_verified, display_name, picture_uri, currency_code, "
    "time_zone, locale, create_ms, update_ms"
)
SESSION_COLUMNS = (
    "id, user_id, token_hash, create_ms, last_seen_ms, expire_ms, revoke_ms, user_agent"
)
INSERT_USER = f"INSERT INTO users ({USER_COLUMNS}) VALUES ({', '.join('?' * 12)})"  # noqa: S608
INSERT_SESSION = f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES ({', '.join('?' * 8)})"  # noqa: S608


@dataclass(frozen=True)
class Seeded:
    """A seeded database and the secrets of its pool of sessions."""

    users: int
    sessions: int
    pool: list[str]

    @property
    def hot_secret(self) -> str:
        """One session of the pool, in the middle of the table."""
        return self.pool[len(self.pool) // 2]


def migrate(data_dir: Path, env: Mapping[str, str], expense_auth: Path) -> None:
    """Create the schema with the service's own command."""
    subprocess.run(
        [str(expense_auth), "migrate"],
        env={**env, "DATA_DIR": str(data_dir)},
        check=True,
        capture_output=True,
        timeout=120,
    )


@dataclass
class _Batch:
    users: list[tuple[object, ...]]
    sessions: list[tuple[object, ...]]
    kept: list[str]


def _batches(users: int, pool: int, now_ms: int) -> Iterator[_Batch]:
    """Users, then sessions (session i belongs to user i % users), in batches.

    There are max(users, pool) sessions; `pool` of them, evenly spread over the
    table (and so over the users), have their secrets kept.
    """
    sessions = max(users, pool)
    step = sessions // pool
    user_ids = [f"usr_{secrets.token_urlsafe(16)}" for _ in range(users)]
    for start in range(0, users, BATCH):
        rows: list[tuple[object, ...]] = []
        for i in range(start, min(users, start + BATCH)):
            rows.append(
                (
                    user_ids[i],
                    "https://accounts.google.com",
                    f"{100000000000000000000 + i}",
                    f"user{i}@example.com",
                    True,
                    f"User {i}",
                    "https://lh3.googleusercontent.com/a/photo",
                    "USD",
                    "UTC",
                    "en",
                    now_ms,
                    now_ms,
                )
            )
        yield _Batch(rows, [], [])
    kept = 0
    for start in range(0, sessions, BATCH):
        batch = _Batch([], [], [])
        for i in range(start, min(sessions, start + BATCH)):
            secret = f"seed-{i:09d}-" + secrets.token_urlsafe(16)
            if i % step == 0 and kept < pool:
                batch.kept.append(secret)
                kept += 1
            batch.sessions.append(
                (
                    f"ses_{secrets.token_urlsafe(16)}",
                    user_ids[i % users],
                    hash_secret(secret),
                    now_ms,
                    now_ms,
                    now_ms + SESSION_LIFETIME_MS,
                    None,
                    USER_AGENT,
                )
            )
        yield batch


def seed(data_dir: Path, users: int, *, pool: int = POOL) -> Seeded:
    """Insert `users` users and max(users, pool) live sessions into the SQLite file."""
    now_ms = int(time.time() * 1000)
    path = data_dir / DB_NAME
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    # Index inserts in random key order thrash a small page cache: give it 1 GiB.
    conn.execute("PRAGMA cache_size = -1048576")
    kept: list[str] = []
    try:
        for batch in _batches(users, pool, now_ms):
            conn.execute("BEGIN")
            conn.executemany(INSERT_USER, batch.users)
            conn.executemany(INSERT_SESSION, batch.sessions)
            conn.execute("COMMIT")
            kept += batch.kept
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("ANALYZE")
    finally:
        conn.close()
    return Seeded(users=users, sessions=max(users, pool), pool=kept)


def refresh_times(now_ms: int) -> tuple[int, int]:
    """(last_seen_ms, expire_ms) that make a seeded session live now, and due for a
    last-seen write on its first use (as a session coming back after a minute is)."""
    return now_ms - MAX_TOUCH_INTERVAL_MS - 1_000, now_ms + SESSION_LIFETIME_MS


def refresh_sqlite(path: Path, pool: Sequence[str]) -> None:
    """Make the pool's sessions live now (the idle timeout runs from the seeding)."""
    last_seen_ms, expire_ms = refresh_times(int(time.time() * 1000))
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "UPDATE sessions SET last_seen_ms = ?, expire_ms = ? WHERE token_hash = ?",
            [(last_seen_ms, expire_ms, hash_secret(s)) for s in pool],
        )
    conn.close()


# The share of the pool's sessions that are due for a last-seen write when a cell
# starts (their last call over a minute ago); the others were seen just now. Left
# alone, a run would come back to most sessions more than a minute apart and nearly
# every call would write; in production a session that is in use is mostly seen
# again within the minute. One in ten is this bench's choice, and the run reports the
# writes per call it measured.
DUE_SHARE = 0.1


def last_seen_plan(
    hashes: Sequence[bytes], *, now_ms: int, rng: random.Random
) -> list[tuple[int, bytes]]:
    """(last_seen_ms, token_hash) for each pool session: DUE_SHARE of them due."""
    due = now_ms - MAX_TOUCH_INTERVAL_MS - 1_000
    return [(due if rng.random() < DUE_SHARE else now_ms, h) for h in hashes]


def set_last_seen_sqlite(path: Path, plan: Sequence[tuple[int, bytes]]) -> None:
    """Write the plan into the SQLite file (the server notices: PRAGMA data_version)."""
    conn = sqlite3.connect(path, timeout=30)
    with conn:
        conn.executemany("UPDATE sessions SET last_seen_ms = ? WHERE token_hash = ?", plan)
    conn.close()


async def set_last_seen_postgres(url: str, plan: Sequence[tuple[int, bytes]]) -> None:
    """Write the plan into the PostgreSQL database."""
    import asyncpg

    conn = await asyncpg.connect(url, timeout=30)
    try:
        await conn.execute(
            "UPDATE sessions SET last_seen_ms = p.at FROM unnest($1::bigint[], $2::bytea[]) "
            "AS p(at, hash) WHERE token_hash = p.hash",
            [at for at, _ in plan],
            [h for _, h in plan],
        )
    finally:
        await conn.close()


async def seed_postgres(url: str, users: int, *, pool: int = POOL) -> Seeded:
    """Migrate the database at `url` with the service's migrations, then COPY `users`
    users and max(users, pool) live sessions into it."""
    import asyncpg

    from server.storage.postgres import schema

    await schema.migrate(url, timeout_s=30)
    now_ms = int(time.time() * 1000)
    kept: list[str] = []
    conn = await asyncpg.connect(url, timeout=30)
    try:
        for batch in _batches(users, pool, now_ms):
            async with conn.transaction():
                if batch.users:
                    await conn.copy_records_to_table(
                        "users", records=batch.users, columns=USER_COLUMNS.split(", ")
                    )
                if batch.sessions:
                    await conn.copy_records_to_table(
                        "sessions", records=batch.sessions, columns=SESSION_COLUMNS.split(", ")
                    )
            kept += batch.kept
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return Seeded(users=users, sessions=max(users, pool), pool=kept)


async def refresh_postgres(url: str, pool: Sequence[str]) -> None:
    """Make the pool's sessions live now."""
    import asyncpg

    last_seen_ms, expire_ms = refresh_times(int(time.time() * 1000))
    conn = await asyncpg.connect(url, timeout=30)
    try:
        await conn.execute(
            "UPDATE sessions SET last_seen_ms = $1, expire_ms = $2 "
            "WHERE token_hash = ANY($3::bytea[])",
            last_seen_ms,
            expire_ms,
            [hash_secret(s) for s in pool],
        )
    finally:
        await conn.close()


def cookie(session_secret_key: str, secret: str) -> str:
    """The cookie value the server would issue for `secret`."""
    return CookieSigner([session_secret_key]).sign(secret)


def cookies(session_secret_key: str, secrets: Sequence[str]) -> list[str]:
    """The cookie values the server would issue for each of `secrets`."""
    signer = CookieSigner([session_secret_key])
    return [signer.sign(secret) for secret in secrets]


def _mint(args: tuple[Path, int, int]) -> list[str]:
    data_dir, start, count = args
    issuer = DevIssuer.load_or_create(data_dir)
    return [
        issuer.mint(
            email=f"signin{(start + i) % 1000}@example.com",
            name="Bench",
            audience=DEV_AUDIENCE,
        )
        for i in range(count)
    ]


def mint_tokens(data_dir: Path, count: int, *, workers: int = 2) -> list[str]:
    """`count` fresh development tokens (unique jti), for 1,000 distinct users."""
    DevIssuer.load_or_create(data_dir)  # create the key once, before the workers race
    chunk = -(-count // workers)
    jobs = [(data_dir, i * chunk, min(chunk, count - i * chunk)) for i in range(workers)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [token for part in pool.map(_mint, jobs) for token in part]


def new_session_key() -> str:
    """A SESSION_SECRET_KEY for one bench run (production requires >= 32 bytes)."""
    return secrets.token_urlsafe(48)


def db_size(data_dir: Path) -> int:
    """The database file's size in bytes."""
    return os.path.getsize(data_dir / DB_NAME)
