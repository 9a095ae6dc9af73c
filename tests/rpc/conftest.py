"""The RPC tests run against both storage engines: one server each, on SQLite and on
a throwaway PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import server_env
from tests.support import postgres
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer, start_server


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle
) -> Iterator[RunningServer]:
    """The real server, on each engine in turn."""
    tmp = tmp_path_factory.mktemp(f"rpc-{request.param}")
    if request.param == "sqlite":
        running = start_server(tmp, server_env(google))
        yield running
        assert running.stop() == 0, running.logs()
        return
    with postgres.database(migrated=False) as url:
        running = start_server(tmp, server_env(google, DATABASE_URL=url))
        yield running
        assert running.stop() == 0, running.logs()
