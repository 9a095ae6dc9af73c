"""A redis-server of the test's own, on a free port (never the machine's shared one)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import require_tool

START_TIMEOUT_S = 10


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class RedisServer:
    """One redis-server process: no persistence, bound to 127.0.0.1."""

    def __init__(self, tmp: Path) -> None:
        self.binary = require_tool("redis-server", "redis-server")
        self.port = free_port()
        self.dir = tmp
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start it and wait until it answers PING."""
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            assert self.process.poll() is None, "redis-server exited while starting"
            assert time.monotonic() < deadline, f"redis-server silent for {START_TIMEOUT_S} s"
            time.sleep(0.02)
        return self

    def answers(self) -> bool:
        """Whether it answers PING now."""
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
        ):
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        return False

    def kill(self) -> None:
        """SIGKILL, and wait for it."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def signal(self, sig: signal.Signals) -> None:
        """Send it a signal (SIGSTOP freezes it)."""
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self) -> None:
        """Gone, whatever state it was in."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()

    @property
    def url(self) -> str:
        """Its RATE_LIMIT_STORAGE_URL."""
        return f"redis://127.0.0.1:{self.port}"


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[RedisServer]:
    """A running redis-server for the block."""
    server = RedisServer(tmp).start()
    try:
        yield server
    finally:
        server.stop()
