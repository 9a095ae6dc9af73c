"""grpc.health.v1.Health: the standard health protocol for load balancers and grpcurl.

It reports the same readiness as `/readyz`: NOT_SERVING once shutdown begins or
when the database or the ID-token keys are unavailable.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from gen.grpc.health.v1 import health_connect
from gen.grpc.health.v1.health_pb import HealthCheckRequest, HealthCheckResponse
from server.readiness import Readiness

ServingStatus = HealthCheckResponse.ServingStatus
WATCH_INTERVAL_S = 1.0


class HealthService(health_connect.Health):
    """Implements the generated `Health` protocol for the server and its services."""

    def __init__(self, readiness: Readiness, *, services: Collection[str]) -> None:
        self._readiness = readiness
        self._services = frozenset(services) | {""}

    async def _status(self, service: str) -> HealthCheckResponse.ServingStatus:
        if service not in self._services:
            return ServingStatus.SERVICE_UNKNOWN
        return ServingStatus.SERVING if await self._readiness.ready() else ServingStatus.NOT_SERVING

    async def check(
        self,
        request: HealthCheckRequest,
        ctx: RequestContext[HealthCheckRequest, HealthCheckResponse],
    ) -> HealthCheckResponse:
        """The status now; `not_found` for a service this server does not have."""
        status = await self._status(request.service)
        if status == ServingStatus.SERVICE_UNKNOWN:
            raise ConnectError(Code.NOT_FOUND, f"unknown service {request.service[:100]!r}")
        return HealthCheckResponse(status=status)

    async def watch(
        self,
        request: HealthCheckRequest,
        ctx: RequestContext[HealthCheckRequest, HealthCheckResponse],
    ) -> AsyncIterator[HealthCheckResponse]:
        """The status now, then each change, until the client goes away."""
        last = await self._status(request.service)
        yield HealthCheckResponse(status=last)
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            status = await self._status(request.service)
            if status != last:
                last = status
                yield HealthCheckResponse(status=status)
