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
- Shutdown drains: on SIGTERM or SIGINT the listener stops taking new
  connections, in-flight calls finish (up to the drain time), then Envoy stops.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import signal
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvoy import PyvoyServer

from server.middleware import SECURITY_HEADERS

log = logging.getLogger("expense_auth.serve")

DRAIN_SECONDS = 10.0

# The cap on all of one request's headers together, cookies included, in KiB
# (Envoy's `max_request_headers_kb`; its default is 60). Our own largest header
# is the session cookie (~80 bytes; ID tokens travel in bodies), so 16 KiB leaves
# browsers ample room while bounding what an anonymous client can make Envoy
# buffer and parse. Beyond it Envoy answers 431 on HTTP/1.1 and resets the
# stream (INTERNAL_ERROR) on HTTP/2; the app never sees the request.
MAX_REQUEST_HEADERS_KB = 16
ADMIN_LISTENER = "admin_listener"
ENVOY_DRAIN_TIME_S = 1

_HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"


@dataclass(frozen=True, slots=True)
class AdminListener:
    """The admin API's own listener: another app in the same process, another port."""

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
_PATH_GUARD_REPLY = {
    "mappers": [
        {
            # RBAC's 403 for exactly these paths (the app never sees them).
            "filter": {
                "and_filter": {
                    "filters": [
                        {
                            "status_code_filter": {
                                "comparison": {
                                    "op": "EQ",
                                    "value": {"default_value": 403, "runtime_key": "unused"},
                                }
                            }
                        },
                        {
                            "header_filter": {
                                "header": {
                                    "name": ":path",
                                    "string_match": {"safe_regex": {"regex": _NON_ASCII_ESCAPE}},
                                }
                            }
                        },
                    ]
                }
            },
            "status_code": 400,
            "body": {"inline_string": _BAD_PATH_BODY},
            "headers_to_add": [
                {
                    "header": {"key": name, "value": value},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
                for name, value in SECURITY_HEADERS
            ],
            "body_format_override": {
                "text_format": "%LOCAL_REPLY_BODY%",
                "content_type": "application/json",
            },
        }
    ]
}


class _Server(PyvoyServer):
    def __init__(
        self, *args: Any, tls: bool, admin: AdminListener | None = None, **kwargs: Any
    ) -> None:
        self._admin_listener = admin
        super().__init__(*args, **kwargs)
        self._tls = tls

    def get_envoy_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_envoy_config()
        listeners: list[dict[str, Any]] = config["static_resources"]["listeners"]
        if self._tls:
            # pyvoy puts TLS on its one `port` listener when no tls_port is given.
            # Refuse to start if an upgrade ever adds a plaintext or QUIC listener.
            chains = [chain for listener in listeners for chain in listener["filter_chains"]]
            if len(listeners) != 1 or any("transport_socket" not in c for c in chains):
                names = [listener["name"] for listener in listeners]
                raise RuntimeError(f"expected one TLS-only Envoy listener, got {names}")
        for listener in listeners:
            for manager in _managers(listener):
                manager["use_remote_address"] = True
                manager["skip_xff_append"] = True
                manager["max_request_headers_kb"] = MAX_REQUEST_HEADERS_KB
                manager["http_filters"].insert(0, copy.deepcopy(_PATH_GUARD))
                manager["local_reply_config"] = copy.deepcopy(_PATH_GUARD_REPLY)
        if self._admin_listener is not None:
            listeners.append(_admin_listener(listeners[0], self._admin_listener))
        return config


def _managers(listener: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        network_filter["typed_config"]
        for chain in listener.get("filter_chains", [])
        for network_filter in chain.get("filters", [])
        if network_filter["name"] == _HTTP_CONNECTION_MANAGER
    ]


def _admin_listener(public: dict[str, Any], admin: AdminListener) -> dict[str, Any]:
    """A copy of the public listener, plaintext, on the admin address, serving `admin.app`."""
    listener = copy.deepcopy(public)
    listener["name"] = ADMIN_LISTENER
    listener["address"] = {"socket_address": {"address": admin.host, "port_value": admin.port}}
    for chain in listener["filter_chains"]:
        chain.pop("transport_socket", None)
    for manager in _managers(listener):
        manager["stat_prefix"] = "admin_http"
        for http_filter in manager["http_filters"]:
            if http_filter["name"] == "pyvoy":
                holder = http_filter["typed_config"]["filter_config"]
                settings = json.loads(holder["value"])
                settings["app"] = admin.app
                holder["value"] = json.dumps(settings)
    return listener


def _listener_port(server: PyvoyServer, name: str) -> int:
    listeners = json.loads(_admin(server, "/listeners?format=json"))
    for status in listeners["listener_statuses"]:
        if status["name"] == name:
            port: int = status["local_address"]["socket_address"]["port_value"]
            return port
    raise RuntimeError(f"Envoy has no listener {name!r}")


def _admin(server: PyvoyServer, path: str, method: str = "GET") -> str:
    # pyvoy exposes Envoy's admin address only as a private attribute.
    address = server._admin_address
    request = urllib.request.Request(f"http://{address}{path}", method=method)
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        body: bytes = response.read()
    return body.decode()


def _active_requests(server: PyvoyServer) -> int:
    stats = _admin(server, "/stats?filter=^http\\.ingress_http\\.downstream_rq_active$").strip()
    return int(stats.rsplit(" ", 1)[-1]) if stats else 0


async def _drain(server: PyvoyServer, seconds: float) -> None:
    try:
        await asyncio.to_thread(_admin, server, "/drain_listeners?graceful", "POST")
        deadline = time.monotonic() + seconds
        # Envoy keeps accepting during its drain period (--drain-time-s) while it
        # tells clients to go away (Connection: close, GOAWAY); stopping before it
        # ends would reset connections that were just accepted.
        await asyncio.sleep(min(ENVOY_DRAIN_TIME_S + 0.25, seconds))
        while time.monotonic() < deadline:
            if await asyncio.to_thread(_active_requests, server) == 0:
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
    shutdown_marker: Path | None = None,
    ready_grace_seconds: float = 1.0,
) -> int:
    """Serve `app` ("module:attr") until SIGTERM/SIGINT; returns the exit code.

    The Envoy process inherits this process's environment; `env` adds to it.
    On SIGTERM/SIGINT: `shutdown_marker` is created (readiness turns false), the
    listeners stop accepting after `ready_grace_seconds`, in-flight calls get up
    to `drain_seconds`, then Envoy stops (the app checkpoints and closes its
    database on the way out).
    With `tls_cert_file` and `tls_key_file` (PEM; the certificate file may hold
    the chain) the port serves HTTPS only.
    """
    if (tls_cert_file is None) != (tls_key_file is None):
        raise ValueError("give both tls_cert_file and tls_key_file, or neither")
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
    server = _Server(
        app,
        address=host,
        port=port,
        env=dict(env or {}),
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
        admin=admin,
        **tls,
    )
    await server.start()
    scheme = "https" if tls else "http"
    log.info(
        "serving",
        extra={
            "address": f"{scheme}://{host}:{server.listener_port}",
            "port": server.listener_port,
            "protocols": "connect,grpc-web,grpc "
            + ("(HTTPS: HTTP/2 and HTTP/1.1 by ALPN)" if tls else "(HTTP/1.1 and h2c)"),
        },
    )
    if admin is not None:
        admin_port = await asyncio.to_thread(_listener_port, server, ADMIN_LISTENER)
        log.info(
            "admin",
            extra={"address": f"http://{admin.host}:{admin_port}", "admin_port": admin_port},
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(server.wait())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if waiter in done:
        stopper.cancel()
        log.error("the server process exited unexpectedly")
        return 1
    log.info("shutting down", extra={"drain_seconds": drain_seconds})
    if shutdown_marker is not None:
        await asyncio.to_thread(shutdown_marker.touch)
        await asyncio.sleep(ready_grace_seconds)  # let load balancers see not-ready
    await _drain(server, drain_seconds)
    await server.stop()
    waiter.cancel()
    log.info("stopped")
    return 0
