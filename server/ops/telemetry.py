"""OpenTelemetry traces and metrics, configured by the standard OTEL_* variables.

Off by default, at zero cost: without OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER
or OTEL_EXPORTER_OTLP_ENDPOINT (or with OTEL_SDK_DISABLED=true) no SDK is set up
and no interceptor is added (an unconfigured connectrpc-otel interceptor would
still cost time on every call). When on, `connectrpc-otel` records a span per call
(propagating W3C trace context) and the `rpc.server.call.duration` histogram.
Exporters: `otlp` (the default; endpoint, headers and protocol from the usual
OTEL_EXPORTER_OTLP_* variables) or `console`, or `none`. The SDK is imported only
when telemetry is on, so that servers without it do not hold it in memory
(figures in docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

log = logging.getLogger("expense_auth.telemetry")

if TYPE_CHECKING:
    from connectrpc_otel import OpenTelemetryInterceptor
    from opentelemetry.sdk.metrics.export import MetricExporter
    from opentelemetry.sdk.trace.export import SpanExporter

SERVICE_NAME = "expense-auth"


def enabled(environ: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables ask for telemetry."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return any(
        environ.get(name)
        for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def _span_exporter(name: str) -> SpanExporter | None:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        return OTLPSpanExporter()
    return None


def _metric_exporter(name: str) -> MetricExporter | None:
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

    if name == "console":
        return ConsoleMetricExporter()
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter,
        )

        return OTLPMetricExporter()
    return None


def interceptor(environ: Mapping[str, str] | None = None) -> OpenTelemetryInterceptor | None:
    """The telemetry interceptor with its SDK set up, or None when telemetry is off."""
    env = os.environ if environ is None else environ
    if not enabled(env):
        log.info("telemetry off", extra={"telemetry": "off"})
        return None
    log.info("telemetry on", extra={"telemetry": "on"})
    from connectrpc_otel import OpenTelemetryInterceptor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", SERVICE_NAME)})
    tracer_provider = TracerProvider(resource=resource)
    span_exporter = _span_exporter(env.get("OTEL_TRACES_EXPORTER", "otlp"))
    if span_exporter is not None:
        processor = (
            SimpleSpanProcessor(span_exporter)
            if isinstance(span_exporter, ConsoleSpanExporter)
            else BatchSpanProcessor(span_exporter)
        )
        tracer_provider.add_span_processor(processor)
    readers = []
    metric_exporter = _metric_exporter(env.get("OTEL_METRICS_EXPORTER", "otlp"))
    if metric_exporter is not None:
        readers.append(PeriodicExportingMetricReader(metric_exporter))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return OpenTelemetryInterceptor(tracer_provider=tracer_provider, meter_provider=meter_provider)
