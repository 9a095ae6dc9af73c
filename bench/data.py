"""Test data for the bench: seeded databases, signed cookies and development tokens.

Users and sessions are bulk-inserted straight into the SQLite file (after
`expense-auth migrate`), with the same shapes the service writes: each user has
one session whose secret we keep, so that its cookie can be signed with the
bench's SESSION_SECRET_KEY exactly as the server would sign it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from server.identity.dev_issuer import DEV_AUDIENCE, DevIssuer
from server.rpc.signing import CookieSigner

DB_NAME = "expense-auth.db"
BATCH = 50_000
SESSION_LIFETIME_MS = 12 * 3600 * 1000
USER_AGENT = "bench"


@dataclass(frozen=True)
class Seeded:
    """A seeded data directory and the secrets of a few of its sessions."""

    data_dir: Path
    users: int
    hot_secret: str
    db_bytes: int


def migrate(data_dir: Path, env: Mapping[str, str], expense_auth: Path) -> None:
    """Create the schema with the service's own command."""
    subprocess.run(
        [str(expense_auth), "migrate"],
        env={**env, "DATA_DIR": str(data_dir)},
        check=True,
        capture_output=True,
        timeout=120,
    )


def _rows(
    start: int, count: int, now_ms: int
) -> Iterator[tuple[tuple[object, ...], tuple[object, ...], str]]:
    for i in range(start, start + count):
        user_id = f"usr_{secrets.token_urlsafe(16)}"
        secret = f"seed-{i:09d}-" + secrets.token_urlsafe(16)
        user = (
            user_id,
            "https://accounts.google.com",
            f"{100000000000000000000 + i}",
            f"user{i}@example.com",
            1,
            f"User {i}",
            "https://lh3.googleusercontent.com/a/photo",
            "USD",
            "UTC",
            "en",
            now_ms,
            now_ms,
        )
        session = (
            f"ses_{secrets.token_urlsafe(16)}",
            user_id,
            hashlib.sha256(secret.encode()).digest(),
            now_ms,
            now_ms,
            now_ms + SESSION_LIFETIME_MS,
            None,
            USER_AGENT,
        )
        yield user, session, secret


def seed(data_dir: Path, users: int, *, hot_index: int | None = None) -> Seeded:
    """Insert `users` users with one live session each; returns a hot session's secret.

    The secrets are `seed-<index>-<random>`; only the hot one is kept. The hot
    session sits in the middle of the table unless `hot_index` says otherwise.
    """
    hot = users // 2 if hot_index is None else hot_index
    now_ms = int(time.time() * 1000)
    path = data_dir / DB_NAME
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    # Index inserts in random key order thrash a small page cache: give it 1 GiB.
    conn.execute("PRAGMA cache_size = -1048576")
    hot_secret = ""
    try:
        for start in range(0, users, BATCH):
            count = min(BATCH, users - start)
            user_rows: list[tuple[object, ...]] = []
            session_rows: list[tuple[object, ...]] = []
            for offset, (user, session, secret) in enumerate(_rows(start, count, now_ms)):
                user_rows.append(user)
                session_rows.append(session)
                if start + offset == hot:
                    hot_secret = secret
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO users (id, issuer, subject, email, email_verified, display_name, "
                "picture_uri, currency_code, time_zone, locale, create_ms, update_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                user_rows,
            )
            conn.executemany(
                "INSERT INTO sessions (id, user_id, token_hash, create_ms, last_seen_ms, "
                "expire_ms, revoke_ms, user_agent) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                session_rows,
            )
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("ANALYZE")
    finally:
        conn.close()
    return Seeded(
        data_dir=data_dir, users=users, hot_secret=hot_secret, db_bytes=path.stat().st_size
    )


def cookie(session_secret_key: str, secret: str) -> str:
    """The cookie value the server would issue for `secret`."""
    return CookieSigner([session_secret_key]).sign(secret)


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
