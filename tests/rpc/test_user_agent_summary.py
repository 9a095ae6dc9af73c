"""The session label ("Chrome on macOS") from real User-Agent strings."""

from __future__ import annotations

import pytest

from server.rpc.user_agent import summarize

CHROME_MAC = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
)


@pytest.mark.parametrize(
    ("header", "label"),
    [
        (CHROME_MAC, "Chrome on macOS"),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
            "Edge on Windows",
        ),
        (
            "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
            "Firefox on Linux",
        ),
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
            "Mobile Safari on iOS",
        ),
        ("grpc-python/1.85.1 grpc-c/46.0.0 (linux; chttp2)", "grpc-python on Linux"),
        ("curl/7.88.1", "curl"),
        ("", "unknown client"),
        ("   ", "unknown client"),
        ("%%%", "unknown client"),
    ],
)
def test_labels(header: str, label: str) -> None:
    assert summarize(header) == label
    assert summarize(header) == label  # the second time from the parser's cache


def test_only_the_first_512_characters_are_read() -> None:
    assert summarize(CHROME_MAC + " x" * 10_000) == "Chrome on macOS"
