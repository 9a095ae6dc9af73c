"""Production refuses settings that would quietly undo a defence, naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import ConfigError, load_config
from tests.support.server import REPO

CLI = str(Path(sys.executable).parent / "expense-auth")
KEY = "IXCsTgbp_Rq7nzitHEG0B6hHAkM_WNotn8KsDXw41HTTb-ju079t5L0Rniz0JXXL"
VALID = {
    "APP_ENV": "production",
    "GOOGLE_CLIENT_ID": "1234567890-test.apps.googleusercontent.com",
    "SESSION_SECRET_KEY": KEY,
    "SESSION_SECURE_COOKIE": "true",
    "BEHIND_TLS_PROXY": "true",
    "CORS_ALLOWED_ORIGIN": "https://app.example.com",
    "ADMIN_PORT": "0",
}


def serve(tmp_path: Path, **changes: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO),
        "DATA_DIR": str(tmp_path / "var"),
        **VALID,
    }
    env.update(changes)
    try:
        return subprocess.run(
            [CLI, "serve", "--port", "0"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"production started with {changes}")


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        (
            {"GOOGLE_CERTS_URL": "http://127.0.0.1:9/oauth2/v1/certs"},
            "GOOGLE_CERTS_URL: must be an https:// URL in production",
        ),
        (
            {"CORS_ALLOWED_ORIGIN": "https://app.example.com,http://app.example.com"},
            "CORS_ALLOWED_ORIGIN: must be https:// origins in production",
        ),
        ({"SESSION_SECRET_KEY": "a" * 32}, "SESSION_SECRET_KEY: key #1 looks guessable"),
        (
            {"SESSION_SECRET_KEY": f"{KEY},{'ab' * 20}"},
            "SESSION_SECRET_KEY: key #2 looks guessable",
        ),
        ({"ADMIN_TOKEN": "t" * 40}, "ADMIN_TOKEN: looks guessable"),
        ({"TRUSTED_PROXIES": "0.0.0.0/0"}, "TRUSTED_PROXIES: 0.0.0.0/0 trusts X-Forwarded-For"),
        ({"TRUSTED_PROXIES": "10.0.0.0/8,::/0"}, "TRUSTED_PROXIES: ::/0 trusts"),
        ({"TRUSTED_PROXIES": "0.0.0.0/1"}, "TRUSTED_PROXIES: 0.0.0.0/1 trusts"),
        (
            {"SENTRY_DSN": "http://0123456789abcdef@sentry.example.com/42"},
            "SENTRY_DSN: must be an https:// DSN in production",
        ),
    ],
)
def test_production_refuses_weakening_settings(
    tmp_path: Path, changes: dict[str, str], says: str
) -> None:
    result = serve(tmp_path, **changes)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    assert KEY not in result.stderr


def test_development_keeps_local_conveniences(tmp_path: Path) -> None:
    """The same values are fine in development, where the fake Google is plain HTTP."""
    config = load_config(
        {
            "GOOGLE_CERTS_URL": "http://127.0.0.1:9/oauth2/v1/certs",
            "CORS_ALLOWED_ORIGIN": "http://localhost:5173",
            "TRUSTED_PROXIES": "0.0.0.0/0",
        }
    )
    assert not config.production


def test_private_networks_are_fine_as_trusted_proxies(tmp_path: Path) -> None:
    config = load_config({**VALID, "TRUSTED_PROXIES": "10.0.0.0/8,fc00::/7,192.168.1.1/32"})
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.0/8", "fc00::/7", "192.168.1.1/32"]


def test_sentry_over_plain_http_is_for_a_relay_on_this_host_only() -> None:
    config = load_config({**VALID, "SENTRY_DSN": "http://0123456789abcdef@127.0.0.1:3000/42"})
    assert config.sentry_dsn is not None
    assert load_config({**VALID, "SENTRY_DSN": ""}).sentry_dsn is None  # empty is unset


@pytest.mark.parametrize(
    "dsn",
    [
        "not a url 0123456789abcdef",
        "https://sentry.example.com/42",  # no public key
        "https://0123456789abcdef@sentry.example.com/",  # no project
        "ftp://0123456789abcdef@sentry.example.com/42",
        "https://0123456789abcdef@sentry.example.com:99999/42",
    ],
)
def test_a_malformed_sentry_dsn_is_named_but_not_quoted(dsn: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config({"SENTRY_DSN": dsn, "SENTRY_SAMPLE_RATE": "1.5"})
    problems = refused.value.problems
    assert any(
        p.startswith("SENTRY_DSN: expected https://PUBLIC_KEY@HOST/PROJECT_ID") for p in problems
    )
    assert any(p.startswith("SENTRY_SAMPLE_RATE:") for p in problems)  # both, in one go
    assert "0123456789abcdef" not in str(refused.value)
