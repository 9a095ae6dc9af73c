"""Prometheus metrics, served at `/metrics` on the admin listener.

Counters and histograms are updated on the request path by the metrics
interceptor; gauges that need the database are computed when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import Scope

from server.edge.router import PlainResponse

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ScrapeTime(Collector):
    """Values read at scrape time: live sessions and cookie verifications by old keys."""

    def __init__(
        self, *, live_sessions: Callable[[], int], old_key_verifications: Callable[[], int]
    ) -> None:
        self._live_sessions = live_sessions
        self._old_key = old_key_verifications

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Produce the metrics."""
        yield GaugeMetricFamily(
            "expense_auth_active_sessions",
            "Sessions that are live now.",
            value=self._live_sessions(),
        )
        yield CounterMetricFamily(
            "expense_auth_cookie_old_key_verifications",
            "Session cookies verified with a key other than the newest (rotation progress).",
            value=self._old_key(),
        )


class Metrics:
    """The service's metrics in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpc_duration = Histogram(
            "expense_auth_rpc_duration_seconds",
            "Duration of RPCs by procedure and result code.",
            ["procedure", "code"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
        )
        self.sign_ins = Counter(
            "expense_auth_sign_ins",
            "Sign-in attempts by result code.",
            ["result"],
            registry=self.registry,
        )
        self.readiness_checks = Counter(
            "expense_auth_readiness_checks",
            "Readiness computations (database probe and key check), shared by every probe.",
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "expense_auth_rate_limited",
            "Calls refused by a rate limit, by procedure.",
            ["procedure"],
            registry=self.registry,
        )

    def add_scrape_time(self, collector: ScrapeTime) -> None:
        """Register values computed when scraped."""
        self.registry.register(collector)

    async def endpoint(self, scope: Scope) -> PlainResponse:
        """The `/metrics` answer."""
        return PlainResponse(
            status=200, body=generate_latest(self.registry), content_type=CONTENT_TYPE
        )
