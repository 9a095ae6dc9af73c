"""grpc.health.v1.Health: the standard health protocol for load balancers and grpcurl.

It reports the same readiness as `/readyz`: NOT_SERVING once shutdown begins or
when the database or the ID-token keys are unavailable. Watch streams are held
open by clients, so they are capped: in all, and per client network.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Collection

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from gen.grpc.health.v1 import health_connect
from gen.grpc.health.v1.health_pb import HealthCheckRequest, HealthCheckResponse
from server.ops.readiness import Readiness
from server.rpc.context import client_network

ServingStatus = HealthCheckResponse.ServingStatus
# A load balancer needs one or two Watch streams per server; these leave room
# for many while bounding what clients can hold open.
MAX_WATCH_STREAMS = 100
MAX_WATCH_STREAMS_PER_CLIENT = 4


class HealthService(health_connect.Health):
    """Implements the generated `Health` protocol for the server and its services."""

    def __init__(self, readiness: Readiness, *, services: Collection[str]) -> None:
        self._readiness = readiness
        self._services = frozenset(services) | {""}
        self._watching: Counter[str] = Counter()

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
        client = client_network()
        if self._watching.total() >= MAX_WATCH_STREAMS:
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED,
                f"this server has {MAX_WATCH_STREAMS} Health/Watch streams open, its limit; "
                "use Health/Check, or retry later",
            )
        if self._watching[client] >= MAX_WATCH_STREAMS_PER_CLIENT:
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED,
                f"your network has {MAX_WATCH_STREAMS_PER_CLIENT} Health/Watch streams open, "
                "the limit per client; close one first",
            )
        self._watching[client] += 1
        try:
            status = await self._status(request.service)
            yield HealthCheckResponse(status=status)
            if status == ServingStatus.SERVICE_UNKNOWN:
                # The protocol keeps the stream open; nothing will change here.
                await asyncio.Event().wait()
            ready = status == ServingStatus.SERVING
            while True:
                ready = await self._readiness.wait_change(ready)
                yield HealthCheckResponse(
                    status=ServingStatus.SERVING if ready else ServingStatus.NOT_SERVING
                )
        finally:
            self._watching[client] -= 1
            if self._watching[client] <= 0:
                del self._watching[client]
