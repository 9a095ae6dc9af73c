"""What the reliability tests share: raw HTTP/1.1, the server's processes, its database.

Requests go out exactly as written (`http.client` with `putrequest`/`putheader`),
so that nothing a client library would normalise gets normalised, over a
keep-alive connection as browsers and proxies use them. A request that gets no
HTTP response at all raises `Dropped`: the tests count those as dropped
connections (or, in the crash test, expect them while the server is down).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sqlite3
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import asyncpg

from server.config import Config
from tests.support import postgres
from tests.support.database import rows
from tests.support.server import RunningServer

AUTH = "/expense.auth.v1.AuthService"
USER = "/expense.user.v1.UserService"
COOKIE_NAME = "expense_session"
CONNECT_JSON: tuple[tuple[str, str], ...] = (
    ("content-type", "application/json"),
    ("connect-protocol-version", "1"),
)
# Longer than the server's own request timeout (10 s): a request unanswered after
# this long is a hang, not a slow answer.
REQUEST_TIMEOUT_S = 15.0
DATABASE_FILE = "expense-auth.db"
# Error codes that mean the server failed, not the client: never acceptable.
SERVER_FAULT_CODES = frozenset({"internal", "unknown", "data_loss"})
GRPC_SERVER_FAULTS = frozenset({2, 13, 15})  # UNKNOWN, INTERNAL, DATA_LOSS
# The servers here run with the default idle timeout.
IDLE_TIMEOUT_S: int = Config.model_fields["session_idle_timeout_seconds"].default

Headers = Sequence[tuple[str, str | bytes]]


class Dropped(Exception):
    """The request got no HTTP response: refused, reset, closed or timed out."""


@dataclass(frozen=True)
class Reply:
    """One HTTP response, as received."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive), or None."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        """The body, decoded as JSON."""
        return json.loads(self.body)

    def connect_code(self) -> str | None:
        """The Connect error code of a JSON error body; None for success or another body."""
        if self.status == 200 or self.header("content-type") != "application/json":
            return None
        try:
            error = self.json()
        except ValueError:
            return None
        code = error.get("code") if isinstance(error, dict) else None
        return code if isinstance(code, str) else None

    def grpc_status(self) -> tuple[int, str] | None:
        """(grpc-status, grpc-message) from the headers or a gRPC-Web trailer frame."""
        fields = {k.lower(): v for k, v in self.headers}
        body = self.body
        while "grpc-status" not in fields and len(body) >= 5:
            flags, length = body[0], struct.unpack(">I", body[1:5])[0]
            frame, body = body[5 : 5 + length], body[5 + length :]
            if flags & 0x80:
                for line in frame.decode(errors="replace").split("\r\n"):
                    name, sep, value = line.partition(":")
                    if sep:
                        fields[name.strip().lower()] = value.strip()
        if "grpc-status" not in fields:
            return None
        return int(fields["grpc-status"]), unquote(fields.get("grpc-message", ""))

    def session_cookie(self) -> str | None:
        """`name=value` of the session cookie this response sets, if any."""
        for name, value in self.headers:
            if name.lower() == "set-cookie" and value.startswith(COOKIE_NAME + "="):
                pair = value.split(";", 1)[0]
                return pair if pair != COOKIE_NAME + "=" else None
        return None

    def __str__(self) -> str:
        shown = [(k, v) for k, v in self.headers if k.lower().startswith(("content-", "grpc-"))]
        return f"HTTP {self.status} {shown} {self.body[:300]!r}"


class Conn:
    """One keep-alive HTTP/1.1 connection; reconnects after the server closes it."""

    def __init__(self, port: int, *, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.port = port
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self.requests = 0
        self.connections = 0

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Headers = ()
    ) -> Reply:
        """Send one request exactly as given; its response, or `Dropped`."""
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self._timeout)
            self.connections += 1
        conn = self._conn
        reused = self.requests > 0
        self.requests += 1
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("content-length", str(len(body)))
            # The server may answer before it has read the whole body.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.endheaders(body)
            response = conn.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError) as exc:
            self.close()
            state = "a reused" if reused else "a new"
            raise Dropped(
                f"{method} {path[:80]}: no response on {state} connection: {exc!r}"
            ) from exc
        if response.will_close:
            self.close()
        return Reply(response.status, [(k.lower(), v) for k, v in response.getheaders()], data)

    def connect_call(self, procedure: str, message: object, *, cookie: str | None = None) -> Reply:
        """A Connect unary JSON call, as a browser's Connect client sends it."""
        headers: list[tuple[str, str | bytes]] = [*CONNECT_JSON]
        if cookie is not None:
            headers.append(("cookie", cookie))
        return self.request("POST", procedure, json.dumps(message).encode(), headers)

    def close(self) -> None:
        """Close the connection; the next request opens a new one."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self.requests = 0


@dataclass(frozen=True)
class SignedIn:
    """A sign-in the server acknowledged: a 200 with a session and its cookie."""

    cookie: str
    session_id: str
    user_id: str


def signed_in(reply: Reply) -> SignedIn | None:
    """The acknowledged sign-in in a SignIn reply, or None when it is not one."""
    cookie = reply.session_cookie()
    if reply.status != 200 or cookie is None:
        return None
    body = reply.json()
    return SignedIn(cookie=cookie, session_id=body["session"]["id"], user_id=body["user"]["id"])


def sign_in(conn: Conn, token: str) -> SignedIn:
    """SignIn with `token`, which must succeed."""
    reply = conn.connect_call(f"{AUTH}/SignIn", {"googleIdToken": token})
    done = signed_in(reply)
    assert done is not None, f"sign-in failed: {reply}"
    return done


# --- the server's processes --------------------------------------------------------------------


def envoy_pid(server: RunningServer) -> int:
    """The Envoy process `expense-auth serve` started (it runs the Python app too)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm_end = text.rfind(")")
        comm = text[text.find("(") + 1 : comm_end]
        ppid = int(text[comm_end + 2 :].split()[1])
        if ppid == server.process.pid and comm == "envoy":
            return int(stat.parent.name)
    raise AssertionError(f"no envoy child of {server.process.pid}:\n{server.logs()[-2000:]}")


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _gone(pid: int) -> bool:
    """Whether the process has exited (a zombie left for its new parent counts)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rfind(")") + 2] in "ZX"


def kill_hard(server: RunningServer) -> None:
    """SIGKILL Envoy (which runs the app) and its parent, as a machine crash would."""
    envoy = envoy_pid(server)
    # Envoy first: with its parent gone first it could see a parent-death signal
    # and shut down in order, which is not a crash.
    os.kill(envoy, signal.SIGKILL)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not _gone(envoy):
        assert time.monotonic() < deadline, f"envoy {envoy} survived SIGKILL"
        time.sleep(0.01)


def server_alive(server: RunningServer) -> bool:
    """Both processes are running."""
    if server.process.poll() is not None:
        return False
    try:
        return not _gone(envoy_pid(server))
    except AssertionError:  # no Envoy child any more
        return False


# --- the server's log and its SQLite file -----------------------------------------------------


def log_faults(server: RunningServer, *, limit: int = 5) -> list[str]:
    """Log lines of a traceback or of a call that ended as internal or unknown."""
    found: list[str] = []
    with server.log_path.open(errors="replace") as log:
        for line in log:
            if "Traceback" in line or "code=internal" in line or "code=unknown" in line:
                found.append(line.rstrip())
                if len(found) >= limit:
                    break
    return found


def database(server: RunningServer) -> Path:
    """The server's SQLite file (SQLite only: the fault tests act on the file itself)."""
    return server.data_dir / DATABASE_FILE


def read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the database file, beside the running server."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    conn.execute("PRAGMA query_only = ON")
    return conn


def integrity_problems(path: Path) -> list[str]:
    """What `PRAGMA integrity_check` and `foreign_key_check` report; empty when sound."""
    conn = read_only(path)
    try:
        found = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
        problems = [] if found == ["ok"] else found
        problems += [f"foreign key: {row}" for row in conn.execute("PRAGMA foreign_key_check")]
        return problems
    finally:
        conn.close()


# --- either engine ----------------------------------------------------------------------------

ENGINES = ("sqlite", "postgres")


def engine_of(server: RunningServer) -> str:
    """`sqlite` or `postgres`: the engine the server stores its data in."""
    url = server.env.get("DATABASE_URL", "")
    return "postgres" if url.startswith(("postgresql://", "postgres://")) else "sqlite"


@contextlib.contextmanager
def engine_env(engine: str) -> Iterator[dict[str, str]]:
    """The environment that puts a server on `engine`, for the block.

    SQLite needs nothing (its file is in DATA_DIR). PostgreSQL gets a throwaway
    database, unmigrated (the server migrates it at start, as in production),
    dropped at the end of the block: stop its servers first.
    """
    if engine == "sqlite":
        yield {}
        return
    assert engine == "postgres", engine
    with postgres.database(migrated=False) as url:
        yield {"DATABASE_URL": url}


def store_problems(server: RunningServer) -> list[str]:
    """What is wrong with the server's database; empty when it is sound.

    On both engines, with SQL: no session without its user (the one foreign key).
    SQLite: `integrity_check` and `foreign_key_check` of the file. PostgreSQL,
    whose foreign keys the engine enforces: the key is in place and every
    constraint is validated, and amcheck finds no damage in any table or B-tree
    index (its equivalent of `integrity_check`).
    """
    orphans = rows(
        server,
        "SELECT s.id FROM sessions AS s LEFT JOIN users AS u ON u.id = s.user_id "
        "WHERE u.id IS NULL",
    )
    problems = [f"session {row[0]} has no user" for row in orphans]
    if engine_of(server) == "sqlite":
        return problems + integrity_problems(database(server))
    return problems + _postgres_problems(server)


# amcheck over every table and every B-tree index of the service (schema public).
_PG_VERIFY_HEAPS = """
    SELECT c.oid::regclass::text, v.blkno, v.offnum, v.msg
    FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
    CROSS JOIN LATERAL verify_heapam(c.oid) AS v
    WHERE n.nspname = 'public' AND c.relkind = 'r'
"""
_PG_CHECK_BTREES = """
    SELECT bt_index_check(c.oid, true)
    FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
    JOIN pg_am AS a ON a.oid = c.relam
    WHERE n.nspname = 'public' AND c.relkind = 'i' AND a.amname = 'btree'
"""


def _postgres_problems(server: RunningServer) -> list[str]:
    problems: list[str] = []
    foreign_keys = rows(
        server,
        "SELECT confrelid::regclass::text FROM pg_constraint "
        "WHERE contype = 'f' AND conrelid = 'sessions'::regclass",
    )
    if foreign_keys != [("users",)]:
        problems.append(f"sessions' foreign keys are {foreign_keys}, not one to users")
    not_valid = rows(
        server,
        "SELECT conrelid::regclass::text, conname FROM pg_constraint AS k "
        "JOIN pg_namespace AS n ON n.oid = k.connamespace "
        "WHERE n.nspname = 'public' AND NOT k.convalidated",
    )
    problems += [f"constraint {table}.{name} is not validated" for table, name in not_valid]
    # amcheck goes into the test's own throwaway database, never into a real one.
    assert "/expense_auth_test_" in server.env["DATABASE_URL"], "not a throwaway database"
    rows(server, "CREATE EXTENSION IF NOT EXISTS amcheck")
    heap = rows(server, _PG_VERIFY_HEAPS)
    problems += [f"amcheck: {table} block {blk} item {off}: {msg}" for table, blk, off, msg in heap]
    try:
        checked = rows(server, _PG_CHECK_BTREES)
    except asyncpg.PostgresError as exc:  # amcheck raises on the first damaged index
        problems.append(f"amcheck: {exc}")
    else:
        if not checked:
            problems.append("amcheck found no B-tree index to check")
    return problems


def live_session_ids(server: RunningServer, user_id: str) -> set[str]:
    """The ids of the user's unrevoked, unexpired sessions, read from the database."""
    now_ms = int(time.time() * 1000)
    found = rows(
        server,
        "SELECT id FROM sessions WHERE user_id = ? AND revoke_ms IS NULL "
        "AND expire_ms > ? AND last_seen_ms > ?",
        user_id,
        now_ms,
        now_ms - IDLE_TIMEOUT_S * 1000,
    )
    return {str(row[0]) for row in found}
