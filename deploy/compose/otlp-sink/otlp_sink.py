"""A stand-in for the OpenTelemetry Collector: receives OTLP over HTTP and logs it.

For hosts where no image registry is reachable, so no collector image can be pulled
(Debian has no collector package). It speaks the receiving half of OTLP/HTTP with
protobuf bodies, what the service's exporter sends: `POST /v1/traces`, `/v1/metrics`
and `/v1/logs` on port 4318, each answered with the empty Export*ServiceResponse, and
prints one JSON line per span, metric and log record (service name and instance, the
name), as the collector's `debug` exporter would. It keeps nothing and forwards
nothing. It runs in the expense-auth image, whose exporter brings the OTLP message
classes (`opentelemetry-proto`). Where a registry is reachable, compose.yaml runs the
real collector instead (OTEL_COLLECTOR_IMAGE, deploy/compose/otel-collector.yaml).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import sys
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

PORT = 4318
MAX_BODY = 16 * 1024 * 1024
ALL_INTERFACES = "0.0.0.0"  # noqa: S104  (inside its container: the port is published)


def _attributes(resource: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in resource.attributes}


def _spans(body: bytes) -> Iterator[tuple[dict[str, str], str]]:
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield resource, span.name


def _metrics(body: bytes) -> Iterator[tuple[dict[str, str], str]]:
    request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
    for resource_metrics in request.resource_metrics:
        resource = _attributes(resource_metrics.resource)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                yield resource, metric.name


def _logs(body: bytes) -> Iterator[tuple[dict[str, str], str]]:
    request = logs_service_pb2.ExportLogsServiceRequest.FromString(body)
    for resource_logs in request.resource_logs:
        resource = _attributes(resource_logs.resource)
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                yield resource, record.body.string_value


# Each path: what its items are, how to read them, and the (empty) response message.
SIGNALS: dict[str, tuple[str, Callable[[bytes], Iterator[tuple[dict[str, str], str]]], bytes]] = {
    "/v1/traces": (
        "span",
        _spans,
        trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
    ),
    "/v1/metrics": (
        "metric",
        _metrics,
        metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString(),
    ),
    "/v1/logs": ("log", _logs, logs_service_pb2.ExportLogsServiceResponse().SerializeToString()),
}


class Handler(BaseHTTPRequestHandler):
    """OTLP/HTTP with protobuf bodies, optionally gzip'd."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        signal = SIGNALS.get(self.path)
        if signal is None:
            self._answer(404, b"unknown path: use /v1/traces, /v1/metrics or /v1/logs")
            return
        kind, parse, response = signal
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY:
            self._answer(413, b"body too large")
            return
        body = self.rfile.read(length)
        try:
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            items = list(parse(body))
        except Exception as exc:  # a bad body is the sender's problem, not a crash
            self._answer(400, f"not an OTLP protobuf body: {exc}".encode())
            return
        for resource, name in items:
            line = {
                "signal": kind,
                "service": resource.get("service.name", ""),
                "instance": resource.get("service.instance.id", ""),
                "name": name,
            }
            print(json.dumps(line), flush=True)
        self._answer(200, response, "application/x-protobuf")

    def do_GET(self) -> None:
        # A liveness answer for health checks, as the collector's health_check extension.
        self._answer(200, b'{"status":"alive"}', "application/json")

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per item above is the log


def main() -> int:
    """Serve until stopped."""
    server = ThreadingHTTPServer((ALL_INTERFACES, PORT), Handler)
    print(f"otlp-sink: listening on :{PORT}", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
