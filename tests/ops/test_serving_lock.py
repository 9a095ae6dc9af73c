"""Servers of one database share their rate limits, or one serves it alone.

A second `expense-auth serve` on the same database (the same SQLite file, the same
PostgreSQL database) is refused when either of the two keeps its limits in memory,
and welcome when both share them in Redis.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import server_env
from tests.support import postgres
from tests.support.google import FakeGoogle
from tests.support.redis import RedisServer, redis_server
from tests.support.server import BIN, RunningServer, start_server

MEMORY = "memory://"


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as running:
        yield running


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The database every server of a test shares (SQLite: DATA_DIR is per server call)."""
    if request.param == "sqlite":
        yield {}
        return
    with postgres.database(migrated=False) as url:
        yield {"DATABASE_URL": url}


def second_serve(first: RunningServer, tmp: Path, limits: str) -> subprocess.CompletedProcess[str]:
    """`serve` on the first server's database, on ports of its own; waits for refusal."""
    env = {**first.env, "RATE_LIMIT_STORAGE_URL": limits, "ADMIN_PORT": "0"}
    return subprocess.run(
        [str(BIN / "expense-auth"), "serve", "--port", "0"],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextlib.contextmanager
def running(tmp: Path, env: dict[str, str], data_dir: Path) -> Iterator[RunningServer]:
    server = start_server(tmp, env, data_dir=data_dir)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.logs()[-2000:]


def test_a_server_with_limits_in_memory_serves_its_database_alone(
    tmp_path: Path, google: FakeGoogle, redis: RedisServer, database: dict[str, str]
) -> None:
    env = server_env(google, RATE_LIMIT_STORAGE_URL=MEMORY, **database)
    with running(tmp_path, env, tmp_path / "var") as first:
        for limits in (MEMORY, f"{redis.url}/0"):
            refused = second_serve(first, tmp_path, limits)
            assert refused.returncode == 2, refused.stderr[-2000:]
            assert "RATE_LIMIT_STORAGE_URL: another expense-auth" in refused.stderr
            assert "Traceback" not in refused.stderr
    # Once the first has stopped, the database is free again.
    with running(tmp_path, env, tmp_path / "var"):
        pass


def test_servers_sharing_their_limits_share_the_database(
    tmp_path: Path, google: FakeGoogle, redis: RedisServer, database: dict[str, str]
) -> None:
    env = server_env(google, RATE_LIMIT_STORAGE_URL=f"{redis.url}/0", **database)
    with (
        running(tmp_path, env, tmp_path / "var") as first,
        running(tmp_path, env, tmp_path / "var") as second,
    ):
        assert first.port != second.port
        refused = second_serve(first, tmp_path, MEMORY)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "rate limits kept in memory (memory://) would be counted by each server" in (
            refused.stderr
        )
