"""RPC metrics: duration by procedure and code, sign-ins by result, rate-limit refusals."""

from __future__ import annotations

import time
from typing import Any

from connectrpc.code import Code
from connectrpc.request import RequestContext
from prometheus_client import Histogram

from server.ops.metrics import Metrics
from server.rpc.context import SIGN_IN, procedure_of
from server.rpc.errors import code_of


class MetricsRecorder:
    """Observes every call once, at its end."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # prometheus_client's labels() takes a lock and builds a key on every
        # call; the few (procedure, code) children are looked up once here.
        self._durations: dict[tuple[str, str], Histogram] = {}

    async def on_start(self, ctx: RequestContext[Any, Any]) -> float:
        """Start the timer."""
        return time.perf_counter()

    async def on_end(
        self, started: float, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        """Record the call."""
        procedure = procedure_of(ctx)
        code = code_of(error)
        label = "ok" if code is None else code.value
        duration = self._durations.get((procedure, label))
        if duration is None:
            duration = self._metrics.rpc_duration.labels(procedure, label)
            self._durations[procedure, label] = duration
        duration.observe(time.perf_counter() - started)
        if procedure == SIGN_IN:
            self._metrics.sign_ins.labels(label).inc()
        if code is Code.RESOURCE_EXHAUSTED:
            self._metrics.rate_limited.labels(procedure).inc()
