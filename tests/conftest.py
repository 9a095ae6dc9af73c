"""Shared fixtures: a fake Google key server and the real server on a socket."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.domain.throttle import POLICIES
from tests.support.google import CLIENT_ID, FakeGoogle
from tests.support.npm import REPO, pack_client, which_npm
from tests.support.server import RunningServer, start_server

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(path: str | None, name: str) -> str:
    """The tool's path; outside CI a missing tool skips, in CI it fails the run."""
    if path and (os.path.exists(path) or shutil.which(path)):
        return path
    message = f"{name} is not installed; run `make setup`"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def google() -> Iterator[FakeGoogle]:
    """Google's key server, local."""
    fake = FakeGoogle().start()
    yield fake
    fake.stop()


# Functional tests sign in hundreds of times from one address; the rate limits
# themselves are tested in tests/security with their real, small numbers.
GENEROUS_LIMITS = {f"RATE_LIMIT_{name.upper()}": "1000000/minute" for name in POLICIES}


def server_env(google: FakeGoogle, **extra: str) -> dict[str, str]:
    """The environment of a development server that trusts the fake Google."""
    return {
        "GOOGLE_CLIENT_ID": CLIENT_ID,
        "GOOGLE_CERTS_URL": google.certs_url,
        **GENEROUS_LIMITS,
        **extra,
    }


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle) -> Iterator[RunningServer]:
    """One real server for the whole run (tests use distinct users)."""
    tmp: Path = tmp_path_factory.mktemp("server")
    running = start_server(tmp, server_env(google))
    yield running
    assert running.stop() == 0, running.logs()


@pytest.fixture(scope="session")
def client_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client package (clients/ts) as `npm pack` makes it from the current sources."""
    npm = require_tool(which_npm(), "npm")
    require_tool(str(REPO / "node_modules" / ".bin" / "tsc"), "tsc (npm ci)")
    return pack_client(npm, tmp_path_factory.mktemp("client-pack"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI nothing may be skipped: a skip there hides a missing tool or a broken setup."""
    if not IN_CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped:
        if reporter is not None:
            reporter.write_line(f"CI refuses skipped tests: {skipped} skipped", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
