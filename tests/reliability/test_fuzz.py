"""Fuzzing the real server with hypothesis: malformed requests of every kind, on a socket.

Each target below draws one kind of hostile request and sends it over a
keep-alive HTTP/1.1 connection exactly as drawn (or over h2c with the grpcio
client, for gRPC): random bytes bodies, truncated and garbled Connect and
gRPC-Web envelopes, bodies in the wrong codec, hostile JSON, huge and odd
headers, random cookies, random paths and methods. Authenticated procedures get
a real session cookie, so that the bodies reach the handlers.

Every request must get an HTTP response that is not a server fault: no 5xx, no
Connect `internal`/`unknown`/`data_loss`, no gRPC UNKNOWN/INTERNAL/DATA_LOSS, no
deadline exceeded. Two answers are protocol-mandated and allowed: 501
`unimplemented` for a compression the server does not support, and deadline
exceeded when the request itself asked for a deadline under 5 s. A failure
prints hypothesis's smallest failing request.

The server must stay up, its log clean, and Envoy's RSS (the app included) may
grow by less than 10 % after each target's warm-up (its first tenth).

FUZZ_EXAMPLES is the number of inputs, shared by the targets: 2,000 by default
(CI, derandomized: the same inputs every run), e.g. FUZZ_EXAMPLES=50000 on demand.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protobuf.wkt.google.protobuf.field_mask_pb import FieldMask

from gen.expense.auth.v1.auth_pb import (
    ListSessionsRequest,
    RevokeSessionRequest,
    SignInRequest,
)
from gen.expense.user.v1.user_pb import UpdateCurrentUserRequest, User
from server.config import Config
from tests.conftest import IN_CI, server_env
from tests.reliability.harness import (
    AUTH,
    COOKIE_NAME,
    GRPC_SERVER_FAULTS,
    SERVER_FAULT_CODES,
    USER,
    Conn,
    Dropped,
    Headers,
    Reply,
    database,
    envoy_pid,
    integrity_problems,
    log_faults,
    rss_kb,
    server_alive,
    sign_in,
)
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer, start_server

pytestmark = pytest.mark.reliability

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
TARGETS = 8
PER_TARGET = -(-FUZZ_EXAMPLES // TARGETS)
WARM_UP_SHARE = 0.1  # of each target's inputs, before its memory baseline
MAX_RSS_GROWTH = 0.10
SHORT_DEADLINE_MS = 5000
EXPORT_LIMIT: str = Config.model_fields["rate_limit_export_per_user"].default

SIGN_OUT = f"{AUTH}/SignOut"
PROCEDURES = [
    *(
        f"{AUTH}/{name}"
        for name in (
            "CreateSignInNonce",
            "SignIn",
            "GetSession",
            "SignOut",
            "ListSessions",
            "RevokeSession",
            "RevokeOtherSessions",
        )
    ),
    *(
        f"{USER}/{name}"
        for name in (
            "GetCurrentUser",
            "UpdateCurrentUser",
            "DeleteCurrentUser",
            "ExportCurrentUserData",
            "ListSecurityEvents",
        )
    ),
    "/grpc.health.v1.Health/Check",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
]
CONTENT_TYPES = [
    "application/json",
    "application/proto",
    "application/json; charset=utf-8",
    "application/connect+json",
    "application/connect+proto",
    "application/grpc-web",
    "application/grpc-web+proto",
    "application/grpc-web+json",
    "application/grpc-web-text",
    "application/grpc",
    "application/grpc+proto",
    "text/plain",
]
# Valid request messages to garble: (procedure, binary, JSON).
MESSAGES: list[tuple[str, bytes, bytes]] = [
    (
        f"{AUTH}/SignIn",
        SignInRequest(google_id_token="a.b.c").to_binary(),
        b'{"googleIdToken":"a.b.c"}',
    ),
    (
        f"{AUTH}/ListSessions",
        ListSessionsRequest(page_size=3, page_token="x").to_binary(),
        b'{"pageSize":3,"pageToken":"x"}',
    ),
    (
        f"{AUTH}/RevokeSession",
        RevokeSessionRequest(session_id="ses_x").to_binary(),
        b'{"sessionId":"ses_x"}',
    ),
    (
        f"{USER}/UpdateCurrentUser",
        UpdateCurrentUserRequest(
            user=User(display_name="Fuzz"), update_mask=FieldMask(paths=["display_name"])
        ).to_binary(),
        b'{"user":{"displayName":"Fuzz"},"updateMask":"displayName"}',
    ),
    (f"{AUTH}/GetSession", b"", b"{}"),
]
# Field names of the requests, so that hostile JSON lands in known fields too.
FIELDS = [
    "googleIdToken",
    "google_id_token",
    "pageSize",
    "pageToken",
    "sessionId",
    "user",
    "updateMask",
    "displayName",
    "currencyCode",
    "timeZone",
    "locale",
    "id",
    "email",
]
# Headers that frame the HTTP/1.1 message itself; drawing them would fuzz the
# client's framing (and Envoy's codec, fuzzed upstream), not the service.
FRAMING = {
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "host",
    "upgrade",
    "expect",
    "proxy-connection",
    "http2-settings",
}
INTERESTING_HEADERS = [
    "content-type",
    "connect-protocol-version",
    "connect-timeout-ms",
    "grpc-timeout",
    "content-encoding",
    "connect-content-encoding",
    "connect-accept-encoding",
    "accept-encoding",
    "grpc-encoding",
    "grpc-accept-encoding",
    "te",
    "origin",
    "referer",
    "user-agent",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
    "x-grpc-web",
    "x-user-agent",
    "cookie",
    "authorization",
    "sec-fetch-site",
    "sec-fetch-mode",
    "traceparent",
    "accept",
]
COMPRESSIONS = ["gzip", "identity", "br", "deflate", "zstd", "GZIP", "gzip, gzip", ""]
URL_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/?%"
COOKIE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.=\"' ,;:/+%\\"
B64URL = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"

# --- strategies --------------------------------------------------------------------------------

# Header values as bytes: visible ASCII, space, and obs-text (0x80-0xFF); no
# control characters, which HTTP/1.1 cannot carry.
header_bytes = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=80,
).map(lambda text: text.encode("latin-1"))
header_names = st.one_of(
    st.sampled_from(INTERESTING_HEADERS),
    st.from_regex(r"\A[a-z][a-z0-9-]{0,30}\Z").filter(lambda name: name not in FRAMING),
)


def repeated(seed: bytes, size: int) -> bytes:
    """`size` bytes of `seed` over and over: large inputs without drawing each byte."""
    return (seed * (size // max(len(seed), 1) + 1))[:size]


bodies = st.one_of(
    st.binary(max_size=512),
    st.binary(max_size=4096),
    st.builds(repeated, st.binary(min_size=1, max_size=16), st.integers(60_000, 70_000)),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and Infinity too: json.dumps writes them, no JSON parser should crash
    st.text(max_size=40),
    st.sampled_from(["", "0", "-1", "1e400", "displayName,locale", "ses_x", "a.b.c"]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(
            st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), children, max_size=5
        ),
    ),
    max_leaves=30,
)


@st.composite
def garbled(draw: st.DrawFn, payload: bytes) -> bytes:
    """The payload truncated, with bytes flipped, inserted or appended."""
    data = bytearray(payload)
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["truncate", "flip", "insert", "append"]))
        if action == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif action == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        elif action == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data += draw(st.binary(max_size=8))
    return bytes(data)


@st.composite
def envelopes(draw: st.DrawFn, payload: bytes) -> bytes:
    """Zero to three length-prefixed messages, with wrong flags, lengths and cuts."""
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        body = draw(garbled(payload))
        if draw(st.booleans()) and draw(st.booleans()):
            body = gzip.compress(body)
        flags = draw(st.one_of(st.sampled_from([0, 0, 1, 0x80, 2]), st.integers(0, 255)))
        length = draw(
            st.one_of(
                st.just(len(body)),
                st.integers(max(0, len(body) - 4), len(body) + 4),
                st.integers(0, 2**32 - 1),
            )
        )
        out += bytes([flags]) + struct.pack(">I", length) + body
    cut = draw(st.one_of(st.none(), st.integers(0, len(out))))
    return out[:cut] if cut is not None else out + draw(st.binary(max_size=6))


# --- the fuzzing session -----------------------------------------------------------------------


def describe(method: str, path: str, body: bytes | None, headers: Headers) -> str:
    """The request, for a failure message (a reproduction)."""
    shown = body if body is None or len(body) <= 400 else body[:400] + b"..."
    header_text = [(k, v if len(v) <= 200 else v[:200]) for k, v in headers]
    size = len(body or b"")
    return f"{method} {path[:300]!r}\nheaders: {header_text!r}\nbody ({size} bytes): {shown!r}"


def asks_for_compression(headers: Headers, path: str) -> bool:
    """The request names a compression (which the server may not support: 501)."""
    names = {"content-encoding", "connect-content-encoding", "grpc-encoding"}
    return any(k.lower() in names for k, _ in headers) or "compression=" in path


_CONNECT_TIMEOUT = re.compile(r"\s*(\d{1,10})\s*")
_GRPC_TIMEOUT = re.compile(r"\s*(\d{1,8})([HMSmun])\s*")
_GRPC_UNIT_MS = {"H": 3_600_000.0, "M": 60_000.0, "S": 1000.0, "m": 1.0, "u": 1e-3, "n": 1e-6}


def asks_for_short_deadline(headers: Headers) -> bool:
    """The request itself set a deadline under SHORT_DEADLINE_MS (exceeding it is correct)."""
    for name, raw in headers:
        value = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        if name.lower() == "connect-timeout-ms":
            match = _CONNECT_TIMEOUT.fullmatch(value)
            if match and int(match[1]) < SHORT_DEADLINE_MS:
                return True
        if name.lower() == "grpc-timeout":
            match = _GRPC_TIMEOUT.fullmatch(value)
            if match and int(match[1]) * _GRPC_UNIT_MS[match[2]] < SHORT_DEADLINE_MS:
                return True
    return False


def server_fault(reply: Reply, path: str, headers: Headers) -> str | None:
    """Why the reply is a server fault, or None when it is an acceptable answer."""
    code = reply.connect_code()
    content_type = reply.header("content-type") or ""
    grpc_status = reply.grpc_status() if content_type.startswith("application/grpc") else None
    if reply.status == 501 and code == "unimplemented" and asks_for_compression(headers, path):
        return None  # the Connect protocol's answer to an unsupported compression
    deadline = reply.status == 504 or code == "deadline_exceeded" or (grpc_status or (0,))[0] == 4
    if deadline and asks_for_short_deadline(headers):
        return None
    if reply.status >= 500:
        return f"HTTP {reply.status}"
    if code in SERVER_FAULT_CODES or code == "deadline_exceeded":
        return f"Connect code {code}"
    if grpc_status is not None and grpc_status[0] in GRPC_SERVER_FAULTS | {4}:
        return f"grpc-status {grpc_status[0]}"
    return None


@dataclass
class Fuzz:
    """The server under fuzzing, a real session on it, and what each target saw."""

    server: RunningServer
    cookie: str
    conn: Conn
    envoy: int
    # Another user's session, never sent by any input: only a server fault can end it.
    bystander: str = ""
    target: str = ""
    sent: int = 0
    warm_up: int = 0
    baseline_kb: int = 0
    died: str | None = None
    statuses: Counter[int] = field(default_factory=Counter)
    figures: list[str] = field(default_factory=list)
    baselines: list[int] = field(default_factory=list)
    trend: list[int] = field(default_factory=list)  # MiB, at every tenth of the inputs
    trend_every: int = 1

    def begin(self, target: str, examples: int) -> None:
        self.target, self.sent, self.statuses = target, 0, Counter()
        self.warm_up = max(20, int(examples * WARM_UP_SHARE))
        self.baseline_kb = 0
        self.trend = []
        self.trend_every = max(1, examples // 10)

    def carries_session(self, name: str, value: str | bytes) -> bool:
        """Whether a header carries the fuzzing session's cookie value."""
        real = self.cookie.split("=", 1)[1]
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        return name.lower() == "cookie" and real in text

    def counted(self) -> None:
        self.sent += 1
        if self.sent == self.warm_up:
            self.baseline_kb = rss_kb(self.envoy)
            self.baselines.append(self.baseline_kb)
        if self.sent % self.trend_every == 0:
            self.trend.append(rss_kb(self.envoy) // 1024)

    def send(
        self, method: str, path: str, body: bytes | None = None, headers: Headers = ()
    ) -> Reply:
        """Send one request; fails on no answer or on a server fault.

        A SignOut never carries the fuzzing session's cookie: a valid one would end
        the session every later input uses (and that the end of a target checks).
        """
        self.counted()
        if urlsplit(path).path == SIGN_OUT:
            headers = [(k, v) for k, v in headers if not self.carries_session(k, v)]
        try:
            reply = self.conn.request(method, path, body, headers)
        except Dropped as exc:
            if self.died is None and not server_alive(self.server):
                self.died = f"{describe(method, path, body, headers)}\n{self.server.logs()[-3000:]}"
            raise AssertionError(
                f"no answer: {exc}\n{describe(method, path, body, headers)}"
            ) from exc
        self.statuses[reply.status] += 1
        fault = server_fault(reply, path, headers)
        assert fault is None, f"{fault}: {reply}\n{describe(method, path, body, headers)}"
        return reply

    def run(self, target: str, examples: int, test: Callable[[], None]) -> None:
        """Run a hypothesis test as this target; then check the server and its memory."""
        self.begin(target, examples)
        started = time.monotonic()
        try:
            test()
        except BaseException as exc:
            if self.died is not None:
                raise AssertionError(f"the server died after:\n{self.died}") from exc
            raise
        seconds = time.monotonic() - started
        end_kb = rss_kb(self.envoy)
        session = self.conn.connect_call(f"{AUTH}/GetSession", {}, cookie=self.cookie)
        bystander = self.conn.connect_call(f"{AUTH}/GetSession", {}, cookie=self.bystander)
        self.figures.append(
            f"{target}: {self.sent} inputs in {seconds:.1f} s, "
            f"statuses {dict(sorted(self.statuses.items()))}, "
            f"Envoy RSS {self.baseline_kb} -> {end_kb} KiB "
            f"({(end_kb - self.baseline_kb) / self.baseline_kb:+.1%}; MiB by tenths {self.trend})"
        )
        print(f"\nfuzz {self.figures[-1]}")
        assert self.sent >= examples, f"hypothesis ran {self.sent} of {examples} inputs"
        assert session.status == 200, f"the fuzzing session was lost: {session}"
        assert bystander.status == 200, f"another user's session was lost: {bystander}"
        assert (end_kb - self.baseline_kb) / self.baseline_kb < MAX_RSS_GROWTH


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings of every target: `examples` inputs, no timing, no database."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=IN_CI,
        database=None,
        print_blob=not IN_CI,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle) -> Iterator[Fuzz]:
    """A server of this module's own, with one signed-in session.

    Data exports keep their production limit: each export adds an event to the
    user's history and returns all of it, so thousands of them would measure a
    growing response, not the server's memory.
    """
    env = server_env(google, RATE_LIMIT_EXPORT_PER_USER=EXPORT_LIMIT)
    server = start_server(tmp_path_factory.mktemp("fuzz"), env)
    conn = Conn(server.port)
    session = sign_in(conn, google.token(sub="fuzz-user", email="fuzz@example.com"))
    bystander = sign_in(conn, google.token(sub="bystander", email="bystander@example.com"))
    yield Fuzz(
        server=server,
        cookie=session.cookie,
        conn=conn,
        envoy=envoy_pid(server),
        bystander=bystander.cookie,
    )
    conn.close()
    assert server.stop() == 0, server.logs()[-3000:]


def with_session(fuzz: Fuzz, procedure: str, cookie: bool) -> list[tuple[str, str | bytes]]:
    """The session cookie, when asked for, on any procedure but SignOut (which would end it)."""
    return [("cookie", fuzz.cookie)] if cookie and procedure != SIGN_OUT else []


# --- the targets -------------------------------------------------------------------------------


def test_random_bodies(fuzz: Fuzz) -> None:
    @fuzz_settings(PER_TARGET)
    @given(
        procedure=st.sampled_from(PROCEDURES),
        content_type=st.sampled_from(CONTENT_TYPES),
        body=bodies,
        cookie=st.booleans(),
        version=st.booleans(),
    )
    def random_bodies(
        procedure: str, content_type: str, body: bytes, cookie: bool, version: bool
    ) -> None:
        headers: list[tuple[str, str | bytes]] = [("content-type", content_type)]
        if version:
            headers.append(("connect-protocol-version", "1"))
        fuzz.send("POST", procedure, body, [*headers, *with_session(fuzz, procedure, cookie)])

    fuzz.run("random bodies", PER_TARGET, random_bodies)


def test_garbled_envelopes(fuzz: Fuzz) -> None:
    @fuzz_settings(PER_TARGET)
    @given(
        message=st.sampled_from(MESSAGES),
        json_codec=st.booleans(),
        framing=st.sampled_from(["grpc-web", "connect-stream", "connect-unary"]),
        encoding=st.sampled_from([None, None, "gzip", "identity", "zzz"]),
        data=st.data(),
    )
    def garbled_envelopes(
        message: tuple[str, bytes, bytes],
        json_codec: bool,
        framing: str,
        encoding: str | None,
        data: st.DataObject,
    ) -> None:
        procedure, binary, text = message
        payload = text if json_codec else binary
        codec = "json" if json_codec else "proto"
        headers: list[tuple[str, str | bytes]] = [("cookie", fuzz.cookie)]
        if framing == "connect-unary":
            body = data.draw(garbled(payload))
            headers += [("content-type", f"application/{codec}"), ("connect-protocol-version", "1")]
            if encoding:
                headers.append(("content-encoding", encoding))
        else:
            body = data.draw(envelopes(payload))
            if framing == "grpc-web":
                headers += [("content-type", f"application/grpc-web+{codec}"), ("x-grpc-web", "1")]
                if encoding:
                    headers.append(("grpc-encoding", encoding))
            else:
                headers += [
                    ("content-type", f"application/connect+{codec}"),
                    ("connect-protocol-version", "1"),
                ]
                if encoding:
                    headers.append(("connect-content-encoding", encoding))
        fuzz.send("POST", procedure, body, headers)

    fuzz.run("garbled envelopes", PER_TARGET, garbled_envelopes)


def test_wrong_codecs(fuzz: Fuzz) -> None:
    @fuzz_settings(PER_TARGET)
    @given(
        message=st.sampled_from(MESSAGES),
        send_json=st.booleans(),
        content_type=st.one_of(
            st.sampled_from(CONTENT_TYPES),
            st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
            st.sampled_from(CONTENT_TYPES).map(lambda t: t + "; charset=latin-1"),
        ),
        compression=st.one_of(st.none(), st.sampled_from(COMPRESSIONS)),
        compress=st.booleans(),
        version=st.sampled_from([None, "1", "2", ""]),
    )
    def wrong_codecs(
        message: tuple[str, bytes, bytes],
        send_json: bool,
        content_type: str,
        compression: str | None,
        compress: bool,
        version: str | None,
    ) -> None:
        procedure, binary, text = message
        body = text if send_json else binary
        if compress:
            body = gzip.compress(body)
        headers: list[tuple[str, str | bytes]] = [
            ("content-type", content_type),
            ("cookie", fuzz.cookie),
        ]
        if version is not None:
            headers.append(("connect-protocol-version", version))
        if compression is not None:
            headers.append(("content-encoding", compression))
        fuzz.send("POST", procedure, body, headers)

    fuzz.run("wrong codecs", PER_TARGET, wrong_codecs)


@st.composite
def hostile_json(draw: st.DrawFn) -> bytes:
    """Hostile JSON: random values, in known fields or whole, sometimes deeply nested."""
    shape = draw(st.sampled_from(["whole", "field", "profile", "deep"]))
    if shape == "deep":
        depth = draw(st.integers(1, 30_000))
        opener = draw(st.sampled_from(["[", '{"a":', '{"user":']))
        closer = {"[": "]", '{"a":': "}", '{"user":': "}"}[opener]
        closed = draw(st.booleans())
        return (opener * depth + ("0" + closer * depth if closed else "")).encode()
    value: Any = draw(json_values)
    if shape == "field":
        value = {draw(st.sampled_from(FIELDS)): value}
    elif shape == "profile":
        fields = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True))
        value = {
            "user": {name: draw(json_values) for name in fields},
            "updateMask": draw(st.one_of(st.just(",".join(fields)), json_values)),
        }
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8


def test_hostile_json(fuzz: Fuzz) -> None:
    @fuzz_settings(PER_TARGET)
    @given(
        procedure=st.sampled_from(PROCEDURES),
        body=hostile_json(),
        grpc_web=st.booleans(),
    )
    def hostile(procedure: str, body: bytes, grpc_web: bool) -> None:
        headers = with_session(fuzz, procedure, True)
        if grpc_web:
            body = b"\x00" + struct.pack(">I", len(body)) + body
            headers += [("content-type", "application/grpc-web+json"), ("x-grpc-web", "1")]
        else:
            headers += [("content-type", "application/json"), ("connect-protocol-version", "1")]
        fuzz.send("POST", procedure, body, headers)

    fuzz.run("hostile JSON", PER_TARGET, hostile)


def test_huge_and_odd_headers(fuzz: Fuzz) -> None:
    @fuzz_settings(PER_TARGET)
    @given(
        request=st.sampled_from(
            [
                (f"{AUTH}/GetSession", b"{}", True),
                (f"{AUTH}/SignIn", b'{"googleIdToken":"a.b.c"}', False),
                (f"{USER}/UpdateCurrentUser", MESSAGES[3][2], True),
            ]
        ),
        extra=st.lists(st.tuples(header_names, header_bytes), max_size=8),
        many=st.integers(0, 160),
        huge=st.one_of(
            st.none(),
            st.tuples(
                header_names, st.integers(1_000, 20_000), st.sampled_from([b"a", b"\xff", b"; "])
            ),
        ),
    )
    def odd_headers(
        request: tuple[str, bytes, bool],
        extra: list[tuple[str, bytes]],
        many: int,
        huge: tuple[str, int, bytes] | None,
    ) -> None:
        procedure, body, session = request
        headers: list[tuple[str, str | bytes]] = [
            ("content-type", "application/json"),
            ("connect-protocol-version", "1"),
            *with_session(fuzz, procedure, session),
            *extra,
            *((f"x-h{i}", "v") for i in range(many)),
        ]
        if huge is not None:
            name, size, seed = huge
            headers.append((name, repeated(seed, size)))
        fuzz.send("POST", procedure, body, headers)

    fuzz.run("huge and odd headers", PER_TARGET, odd_headers)


@st.composite
def cookie_values(draw: st.DrawFn, real: str) -> str:
    """Cookie values: random, session-shaped, or the real one tampered with."""
    kind = draw(st.sampled_from(["random", "shaped", "tampered", "huge"]))
    if kind == "random":
        return draw(st.text(alphabet=COOKIE_CHARS, max_size=120))
    if kind == "shaped":
        b64 = st.text(alphabet=B64URL, min_size=0, max_size=60)
        return f"{draw(b64)}.{draw(b64)}"
    if kind == "huge":
        return "a" * draw(st.integers(1_000, 20_000))
    # A character inside the value replaced: a different secret or signature.
    at = draw(st.integers(0, len(real) - 3))
    new = draw(st.sampled_from(B64URL + ".").filter(lambda c: c != real[at]))
    return real[:at] + new + real[at + 1 :]


def test_random_cookies(fuzz: Fuzz) -> None:
    real = fuzz.cookie.split("=", 1)[1]

    @fuzz_settings(PER_TARGET)
    @given(
        procedure=st.sampled_from(
            [
                f"{AUTH}/GetSession",
                f"{AUTH}/ListSessions",
                f"{USER}/GetCurrentUser",
                f"{AUTH}/SignIn",
            ]
        ),
        cookies=st.lists(
            st.lists(
                st.tuples(
                    st.one_of(
                        st.sampled_from([COOKIE_NAME, "expense_signin_nonce", "", " "]),
                        st.text(alphabet=COOKIE_CHARS, max_size=12),
                    ),
                    cookie_values(real),
                ),
                max_size=5,
            ),
            min_size=1,
            max_size=3,
        ),
        separator=st.sampled_from(["; ", ";", ",", " ; ", ";;"]),
        raw=st.one_of(st.none(), header_bytes),
    )
    def random_cookies(
        procedure: str,
        cookies: list[list[tuple[str, str]]],
        separator: str,
        raw: bytes | None,
    ) -> None:
        values: list[str | bytes] = [
            separator.join(f"{name}={value}" for name, value in pairs) for pairs in cookies
        ]
        if raw is not None:
            values.append(raw)
        headers: list[tuple[str, str | bytes]] = [
            ("content-type", "application/json"),
            ("connect-protocol-version", "1"),
            *(("cookie", value) for value in values),
        ]
        body = b'{"googleIdToken":"a.b.c"}' if procedure.endswith("SignIn") else b"{}"
        reply = fuzz.send("POST", procedure, body, headers)
        if not procedure.endswith("SignIn"):
            # Without the real cookie no random or tampered one may authenticate.
            carries_real = any(
                real in (v.decode("latin-1") if isinstance(v, bytes) else v) for v in values
            )
            assert reply.status != 200 or carries_real, f"a forged cookie was accepted: {values}"

    fuzz.run("random cookies", PER_TARGET, random_cookies)


@st.composite
def paths(draw: st.DrawFn) -> str:
    """Request targets: random, near-miss procedures, Connect GET queries, odd forms."""
    kind = draw(st.sampled_from(["random", "procedure", "get", "escaped", "odd"]))
    if kind == "random":
        return "/" + draw(st.text(alphabet=URL_SAFE, max_size=80))
    if kind == "procedure":
        procedure = draw(st.sampled_from(PROCEDURES))
        service, _, method = procedure.rpartition("/")
        variant = draw(
            st.sampled_from(
                [
                    procedure.lower(),
                    procedure + "/",
                    "/" + procedure,
                    service + "//" + method,
                    procedure + "?" + draw(st.text(alphabet=URL_SAFE, max_size=40)),
                    service + "/" + draw(st.text(alphabet=URL_SAFE.replace("/", ""), max_size=30)),
                ]
            )
        )
        return variant
    if kind == "get":
        procedure = draw(
            st.sampled_from(
                [f"{AUTH}/GetSession", f"{AUTH}/ListSessions", f"{USER}/GetCurrentUser"]
            )
        )
        params = {
            "encoding": draw(st.sampled_from(["json", "proto", "xml", ""])),
            "message": quote(draw(st.one_of(st.text(max_size=60), st.just("{}"))), safe=""),
            "base64": draw(st.sampled_from(["1", "0", "true", ""])),
            "compression": draw(st.sampled_from(["gzip", "identity", "zzz", ""])),
            "connect": draw(st.sampled_from(["v1", "v2", ""])),
        }
        chosen = draw(st.lists(st.sampled_from(list(params)), unique=True))
        return procedure + "?" + "&".join(f"{name}={params[name]}" for name in chosen)
    if kind == "escaped":
        return "/" + quote(draw(st.binary(max_size=60)), safe="/")
    return draw(
        st.sampled_from(
            ["*", "http://127.0.0.1" + PROCEDURES[1], "http://evil.example/", "/" + "a" * 20_000]
        )
    )


def test_random_paths_and_methods(fuzz: Fuzz) -> None:
    @fuzz_settings(PER_TARGET)
    @given(
        method=st.one_of(
            st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]),
            st.from_regex(r"\A[A-Z]{1,10}\Z"),
        ),
        path=paths(),
        body=st.one_of(st.none(), st.just(b"{}"), st.binary(max_size=64)),
        cookie=st.booleans(),
    )
    def random_paths(method: str, path: str, body: bytes | None, cookie: bool) -> None:
        headers: list[tuple[str, str | bytes]] = [
            ("content-type", "application/json"),
            ("connect-protocol-version", "1"),
        ]
        if cookie:
            headers.append(("cookie", fuzz.cookie))
        if method == "CONNECT":
            method = "CONNECTX"  # a tunnel request, for a proxy: not this API's concern
        fuzz.send(method, path, None if method == "HEAD" else body, headers)

    fuzz.run("random paths and methods", PER_TARGET, random_paths)


def test_grpc_over_h2c(fuzz: Fuzz) -> None:
    """The same over HTTP/2 with the grpcio reference client: raw bytes, odd metadata."""
    metadata_keys = st.from_regex(r"\A[a-z][a-z0-9-_.]{0,20}\Z").filter(
        lambda key: not key.startswith("grpc-") and not key.endswith("-bin") and key not in FRAMING
    )
    metadata_values = st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60
    )
    with grpc.insecure_channel(fuzz.server.address) as channel:

        @fuzz_settings(PER_TARGET)
        @given(
            procedure=st.one_of(
                st.sampled_from(PROCEDURES),
                st.text(alphabet=URL_SAFE.replace("?", "").replace("%", ""), max_size=40).map(
                    lambda p: "/" + p
                ),
            ),
            request=st.one_of(st.binary(max_size=512), st.sampled_from([m[1] for m in MESSAGES])),
            metadata=st.lists(st.tuples(metadata_keys, metadata_values), max_size=4),
            cookie=st.booleans(),
        )
        def over_h2c(
            procedure: str, request: bytes, metadata: list[tuple[str, str]], cookie: bool
        ) -> None:
            fuzz.counted()
            sent = [*metadata, *with_session(fuzz, procedure, cookie)]
            call = channel.unary_unary(
                procedure, request_serializer=None, response_deserializer=None
            )
            try:
                call(request, metadata=sent, timeout=15)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code, details = err.code(), err.details()
                where = f"{procedure!r} {request!r} {sent!r}: {code} {details}"
                if code is grpc.StatusCode.UNAVAILABLE and not server_alive(fuzz.server):
                    fuzz.died = where
                assert code not in (
                    grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.DATA_LOSS,
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ), where
            fuzz.statuses[code.value[0]] += 1

        fuzz.run("gRPC over h2c", PER_TARGET, over_h2c)


def test_server_survived_with_a_clean_log_and_flat_memory(fuzz: Fuzz) -> None:
    """After every target: alive, log clean, database sound, memory flat overall."""
    assert server_alive(fuzz.server)
    assert log_faults(fuzz.server) == []
    assert integrity_problems(database(fuzz.server)) == []
    end_kb = rss_kb(fuzz.envoy)
    assert fuzz.baselines, "run the whole module: the targets measure the memory baseline"
    first = fuzz.baselines[0]
    print(
        f"\nfuzz: {len(fuzz.figures)} targets; Envoy RSS {first} KiB after the first warm-up, "
        f"{end_kb} KiB at the end ({(end_kb - first) / first:+.1%})"
    )
    assert (end_kb - first) / first < MAX_RSS_GROWTH
