"""TLS to PostgreSQL: the libpq parameters of DATABASE_URL reach the driver.

A PostgreSQL of the test's own serves TLS with a certificate of a throwaway CA. The
server, with `sslmode=verify-full&sslrootcert=CA` in DATABASE_URL, migrates, serves and
signs in over connections that PostgreSQL itself reports as TLS; pointed at another CA,
it refuses to start and says why.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import server_env
from tests.support.client import Session
from tests.support.google import FakeGoogle
from tests.support.pki import Pki, make_pki
from tests.support.postgres_server import PostgresServer
from tests.support.server import BIN, start_server


@pytest.fixture
def tls_postgres(tmp_path: Path) -> Iterator[tuple[PostgresServer, Pki]]:
    pki = make_pki(tmp_path)
    server = PostgresServer().init()
    try:
        server.enable_tls(pki.server_cert, pki.server_key)
        server.start()
        yield server, pki
    finally:
        server.destroy()


async def _tls_of_others(url: str) -> list[bool]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT s.ssl FROM pg_stat_ssl AS s JOIN pg_stat_activity AS a USING (pid) "
            "WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()"
        )
        return [bool(row[0]) for row in rows]
    finally:
        await conn.close()


def test_sslmode_verify_full_passes_through_database_url(
    tls_postgres: tuple[PostgresServer, Pki], tmp_path: Path, google: FakeGoogle
) -> None:
    database, pki = tls_postgres
    url = f"{database.url}?sslmode=verify-full&sslrootcert={pki.ca_cert}"
    server = start_server(tmp_path, server_env(google, DATABASE_URL=url))
    try:
        browser = Session(server.url)
        assert browser.sign_in(google.token(sub="tls-user")).user is not None
        tls = asyncio.run(_tls_of_others(f"{database.url}?sslmode=disable"))
        assert tls and all(tls), tls  # every connection of the server is TLS
    finally:
        assert server.stop() == 0, server.logs()[-3000:]


def test_a_certificate_of_another_ca_is_refused_at_start(
    tls_postgres: tuple[PostgresServer, Pki], tmp_path: Path
) -> None:
    database, _ = tls_postgres
    (tmp_path / "other").mkdir()
    other = make_pki(tmp_path / "other")
    url = f"{database.url}?sslmode=verify-full&sslrootcert={other.ca_cert}"
    result = subprocess.run(
        [str(BIN / "expense-auth"), "serve", "--port", "0"],
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": url, "DATA_DIR": str(tmp_path / "var")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "cannot connect to the PostgreSQL database at 127.0.0.1" in result.stderr
    assert "certificate verify failed" in result.stderr
    assert "Traceback" not in result.stderr
