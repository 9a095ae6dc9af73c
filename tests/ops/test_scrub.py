"""The scrubber of what goes to the error tracker (server/ops/scrub.py), rule by rule."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from server.ops.scrub import FILTERED, Scrubber
from tests.support.google import FakeGoogle

KEY = secrets.token_urlsafe(48)
ADMIN = secrets.token_urlsafe(32)
COOKIE = "9wXx3tYb1nJ2kQ7rZ0vF5mL8pS4cA6hD_eGiUoTyWzB.aSx3Yg.Qm9FJx1c0dRk2VwZp8Ht7sLb3nA"
scrubber = Scrubber([KEY, ADMIN, "hunter2-password"])


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"cookie header was expense_session={COOKIE}; other=1", COOKIE),
        (f"__Host-expense_session={COOKIE}", COOKIE),
        (f"bad cookie value {COOKIE!r}", COOKIE),
        ("Authorization: Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl"),
        ("authorization: basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("user ann.o'neil+tag@example.co.uk not found", "ann.o'neil+tag@example.co.uk"),
        ("postgresql://app:s3cr3t-pw@db.internal:5432/auth", "s3cr3t-pw"),
        ("redis://:r3dis-pw@cache:6379/0", "r3dis-pw"),
        (f"signing with {KEY} failed", KEY),
        (f"token={ADMIN}&x=1", ADMIN),
        (f"ADMIN_TOKEN is {ADMIN}", ADMIN),
        ("the password hunter2-password is wrong", "hunter2-password"),
        ("page_token=Zm9vYmFyYmF6cXV4", "Zm9vYmFyYmF6cXV4"),
        ("id kQ7rZ0vF5mL8pS4cA6hD9wXx3tYb1nJ2 unknown", "kQ7rZ0vF5mL8pS4cA6hD9wXx3tYb1nJ2"),
    ],
)
def test_credentials_in_text_are_replaced(text: str, secret: str) -> None:
    cleaned = scrubber.text(text)
    assert secret not in cleaned
    assert "Filtered" in cleaned


def test_a_google_id_token_is_replaced_wherever_it_appears(google: FakeGoogle) -> None:
    token = google.token()
    for text in (token, f"verify failed for {token}", f'{{"credential": "{token}"}}'):
        cleaned = scrubber.text(text)
        assert token not in cleaned and token.split(".")[1] not in cleaned, cleaned
        assert "[Filtered:jwt]" in cleaned


@pytest.mark.parametrize(
    "text",
    [
        "expense-auth@0.1.0",
        "timestamp seconds out of range",
        "server/ops/scrub.py",
        "server.storage.sqlite.store",
        "d8e07f34a49143cc9e0281ff50d2c920",  # trace and event ids: lower-case hex
        "test_unexpected_errors_and_a_failed_job_are_reported",
        "[Errno 17] File exists: '/srv/backups'",
        "request_id=proof-1",
    ],
)
def test_ordinary_text_is_kept(text: str) -> None:
    assert scrubber.text(text) == text


def test_values_under_sensitive_keys_are_replaced_at_any_depth() -> None:
    event: dict[str, Any] = {
        "request": {
            "headers": {
                "Cookie": "a=b",
                "Set-Cookie": "c=d",
                "Authorization": "x",
                "X-Request-Id": "r1",
            },
            "cookies": {"expense_session": "v"},
            "env": {"REMOTE_ADDR": "10.0.0.1"},
        },
        "user": {"id": "usr_1", "email": "e", "ip_address": "10.0.0.2"},
        "breadcrumbs": {
            "values": [{"data": {"session_secret_key": "k", "Email": "e", "path": "/x"}}]
        },
        "exception": {"values": [{"stacktrace": {"frames": [{"vars": {"password": "p"}}]}}]},
        "extra": {"headers": [["authorization", "Bearer z"], ["accept", "*/*"]]},
        "tags": {"request_id": "r1", "job": "backup"},
    }
    cleaned = scrubber.event(event)
    headers = cleaned["request"]["headers"]
    assert headers["Cookie"] == headers["Set-Cookie"] == headers["Authorization"] == FILTERED
    assert headers["X-Request-Id"] == "r1"
    assert cleaned["request"]["cookies"] == FILTERED
    assert cleaned["request"]["env"] == FILTERED
    assert cleaned["user"] == FILTERED
    crumb = cleaned["breadcrumbs"]["values"][0]["data"]
    assert crumb == {"session_secret_key": FILTERED, "Email": FILTERED, "path": "/x"}
    frame = cleaned["exception"]["values"][0]["stacktrace"]["frames"][0]
    assert frame["vars"]["password"] == FILTERED
    assert cleaned["extra"]["headers"] == [["authorization", FILTERED], ["accept", "*/*"]]
    assert cleaned["tags"] == {"request_id": "r1", "job": "backup"}
    assert event["request"]["headers"]["Cookie"] == "a=b"  # a copy: the input is untouched


def test_breadcrumbs_are_scrubbed_on_their_own_too() -> None:
    crumb = {"category": "log", "message": f"signed cookie {COOKIE}", "data": {"token": "t"}}
    cleaned = scrubber.breadcrumb(crumb, {})
    assert COOKIE not in str(cleaned) and cleaned["data"]["token"] == FILTERED
