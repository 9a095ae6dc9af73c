"""Read a running test server's database, whichever engine it uses."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from contextlib import closing
from typing import Any

import asyncpg

from tests.support.server import RunningServer


def rows(server: RunningServer, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """The rows of `sql` (with `?` placeholders), read beside the running server."""
    url = server.env.get("DATABASE_URL", "")
    if url.startswith(("postgresql://", "postgres://")):
        numbered = iter(range(1, 1000))
        pg_sql = re.sub(r"\?", lambda _: f"${next(numbered)}", sql)
        return asyncio.run(_pg_rows(url, pg_sql, params))
    path = server.data_dir / "expense-auth.db"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [tuple(row) for row in db.execute(sql, params)]


async def _pg_rows(url: str, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return [tuple(row) for row in await conn.fetch(sql, *params)]
    finally:
        await conn.close()


TABLES = ("users", "sessions", "audit_events", "used_id_tokens", "deleted_accounts")


def everything(server: RunningServer) -> str:
    """Every row of every table of the service, as text (to look for traces in)."""
    return "\n".join(repr(rows(server, f"SELECT * FROM {table}")) for table in TABLES)  # noqa: S608
