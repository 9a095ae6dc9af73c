"""The port through which unexpected errors reach an error tracker.

The error boundary, the forward-auth check and the job runner call a `Report`
for each error that is not one of the domain's expected ones (a bug, or a
dependency failing in a way the code does not know). `create_app` passes the
error tracker's (server/ops/error_tracking.py) when SENTRY_DSN is set, and none
otherwise: this module imports nothing, so callers cost nothing without a tracker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Report(Protocol):
    """Sends one unexpected error, with tags that let an operator find its log line."""

    def __call__(self, error: BaseException, *, tags: Mapping[str, str]) -> None:
        """Report `error` (never raises; a tracker that is down loses the report)."""
        ...
