"""A redis-server of the test's own, on a free port (never the machine's shared one).

Used for the rate limits shared by replicas (RATE_LIMIT_STORAGE_URL=redis://...):
the fault tests kill and stop it, the replica tests share it between servers.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.ports import free_port

START_TIMEOUT_S = 10.0


class RedisServer:
    """redis-server without persistence, on 127.0.0.1 and a port of its own.

    `binary` is the path of redis-server (callers decide how a missing one is
    reported). `start` may be called again after `kill`: the same port is reused.
    """

    def __init__(self, tmp: Path, *, binary: str) -> None:
        self.binary = binary
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
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.05)
        return self

    def answers(self) -> bool:
        """Whether it answers PING right now."""
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
        ):
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        return False

    def kill(self) -> None:
        """SIGKILL, and wait."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal (SIGSTOP, SIGCONT...)."""
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self) -> None:
        """Gone for good (resumed first if it was stopped)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()

    @property
    def url(self) -> str:
        """RATE_LIMIT_STORAGE_URL for it."""
        return f"redis://127.0.0.1:{self.port}"


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[RedisServer]:
    """A running redis-server for the block (a missing binary fails in CI, skips outside)."""
    from tests.conftest import require_tool

    server = RedisServer(tmp, binary=require_tool("redis-server", "redis-server")).start()
    try:
        yield server
    finally:
        server.stop()
