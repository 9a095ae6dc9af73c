"""Raw HTTP/1.1 requests, for tests that need full control of headers and bodies."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Response:
    """Status, headers (lower-cased names, repeated ones kept) and body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of a header."""
        return next((v for k, v in self.headers if k == name.lower()), None)

    def all(self, name: str) -> list[str]:
        """Every value of a header."""
        return [v for k, v in self.headers if k == name.lower()]

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


def request(
    url: str,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 20,
) -> Response:
    """One request on a fresh connection."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        raw = conn.getresponse()
        return Response(
            status=raw.status,
            headers=[(k.lower(), v) for k, v in raw.getheaders()],
            body=raw.read(),
        )
    finally:
        conn.close()


def connect_post(
    url: str, procedure: str, message: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    """A Connect unary JSON call, as a browser's Connect client sends it."""
    return request(
        url,
        "POST",
        procedure,
        body=json.dumps(message).encode(),
        headers={
            "content-type": "application/json",
            "connect-protocol-version": "1",
            **(headers or {}),
        },
    )
