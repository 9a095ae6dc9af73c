"""Fixtures shared by the operations tests: the admin credential and grpcurl."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Protocol

import pytest

from tests.conftest import require_tool
from tests.interop.tools import PROTO_DIR, VENV_BIN, run

# 40 bytes: ADMIN_TOKEN must have at least 32.
ADMIN_TOKEN = "a" * 40
AUTHORIZED = {"authorization": f"Bearer {ADMIN_TOKEN}"}

# grpcurl exits with 64 + the gRPC status code when the RPC fails.
GRPCURL_RPC_ERROR = 64


class Grpcurl(Protocol):
    """Runs grpcurl against one address (see the `grpcurl` fixture)."""

    def __call__(
        self, address: str, method: str, *, flags: Sequence[str] = (), proto: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """grpcurl's exit code, stdout (the response) and stderr (with the error as JSON)."""
        ...


@pytest.fixture(scope="session")
def grpcurl() -> Grpcurl:
    """`grpcurl -plaintext -format-error [flags] ADDRESS METHOD`, never raising on failure.

    With `proto`, the schema comes from that file under proto/ (the admin listener
    has no reflection); otherwise from the server's reflection.
    """
    tool = require_tool(str(VENV_BIN / "grpcurl"), "grpcurl")

    def call(
        address: str, method: str, *, flags: Sequence[str] = (), proto: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        schema = ["-import-path", str(PROTO_DIR), "-proto", proto] if proto else []
        return run([tool, "-plaintext", "-format-error", *schema, *flags, address, method])

    return call
