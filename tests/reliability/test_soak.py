"""Soak: a mixed load for a while; no internal errors, no dropped connections, flat memory.

Six threads speak Connect JSON over keep-alive HTTP/1.1 connections, as
browsers do: sign-ins (returning users, fresh tokens), GetSession, ListSessions
(following page tokens), UpdateCurrentUser, SignOut, and about a fifth of bad
requests, each with the exact answer it must get. A seventh thread speaks gRPC
over h2c with the grpcio reference client.

Every request must get an HTTP response (a request without one is a dropped
connection) with the expected status and code; no call may end as `internal`
or `unknown`, in the answers or in the server's log. Envoy's RSS (the Python
app runs inside Envoy) is sampled every second; after the warm-up it must grow
by less than 10 %.

It runs on both engines. SOAK_SECONDS sets the length of each, e.g.
SOAK_SECONDS=1800 on demand; by default (CI) SQLite soaks 60 s and PostgreSQL
30 s, to keep the directory's CI time in bounds.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests.conftest import server_env
from tests.interop.tools import new_sub
from tests.reliability.harness import (
    AUTH,
    CONNECT_JSON,
    ENGINES,
    SERVER_FAULT_CODES,
    USER,
    Conn,
    Dropped,
    Headers,
    Reply,
    SignedIn,
    engine_env,
    envoy_pid,
    log_faults,
    rss_kb,
    signed_in,
    store_problems,
)
from tests.support.google import FakeGoogle
from tests.support.server import start_server

pytestmark = pytest.mark.reliability

_LENGTH = os.environ.get("SOAK_SECONDS")
SOAK_SECONDS = {"sqlite": float(_LENGTH or 60), "postgres": float(_LENGTH or 30)}


def warm_up_s(length_s: float) -> float:
    """Long enough for every path to have run and every cache (and the PostgreSQL pool) to
    have filled; a quarter of the run, at least 10 s, at most 2 minutes (more than the
    1-minute windows of the rate limiter, whose counters then expire as fast as they come).
    """
    return min(120.0, max(10.0, length_s / 4))


MAX_RSS_GROWTH = 0.10
HTTP_WORKERS = 6
USERS = 40
SESSIONS_PER_WORKER = 10
REPORTED = 20  # unexpected answers quoted in a failure

CURRENCIES = ["EUR", "USD", "JPY", "GBP", "CHF"]
TIME_ZONES = ["Europe/Paris", "America/New_York", "Asia/Tokyo", "UTC"]
LOCALES = ["en", "fr-FR", "de", "ja-JP", "pt-BR"]


@dataclass(frozen=True)
class Expect:
    """The answer a request must get: an HTTP status and, for errors, a Connect code."""

    status: int
    code: str | None = None

    def check(self, reply: Reply) -> bool:
        return reply.status == self.status and reply.connect_code() == self.code


OK = Expect(200)


@dataclass
class Tally:
    """What the load saw, shared by the threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: Counter[str] = field(default_factory=Counter)
    faults: list[str] = field(default_factory=list)  # internal/unknown/5xx
    dropped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    cookies: list[SignedIn] = field(default_factory=list)  # shared with the gRPC thread

    def record(self, name: str, reply: Reply, expect: Expect) -> None:
        with self.lock:
            self.calls[name] += 1
            if reply.status >= 500 or reply.connect_code() in SERVER_FAULT_CODES:
                self.faults.append(f"{name}: {reply}")
            elif not expect.check(reply):
                self.unexpected.append(f"{name}: expected {expect}, got {reply}")


class Worker:
    """One browser-like client: its own connection and its own sessions."""

    def __init__(self, port: int, google: FakeGoogle, subjects: list[str], tally: Tally) -> None:
        self.conn = Conn(port)
        self.google = google
        self.subjects = subjects
        self.tally = tally
        self.sessions: list[SignedIn] = []

    def call(
        self, name: str, procedure: str, body: bytes, expect: Expect, headers: Headers = ()
    ) -> Reply | None:
        try:
            reply = self.conn.request("POST", procedure, body, headers or CONNECT_JSON)
        except Dropped as exc:
            with self.tally.lock:
                self.tally.calls[name] += 1
                self.tally.dropped.append(f"{name}: {exc}")
            return None
        self.tally.record(name, reply, expect)
        return reply

    def json_call(
        self, name: str, procedure: str, message: str, expect: Expect, cookie: str | None
    ) -> Reply | None:
        headers = [*CONNECT_JSON, *([("cookie", cookie)] if cookie else [])]
        return self.call(name, procedure, message.encode(), expect, headers)

    def sign_in(self, rng: random.Random) -> None:
        sub = rng.choice(self.subjects)
        token = self.google.token(sub=sub, email=f"{sub}@example.com")
        reply = self.json_call(
            "SignIn", f"{AUTH}/SignIn", f'{{"googleIdToken":"{token}"}}', OK, None
        )
        done = signed_in(reply) if reply is not None else None
        if done is not None:
            self.sessions.append(done)
            if len(self.sessions) > SESSIONS_PER_WORKER:
                self.sessions.pop(0)  # forgotten, not signed out: it stays in the database
            with self.tally.lock:
                self.tally.cookies = [*self.tally.cookies[-50:], done]

    def step(self, rng: random.Random) -> None:
        if not self.sessions:
            self.sign_in(rng)
            return
        me = rng.choice(self.sessions)
        choice = rng.random()
        if choice < 0.10:
            self.sign_in(rng)
        elif choice < 0.45:
            self.json_call("GetSession", f"{AUTH}/GetSession", "{}", OK, me.cookie)
        elif choice < 0.60:
            self.list_sessions(rng, me)
        elif choice < 0.75:
            field_name, value = rng.choice(
                [
                    ("displayName", f"Soak {rng.randrange(10**6)}"),
                    ("currencyCode", rng.choice(CURRENCIES)),
                    ("timeZone", rng.choice(TIME_ZONES)),
                    ("locale", rng.choice(LOCALES)),
                ]
            )
            message = f'{{"user":{{"{field_name}":"{value}"}},"updateMask":"{field_name}"}}'
            self.json_call("UpdateCurrentUser", f"{USER}/UpdateCurrentUser", message, OK, me.cookie)
        elif choice < 0.78:
            self.json_call("SignOut", f"{AUTH}/SignOut", "{}", OK, me.cookie)
            self.sessions.remove(me)
            # The signed-out cookie must be refused from now on.
            self.json_call(
                "bad:signed-out-cookie",
                f"{AUTH}/GetSession",
                "{}",
                Expect(401, "unauthenticated"),
                me.cookie,
            )
        else:
            name, send = rng.choice(BAD_REQUESTS)
            send(self, me, name)

    def list_sessions(self, rng: random.Random, me: SignedIn) -> None:
        size = rng.choice([0, 1, 3, 100])
        token = ""
        for _ in range(3):  # the first pages
            message = f'{{"pageSize":{size},"pageToken":"{token}"}}'
            reply = self.json_call("ListSessions", f"{AUTH}/ListSessions", message, OK, me.cookie)
            if reply is None or reply.status != 200:
                return
            token = reply.json().get("nextPageToken", "")
            if not token:
                return


BadRequest = Callable[[Worker, SignedIn, str], object]


def _bad(
    procedure: str, body: bytes, expect: Expect, *, session: bool = False, headers: Headers = ()
) -> BadRequest:
    def send(worker: Worker, me: SignedIn, name: str) -> object:
        sent = [*(headers or CONNECT_JSON), *([("cookie", me.cookie)] if session else [])]
        return worker.call(name, procedure, body, expect, sent)

    return send


INVALID = Expect(400, "invalid_argument")
UNAUTHENTICATED = Expect(401, "unauthenticated")
BAD_REQUESTS: list[tuple[str, BadRequest]] = [
    ("bad:json", _bad(f"{AUTH}/SignIn", b"{not json", INVALID)),
    ("bad:token", _bad(f"{AUTH}/SignIn", b'{"googleIdToken":"a.b.c"}', UNAUTHENTICATED)),
    ("bad:no-token", _bad(f"{AUTH}/SignIn", b"{}", INVALID)),
    ("bad:no-cookie", _bad(f"{AUTH}/GetSession", b"{}", UNAUTHENTICATED)),
    (
        "bad:forged-cookie",
        _bad(
            f"{AUTH}/GetSession",
            b"{}",
            UNAUTHENTICATED,
            headers=(*CONNECT_JSON, ("cookie", "expense_session=abc.def")),
        ),
    ),
    ("bad:page-size", _bad(f"{AUTH}/ListSessions", b'{"pageSize":500}', INVALID, session=True)),
    ("bad:page-token", _bad(f"{AUTH}/ListSessions", b'{"pageToken":"x"}', INVALID, session=True)),
    (
        "bad:time-zone",
        _bad(
            f"{USER}/UpdateCurrentUser",
            b'{"user":{"timeZone":"Mars/Olympus"},"updateMask":"timeZone"}',
            INVALID,
            session=True,
        ),
    ),
    (
        "bad:mask",
        _bad(
            f"{USER}/UpdateCurrentUser",
            b'{"user":{"email":"x@example.com"},"updateMask":"email"}',
            INVALID,
            session=True,
        ),
    ),
    (
        "bad:revoke-unknown",
        _bad(
            f"{AUTH}/RevokeSession",
            b'{"sessionId":"ses_nope"}',
            Expect(404, "not_found"),
            session=True,
        ),
    ),
    ("bad:unknown-method", _bad(f"{AUTH}/Nope", b"{}", Expect(404))),
    ("bad:unknown-path", _bad("/nope", b"{}", Expect(404, "not_found"))),
    (
        "bad:over-64k",
        _bad(
            f"{AUTH}/SignIn",
            b'{"googleIdToken":"' + b"a" * 70_000 + b'"}',
            Expect(429, "resource_exhausted"),
        ),
    ),
    (
        "bad:content-type",
        _bad(f"{AUTH}/SignIn", b"{}", Expect(415), headers=(("content-type", "text/plain"),)),
    ),
    (
        "bad:headers-over-cap",
        _bad(
            f"{AUTH}/GetSession",
            b"{}",
            Expect(431),
            headers=(*CONNECT_JSON, ("cookie", "expense_session=" + "a" * 20_000)),
        ),
    ),
]


def grpc_worker(address: str, tally: Tally, stop: threading.Event) -> None:
    """GetSession and ListSessions over gRPC (h2c), with cookies the HTTP workers got."""
    rng = random.Random(7)  # noqa: S311 (test data, not a secret)
    with grpc.insecure_channel(address) as channel:
        methods = {
            name: channel.unary_unary(
                f"{AUTH}/{name}", request_serializer=None, response_deserializer=None
            )
            for name in ("GetSession", "ListSessions")
        }
        while not stop.is_set():
            with tally.lock:
                cookies = list(tally.cookies)
            if not cookies:
                time.sleep(0.05)
                continue
            name = rng.choice(list(methods))
            me = rng.choice(cookies)
            try:
                methods[name](b"", metadata=(("cookie", me.cookie),), timeout=15)
                problem = None
            except grpc.RpcError as err:
                problem = (err.code(), err.details())
            with tally.lock:
                tally.calls[f"grpc:{name}"] += 1
                if problem is None:
                    continue
                code, details = problem
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    tally.dropped.append(f"grpc:{name}: {code} {details}")
                elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    tally.faults.append(f"grpc:{name}: {code} {details}")
                elif code != grpc.StatusCode.UNAUTHENTICATED:  # signed out meanwhile
                    tally.unexpected.append(f"grpc:{name}: {code} {details}")


@pytest.mark.parametrize("engine", ENGINES)
def test_soak(engine: str, tmp_path: Path, google: FakeGoogle) -> None:
    with engine_env(engine) as env:
        soak(engine, SOAK_SECONDS[engine], tmp_path, google, env)


def soak(
    engine: str, length_s: float, tmp_path: Path, google: FakeGoogle, env: dict[str, str]
) -> None:
    """The soak on one engine, `length_s` long."""
    warm_up = warm_up_s(length_s)
    server = start_server(tmp_path, server_env(google, **env))
    tally = Tally()
    stop = threading.Event()
    subjects = [new_sub() for _ in range(USERS)]

    def http_worker(seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 (test data, not a secret)
        worker = Worker(server.port, google, subjects, tally)
        try:
            while not stop.is_set():
                worker.step(rng)
        except Exception as exc:  # a worker must never die silently
            with tally.lock:
                tally.unexpected.append(f"worker error: {exc!r}")
        finally:
            worker.conn.close()

    threads = [threading.Thread(target=http_worker, args=(i,)) for i in range(HTTP_WORKERS)]
    threads.append(threading.Thread(target=grpc_worker, args=(server.address, tally, stop)))
    envoy = envoy_pid(server)
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        while (elapsed := time.monotonic() - started) < length_s:
            samples.append((elapsed, rss_kb(envoy)))
            with tally.lock:
                if len(tally.faults) + len(tally.dropped) + len(tally.unexpected) > REPORTED:
                    break  # enough to report
            time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    duration = time.monotonic() - started
    after = rss_kb(envoy)
    alive = server.process.poll() is None
    faults_in_log = log_faults(server)
    assert server.stop() == 0, server.logs()[-3000:]

    warm = [rss for t, rss in samples if t >= warm_up]
    before = warm[0] if warm else samples[-1][1]
    peak = max(rss for _, rss in samples)
    tenths = [samples[len(samples) * i // 10][1] // 1024 for i in range(10)]
    total = sum(tally.calls.values())
    print(
        f"\nsoak ({engine}): {duration:.0f} s, {total} requests ({total / duration:.0f}/s), "
        f"calls {dict(sorted(tally.calls.items()))}; "
        f"Envoy RSS {samples[0][1] // 1024} MiB at start, {before // 1024} MiB after "
        f"{warm_up:.0f} s warm-up, {after // 1024} MiB at the end "
        f"({(after - before) / before:+.1%}), peak {peak // 1024} MiB, MiB by tenths {tenths}; "
        f"faults {len(tally.faults)}, dropped {len(tally.dropped)}, "
        f"unexpected {len(tally.unexpected)}"
    )
    assert alive
    assert not tally.faults, "\n".join(tally.faults[:REPORTED])
    assert not tally.dropped, "\n".join(tally.dropped[:REPORTED])
    assert not tally.unexpected, "\n".join(tally.unexpected[:REPORTED])
    assert not faults_in_log, "\n".join(faults_in_log)
    assert store_problems(server) == []
    assert (after - before) / before < MAX_RSS_GROWTH, f"Envoy RSS {before} -> {after} KiB"
    assert duration >= length_s * 0.95
