"""The baseline: a bare connectrpc echo on the same ASGI server (pyvoy) as the service.

`grpc.health.v1.Health/Check` with a trivial service, no interceptors and no
middleware, wrapped in the same `ReceiveAfterBodyFix` as server/runtime/asgi.py (pyvoy
needs it). Run with `expense-auth serve --app bench.echo_app:app`, so that the
Envoy configuration is exactly the service's.
"""

from __future__ import annotations

from connectrpc.request import RequestContext

from gen.grpc.health.v1.health_connect import Health, HealthASGIApplication
from gen.grpc.health.v1.health_pb import HealthCheckRequest, HealthCheckResponse
from server.runtime.receive_fix import ReceiveAfterBodyFix

_SERVING = HealthCheckResponse(status=HealthCheckResponse.ServingStatus.SERVING)


class EchoHealth(Health):
    """Answers SERVING to every Check: the least work a unary call can do."""

    async def check(
        self,
        request: HealthCheckRequest,
        ctx: RequestContext[HealthCheckRequest, HealthCheckResponse],
    ) -> HealthCheckResponse:
        """Always SERVING."""
        return _SERVING


app = ReceiveAfterBodyFix(HealthASGIApplication(EchoHealth()))
