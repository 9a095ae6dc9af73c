"""The `expense-auth` command: configuration checks, migrations, development tokens."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from connectrpc.errors import ConnectError

from server.config import ConfigError, load_config
from tests.support.client import Session, code_of
from tests.support.server import RunningServer

CLI = str(Path(sys.executable).parent / "expense-auth")
# Random keys, fixed so that the test is repeatable (production refuses guessable ones).
STRONG = "IXCsTgbp_Rq7nzitHEG0B6hHAkM_WNotn8KsDXw41HTTb-ju079t5L0Rniz0JXXL"
OLDER = "YjOHxPmGJC5nl0IuyxWTlnfeMOnXsGaInmBD6Ifr73afFR_gd_R7fx7BBsnGGARb"


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        env={"PATH": os.environ.get("PATH", ""), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "variables"),
    [
        ({}, ["GOOGLE_CLIENT_ID", "SESSION_SECRET_KEY", "SESSION_SECURE_COOKIE"]),
        (
            {"GOOGLE_CLIENT_ID": "c", "SESSION_SECRET_KEY": "short", "SESSION_SECURE_COOKIE": "1"},
            ["SESSION_SECRET_KEY: key #1 is shorter than 32 bytes"],
        ),
        (
            {
                "GOOGLE_CLIENT_ID": "c",
                "SESSION_SECRET_KEY": STRONG,
                "SESSION_SECURE_COOKIE": "true",
                "DEV_IDENTITY_ENABLED": "true",
            },
            ["DEV_IDENTITY_ENABLED"],
        ),
        (
            {
                "GOOGLE_CLIENT_ID": "c",
                "SESSION_SECRET_KEY": STRONG,
                "SESSION_SECURE_COOKIE": "true",
                "CORS_ALLOWED_ORIGIN": "https://app.example.com,*",
                "SIGNIN_NONCE_REQUIRED": "false",
            },
            [
                "CORS_ALLOWED_ORIGIN: each origin must be exact",
                "got '*'",
                "SIGNIN_NONCE_REQUIRED: must stay on in production",
                "TLS_CERT_FILE: production needs HTTPS",
                "BEHIND_TLS_PROXY=true",
            ],
        ),
        (
            {"CORS_ALLOWED_ORIGIN": "null", "TLS_CERT_FILE": "/nonexistent.pem"},
            ["CORS_ALLOWED_ORIGIN", "got 'null'", "TLS_CERT_FILE, TLS_KEY_FILE: give both"],
        ),
        (
            {"SESSION_IDLE_TIMEOUT_SECONDS": "soon", "SESSION_SECURE_COOKIE": "perhaps"},
            ["SESSION_IDLE_TIMEOUT_SECONDS", "SESSION_SECURE_COOKIE", "GOOGLE_CLIENT_ID"],
        ),
    ],
)
def test_production_refuses_to_start_and_names_every_problem(
    tmp_path: Path, env: dict[str, str], variables: list[str]
) -> None:
    result = run_cli("serve", env={"APP_ENV": "production", **env}, cwd=tmp_path)
    assert result.returncode == 2
    for variable in variables:
        assert variable in result.stderr
    assert "Traceback" not in result.stderr
    assert STRONG not in result.stderr and "short" not in result.stderr.replace("shorter", "")


def test_valid_production_config_loads() -> None:
    config = load_config(
        {
            "APP_ENV": "production",
            "GOOGLE_CLIENT_ID": "a.apps.googleusercontent.com, b.apps.googleusercontent.com",
            "SESSION_SECRET_KEY": f"{OLDER},{STRONG}",
            "SESSION_SECURE_COOKIE": "true",
            "CORS_ALLOWED_ORIGIN": "https://app.example.com",
            "BEHIND_TLS_PROXY": "true",
        }
    )
    assert config.google_client_id == [
        "a.apps.googleusercontent.com",
        "b.apps.googleusercontent.com",
    ]
    assert [k.get_secret_value() for k in config.session_secret_key][-1] == STRONG
    assert not config.dev_identity
    assert STRONG not in repr(config)


def test_max_age_must_cover_idle_timeout() -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"SESSION_IDLE_TIMEOUT_SECONDS": "7200", "SESSION_MAX_AGE_SECONDS": "3600"})
    assert any("SESSION_MAX_AGE_SECONDS" in p for p in err.value.problems)


def test_migrate_is_explicit_and_idempotent(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path / "data")}
    assert run_cli("migrate", env=env, cwd=tmp_path).returncode == 0
    assert run_cli("migrate", env=env, cwd=tmp_path).returncode == 0
    with sqlite3.connect(tmp_path / "data" / "expense-auth.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"users", "sessions"} <= tables


def test_dev_token_signs_in_to_a_server_sharing_the_data_dir(
    server: RunningServer, tmp_path: Path
) -> None:
    env = {"DATA_DIR": str(server.data_dir)}
    tokens = [
        run_cli("dev-token", "--email", "dev@example.com", "--name", "Dev", env=env, cwd=tmp_path)
        for _ in range(2)
    ]
    assert all(t.returncode == 0 for t in tokens), tokens[0].stderr
    client = Session(server.url)
    first = client.sign_in(tokens[0].stdout.strip())
    second = client.sign_in(tokens[1].stdout.strip())
    assert first.user is not None and second.user is not None
    assert first.user.display_name == "Dev"
    assert first.user.id == second.user.id  # one email, one development user


def test_dev_token_from_another_data_dir_is_refused(server: RunningServer, tmp_path: Path) -> None:
    other = run_cli(
        "dev-token", "--email", "x@example.com", env={"DATA_DIR": "elsewhere"}, cwd=tmp_path
    )
    assert other.returncode == 0
    with pytest.raises(ConnectError) as err:
        Session(server.url).sign_in(other.stdout.strip())
    assert code_of(err.value) == "unauthenticated"


def test_dev_token_is_refused_when_the_dev_issuer_is_off(tmp_path: Path) -> None:
    result = run_cli(
        "dev-token", "--email", "a@example.com", env={"DEV_IDENTITY_ENABLED": "false"}, cwd=tmp_path
    )
    assert result.returncode == 2
    assert "development issuer is off" in result.stderr


def test_trusted_proxies_are_networks_and_mistakes_are_named() -> None:
    config = load_config({"TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7, 2001:db8::/32"})
    assert [str(net) for net in config.trusted_proxies] == [
        "10.0.0.0/8",
        "192.0.2.7/32",
        "2001:db8::/32",
    ]
    with pytest.raises(ConfigError) as err:
        load_config({"TRUSTED_PROXIES": "10.0.0.1/8,proxy.internal"})
    message = str(err.value)
    assert "10.0.0.1/8 has host bits set" in message
    assert "'proxy.internal' does not appear to be an IPv4 or IPv6 network" in message


@pytest.mark.parametrize("command", [("migrate",), ("serve", "--port", "0"), ("purge",)])
def test_an_unreachable_postgres_is_named_without_a_traceback(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://someone:hunter2secret@127.0.0.1:{port}/expenses"
    result = run_cli(*command, env={"DATABASE_URL": url, "DATA_DIR": str(tmp_path)}, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert (
        f"cannot connect to the PostgreSQL database at 127.0.0.1:{port}/expenses (DATABASE_URL)"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert "hunter2secret" not in result.stderr + result.stdout
