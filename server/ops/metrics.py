"""Prometheus metrics, served at `/metrics` on the admin listener.

Counters and histograms are updated where things happen (the metrics
interceptor, the store, the limiter, the cookie signer); gauges that need the
database are refreshed when scraped. The operational gauges (readiness checks,
dependencies, last backup, session lifetime, and the process collector's start
time) exist for the alert rules in deploy/prometheus.

With several workers (`serve --workers N`) every worker writes its values to
files in PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, set up
by the supervisor), and whichever worker is scraped answers for all of them:
counters and histograms are summed, gauges show the most recent value of a live
worker. So a scrape is never one worker's fragment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import Scope

from server.domain.errors import Unavailable
from server.edge.router import PlainResponse

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A gauge in multiprocess mode: the most recent value written by a live worker.
LATEST: Literal["livemostrecent"] = "livemostrecent"


class Metrics:
    """The service's metrics in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._exposition = self.registry
        if os.environ.get(MULTIPROC_ENV):
            self._exposition = CollectorRegistry()
            MultiProcessCollector(self._exposition)  # type: ignore[no-untyped-call]
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
        self.cookie_old_key = Counter(
            "expense_auth_cookie_old_key_verifications",
            "Session cookies verified with a key other than the newest (rotation progress).",
            registry=self.registry,
        )
        self.storage_errors = Counter(
            "expense_auth_storage_errors",
            "Store calls that failed because of the database, by kind (busy, disk_full, "
            "read_only, io, damaged, error).",
            ["kind"],
            registry=self.registry,
        )
        self.rate_limit_storage_errors = Counter(
            "expense_auth_rate_limit_storage_errors",
            "Rate-limit calls that the shared storage (Redis) failed or did not answer in "
            "time; each fell back to this process's own counts or passed.",
            registry=self.registry,
        )
        self.forward_auth_checks = Counter(
            "expense_auth_forward_auth_checks",
            "Forward-auth checks answered to gateways, by result (ok or the error code).",
            ["result"],
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "expense_auth_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered (a 2xx), failed (to be retried) "
            "or parked (failed past WEBHOOK_RETRY_FOR_SECONDS).",
            ["outcome"],
            registry=self.registry,
        )
        # process_start_time_seconds: the key-rotation alert compares the uptime with
        # the session lifetime (a restart is when a new key list takes effect). With
        # workers, the scraped worker's own (they start together).
        ProcessCollector(registry=self._exposition)
        self.readiness = Gauge(
            "expense_auth_readiness_check",
            "1 when the readiness check passes, 0 when it fails (the checks of /readyz).",
            ["check"],
            registry=self.registry,
            multiprocess_mode=LATEST,
        )
        self.dependency_up = Gauge(
            "expense_auth_dependency_up",
            "1 when a dependency that does not gate readiness works (identity_keys: keys to "
            "verify Google ID tokens; rate_limit_storage: the shared limit counters), else 0.",
            ["dependency"],
            registry=self.registry,
            multiprocess_mode=LATEST,
        )
        self.last_backup = Gauge(
            "expense_auth_backup_last_success_timestamp_seconds",
            "Unix time of the last verified backup (scheduled or `expense-auth backup`); "
            "0 when none was ever recorded.",
            registry=self.registry,
            multiprocess_mode=LATEST,
        )
        self.session_max_age = Gauge(
            "expense_auth_session_max_age_seconds",
            "SESSION_MAX_AGE_SECONDS: after this long, no cookie signed by an old key is live.",
            registry=self.registry,
            multiprocess_mode=LATEST,
        )
        self.active_sessions = Gauge(
            "expense_auth_active_sessions",
            "Sessions that are live now (NaN when the database cannot say).",
            registry=self.registry,
            multiprocess_mode=LATEST,
        )
        self.webhook_events = Gauge(
            "expense_auth_webhook_events",
            "Webhook events in the outbox by state: pending (to be delivered) or parked "
            "(an operator must redeliver them); NaN when the database cannot say.",
            ["state"],
            registry=self.registry,
            multiprocess_mode=LATEST,
        )
        self._before_scrape: list[Callable[[], Awaitable[None]]] = []

    def track_active_sessions(self, count: Callable[[], Awaitable[int]]) -> None:
        """Refresh the live-sessions gauge from `count` at each scrape."""

        async def refresh() -> None:
            try:
                self.active_sessions.set(await count())
            except Unavailable:
                self.active_sessions.set(math.nan)

        self._before_scrape.append(refresh)

    def track_webhook_events(self, counts: Callable[[], Awaitable[Mapping[str, int]]]) -> None:
        """Refresh the outbox gauge from `counts` (events per state) at each scrape."""

        async def refresh() -> None:
            try:
                for state, n in (await counts()).items():
                    self.webhook_events.labels(state).set(n)
            except Unavailable:
                for state in ("pending", "parked"):
                    self.webhook_events.labels(state).set(math.nan)

        self._before_scrape.append(refresh)

    def track_readiness(
        self,
        checks: Callable[[], Awaitable[Mapping[str, str]]],
        dependencies: Callable[[], Awaitable[Mapping[str, str]]],
    ) -> None:
        """Refresh the readiness and dependency gauges (as /readyz reports them) at each
        scrape."""

        async def refresh() -> None:
            for check, result in (await checks()).items():
                self.readiness.labels(check).set(1 if result == "ok" else 0)
            for dependency, state in (await dependencies()).items():
                self.dependency_up.labels(dependency).set(1 if state == "ok" else 0)

        self._before_scrape.append(refresh)

    def track(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """Run `refresh` before each scrape (it sets a gauge)."""
        self._before_scrape.append(refresh)

    async def endpoint(self, scope: Scope) -> PlainResponse:
        """The `/metrics` answer."""
        for refresh in self._before_scrape:
            await refresh()
        return PlainResponse(
            status=200, body=generate_latest(self._exposition), content_type=CONTENT_TYPE
        )
