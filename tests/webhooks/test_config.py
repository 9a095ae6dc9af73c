"""The webhook settings are checked at start, every problem named with its variable."""

from __future__ import annotations

import pytest

from server.config import ConfigError, load_config
from tests.support.webhooks import new_secret

SECRET = new_secret()
PRODUCTION = {
    "APP_ENV": "production",
    "GOOGLE_CLIENT_ID": "client.apps.googleusercontent.com",
    "SESSION_SECRET_KEY": "k" * 8 + "Zq3-x_9TbYw2LmNpRs4VuHjKcDfGaE5W7",
    "SESSION_SECURE_COOKIE": "true",
    "BEHIND_TLS_PROXY": "true",
}


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        (
            {"WEBHOOK_URLS": "ftp://expenses.internal/hooks", "WEBHOOK_SECRET": SECRET},
            "WEBHOOK_URLS: expected http:// or https:// URLs, comma-separated, "
            "got 'ftp://expenses.internal/hooks'",
        ),
        (
            {"WEBHOOK_URLS": "https://user:pw@expenses.internal/h", "WEBHOOK_SECRET": SECRET},
            "WEBHOOK_URLS: a URL must not carry credentials",
        ),
        (
            {"WEBHOOK_URLS": "https://a.internal/h,https://a.internal/h", "WEBHOOK_SECRET": SECRET},
            "WEBHOOK_URLS: a URL is listed twice",
        ),
        ({"WEBHOOK_URLS": "https://a.internal/h"}, "WEBHOOK_SECRET: required with WEBHOOK_URLS"),
        (
            {"WEBHOOK_URLS": "https://a.internal/h", "WEBHOOK_SECRET": "not-a-secret"},
            "WEBHOOK_SECRET: secret #1 must be whsec_ followed by 24 to 64 random bytes",
        ),
        (
            {"WEBHOOK_URLS": "https://a.internal/h", "WEBHOOK_SECRET": f"{SECRET},whsec_c2hvcnQ="},
            "WEBHOOK_SECRET: secret #2 must be whsec_",
        ),
        ({"WEBHOOK_RETRY_FOR_SECONDS": "0"}, "WEBHOOK_RETRY_FOR_SECONDS: Input should be greater"),
        ({"WEBHOOK_TIMEOUT_SECONDS": "-1"}, "WEBHOOK_TIMEOUT_SECONDS: Input should be greater"),
        (
            {**PRODUCTION, "WEBHOOK_URLS": "http://expenses.internal/h", "WEBHOOK_SECRET": SECRET},
            "WEBHOOK_URLS: must be https:// in production",
        ),
    ],
)
def test_bad_webhook_settings_are_named(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(env, env_file=None)
    assert any(p.startswith(problem) for p in refused.value.problems), refused.value.problems
    assert SECRET not in str(refused.value)


def test_good_settings_and_loopback_in_production() -> None:
    env = {
        **PRODUCTION,
        "WEBHOOK_URLS": "https://expenses.internal/h, http://127.0.0.1:9000/h",
        "WEBHOOK_SECRET": f"{new_secret()},{SECRET}",
    }
    config = load_config(env, env_file=None)
    assert config.webhook_urls == ["https://expenses.internal/h", "http://127.0.0.1:9000/h"]
    assert [key.get_secret_value() for key in config.webhook_secret][1] == SECRET
