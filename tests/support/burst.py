"""A burst of sign-ins against a real server while it is told to stop: the drain tests' clients.

The clients behave like a load balancer that is a little slow to react: they keep
sending through the readiness grace period, and once the server has said it is
draining (`Connection: close` on an answer, Envoy's drain notice), each makes one last
call a moment later and stops. A server that drains gracefully keeps accepting for its
drain period (Envoy's --drain-time-s, 1 s) and answers all of these; so no client may
see a refused or dropped connection. Refusals or resets mean the drain was cut short.

Used against `expense-auth serve` on the host (tests/ops/test_lifecycle.py) and in a
container stopped by its engine (tests/deploy/test_container.py).
"""

from __future__ import annotations

import http.client
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.support.client import cookie_from
from tests.support.google import FakeGoogle
from tests.support.http import Response, connect_post

SIGN_IN = "/expense.auth.v1.AuthService/SignIn"
GET_SESSION = "/expense.auth.v1.AuthService/GetSession"

WORKERS = 8
PAUSE_S = 0.1  # between one client's sign-in pairs: steady load, not a flood
NOTICES = 2
LAST_CALL_AFTER_S = 0.25  # the load balancer's reaction time; well within the drain period
BURST_BEFORE_SIGTERM_S = 1.0

# A fresh subject and an ID token for it; called from several threads at once.
Tokens = Callable[[], tuple[str, str]]


def google_tokens(google: FakeGoogle) -> Tokens:
    """Tokens from the fake Google, for a new user each time."""

    def token() -> tuple[str, str]:
        subject = secrets.token_hex(8)
        return subject, google.token(sub=subject, email=f"{subject}@example.com")

    return token


def listed_tokens(pairs: Iterable[tuple[str, str]]) -> Tokens:
    """Tokens minted beforehand (e.g. inside a container), each used once."""
    remaining = iter(list(pairs))
    lock = threading.Lock()

    def token() -> tuple[str, str]:
        with lock:
            pair = next(remaining, None)
        if pair is None:
            raise RuntimeError("the burst used up its tokens: mint more")
        return pair

    return token


@dataclass
class Call:
    """One call of the burst, as its client saw it.

    A call either got an HTTP answer (`status`), or none (`error`: the exception's
    class name). The calls are raw Connect JSON requests, one connection each,
    rather than the generated client: that client folds "could not connect" and
    "connection dropped after the request was sent" into one `unavailable`, and
    these tests are about telling them apart.
    """

    procedure: str
    subject: str
    started: float
    status: int | None = None
    error: str = ""
    body: str = ""
    session_id: str = ""
    closing: bool = False  # the answer said `Connection: close`: the server is draining

    @property
    def refused(self) -> bool:
        """The server did not take the connection at all."""
        return self.error == ConnectionRefusedError.__name__


def attempt(
    url: str, procedure: str, message: dict[str, Any], *, subject: str, cookie: str = ""
) -> tuple[Call, Response | None]:
    """One raw Connect call on a fresh connection, recorded."""
    call = Call(procedure, subject, started=time.monotonic())
    try:
        response = connect_post(url, procedure, message, headers={"cookie": cookie})
    except (OSError, http.client.HTTPException) as exc:
        call.error = type(exc).__name__
        return call, None
    call.status = response.status
    call.body = response.body.decode(errors="replace")[:300]
    call.closing = (response.header("connection") or "").lower() == "close"
    if response.status == 200:
        call.session_id = response.json()["session"]["id"]
    return call, response


def session_cookie(response: Response) -> str:
    """The Cookie header a browser would send after this answer."""
    pairs = [cookie_from(c) for c in response.all("set-cookie") if "Max-Age=0" not in c]
    return "; ".join(f"{name}={value}" for name, value in pairs if value)


def client_loop(url: str, tokens: Tokens, calls: list[Call]) -> None:
    """Sign in as a new user and read the session back, until told to go away."""
    notices = 0
    while True:
        subject, token = tokens()
        sign_in, response = attempt(url, SIGN_IN, {"googleIdToken": token}, subject=subject)
        calls.append(sign_in)
        notices += sign_in.closing
        if response is None or notices >= NOTICES:
            return
        if response.status == 200:
            if notices:
                time.sleep(LAST_CALL_AFTER_S)
            get, _ = attempt(url, GET_SESSION, {}, subject=subject, cookie=session_cookie(response))
            calls.append(get)
            notices += get.closing
            if get.status is None or notices >= NOTICES:
                return
        time.sleep(LAST_CALL_AFTER_S if notices else PAUSE_S)


@dataclass
class Burst:
    """What the clients saw, and when the stop began (monotonic time)."""

    calls: list[Call] = field(default_factory=list)
    sigterm_at: float = 0.0

    @property
    def answered(self) -> list[Call]:
        """Calls that got an HTTP answer."""
        return [c for c in self.calls if c.status is not None]

    @property
    def unanswered(self) -> list[Call]:
        """Calls that got none: refused, reset, or an empty reply."""
        return [c for c in self.calls if c.status is None]


def burst_then_stop(url: str, tokens: Tokens, stop: Callable[[], object]) -> Burst:
    """Start the clients, call `stop` (it sends SIGTERM and waits) mid-burst, join them."""
    burst = Burst()  # list.append is atomic: the workers share `calls` without a lock
    workers = [
        threading.Thread(target=client_loop, args=(url, tokens, burst.calls), daemon=True)
        for _ in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    time.sleep(BURST_BEFORE_SIGTERM_S)
    burst.sigterm_at = time.monotonic()
    stop()
    for worker in workers:
        worker.join(timeout=30)
    return burst


def describe(calls: list[Call], since: float) -> str:
    """The first calls, one a line, timed from `since`."""
    return "\n".join(
        f"{c.started - since:+.2f}s {c.procedure.rsplit('/', 1)[-1]} "
        f"status={c.status} error={c.error} {c.body}"
        for c in calls[:20]
    )
