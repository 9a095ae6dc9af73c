"""Error tracking with Sentry: unexpected errors and failed jobs, scrubbed, nothing else.

Imported by `create_app` only when SENTRY_DSN is set, so that a server without it
never loads the SDK. What is sent, and only that:

- Unexpected errors: those the error boundary answers as `internal` (and logs with
  a traceback), forward-auth checks that fail the same way, and anything escaping
  an application to the ASGI server. Each is tagged with the request id the client
  got in `X-Request-Id` and that the log line carries. Expected errors (invalid
  arguments, unauthenticated calls, rate limits, a dependency `unavailable` with
  Retry-After) are answers, not bugs: never sent.
- Failed background jobs (retention, scheduled backups), tagged with the job.

The SDK is set up to collect nothing by itself: no integrations (no logging
breadcrumbs, no HTTP or database instrumentation, no argv or module list), no
request data, cookies, headers or bodies, no local variables of stack frames, no
tracing, profiling, logs, metrics or sessions. Every payload then goes through the
scrubber (server/ops/scrub.py) before it leaves; a scrubber that fails drops the
event rather than send it unscrubbed (the SDK's own rule for `before_send`).
Events queued at shutdown are flushed (up to SENTRY_SHUTDOWN_TIMEOUT_SECONDS).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import TYPE_CHECKING

import sentry_sdk
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import Config
from server.ops.scrub import Scrubber

if TYPE_CHECKING:
    from sentry_sdk._types import DataCollectionUserOptions

log = logging.getLogger("expense_auth.error_tracking")

PACKAGE = "expense-auth"
# Everything the SDK could collect about a request or a frame, off: the events
# carry the exception, its stack (code, not data) and our tags. This is the SDK's
# successor to send_default_pii=False (deprecated in 2.x), and stricter.
DATA_COLLECTION: DataCollectionUserOptions = {
    "user_info": False,
    "cookies": {"mode": "off"},
    "http_headers": {"request": {"mode": "off"}},
    "http_bodies": [],
    "url_query_params": {"mode": "off"},
    "graphql": {"document": False, "variables": False},
    "gen_ai": {"inputs": False, "outputs": False},
    "database_query_data": False,
    "queues": False,
    "stack_frame_variables": False,
}
# Errors waiting for their event to be built (see ErrorTracker).
MAX_PENDING = 100
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class ErrorTracker:
    """Reports errors to Sentry from a thread of its own; flushes on shutdown.

    Building an event (reading the source lines around each frame, serializing,
    scrubbing) took ~10-20 ms here: not on the event loop, where a bug that every
    request meets would stall every call. At most MAX_PENDING errors wait to be
    built; beyond, they are dropped (and counted in the log) rather than piling up
    with their tracebacks, which keep their requests' objects alive.
    """

    def __init__(self, *, shutdown_timeout_s: float) -> None:
        self._shutdown_timeout_s = shutdown_timeout_s
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="error-tracking")
        self._lock = threading.Lock()
        self._pending = 0
        self._dropped = 0

    def report(self, error: BaseException, *, tags: Mapping[str, str]) -> None:
        """Queue one event for `error`; it is built and sent off the caller's thread."""
        with self._lock:
            if self._pending >= MAX_PENDING:
                self._dropped += 1
                return
            self._pending += 1
        self._builder.submit(self._capture, error, dict(tags))

    def _capture(self, error: BaseException, tags: dict[str, str]) -> None:
        try:
            sentry_sdk.capture_exception(error, tags=tags)
        finally:
            with self._lock:
                self._pending -= 1
                dropped, self._dropped = self._dropped, 0
            if dropped:
                log.warning("error reports dropped: too many at once", extra={"dropped": dropped})

    async def flush(self) -> None:
        """Build and send what is queued, waiting at most SENTRY_SHUTDOWN_TIMEOUT_SECONDS."""
        await asyncio.to_thread(self._flush)

    def _flush(self) -> None:
        deadline = time.monotonic() + self._shutdown_timeout_s
        with contextlib.suppress(FuturesTimeout):
            # Runs after every report submitted before it (one thread, in order).
            self._builder.submit(lambda: None).result(timeout=self._shutdown_timeout_s)
        sentry_sdk.flush(max(0.0, deadline - time.monotonic()))

    def around(self, app: ASGIApp, *, listener: str) -> ASGIApp:
        """`app`, reporting whatever escapes it (then letting it escape as before)."""
        return _ReportEscapes(app, self, listener=listener)


def start(config: Config, *, secrets: Iterable[str]) -> ErrorTracker:
    """Set up the SDK for the configuration's SENTRY_* settings.

    Args:
        config: With `sentry_dsn` set.
        secrets: Values that must never leave, wherever they appear (cookie keys,
            tokens, passwords).
    """
    assert config.sentry_dsn is not None
    scrubber = Scrubber(secrets)
    sentry_sdk.init(
        dsn=config.sentry_dsn.get_secret_value(),
        environment=config.sentry_environment or config.app_env,
        release=config.sentry_release or f"{PACKAGE}@{_version()}",
        sample_rate=config.sentry_sample_rate,
        shutdown_timeout=config.sentry_shutdown_timeout_seconds,
        default_integrations=False,
        auto_enabling_integrations=False,
        integrations=[],
        data_collection=DATA_COLLECTION,
        before_send=scrubber.event,
        before_send_transaction=scrubber.event,
        before_breadcrumb=scrubber.breadcrumb,
        max_request_body_size="never",
        traces_sample_rate=None,
        auto_session_tracking=False,
        enable_logs=False,
        enable_metrics=False,
        in_app_include=["server", "interceptors"],
    )
    log.info(
        "error tracking on",
        extra={
            "error_tracking": "sentry",
            "environment": config.sentry_environment or config.app_env,
            "sample_rate": config.sentry_sample_rate,
        },
    )
    return ErrorTracker(shutdown_timeout_s=config.sentry_shutdown_timeout_seconds)


def _version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _ReportEscapes:
    """The outermost layer of a listener's app: an exception no inner layer answered."""

    def __init__(self, app: ASGIApp, tracker: ErrorTracker, *, listener: str) -> None:
        self._app = app
        self._tracker = tracker
        self._listener = listener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        try:
            await self._app(scope, receive, send)
        except Exception as exc:
            tags = {"listener": self._listener, "scope": str(scope.get("type", ""))}
            incoming = _header(scope, b"x-request-id")
            if _SAFE_ID.fullmatch(incoming):
                tags["request_id"] = incoming
            self._tracker.report(exc, tags=tags)
            if scope.get("type") == "lifespan":
                # Start-up failed: no shutdown hook will run to flush it.
                await self._tracker.flush()
            raise


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return ""
