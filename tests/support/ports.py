"""Free TCP ports on the loopback interface, for servers the tests start themselves."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on right now (the kernel's pick for an ephemeral bind)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
