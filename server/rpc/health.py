"""grpc.health.v1.Health: the standard health protocol for load balancers and grpcurl."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from gen.grpc.health.v1 import health_connect
from gen.grpc.health.v1.health_pb import HealthCheckRequest, HealthCheckResponse

ServingStatus = HealthCheckResponse.ServingStatus


class HealthState:
    """Whether the server takes requests; flipped to not-serving when shutdown begins."""

    def __init__(self) -> None:
        self._serving = True
        self._changed = asyncio.Event()

    @property
    def serving(self) -> bool:
        """True until `set_serving(False)`."""
        return self._serving

    def set_serving(self, serving: bool) -> None:
        """Change the status and wake every watcher."""
        self._serving = serving
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        """Wait for the next change."""
        await self._changed.wait()


class HealthService(health_connect.Health):
    """Implements the generated `Health` protocol for the server and its services."""

    def __init__(self, state: HealthState, *, services: Collection[str]) -> None:
        self._state = state
        self._services = frozenset(services) | {""}

    def _status(self, service: str) -> HealthCheckResponse.ServingStatus:
        if service not in self._services:
            return ServingStatus.SERVICE_UNKNOWN
        return ServingStatus.SERVING if self._state.serving else ServingStatus.NOT_SERVING

    async def check(
        self,
        request: HealthCheckRequest,
        ctx: RequestContext[HealthCheckRequest, HealthCheckResponse],
    ) -> HealthCheckResponse:
        """The status now; `not_found` for a service this server does not have."""
        status = self._status(request.service)
        if status == ServingStatus.SERVICE_UNKNOWN:
            raise ConnectError(Code.NOT_FOUND, f"unknown service {request.service[:100]!r}")
        return HealthCheckResponse(status=status)

    async def watch(
        self,
        request: HealthCheckRequest,
        ctx: RequestContext[HealthCheckRequest, HealthCheckResponse],
    ) -> AsyncIterator[HealthCheckResponse]:
        """The status now, then each change, until the client goes away."""
        last = self._status(request.service)
        yield HealthCheckResponse(status=last)
        while True:
            await self._state.changed()
            status = self._status(request.service)
            if status != last:
                last = status
                yield HealthCheckResponse(status=status)
