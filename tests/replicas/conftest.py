"""Fixtures of the replica tests: one Redis for the package, and a pair of replicas
on a throwaway PostgreSQL database for the tests that need nothing special."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.replicas.cluster import replica_env, start_replicas, stop_all
from tests.support import postgres
from tests.support.google import FakeGoogle
from tests.support.redis import RedisServer
from tests.support.server import RunningServer


@dataclass(frozen=True)
class Pair:
    """Two replicas on one database: act on `b`, observe on `a`."""

    a: RunningServer
    b: RunningServer
    database_url: str

    @property
    def servers(self) -> tuple[RunningServer, RunningServer]:
        """Both, `a` first."""
        return self.a, self.b


def redis_binary() -> str:
    """redis-server; its absence fails the run (CI skips nothing)."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail("redis-server is not installed (Debian redis-server); run `make setup`")
    return path


@pytest.fixture(scope="package")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of the package's own: the replicas' shared rate-limit storage."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), binary=redis_binary()).start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def pair(
    tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle, redis: RedisServer
) -> Iterator[Pair]:
    """Two replicas on a fresh database (which they migrate side by side) and Redis."""
    with postgres.database(migrated=False) as url:
        a, b = start_replicas(
            tmp_path_factory.mktemp("pair"),
            replica_env(google, database_url=url, redis_url=redis.url),
        )
        yield Pair(a, b, url)
        assert stop_all([a, b]) == []
