"""`python -m bench.pg_driver`: asyncpg against psycopg 3 on the session check.

The PostgreSQL engine's hot path is one query per session check: the
session-and-user join of `find_principal` ("read"); its writes are short
transactions ("write": BEGIN, one UPDATE by token hash, COMMIT). This runs both
on a throwaway database holding USERS users with one session each, through each
driver's own pool (asyncpg.create_pool, psycopg_pool.AsyncConnectionPool) of
POOL connections, from CONCURRENCY tasks on one event loop, over distinct
sessions in random order. It reports calls per second and this process's CPU
per call (the part the server pays; the database's own work is the same SQL).
The drivers take turns for ROUNDS rounds so that a noisy machine hits both.

Needs the `bench` extra (psycopg, psycopg_pool) and a PostgreSQL server
(TEST_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import psycopg
import psycopg_pool

from tests.support import postgres

FIND_PRINCIPAL = """
SELECT s.id, s.user_id, s.token_hash, s.create_ms, s.last_seen_ms, s.expire_ms,
       s.revoke_ms, s.user_agent,
       u.id, u.issuer, u.subject, u.email, u.email_verified, u.display_name,
       u.picture_uri, u.currency_code, u.time_zone, u.locale, u.create_ms,
       u.update_ms, u.disabled_ms
FROM sessions AS s JOIN users AS u ON u.id = s.user_id
WHERE s.token_hash = {}
"""
# A write transaction of the size most writes here are (a touch, a revocation).
TOUCH = "UPDATE sessions SET last_seen_ms = last_seen_ms + 1 WHERE token_hash = {}"

GOOGLE = "https://accounts.google.com"
PREFERENCES = ("EUR", "Europe/Berlin", "en-GB")
Query = Callable[[bytes], Awaitable[object]]


async def _seed(url: str, users: int) -> list[bytes]:
    conn = await asyncpg.connect(url)
    hashes = [secrets.token_bytes(32) for _ in range(users)]
    ids = [str(uuid.uuid4()) for _ in range(users)]
    now = int(time.time() * 1000)
    await conn.copy_records_to_table(
        "users",
        columns=[
            *("id", "issuer", "subject", "email", "email_verified", "display_name"),
            *("picture_uri", "currency_code", "time_zone", "locale", "create_ms", "update_ms"),
        ],
        records=[
            (
                uid,
                GOOGLE,
                f"sub-{i}",
                f"u{i}@example.com",
                True,
                f"User {i}",
                "",
                *PREFERENCES,
                now,
                now,
            )
            for i, uid in enumerate(ids)
        ],
    )
    await conn.copy_records_to_table(
        "sessions",
        columns=[
            *("id", "user_id", "token_hash", "create_ms", "last_seen_ms", "expire_ms"),
            "user_agent",
        ],
        records=[
            (str(uuid.uuid4()), uid, h, now, now, now + 86_400_000, "bench")
            for uid, h in zip(ids, hashes, strict=True)
        ],
    )
    await conn.execute("ANALYZE")
    await conn.close()
    return hashes


async def _measure(query: Query, hashes: list[bytes], calls: int, concurrency: int) -> float:
    """Run `calls` session checks from `concurrency` tasks; returns how many ran."""
    picks = [random.choice(hashes) for _ in range(calls)]
    per_task = calls // concurrency

    async def worker(part: list[bytes]) -> None:
        for token_hash in part:
            if await query(token_hash) in (None, "UPDATE 0"):
                raise AssertionError("a seeded session was not found")

    await asyncio.gather(
        *(worker(picks[i * per_task : (i + 1) * per_task]) for i in range(concurrency))
    )
    return float(per_task * concurrency)


Opened = tuple[Query, Callable[[], Awaitable[None]]]


async def _asyncpg(url: str, pool_size: int, write: bool) -> Opened:
    """As the store does it: reads outside a transaction, writes in one."""
    pool = await asyncpg.create_pool(url, min_size=pool_size, max_size=pool_size)
    read_sql, write_sql = FIND_PRINCIPAL.format("$1"), TOUCH.format("$1")

    async def read(token_hash: bytes) -> object:
        async with pool.acquire() as conn:
            return await conn.fetchrow(read_sql, token_hash)

    async def touch(token_hash: bytes) -> object:
        async with pool.acquire() as conn, conn.transaction():
            return await conn.execute(write_sql, token_hash)

    return (touch if write else read), pool.close


async def _psycopg(url: str, pool_size: int, write: bool) -> Opened:
    """Autocommit connections (no implicit BEGIN for a read), statements prepared."""
    pool = psycopg_pool.AsyncConnectionPool(
        url, min_size=pool_size, max_size=pool_size, open=False, kwargs={"autocommit": True}
    )
    await pool.open(wait=True)
    read_sql, write_sql = FIND_PRINCIPAL.format("%s"), TOUCH.format("%s")

    async def read(token_hash: bytes) -> object:
        async with pool.connection() as conn:
            cursor = await conn.execute(read_sql, (token_hash,), prepare=True)
            return await cursor.fetchone()

    async def touch(token_hash: bytes) -> object:
        async with pool.connection() as conn, conn.transaction():
            return await conn.execute(write_sql, (token_hash,), prepare=True)

    return (touch if write else read), pool.close


async def run(
    url: str, users: int, calls: int, concurrency: int, pool_size: int, rounds: int
) -> None:
    """Print the figures per driver."""
    hashes = await _seed(url, users)
    drivers = {"asyncpg": _asyncpg, f"psycopg {psycopg.__version__}": _psycopg}
    cells = [
        (f"{name} {kind}", opener, kind == "write")
        for name, opener in drivers.items()
        for kind in ("read", "write")
    ]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cells}
    for _ in range(rounds):
        random.shuffle(cells)
        for name, open_pool, write in cells:
            query, close = await open_pool(url, pool_size, write)
            await _measure(query, hashes, calls // 10, concurrency)  # warm up
            wall, cpu = time.perf_counter(), time.process_time()
            done = await _measure(query, hashes, calls, concurrency)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            await close()
            results[name].append((done / wall, cpu / done * 1e6))
    print(
        f"{users} users, {calls} calls per round, concurrency {concurrency}, "
        f"pool {pool_size}, {rounds} rounds (median, [min-max])"
    )
    for name, figures in sorted(results.items()):
        rates = [rate for rate, _ in figures]
        cpus = [cpu for _, cpu in figures]
        print(
            f"  {name:22} {statistics.median(rates):7.0f} calls/s "
            f"[{min(rates):.0f}-{max(rates):.0f}]  "
            f"{statistics.median(cpus):6.0f} us CPU/call [{min(cpus):.0f}-{max(cpus):.0f}]"
        )


def main() -> None:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser(prog="python -m bench.pg_driver", description=__doc__)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pool", type=int, default=int(os.environ.get("POOL", "8")))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    url = postgres.create_database()
    try:
        asyncio.run(run(url, args.users, args.calls, args.concurrency, args.pool, args.rounds))
    finally:
        postgres.drop_database(url)


if __name__ == "__main__":
    main()
