"""Helpers shared by the interop tests: running a tool, cookies, raw HTTP responses."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
PROTO_DIR = REPO / "proto"
COOKIE_NAME = "expense_session"
# A guard against a hung tool, not a speed check: tsc over the client package took
# more than 30 s on a 2-core machine loaded with other test runs.
TOOL_TIMEOUT_S = 180


def new_sub() -> str:
    """A fresh Google subject, so each test has its own user."""
    return str(10**20 + secrets.randbelow(10**20))


def run(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = TOOL_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run a client tool from the repository root; never raises on a non-zero exit."""
    return subprocess.run(
        list(args),
        cwd=REPO,
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cookie_pair(set_cookie: str) -> str:
    """`name=value` of a Set-Cookie header, as a client sends it back."""
    return set_cookie.split(";", 1)[0].strip()


def cookie_attributes(set_cookie: str) -> dict[str, str]:
    """The attributes of a Set-Cookie header: `{"Path": "/", "HttpOnly": "", ...}`."""
    attributes: dict[str, str] = {}
    for part in set_cookie.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        attributes[name] = value
    return attributes


def assert_session_cookie(set_cookie: str) -> None:
    """The cookie SignIn sets: the session cookie, HttpOnly, Lax, with a lifetime."""
    name, _, value = cookie_pair(set_cookie).partition("=")
    assert name == COOKIE_NAME, set_cookie
    assert value, set_cookie
    attributes = cookie_attributes(set_cookie)
    assert attributes.keys() == {"Path", "Max-Age", "HttpOnly", "SameSite"}, set_cookie
    assert attributes["Path"] == "/"
    assert attributes["SameSite"] == "Lax"
    assert int(attributes["Max-Age"]) > 0


@dataclass(frozen=True)
class HttpResponse:
    """A response as `curl -s -i` printed it."""

    version: str
    status: int
    headers: list[tuple[str, str]]
    body: str

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive), or None."""
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        """All values of a header (case-insensitive)."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        """The body, decoded as JSON."""
        return json.loads(self.body)


def parse_http_response(raw: str) -> HttpResponse:
    """Split `curl -i` output (read as text: CRLF already turned into LF) into its parts."""
    head, sep, body = raw.partition("\n\n")
    assert sep, f"no end of headers in {raw!r}"
    status_line, *header_lines = head.split("\n")
    version, status, *_ = status_line.split(" ", 2)
    headers = []
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return HttpResponse(version=version, status=int(status), headers=headers, body=body)
