"""Liveness and readiness, for load balancers and orchestrators.

`/healthz` says the process answers. `/readyz` (and grpc.health.v1) says it
should get traffic: the database is reachable, writable and migrated, keys to
verify ID tokens are at hand, and shutdown has not begun. Shutdown is signalled
by the serving process (which receives SIGTERM) through a marker file, because
the app runs in Envoy's process, where Python cannot install signal handlers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from server.router import PlainResponse
from server.storage.base import Store

# The environment variable through which `expense-auth serve` tells the app
# (in Envoy's process) where the shutdown marker file will appear.
SHUTDOWN_MARKER_ENV = "EXPENSE_AUTH_SHUTDOWN_MARKER"


class KeySource(Protocol):
    """Something that can tell whether ID-token keys are available."""

    async def keys_available(self) -> bool:
        """True when at least one issuer's keys are at hand."""
        ...


class Readiness:
    """Computes the readiness checks."""

    def __init__(self, store: Store, keys: KeySource, *, shutdown_marker: Path | None) -> None:
        self._store = store
        self._keys = keys
        self._marker = shutdown_marker

    @property
    def draining(self) -> bool:
        """Whether shutdown has begun."""
        return self._marker is not None and self._marker.exists()

    async def checks(self) -> dict[str, str]:
        """Each check's result: "ok" or what is wrong."""
        store_problem = await self._store.probe()
        return {
            "shutdown": "draining" if self.draining else "ok",
            "database": store_problem or "ok",
            "identity_keys": "ok" if await self._keys.keys_available() else "unavailable",
        }

    async def ready(self) -> bool:
        """Whether every check passes."""
        return all(v == "ok" for v in (await self.checks()).values())

    async def readyz(self) -> PlainResponse:
        """The `/readyz` answer: 200 when ready, 503 with the failing checks otherwise."""
        checks = await self.checks()
        ready = all(v == "ok" for v in checks.values())
        return PlainResponse.json(
            200 if ready else 503, {"status": "ready" if ready else "not_ready", "checks": checks}
        )


async def healthz() -> PlainResponse:
    """The `/healthz` answer: the process is alive."""
    return PlainResponse.json(200, {"status": "alive"})
