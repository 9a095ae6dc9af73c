"""A local Sentry ingest: receives what the server's Sentry SDK sends, over real HTTP.

It accepts `POST /api/<project_id>/envelope/` as Sentry's ingest does, checks the
public key of the `X-Sentry-Auth` header, undoes the gzip the SDK applies, and
keeps every envelope, byte for byte, for tests to read. A receiver, not a
stand-in for our code: the server's SDK, transport and hooks run as in production.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PUBLIC_KEY = "0123456789abcdef0123456789abcdef"
PROJECT_ID = 1
_ENVELOPE_PATH = re.compile(r"/api/(\d+)/envelope/")


@dataclass
class Item:
    """One item of an envelope: its header and its payload."""

    header: dict[str, Any]
    payload: bytes

    @property
    def type(self) -> str:
        """`event`, `transaction`, `session`, `client_report`..."""
        return str(self.header.get("type", ""))

    def json(self) -> Any:
        """The payload as JSON."""
        return json.loads(self.payload)


@dataclass
class Envelope:
    """One envelope as received: the bytes on the wire, decoded, and parsed."""

    wire: bytes
    body: bytes
    content_encoding: str
    header: dict[str, Any] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)


def parse(body: bytes) -> tuple[dict[str, Any], list[Item]]:
    """An envelope's header and items (Sentry's envelope format: JSON lines, and
    payloads of a declared length)."""
    first, _, rest = body.partition(b"\n")
    header = json.loads(first)
    items: list[Item] = []
    while rest.strip():
        line, _, rest = rest.partition(b"\n")
        item_header = json.loads(line)
        length = item_header.get("length")
        if length is None:
            payload, _, rest = rest.partition(b"\n")
        else:
            payload, rest = rest[:length], rest[length:].removeprefix(b"\n")
        items.append(Item(item_header, payload))
    return header, items


class FakeSentry:
    """Sentry's ingest on 127.0.0.1. `answer_after_s` delays every answer (a slow
    Sentry), so that events queue up in the SDK."""

    def __init__(self, *, answer_after_s: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._envelopes: list[Envelope] = []
        self.refused: list[str] = []
        self.answer_after_s = answer_after_s
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def dsn(self) -> str:
        """The DSN to give the server as SENTRY_DSN."""
        port = self._server.server_address[1]
        return f"http://{PUBLIC_KEY}@127.0.0.1:{port}/{PROJECT_ID}"

    def start(self) -> FakeSentry:
        """Start receiving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop receiving."""
        self._server.shutdown()
        self._server.server_close()

    @property
    def envelopes(self) -> list[Envelope]:
        """Everything received so far."""
        with self._lock:
            return list(self._envelopes)

    def events(self) -> list[dict[str, Any]]:
        """The error events received so far (not client reports or other items)."""
        return [item.json() for env in self.envelopes for item in env.items if item.type == "event"]

    def wait_for_events(self, count: int, *, timeout_s: float = 20) -> list[dict[str, Any]]:
        """Wait until at least `count` events have arrived; returns them all."""
        deadline = time.monotonic() + timeout_s
        while len(events := self.events()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(events)} events in {timeout_s} s, wanted {count}")
            time.sleep(0.05)
        return events

    def _receive(self, path: str, headers: dict[str, str], wire: bytes) -> int:
        match = _ENVELOPE_PATH.fullmatch(path)
        if match is None or int(match.group(1)) != PROJECT_ID:
            self.refused.append(f"path {path}")
            return 404
        if f"sentry_key={PUBLIC_KEY}" not in headers.get("x-sentry-auth", ""):
            self.refused.append("no or wrong sentry_key")
            return 401
        encoding = headers.get("content-encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(wire)
        elif encoding in ("", "identity"):
            body = wire
        else:
            self.refused.append(f"content-encoding {encoding}")
            return 415
        header, items = parse(body)
        with self._lock:
            self._envelopes.append(Envelope(wire, body, encoding, header, items))
        return 200

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                wire = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = fake._receive(self.path, headers, wire)
                if fake.answer_after_s:
                    time.sleep(fake.answer_after_s)
                body = b"{}"
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        return Handler
