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
import logging
import signal
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyvoy import PyvoyServer

log = logging.getLogger("expense_auth.serve")

DRAIN_SECONDS = 10.0

# The cap on all of one request's headers together, cookies included, in KiB
# (Envoy's `max_request_headers_kb`; its default is 60). Our own largest header
# is the session cookie (~80 bytes; ID tokens travel in bodies), so 16 KiB leaves
# browsers ample room while bounding what an anonymous client can make Envoy
# buffer and parse. Beyond it Envoy answers 431 on HTTP/1.1 and resets the
# stream (INTERNAL_ERROR) on HTTP/2; the app never sees the request.
MAX_REQUEST_HEADERS_KB = 16

_HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"


class _Server(PyvoyServer):
    def __init__(self, *args: Any, tls: bool, **kwargs: Any) -> None:
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
            for chain in listener.get("filter_chains", []):
                for network_filter in chain.get("filters", []):
                    if network_filter["name"] == _HTTP_CONNECTION_MANAGER:
                        manager = network_filter["typed_config"]
                        manager["use_remote_address"] = True
                        manager["skip_xff_append"] = True
                        manager["max_request_headers_kb"] = MAX_REQUEST_HEADERS_KB
        return config


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
        await asyncio.to_thread(_admin, server, "/drain_listeners?graceful&inbound_only", "POST")
        deadline = time.monotonic() + seconds
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
) -> int:
    """Serve `app` ("module:attr") until SIGTERM/SIGINT; returns the exit code.

    The Envoy process inherits this process's environment; `env` adds to it.
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
        additional_envoy_args=["--drain-time-s", "1", "--drain-strategy", "immediate"],
        tls=bool(tls),
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
    await _drain(server, drain_seconds)
    await server.stop()
    waiter.cancel()
    log.info("stopped")
    return 0
