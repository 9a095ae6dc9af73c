"""The benchmark run: servers, data, interleaved rounds, results.

Every figure that matters is a ratio against a baseline measured in the same
round: a noisy shared 2-core machine moves absolute RPS by tens of percent from
minute to minute, but a ratio of two cells measured seconds apart holds.

Layout of one run:
- servers on core 0 (each `taskset -c 0` before it spawns its children), load
  generators (h2load, bench.loadgen) and this process on core 1;
- ours run in production mode from a virtualenv holding only the runtime
  dependencies (bench/runtime.py), SignIn verifying Google-shaped tokens against a
  local HTTPS certs URL (bench/google.py) with the nonce of CreateSignInNonce;
- ours: `expense-auth serve` on a 1k-user SQLite database (GetSession,
  GetCurrentUser, SignIn, unauthenticated, and a gateway's forward-auth check on
  its own listener); on 1k / 100k / 1M-user SQLite databases (the data-scale cells)
  and 1k / 1M-user PostgreSQL databases (GetSession and SignIn); with the rate
  limits in Redis, with one worker and with two (`--workers 2`); and with
  LOG_LEVEL=WARNING to price the access log;
- every signed-in call names one of 10,000 distinct sessions, chosen at random per
  request (bench.loadgen), so that lookups, cache misses and last-seen writes are
  what production sees; one cell keeps the old single cookie to show the cache;
- baselines: the bare connectrpc echo on the same pyvoy (`bench.echo_app`), a bare
  grpc.aio echo, a bare connect-node echo;
- a warm-up pass, then ROUNDS rounds, each visiting every cell once in a
  shuffled order (a different one each round);
- as root, everything the bench starts runs at nice -10 (process and scheduling
  autogroup), so that other work on a shared machine yields while it runs; the
  PostgreSQL backends serving the bench are pinned to the server core with it.

Outputs: bench/results/latest.{json,png,md} (quick.* for --quick) and the
generated section of docs/benchmarks.md (full runs only).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import data, google, load, procs, report, runtime
from bench.load import GRPC, H1, PROTOCOLS, Request, Run
from server.domain.throttle import POLICIES
from server.domain.tokens import hash_secret

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = REPO / "bench" / "results"
TMP = RESULTS / "tmp"
# Bench-only: every limit far above what one core can serve, so that nothing is
# refused; the limiter still does its full work per call (GENEROUS_LIMITS style).
RATE_LIMITS = {f"RATE_LIMIT_{name.upper()}": "1000000/minute" for name in POLICIES}
GOOGLE_CLIENT_ID = google.CLIENT_ID
# The development-mode tools (bench.ab, bench.profile, bench.inproc) use the plain
# cookie; production's is Secure and `__Host-` prefixed.
COOKIE_NAME = "expense_session"
SECURE_COOKIE_NAME = "__Host-expense_session"
GET_SESSION = "/expense.auth.v1.AuthService/GetSession"
SIGN_IN = "/expense.auth.v1.AuthService/SignIn"
CREATE_NONCE = "/expense.auth.v1.AuthService/CreateSignInNonce"
GET_CURRENT_USER = "/expense.user.v1.UserService/GetCurrentUser"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
FORWARD_AUTH = "/forward-auth"
# PostgreSQL for the PostgreSQL cells (the tests' variable, the tests' default).
POSTGRES_URL = os.environ.get(
    "BENCH_POSTGRES_URL",
    os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
)
PG_RUN_PREFIX = "expense_bench_run_"
PG_SEED_PREFIX = "expense_bench_seed_"


@dataclass(frozen=True)
class Mode:
    """How long and how big."""

    quick: bool
    rounds: int
    seconds: float
    warmup_seconds: float
    signin_tokens: int  # per SignIn cell and round
    scales: tuple[int, ...]  # SQLite users
    pg_scales: tuple[int, ...]  # PostgreSQL users
    extras: bool = True  # the LOG_LEVEL=WARNING server, SignIn at the largest SQLite scale
    pool: int = data.POOL  # distinct sessions per signed-in cell


# 44 cells: 4 rounds x 3 s keep a full run near 20 minutes on a busy machine. A SignIn
# cell stops early when its tokens run out (each needs a CreateSignInNonce call and an
# RSA signature before the clock starts: most of the time the run spends outside cells).
FULL = Mode(
    False,
    rounds=4,
    seconds=3,
    warmup_seconds=2,
    signin_tokens=1200,
    scales=(1_000, 100_000, 1_000_000),
    pg_scales=(1_000, 1_000_000),
)
QUICK = Mode(
    True,
    rounds=1,
    seconds=1,
    warmup_seconds=0.25,
    signin_tokens=400,
    scales=(1_000, 100_000),
    pg_scales=(1_000,),
    extras=False,
)


@dataclass(frozen=True)
class Spec:
    """One of our servers: its data, engine and settings."""

    name: str
    users: int
    engine: str = "sqlite"  # or "postgres"
    workers: int = 1
    redis: bool = False
    log_level: str = "INFO"  # production's
    forward_auth: bool = False


@dataclass
class Cell:
    """One thing measured each round: a scenario on a server over a protocol."""

    name: str
    protocol: str
    server: str
    expect: str  # "ok" or "unauthenticated"
    request: Request | None = None  # h2load
    loadgen: Callable[..., Run] | None = None  # (port, protocol, round, seconds) -> Run
    prepare: Callable[[int, int], None] | None = None  # (port, round) before the clock
    port: str = ""  # which of the server's ports, when not the protocol's own
    sessions: int | None = None  # distinct sessions the requests name
    probe_cookie: str = ""  # a cookie (name=value) for the probe
    runs: list[Run] = field(default_factory=list)
    cpu_util: list[float] = field(default_factory=list)
    cpu_ms_per_request: list[float] = field(default_factory=list)
    storage_cpu_ms_per_request: list[float] = field(default_factory=list)
    writes_per_call: list[float] = field(default_factory=list)  # last-seen writes
    core0_other: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.protocol


def server_env(session_key: str, **extra: str) -> dict[str, str]:
    """Development mode, for bench.ab, bench.profile and bench.inproc (quick loops on
    the app's own code): development issuer, WARNING logs, the bench's rate limits,
    numpy hidden (bench/shield), plus `extra` (which wins). The run itself uses
    production_env."""
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


def production_env(
    session_key: str, stand_in: google.GoogleStandIn, **extra: str
) -> dict[str, str]:
    """A server under test: production mode as README's production section sets it up
    behind a TLS-terminating proxy, the bench's rate limits, plus `extra`."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/root"),
        "APP_ENV": "production",
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": str(REPO),
        "SESSION_SECRET_KEY": session_key,
        "SESSION_SECURE_COOKIE": "true",
        "BEHIND_TLS_PROXY": "true",
        "GOOGLE_CLIENT_ID": GOOGLE_CLIENT_ID,
        "GOOGLE_CERTS_URL": stand_in.certs_url,
        # The only CA the servers trust: the one that signed the stand-in's certificate.
        "SSL_CERT_FILE": str(stand_in.ca_file),
        **RATE_LIMITS,
        "ADMIN_PORT": "0",  # each server's admin listener on a free port, as in production
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


def _schema_version(engine: str = "sqlite") -> str:
    if engine == "postgres":
        from server.storage.postgres.schema import known_migrations as pg_migrations

        return "-".join(name[:4] for name in pg_migrations())
    from server.storage.sqlite.connection import known_migrations

    return "-".join(name[:4] for name in known_migrations())


def prepare_sqlite(users: int, dest: Path, env: dict[str, str], *, pool: int) -> list[str]:
    """A data dir with `users` users and max(users, pool) sessions; returns the secrets
    of the pool's sessions, all live now.

    Large databases are built once and kept in bench/results/tmp/seed/ (keyed by
    size, pool and schema), then copied: seeding a million rows takes minutes.
    """
    dest.mkdir(parents=True, exist_ok=True)
    template = TMP / "seed" / f"{users}-{pool}-{_schema_version()}"
    if users >= 100_000 and (template / "pool.json").exists():
        shutil.copyfile(template / data.DB_NAME, dest / data.DB_NAME)
        secrets: list[str] = json.loads((template / "pool.json").read_text())
    else:
        data.migrate(dest, env, BIN / "expense-auth")
        secrets = data.seed(dest, users, pool=pool).pool
        if users >= 100_000:
            template.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dest / data.DB_NAME, template / data.DB_NAME)
            (template / "pool.json").write_text(json.dumps(secrets))
    data.refresh_sqlite(dest / data.DB_NAME, secrets)
    return secrets


def prepare_scale(users: int, dest: Path, env: dict[str, str]) -> str:
    """A data dir with `users` users; returns one live session's secret (bench.ab,
    bench.profile)."""
    secrets = prepare_sqlite(users, dest, env, pool=min(users, data.POOL))
    return secrets[len(secrets) // 2]


def _pg_url(database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{database}"))


async def _pg_admin(*statements: str) -> None:
    """DDL on the PostgreSQL server (names are the bench's own, never input)."""
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL, timeout=30)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _pg_column(query: str, *args: object, database: str = "") -> list[Any]:
    """The first column of a query's rows (on the admin database unless told otherwise)."""
    import asyncpg

    conn = await asyncpg.connect(_pg_url(database) if database else POSTGRES_URL, timeout=30)
    try:
        return [row[0] for row in await conn.fetch(query, *args)]
    finally:
        await conn.close()


def drop_run_databases() -> None:
    """Drop the databases of earlier runs (a run that was killed leaves them)."""
    names = asyncio.run(
        _pg_column("SELECT datname FROM pg_database WHERE starts_with(datname, $1)", PG_RUN_PREFIX)
    )
    for name in names:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def prepare_postgres(name: str, users: int, *, pool: int) -> tuple[str, list[str]]:
    """A PostgreSQL database for server `name` with `users` users; returns its URL and
    the pool's secrets.

    The seeded database is built once and kept as a template database on the server
    (keyed by size, pool and schema), its secrets in bench/results/tmp/seed/; each
    run's database is a copy (CREATE DATABASE ... TEMPLATE: a file copy).
    """
    # Database names stop at 63 bytes: the schema goes in as a short digest.
    schema = hashlib.sha256(_schema_version("postgres").encode()).hexdigest()[:8]
    key = f"{users}_{pool}_{schema}"
    seed_db = f"{PG_SEED_PREFIX}{key}"
    secrets_file = TMP / "seed" / f"pg-{key}.json"
    exists = asyncio.run(_pg_column("SELECT 1 FROM pg_database WHERE datname = $1", seed_db))
    if not exists or not secrets_file.exists():
        building = f"{seed_db}_building"
        asyncio.run(
            _pg_admin(
                f'DROP DATABASE IF EXISTS "{seed_db}" WITH (FORCE)',
                f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)',
                f'CREATE DATABASE "{building}"',
            )
        )
        seeded = asyncio.run(data.seed_postgres(_pg_url(building), users, pool=pool))
        secrets_file.parent.mkdir(parents=True, exist_ok=True)
        secrets_file.write_text(json.dumps(seeded.pool))
        asyncio.run(_pg_admin(f'ALTER DATABASE "{building}" RENAME TO "{seed_db}"'))
    secrets: list[str] = json.loads(secrets_file.read_text())
    run_db = f"{PG_RUN_PREFIX}{name.replace('-', '_')}"
    asyncio.run(
        _pg_admin(
            f'DROP DATABASE IF EXISTS "{run_db}" WITH (FORCE)',
            f'CREATE DATABASE "{run_db}" TEMPLATE "{seed_db}"',
        )
    )
    url = _pg_url(run_db)
    asyncio.run(data.refresh_postgres(url, secrets))
    return url, secrets


def pg_backends(database: str) -> list[int]:
    """The PostgreSQL backends connected to `database` (the server's pool)."""
    pids = asyncio.run(_pg_column("SELECT pid FROM pg_stat_activity WHERE datname = $1", database))
    return [int(pid) for pid in pids]


def write_cookies(path: Path, session_key: str, secrets: list[str]) -> Path:
    """One `name=value` line per session, signed as the server signs its cookies."""
    path.write_text(
        "".join(f"{SECURE_COOKIE_NAME}={value}\n" for value in data.cookies(session_key, secrets))
    )
    return path


# --------------------------------------------------------------------------- servers


def specs(mode: Mode) -> list[Spec]:
    """Our servers in this mode."""
    out = [Spec("main", 1_000, forward_auth=True)]
    out += [Spec(f"scale-{n}", n) for n in mode.scales]
    out += [Spec(f"pg-{n}", n, engine="postgres") for n in mode.pg_scales]
    out += [Spec("redis", 1_000, redis=True), Spec("workers-2", 1_000, workers=2, redis=True)]
    if mode.extras:
        out.append(Spec("log-warning", 1_000, log_level="WARNING"))
    return out


@dataclass
class Ours:
    """What the cells need to know of one of our servers."""

    spec: Spec
    cookies: Path  # the pool's cookies, one per line
    database: str = ""  # PostgreSQL's database name
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)  # the pool's sessions


def start_servers(
    mode: Mode,
    run_dir: Path,
    env: dict[str, str],
    session_key: str,
    servers: dict[str, procs.Server],
) -> dict[str, Ours]:
    """Prepare the data and start every server into `servers` (so that a failure still
    stops them all)."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    ours: dict[str, Ours] = {}
    for spec in specs(mode):
        if spec.engine == "postgres":
            url, secrets = prepare_postgres(spec.name, spec.users, pool=mode.pool)
            database = url.rsplit("/", 1)[1]
        else:
            secrets = prepare_sqlite(spec.users, run_dir / spec.name, env, pool=mode.pool)
            url, database = "", ""
        cookies = write_cookies(run_dir / f"cookies-{spec.name}.txt", session_key, secrets)
        ours[spec.name] = Ours(
            spec=spec,
            cookies=cookies,
            database=database,
            env={"DATABASE_URL": url} if url else {},
            secrets=secrets,
        )
    if any(o.spec.redis for o in ours.values()):
        redis_port = procs.free_port()
        servers["redis-server"] = procs.spawn(
            "redis-server",
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(run_dir)],
            env=env,
            cwd=REPO,
            log_dir=logs,
            ports={"redis": redis_port},
        )  # fmt: skip
    python = runtime.python()
    serve = runtime.serve_command(python)
    for name, our in ours.items():
        spec = our.spec
        port = procs.free_port()
        our_env = {
            **env,
            "DATA_DIR": str(run_dir / name),
            "LOG_LEVEL": spec.log_level,
            **our.env,
        }
        ports = {"h1": port, "h2c": port}
        args = [*serve, "serve", "--port", str(port)]
        if spec.workers > 1:
            args += ["--workers", str(spec.workers)]
        if spec.redis:
            our_env["RATE_LIMIT_STORAGE_URL"] = (
                f"redis://127.0.0.1:{servers['redis-server'].ports['redis']}/1"
            )
        if spec.forward_auth:
            # The forward-auth listener, as a gateway would call it.
            ports["forward-auth"] = procs.free_port()
            our_env["FORWARD_AUTH_PORT"] = str(ports["forward-auth"])
        servers[name] = procs.spawn(name, args, env=our_env, cwd=REPO, log_dir=logs, ports=ports)
    # The old measurement, for a before-and-after within one run: development mode from
    # the bench's own virtualenv (numpy hidden by bench/shield), WARNING logs, one
    # cookie, 1k users with one session each.
    legacy_env = server_env(session_key, HOME=env["HOME"], DATA_DIR=str(run_dir / "legacy"))
    secrets = prepare_sqlite(1_000, run_dir / "legacy", legacy_env, pool=1_000)
    legacy_cookie = data.cookie(session_key, secrets[len(secrets) // 2])
    (run_dir / "cookie-legacy.txt").write_text(f"{COOKIE_NAME}={legacy_cookie}\n")
    port = procs.free_port()
    servers["legacy"] = procs.spawn(
        "legacy",
        procs.serve_args(str(BIN / "expense-auth"), port),
        env=legacy_env,
        cwd=REPO,
        log_dir=logs,
        ports={"h1": port, "h2c": port},
    )
    port = procs.free_port()
    servers["echo"] = procs.spawn(
        "echo",
        [*serve, "serve", "--port", str(port), "--app", "bench.echo_app:app", "--no-admin"],
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
    return ours


# --------------------------------------------------------------------------- cells


def build_cells(mode: Mode, run_dir: Path, ours: dict[str, Ours], minter: Minter) -> list[Cell]:
    """Every (scenario, server, protocol) measured each round."""
    bodies = run_dir / "bodies"
    bodies.mkdir(parents=True, exist_ok=True)
    # The old cell: one session, answered from the server's session cache after its
    # first call.
    main_pool = ours["main"].cookies.read_text().splitlines()
    one = run_dir / "cookies-one.txt"
    one.write_text(main_pool[len(main_pool) // 2] + "\n")
    cells: list[Cell] = []

    def fixed(
        name: str,
        server: str,
        protocol: str,
        path: str,
        *,
        expect: str = "ok",
        cookie: str = "",
    ) -> None:
        extra = [("cookie", cookie)] if cookie else []
        request = load.request_for(
            protocol, path, json_body="{}", proto_body=b"", extra=extra, body_dir=bodies
        )
        cells.append(
            Cell(name, protocol, server, expect, request=request, sessions=1 if cookie else None)
        )

    def signed_in(name: str, server: str, protocol: str, path: str, cookies: Path) -> None:
        pool = cookies.read_text().splitlines()
        cells.append(
            Cell(
                name,
                protocol,
                server,
                "ok",
                loadgen=_pool_loadgen(path, cookies),
                sessions=len(pool),
                probe_cookie=pool[0],
            )
        )

    def sign_in(name: str, server: str, protocol: str) -> None:
        cells.append(
            Cell(
                name,
                protocol,
                server,
                "ok",
                loadgen=_sign_in_loadgen(bodies, name),
                prepare=minter.preparer(bodies, name, protocol, mode),
            )
        )

    for protocol in PROTOCOLS:
        fixed("echo", "echo", protocol, HEALTH_CHECK)
        fixed("connect-node echo", "connect-node", protocol, HEALTH_CHECK)
        if protocol == GRPC:
            fixed("grpc.aio echo", "grpc-aio", protocol, HEALTH_CHECK)
        cells.append(
            Cell(
                "echo, bench.loadgen client",
                protocol,
                "echo",
                "ok",
                loadgen=_echo_loadgen(),
            )
        )
        pool = ours["main"].cookies
        signed_in("GetSession", "main", protocol, GET_SESSION, pool)
        fixed(
            "GetSession, as measured before",
            "legacy",
            protocol,
            GET_SESSION,
            cookie=(run_dir / "cookie-legacy.txt").read_text().strip(),
        )
        signed_in("GetSession, one session (cached)", "main", protocol, GET_SESSION, one)
        signed_in("GetCurrentUser", "main", protocol, GET_CURRENT_USER, pool)
        fixed("Unauthenticated", "main", protocol, GET_SESSION, expect="unauthenticated")
        for users in mode.scales:
            name = f"scale-{users}"
            signed_in(
                f"GetSession @ {_count(users)} users",
                name,
                protocol,
                GET_SESSION,
                ours[name].cookies,
            )
        for users in mode.pg_scales:
            name = f"pg-{users}"
            signed_in(
                f"GetSession @ {_count(users)} users, PostgreSQL",
                name,
                protocol,
                GET_SESSION,
                ours[name].cookies,
            )
        signed_in("GetSession, Redis limits", "redis", protocol, GET_SESSION, ours["redis"].cookies)
        signed_in(
            "GetSession, 2 workers + Redis limits",
            "workers-2",
            protocol,
            GET_SESSION,
            ours["workers-2"].cookies,
        )
        if mode.extras:
            signed_in(
                "GetSession, LOG_LEVEL=WARNING",
                "log-warning",
                protocol,
                GET_SESSION,
                ours["log-warning"].cookies,
            )
        if protocol == H1:
            cells.append(_forward_auth_cell(pool))
        sign_in("SignIn", "main", protocol)
        if mode.extras:
            largest = max(mode.scales)
            sign_in(f"SignIn @ {_count(largest)} users", f"scale-{largest}", protocol)
        for users in mode.pg_scales:
            sign_in(f"SignIn @ {_count(users)} users, PostgreSQL", f"pg-{users}", protocol)
    return cells


def _pool_loadgen(path: str, cookies: Path) -> Callable[..., Run]:
    def go(port: int, protocol: str, index: int, seconds: float) -> Run:
        return load.loadgen(
            port,
            protocol,
            path,
            repeat="{}" if protocol == H1 else "",
            cookies_file=cookies,
            headers={},
            seconds=seconds,
        )

    return go


def _forward_auth_cell(cookies: Path) -> Cell:
    """A gateway's check (Traefik, nginx and Caddy send a GET over HTTP/1.1), as Traefik
    describes the original request: a signed-in browser's GET of an expense page."""
    headers = {
        "x-forwarded-method": "GET",
        "x-forwarded-host": "expenses.example.com",
        "x-forwarded-uri": "/expenses/2026-11",
        "x-forwarded-for": "198.51.100.7",
    }

    def go(port: int, protocol: str, index: int, seconds: float) -> Run:
        return load.loadgen(
            port,
            protocol,
            FORWARD_AUTH,
            get=True,
            cookies_file=cookies,
            headers=headers,
            seconds=seconds,
        )

    pool = cookies.read_text().splitlines()
    return Cell(
        "ForwardAuth (GET check)",
        H1,
        "main",
        "ok",
        loadgen=go,
        port="forward-auth",
        sessions=len(pool),
        probe_cookie=pool[0],
    )


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1_000}k"


class Minter:
    """SignIn's requests, made before the clock starts: one CreateSignInNonce call per
    sign-in (its nonce cookie), and a token carrying that nonce."""

    def __init__(self, stand_in: google.GoogleStandIn, *, workers: int) -> None:
        self._stand_in = stand_in
        self._workers = workers

    def preparer(
        self, bodies: Path, name: str, protocol: str, mode: Mode
    ) -> Callable[[int, int], None]:
        """What a SignIn cell runs before the clock starts: its requests, fresh."""
        stem = _stem(name, protocol)

        def prepare(port: int, index: int) -> None:
            saved = bodies / f"{stem}-nonces.jsonl"
            load.loadgen(
                port,
                H1,
                CREATE_NONCE,
                repeat="{}",
                count=mode.signin_tokens,
                save=saved,
                headers={},
                seconds=600,
            )
            nonces, cookies = [], []
            for line in saved.read_text().splitlines():
                answer = json.loads(line)
                nonces.append(json.loads(answer["body"])["nonce"])
                cookie = next(c for c in answer["set_cookie"] if "signin_nonce=" in c)
                cookies.append(cookie.split(";", 1)[0])
            if len(nonces) != mode.signin_tokens:
                raise RuntimeError(f"{name}: {len(nonces)} nonces of {mode.signin_tokens}")
            tokens = google.mint_tokens(self._stand_in.key_dir, nonces, workers=self._workers)
            lines = [
                json.dumps({"googleIdToken": t}) if protocol == H1 else sign_in_proto(t).hex()
                for t in tokens
            ]
            (bodies / f"{stem}.txt").write_text("\n".join(lines) + "\n")
            (bodies / f"{stem}-cookies.txt").write_text("\n".join(cookies) + "\n")

        return prepare


def _stem(name: str, protocol: str) -> str:
    return "signin-" + "".join(c if c.isalnum() else "_" for c in f"{name}-{protocol}")


def _sign_in_loadgen(bodies: Path, name: str) -> Callable[..., Run]:
    def go(port: int, protocol: str, index: int, seconds: float) -> Run:
        stem = _stem(name, protocol)
        return load.loadgen(
            port,
            protocol,
            SIGN_IN,
            bodies_file=bodies / f"{stem}.txt",
            cookies_file=bodies / f"{stem}-cookies.txt",
            paired=True,
            headers={},
            seconds=seconds,
        )

    return go


def _echo_loadgen() -> Callable[..., Run]:
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
    if cell.request is None and not cell.probe_cookie:
        return  # SignIn and the loadgen echo check every response's status themselves
    path = cell.request.path if cell.request is not None else _loadgen_path(cell)
    headers = dict(cell.request.headers) if cell.request is not None else {}
    if cell.probe_cookie:
        headers["cookie"] = cell.probe_cookie
    if cell.protocol == H1:
        get = cell.port == "forward-auth"
        if cell.request is not None and cell.request.body is not None:
            body: bytes | None = cell.request.body.read_bytes()
        else:
            body = None if get else b"{}"
            if not get:
                headers.update(
                    {"content-type": "application/json", "connect-protocol-version": "1"}
                )
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}",
            data=body,
            headers=headers,
            method="GET" if get else "POST",
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
        call = channel.unary_unary(path)
        metadata = tuple((k, v) for k, v in headers.items() if k == "cookie")
        try:
            call(b"", metadata=metadata, timeout=10)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
    wanted_code = "OK" if cell.expect == "ok" else "UNAUTHENTICATED"
    if code != wanted_code:
        raise RuntimeError(f"probe {cell.key}: gRPC {code}, wanted {wanted_code}")


def _loadgen_path(cell: Cell) -> str:
    if cell.port == "forward-auth":
        return FORWARD_AUTH
    return GET_CURRENT_USER if cell.name.startswith("GetCurrentUser") else GET_SESSION


# --------------------------------------------------------------------------- measuring


@dataclass
class Storage:
    """Processes outside the server's tree that serve it: PostgreSQL's backends for its
    database, the bench's redis-server. Pinned to the server core with it."""

    pg_database: str = ""
    redis: procs.Server | None = None
    sqlite_path: Path | None = None
    pool_hashes: list[bytes] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)

    def stagger_last_seen(self) -> None:
        """Before a signed-in cell: data.DUE_SHARE of the pool due for a last-seen write."""
        if not self.pool_hashes:
            return
        plan = data.last_seen_plan(self.pool_hashes, now_ms=int(time.time() * 1000), rng=self.rng)
        if self.pg_database:
            asyncio.run(data.set_last_seen_postgres(_pg_url(self.pg_database), plan))
        elif self.sqlite_path is not None:
            data.set_last_seen_sqlite(self.sqlite_path, plan)

    def sessions_seen_since(self, since_ms: int) -> int | None:
        """Sessions whose last-seen time was written at or after `since_ms`: the
        last-seen writes of a cell (each session is written at most once a minute)."""
        query = "SELECT count(*) FROM sessions WHERE last_seen_ms >= "
        if self.pg_database:
            counted = asyncio.run(_pg_column(query + "$1", since_ms, database=self.pg_database))
            return int(counted[0])
        if self.sqlite_path is not None:
            conn = sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True, timeout=10)
            try:
                return int(conn.execute(query + "?", (since_ms,)).fetchone()[0])
            finally:
                conn.close()
        return None

    def pids(self) -> list[int]:
        pids = pg_backends(self.pg_database) if self.pg_database else []
        if self.redis is not None:
            pids += self.redis.refresh_pids()
        for pid in pids:
            procs.adopt(pid)
        return pids


def measure(
    cell: Cell,
    server: procs.Server,
    storage: Storage,
    *,
    index: int,
    seconds: float,
    record: bool,
    log_dir: Path,
) -> Run:
    """One run of one cell, with the server's CPU and peak memory around it."""
    port = _port(cell, server)
    if cell.prepare is not None:
        cell.prepare(port, index)
    if cell.sessions is not None:
        storage.stagger_last_seen()
    pids = server.refresh_pids()
    storage_pids = storage.pids()
    procs.reset_peak_rss(pids)
    since_ms = int(time.time() * 1000)
    cpu0, storage0, core0, t0 = (
        procs.cpu_seconds(pids),
        procs.cpu_seconds(storage_pids),
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
    storage_cpu = procs.cpu_seconds(storage_pids) - storage0
    core = procs.core_busy_seconds(procs.SERVER_CPU) - core0
    _check(cell, run)
    if record and cell.sessions is not None:
        time.sleep(0.3)  # last-seen writes wait at most 0.25 s (server/storage/touches.py)
        written = storage.sessions_seen_since(since_ms)
        if written is not None:
            cell.writes_per_call.append(written / max(run.requests, 1))
    if record:
        cell.runs.append(run)
        cell.cpu_util.append(cpu / wall)
        cell.cpu_ms_per_request.append(1000 * cpu / max(run.requests, 1))
        cell.storage_cpu_ms_per_request.append(1000 * storage_cpu / max(run.requests, 1))
        cell.core0_other.append(max(0.0, core - cpu - storage_cpu) / wall)
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
    """Versions of everything in the measured paths (the servers' packages as their
    runtime-only virtualenv has them; grpcio and protobuf are the bench's, for the
    grpc.aio baseline)."""
    out = {"python": platform.python_version()}
    out["servers' environment"] = "runtime dependencies only (bench/runtime.py)"
    packages = (
        "pyvoy",
        "connectrpc",
        "protobuf-py",
        "starlette",
        "limits",
        "redis",
        "itsdangerous",
        "google-auth",
        "asyncpg",
    )
    script = (
        "import json, sys\nfrom importlib import metadata\nout = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try: out[p] = metadata.version(p)\n"
        "    except metadata.PackageNotFoundError: out[p] = 'absent'\n"
        "print(json.dumps(out))\n"
    )
    found = subprocess.run(
        [str(runtime.python()), "-c", script, *packages],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    out.update(json.loads(found.stdout))
    for package in ("grpcio", "protobuf"):
        try:
            out[f"{package} (grpc.aio baseline)"] = metadata.version(package)
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
        "postgres": "the machine's shared server; the bench's backends pinned to core "
        f"{procs.SERVER_CPU} with the server",
        "redis": f"the bench's own redis-server, on core {procs.SERVER_CPU} with the server",
    }


def _tools() -> None:
    missing = [
        tool for tool in ("h2load", "taskset", "node", "redis-server") if shutil.which(tool) is None
    ]
    if missing:
        raise SystemExit(
            f"bench: missing {', '.join(missing)}; run `make bench` (it installs "
            "nghttp2-client and redis-server with apt-get) or apt-get install -y them"
        )
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("bench: needs 2 cores (server and load pinned apart)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run in a few minutes")
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
        mode = replace(
            mode, rounds=args.rounds or mode.rounds, seconds=args.seconds or mode.seconds
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
    _say("the runtime-only virtualenv (created on first use)")
    runtime.python()
    stand_in = google.GoogleStandIn(run_dir / "google")
    session_key = data.new_session_key()
    env = production_env(session_key, stand_in, HOME=os.environ.get("HOME", str(run_dir)))
    info = machine()
    servers: dict[str, procs.Server] = {}
    postgres_group = procs.PostgresPriority()
    try:
        _say(f"preparing data and servers ({'quick' if mode.quick else 'full'} mode)")
        drop_run_databases()
        ours = start_servers(mode, run_dir, env, session_key, servers)
        postgres_group.raise_()
        idle_rss = {
            name: round(procs.rss_mb(server.refresh_pids()), 1) for name, server in servers.items()
        }
        _say(f"servers up in {time.monotonic() - started:.0f} s")
        minter = Minter(stand_in, workers=1 if mode.quick else 2)
        cells = build_cells(mode, run_dir, ours, minter)
        storage = {
            name: Storage(
                pg_database=our.database,
                redis=servers["redis-server"] if our.spec.redis else None,
                sqlite_path=None if our.database else run_dir / name / data.DB_NAME,
                pool_hashes=[hash_secret(secret) for secret in our.secrets],
            )
            for name, our in ours.items()
        }
        storage["legacy"] = Storage(sqlite_path=run_dir / "legacy" / data.DB_NAME)
        for cell in cells:
            probe(cell, servers[cell.server])
        _say(f"warm-up: {len(cells)} cells x {mode.warmup_seconds:g} s")
        for cell in cells:
            # V8 needs a few seconds of traffic before its JIT settles; Python does not.
            seconds = mode.warmup_seconds * (4 if cell.server == "connect-node" else 1)
            measure(
                cell,
                servers[cell.server],
                storage.get(cell.server, Storage()),
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
                    storage.get(cell.server, Storage()),
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
        serving_processes = sum(our.spec.workers for our in ours.values())
    finally:
        for server in servers.values():
            server.stop()
        postgres_group.restore()
        stand_in.stop()
        drop_run_databases()
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
        google_cert_fetches=stand_in.fetches,
        serving_processes=serving_processes,
        idle_rss=idle_rss,
        elapsed_s=elapsed,
        server_peaks=server_peaks,
    )
    stem = "quick" if mode.quick else "latest"
    report.write(results, RESULTS / f"{stem}.json", RESULTS / f"{stem}.png", RESULTS / f"{stem}.md")
    if not mode.quick and not args.no_docs:
        report.update_docs(REPO / "docs" / "benchmarks.md", RESULTS / f"{stem}.md")
    for name in (*ours, "echo"):
        shutil.rmtree(run_dir / name, ignore_errors=True)  # the databases; logs stay
    _say(f"done in {elapsed:.0f} s: {RESULTS / stem}.json, .png, .md")
    print(report.markdown_table(results))
    return 0


_STARTED = time.monotonic()


def _say(text: str) -> None:
    print(f"bench [{time.monotonic() - _STARTED:4.0f} s]: {text}", file=sys.stderr, flush=True)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
