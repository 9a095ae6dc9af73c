"""The benchmark run: servers, data, interleaved rounds, results.

Every figure that matters is a ratio against a baseline measured in the same
round: a noisy shared 2-core machine moves absolute RPS by tens of percent from
minute to minute, but a ratio of two cells measured seconds apart holds.

Layout of one run:
- servers on core 0 (each `taskset -c 0` before it spawns its children), load
  generators (h2load, bench.loadgen) and this process on core 1;
- ours: `expense-auth serve` on a 1k-user database (GetSession, GetCurrentUser,
  SignIn, unauthenticated, and a gateway's forward-auth check on its own listener),
  on 1k / 100k / 1M-user databases (the data-scale cells, GetSession only), and on a
  1k database with LOG_LEVEL=INFO;
- baselines: the bare connectrpc echo on the same pyvoy (`bench.echo_app`), a bare
  grpc.aio echo, a bare connect-node echo;
- a warm-up pass, then ROUNDS rounds, each visiting every cell once in a
  shuffled order (a different one each round);
- as root, everything the bench starts runs at nice -10 (process and scheduling
  autogroup), so that other work on a shared machine yields while it runs.

Outputs: bench/results/latest.{json,png,md} (quick.* for --quick) and the
generated section of docs/benchmarks.md (full runs only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import data, load, procs, report
from bench.load import GRPC, H1, PROTOCOLS, Request, Run
from server.domain.throttle import POLICIES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = REPO / "bench" / "results"
TMP = RESULTS / "tmp"
# Bench-only: every limit far above what one core can serve, so that nothing is
# refused; the limiter still does its full work per call (GENEROUS_LIMITS style).
RATE_LIMITS = {f"RATE_LIMIT_{name.upper()}": "1000000/minute" for name in POLICIES}
GOOGLE_CLIENT_ID = "1234567890-bench.apps.googleusercontent.com"
COOKIE_NAME = "expense_session"
GET_SESSION = "/expense.auth.v1.AuthService/GetSession"
SIGN_IN = "/expense.auth.v1.AuthService/SignIn"
GET_CURRENT_USER = "/expense.user.v1.UserService/GetCurrentUser"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
FORWARD_AUTH = "/forward-auth"


@dataclass(frozen=True)
class Mode:
    """How long and how big."""

    quick: bool
    rounds: int
    seconds: float
    warmup_seconds: float
    signin_tokens: int  # per SignIn cell and round
    scales: tuple[int, ...]
    extras: bool = True  # the LOG_LEVEL=INFO server and the loadgen-client echo rows


FULL = Mode(
    False,
    rounds=5,
    seconds=5,
    warmup_seconds=2,
    signin_tokens=2500,
    scales=(1_000, 100_000, 1_000_000),
)
QUICK = Mode(
    True,
    rounds=1,
    seconds=1,
    warmup_seconds=0.25,
    signin_tokens=400,
    scales=(1_000, 100_000),
    extras=False,
)


@dataclass
class Cell:
    """One thing measured each round: a scenario on a server over a protocol."""

    name: str
    protocol: str
    server: str
    expect: str  # "ok" or "unauthenticated"
    request: Request | None = None  # h2load
    loadgen: Callable[..., Run] | None = None  # (port, protocol, round, seconds) -> Run
    port: str = ""  # which of the server's ports, when not the protocol's own
    runs: list[Run] = field(default_factory=list)
    cpu_util: list[float] = field(default_factory=list)
    cpu_ms_per_request: list[float] = field(default_factory=list)
    core0_other: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.protocol


class CertsCounter:
    """Stands in for Google's certs URL and counts fetches (there must be none)."""

    def __init__(self) -> None:
        self.fetches = 0
        counter = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                counter.fetches += 1
                body = b"{}"
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("cache-control", "public, max-age=3600")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/oauth2/v1/certs"

    def stop(self) -> None:
        self._server.shutdown()


def server_env(session_key: str, **extra: str) -> dict[str, str]:
    """The environment of a server under test: development issuer, WARNING logs, the
    bench's rate limits, numpy hidden (bench/shield), plus `extra` (which wins)."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/root"),
        "APP_ENV": "development",
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": f"{REPO / 'bench' / 'shield'}:{REPO}",
        "SESSION_SECRET_KEY": session_key,
        **RATE_LIMITS,
        "ADMIN_PORT": "0",  # each server's admin listener (if any) on a free port
        **extra,
    }


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def sign_in_proto(token: str) -> bytes:
    """SignInRequest{google_id_token: token} in protobuf wire format (field 1, string)."""
    raw = token.encode()
    return b"\x0a" + _varint(len(raw)) + raw


# --------------------------------------------------------------------------- data


def _schema_version() -> str:
    from server.storage.sqlite.connection import known_migrations

    return "-".join(name[:4] for name in known_migrations())


def prepare_scale(users: int, dest: Path, env: dict[str, str]) -> str:
    """A data dir with `users` users/sessions; returns the hot session's secret.

    Large databases are built once and kept in bench/results/tmp/seed/ (keyed by
    size and schema), then copied: seeding a million rows takes minutes.
    """
    dest.mkdir(parents=True, exist_ok=True)
    template = TMP / "seed" / f"{users}-{_schema_version()}"
    if users >= 100_000 and (template / "hot.json").exists():
        shutil.copyfile(template / data.DB_NAME, dest / data.DB_NAME)
        secret: str = json.loads((template / "hot.json").read_text())["secret"]
    else:
        data.migrate(dest, env, BIN / "expense-auth")
        secret = data.seed(dest, users).hot_secret
        if users >= 100_000:
            template.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dest / data.DB_NAME, template / data.DB_NAME)
            (template / "hot.json").write_text(json.dumps({"secret": secret}))
    # The hot session must be live now (idle timeout): refresh it like a touch would.
    now_ms = int(time.time() * 1000)
    conn = sqlite3.connect(dest / data.DB_NAME)
    with conn:
        conn.execute(
            "UPDATE sessions SET last_seen_ms = ?, expire_ms = ? WHERE token_hash = ?",
            (now_ms, now_ms + data.SESSION_LIFETIME_MS, _hash(secret)),
        )
    conn.close()
    return secret


def _hash(secret: str) -> bytes:
    from server.domain.tokens import hash_secret

    return hash_secret(secret)


# --------------------------------------------------------------------------- servers


def start_servers(
    mode: Mode,
    run_dir: Path,
    env: dict[str, str],
    session_key: str,
    servers: dict[str, procs.Server],
) -> dict[str, str]:
    """Start every server into `servers` (so a failure still stops them all).

    Returns the hot session cookie of each of our servers.
    """
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    cookies: dict[str, str] = {}
    ours = {"main": 1_000, **{f"scale-{n}": n for n in mode.scales}}
    if mode.extras:
        ours["log-info"] = 1_000
    for name, users in ours.items():
        secret = prepare_scale(users, run_dir / name, env)
        cookies[name] = data.cookie(session_key, secret)
    expense_auth = str(BIN / "expense-auth")
    for name in ours:
        port = procs.free_port()
        server_env = {**env, "DATA_DIR": str(run_dir / name)}
        ports = {"h1": port, "h2c": port}
        if name == "log-info":
            server_env["LOG_LEVEL"] = "INFO"
        if name == "main":
            # The forward-auth listener, as a gateway would call it.
            ports["forward-auth"] = procs.free_port()
            server_env["FORWARD_AUTH_PORT"] = str(ports["forward-auth"])
        servers[name] = procs.spawn(
            name,
            procs.serve_args(expense_auth, port),
            env=server_env,
            cwd=REPO,
            log_dir=logs,
            ports=ports,
        )
    port = procs.free_port()
    servers["echo"] = procs.spawn(
        "echo",
        procs.serve_args(expense_auth, port, "bench.echo_app:app"),
        env={**env, "DATA_DIR": str(run_dir / "echo")},
        cwd=REPO,
        log_dir=logs,
        ports={"h1": port, "h2c": port},
    )
    port = procs.free_port()
    servers["grpc-aio"] = procs.spawn(
        "grpc-aio",
        [sys.executable, "-m", "bench.grpc_aio_echo", str(port), str(TMP / "stubs")],
        env=env,
        cwd=REPO,
        log_dir=logs,
        ports={"h2c": port},
    )
    servers["connect-node"] = procs.spawn(
        "connect-node",
        [str(REPO / "node_modules" / ".bin" / "tsx"), "bench/connect_node_echo.ts", "0", "0"],
        env=env,
        cwd=REPO,
        log_dir=logs,
        ports={},
    )
    for name, server in servers.items():
        pattern = r"listening h1=(?P<h1>\d+) h2c=(?P<h2c>\d+)" if name == "connect-node" else None
        procs.wait_listening(server, pattern=pattern)
    return cookies


# --------------------------------------------------------------------------- cells


def build_cells(
    mode: Mode,
    run_dir: Path,
    cookies: dict[str, str],
    tokens: dict[str, list[list[str]]],
) -> list[Cell]:
    """Every (scenario, server, protocol) measured each round."""
    bodies = run_dir / "bodies"
    cells: list[Cell] = []

    def fixed(
        name: str,
        server: str,
        protocol: str,
        path: str,
        *,
        cookie: str | None,
        expect: str = "ok",
        json_body: str = "{}",
    ) -> None:
        extra = [("cookie", f"{COOKIE_NAME}={cookie}")] if cookie else []
        request = load.request_for(
            protocol, path, json_body=json_body, proto_body=b"", extra=extra, body_dir=bodies
        )
        cells.append(Cell(name, protocol, server, expect, request=request))

    for protocol in PROTOCOLS:
        fixed("echo", "echo", protocol, HEALTH_CHECK, cookie=None)
        fixed("connect-node echo", "connect-node", protocol, HEALTH_CHECK, cookie=None)
        if protocol == GRPC:
            fixed("grpc.aio echo", "grpc-aio", protocol, HEALTH_CHECK, cookie=None)
        fixed("GetSession", "main", protocol, GET_SESSION, cookie=cookies["main"])
        fixed("GetCurrentUser", "main", protocol, GET_CURRENT_USER, cookie=cookies["main"])
        fixed(
            "Unauthenticated", "main", protocol, GET_SESSION, cookie=None, expect="unauthenticated"
        )
        for users in mode.scales:
            fixed(
                f"GetSession @ {_count(users)} users",
                f"scale-{users}",
                protocol,
                GET_SESSION,
                cookie=cookies[f"scale-{users}"],
            )
        if protocol == H1:
            cells.append(_forward_auth_cell(cookies["main"]))
        if mode.extras:
            fixed(
                "GetSession, LOG_LEVEL=INFO",
                "log-info",
                protocol,
                GET_SESSION,
                cookie=cookies["log-info"],
            )
        cells.append(
            Cell(
                "SignIn",
                protocol,
                "main",
                "ok",
                loadgen=_sign_in_loadgen(bodies, tokens[protocol], mode),
            )
        )
        if mode.extras:
            cells.append(
                Cell(
                    "echo, bench.loadgen client",
                    protocol,
                    "echo",
                    "ok",
                    loadgen=_echo_loadgen(mode),
                )
            )
    return cells


def _forward_auth_cell(cookie: str) -> Cell:
    """A gateway's check (Traefik, nginx and Caddy send a GET over HTTP/1.1), as Traefik
    describes the original request: a signed-in browser's GET of an expense page."""
    headers = (
        ("cookie", f"{COOKIE_NAME}={cookie}"),
        ("x-forwarded-method", "GET"),
        ("x-forwarded-host", "expenses.example.com"),
        ("x-forwarded-uri", "/expenses/2026-11"),
        ("x-forwarded-for", "198.51.100.7"),
    )
    request = Request(path=FORWARD_AUTH, headers=headers, body=None)
    return Cell("ForwardAuth (GET check)", H1, "main", "ok", request=request, port="forward-auth")


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1_000}k"


def _sign_in_loadgen(bodies: Path, batches: list[list[str]], mode: Mode) -> Callable[..., Run]:
    def go(port: int, protocol: str, index: int, seconds: float) -> Run:
        path = bodies / f"signin-{protocol}-{index}.txt"
        lines = [
            json.dumps({"googleIdToken": t}) if protocol == H1 else sign_in_proto(t).hex()
            for t in batches[index]
        ]
        path.write_text("\n".join(lines) + "\n")
        return load.loadgen(port, protocol, SIGN_IN, bodies_file=path, headers={}, seconds=seconds)

    return go


def _echo_loadgen(mode: Mode) -> Callable[..., Run]:
    def go(port: int, protocol: str, index: int, seconds: float) -> Run:
        return load.loadgen(
            port,
            protocol,
            HEALTH_CHECK,
            repeat="{}" if protocol == H1 else "",
            headers={},
            seconds=seconds,
        )

    return go


# --------------------------------------------------------------------------- probes


def probe(cell: Cell, server: procs.Server) -> None:
    """One request through a real client: the cell must get the answer it expects."""
    port = _port(cell, server)
    if cell.request is None:
        return  # SignIn cells check every response's status themselves
    headers = dict(cell.request.headers)
    if cell.protocol == H1:
        body = cell.request.body
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}{cell.request.path}",
            data=body.read_bytes() if body is not None else None,
            headers=headers,
            method="POST" if body is not None else "GET",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        wanted = 200 if cell.expect == "ok" else 401
        if status != wanted:
            raise RuntimeError(f"probe {cell.key}: HTTP {status}, wanted {wanted}")
        return
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(cell.request.path)
        metadata = tuple((k, v) for k, v in headers.items() if k == "cookie")
        try:
            call(b"", metadata=metadata, timeout=10)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
    wanted_code = "OK" if cell.expect == "ok" else "UNAUTHENTICATED"
    if code != wanted_code:
        raise RuntimeError(f"probe {cell.key}: gRPC {code}, wanted {wanted_code}")


# --------------------------------------------------------------------------- measuring


def measure(
    cell: Cell, server: procs.Server, *, index: int, seconds: float, record: bool, log_dir: Path
) -> Run:
    """One run of one cell, with the server's CPU and peak memory around it."""
    port = _port(cell, server)
    pids = server.refresh_pids()
    procs.reset_peak_rss(pids)
    cpu0, core0, t0 = (
        procs.cpu_seconds(pids),
        procs.core_busy_seconds(procs.SERVER_CPU),
        time.monotonic(),
    )
    if cell.request is not None:
        run = load.h2load(
            port,
            cell.protocol,
            cell.request,
            seconds=seconds,
            log_file=log_dir / "h2load.log" if record else None,
        )
    else:
        assert cell.loadgen is not None
        run = cell.loadgen(port, cell.protocol, index, seconds)
    wall = time.monotonic() - t0
    cpu = procs.cpu_seconds(pids) - cpu0
    core = procs.core_busy_seconds(procs.SERVER_CPU) - core0
    _check(cell, run)
    if record:
        cell.runs.append(run)
        cell.cpu_util.append(cpu / wall)
        cell.cpu_ms_per_request.append(1000 * cpu / max(run.requests, 1))
        cell.core0_other.append(max(0.0, core - cpu) / wall)
        cell.peak_rss_mb = max(cell.peak_rss_mb, procs.peak_rss_mb(pids))
    return run


def _port(cell: Cell, server: procs.Server) -> int:
    return server.ports[cell.port or ("h1" if cell.protocol == H1 else "h2c")]


def _check(cell: Cell, run: Run) -> None:
    if run.requests == 0:
        raise RuntimeError(f"{cell.key}: no request completed")
    if cell.request is None:
        if run.errors:
            raise RuntimeError(f"{cell.key}: {run.errors} failed calls: {run.status}")
        return
    if cell.protocol == H1:
        wanted = "2xx" if cell.expect == "ok" else "4xx"
        if run.status.get(wanted, 0) != run.requests:
            raise RuntimeError(f"{cell.key}: statuses {run.status}, wanted all {wanted}")
    # gRPC errors travel in trailers with HTTP 200; a trailers-only error has no
    # DATA, a success always has a message frame: the bytes tell them apart.
    elif cell.expect == "ok" and run.data_bytes_per_request < 5:
        raise RuntimeError(f"{cell.key}: {run.data_bytes_per_request} data bytes per call")
    elif cell.expect != "ok" and run.data_bytes_per_request > 0:
        raise RuntimeError(f"{cell.key}: unexpected response data")


# --------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    """Versions of everything in the measured paths."""
    out = {"python": platform.python_version()}
    for package in (
        "pyvoy",
        "connectrpc",
        "protobuf-py",
        "starlette",
        "limits",
        "grpcio",
        "protobuf",
        "itsdangerous",
        "google-auth",
    ):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "absent"
    out["node"] = subprocess.run(
        ["node", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    manifest = REPO / "node_modules" / "@connectrpc" / "connect-node" / "package.json"
    out["@connectrpc/connect-node"] = json.loads(manifest.read_text())["version"]
    h2 = subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=False)
    out["h2load"] = h2.stdout.strip().split()[-1] if h2.stdout else "absent"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "server", "interceptors"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if not commit:  # a source tree without .git, e.g. a `git archive` snapshot
        commit = os.environ.get("EXPENSE_AUTH_SOURCE", "unknown")
    out["expense-auth"] = commit + (" (server/ or interceptors/ modified)" if dirty else "")
    return out


def machine() -> dict[str, Any]:
    """The machine, and how busy it was (other people's work shares it)."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "pinning": f"servers on core {procs.SERVER_CPU}, load generators on core {procs.LOAD_CPU}",
        "nice": procs.NICE,
        "concurrency": load.CONCURRENCY,
        "load_average_start": os.getloadavg(),
    }


def _tools() -> None:
    missing = [tool for tool in ("h2load", "taskset", "node") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(
            f"bench: missing {', '.join(missing)}; run `make bench` "
            "(it installs nghttp2-client with apt-get) or apt-get install -y nghttp2-client"
        )
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("bench: needs 2 cores (server and load pinned apart)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    parser.add_argument("--rounds", type=int, help="measured rounds (full: 5, quick: 1)")
    parser.add_argument("--seconds", type=float, help="seconds per cell and round")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument(
        "--nice",
        type=int,
        default=-10 if os.geteuid() == 0 else 0,
        help="nice value (process and autogroup) of the servers and load generators, so that "
        "other work on a shared machine yields the cores while the bench runs; default -10 "
        "as root, 0 otherwise; 0 leaves priorities alone",
    )
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    if args.rounds or args.seconds:
        mode = Mode(
            mode.quick,
            args.rounds or mode.rounds,
            args.seconds or mode.seconds,
            mode.warmup_seconds,
            mode.signin_tokens,
            mode.scales,
        )
    _tools()
    # A SIGTERM (or SIGINT, which background jobs ignore) stops the servers too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs.NICE = args.nice
    procs.raise_priority()  # the load generators run in this process's session
    os.sched_setaffinity(0, {int(procs.LOAD_CPU)})
    started = time.monotonic()
    TMP.mkdir(parents=True, exist_ok=True)
    for old in TMP.glob("run-*"):
        shutil.rmtree(old, ignore_errors=True)
    run_dir = TMP / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    certs = CertsCounter()
    session_key = data.new_session_key()
    env = server_env(
        session_key,
        HOME=os.environ.get("HOME", str(run_dir)),
        GOOGLE_CLIENT_ID=GOOGLE_CLIENT_ID,
        GOOGLE_CERTS_URL=certs.url,
    )
    info = machine()
    servers: dict[str, procs.Server] = {}
    try:
        _say(f"preparing data and servers ({'quick' if mode.quick else 'full'} mode)")
        # Tokens are minted on the load core while the servers start on theirs.
        per_protocol = mode.signin_tokens * (mode.rounds + 1)
        minting = ThreadPoolExecutor(max_workers=1)
        minted_future = minting.submit(
            data.mint_tokens, run_dir / "main", per_protocol * 2, workers=1 if mode.quick else 2
        )
        cookies = start_servers(mode, run_dir, env, session_key, servers)
        idle_rss = {
            name: round(procs.rss_mb(server.refresh_pids()), 1) for name, server in servers.items()
        }
        minted = minted_future.result()
        minting.shutdown()
        _say(f"servers up and tokens minted in {time.monotonic() - started:.0f} s")
        tokens = {
            protocol: [
                minted[offset + i * mode.signin_tokens : offset + (i + 1) * mode.signin_tokens]
                for i in range(mode.rounds + 1)
            ]
            for protocol, offset in ((H1, 0), (GRPC, per_protocol))
        }
        cells = build_cells(mode, run_dir, cookies, tokens)
        for cell in cells:
            probe(cell, servers[cell.server])
        _say(f"warm-up: {len(cells)} cells x {mode.warmup_seconds:g} s")
        for cell in cells:
            # V8 needs a few seconds of traffic before its JIT settles; Python does not.
            seconds = mode.warmup_seconds * (4 if cell.server == "connect-node" else 1)
            measure(
                cell,
                servers[cell.server],
                index=mode.rounds,
                seconds=seconds,
                record=False,
                log_dir=run_dir,
            )
        for round_index in range(mode.rounds):
            order = list(cells)
            random.Random(round_index).shuffle(order)
            _say(f"round {round_index + 1}/{mode.rounds}")
            for cell in order:
                measure(
                    cell,
                    servers[cell.server],
                    index=round_index,
                    seconds=mode.seconds,
                    record=True,
                    log_dir=run_dir,
                )
        info["load_average_end"] = os.getloadavg()
        server_peaks = {
            name: round(procs.peak_rss_mb(server.refresh_pids()), 1)
            for name, server in servers.items()
        }
    finally:
        for server in servers.values():
            server.stop()
        certs.stop()
    elapsed = time.monotonic() - started
    command = "python -m bench" + (" --quick" if mode.quick else "")
    if args.nice:
        command += f" --nice {args.nice}"
    results = report.build(
        cells,
        mode=mode,
        machine=info,
        versions=versions(),
        command=command,
        google_cert_fetches=certs.fetches,
        idle_rss=idle_rss,
        elapsed_s=elapsed,
        server_peaks=server_peaks,
    )
    stem = "quick" if mode.quick else "latest"
    report.write(results, RESULTS / f"{stem}.json", RESULTS / f"{stem}.png", RESULTS / f"{stem}.md")
    if not mode.quick and not args.no_docs:
        report.update_docs(REPO / "docs" / "benchmarks.md", RESULTS / f"{stem}.md")
    for name in ("main", "log-info", "echo", *(f"scale-{n}" for n in mode.scales)):  # if present
        shutil.rmtree(run_dir / name, ignore_errors=True)  # the databases; logs stay
    _say(f"done in {elapsed:.0f} s: {RESULTS / stem}.json, .png, .md")
    print(report.markdown_table(results))
    return 0


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
