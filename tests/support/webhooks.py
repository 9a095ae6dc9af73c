"""A webhook receiver on a real socket, as the expense service would run one.

It verifies every delivery with the `standardwebhooks` library (signature and
timestamp, nothing of ours), drops duplicates by `webhook-id`, and records what
it accepted, in arrival order. Tests can take it down (its port refuses
connections) and bring it back on the same port, make it answer an error, or
hold its answers (to kill the sender while a delivery is on the wire).
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Delivery:
    """One request as it arrived, whatever became of it."""

    headers: dict[str, str]
    body: bytes
    verdict: str  # accepted | duplicate | rejected: <the library's reason> | refused: HTTP n


@dataclass
class Receiver:
    """The receiver: `start()`, then point WEBHOOK_URLS at `url`."""

    secret: str
    port: int = 0
    answer_status: int = 200
    # Seconds each answer takes (a slow receiver keeps deliveries on the wire longer).
    delay_s: float = 0.0
    # Set: answers are held until it is cleared (the request is verified and recorded first).
    hold: threading.Event = field(default_factory=threading.Event)
    deliveries: list[Delivery] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    accepted_ids: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The endpoint's URL."""
        return f"http://127.0.0.1:{self.port}/hooks/expense-auth"

    def start(self) -> Receiver:
        """Listen (on the same port as before, after a `stop`)."""
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening: connections to the port are refused until `start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def release(self) -> None:
        """Let held answers go."""
        self.hold.clear()

    def verdicts(self) -> list[str]:
        """What became of each request, in arrival order."""
        with self._lock:
            return [d.verdict for d in self.deliveries]

    def events(self) -> list[dict[str, Any]]:
        """The accepted events (duplicates dropped), in arrival order."""
        with self._lock:
            return list(self.accepted)

    def events_of(self, user_id: str) -> list[str]:
        """The types of the events accepted about one user, in arrival order."""
        return [e["type"] for e in self.events() if _user_of(e) == user_id]

    def wait_for(self, condition: Callable[[Receiver], bool], timeout_s: float = 60) -> None:
        """Wait until `condition(self)` holds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition(self):
                return
            time.sleep(0.05)
        raise AssertionError(f"receiver: condition not met in {timeout_s} s: {self.verdicts()}")

    def receive(self, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        """Verify and record one delivery; returns the status to answer and the verdict."""
        try:
            payload = Webhook(self.secret).verify(body, headers)
        except WebhookVerificationError as exc:
            return 400, f"rejected: {exc}"
        if self.answer_status != 200:
            return self.answer_status, f"refused: HTTP {self.answer_status}"
        event_id = headers["webhook-id"]
        with self._lock:
            if event_id in self.accepted_ids:
                return 200, "duplicate"
            self.accepted_ids.append(event_id)
            self.accepted.append({**payload, "id": event_id})
        return 200, "accepted"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, verdict = receiver.receive(headers, body)
                with receiver._lock:
                    receiver.deliveries.append(Delivery(headers, body, verdict))
                time.sleep(receiver.delay_s)
                while receiver.hold.is_set():
                    time.sleep(0.05)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _user_of(event: dict[str, Any]) -> str:
    data = event["data"]
    return str(data["user"]["id"] if "user" in data else data["user_id"])


def post(url: str, headers: dict[str, str], body: bytes) -> int:
    """POST a delivery as-is (for replays and forgeries); returns the status. The
    headers that describe the connection or the body's length are the new request's."""
    hop = {"content-length", "host", "connection", "accept-encoding", "accept"}
    headers = {k: v for k, v in headers.items() if k.lower() not in hop}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def json_body(delivery: Delivery) -> dict[str, Any]:
    """A delivery's payload."""
    parsed: dict[str, Any] = json.loads(delivery.body)
    return parsed
