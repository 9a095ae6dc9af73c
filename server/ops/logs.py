"""Logging set-up: one structured line per event.

Production writes one JSON object per line; development writes `key=value`
pairs for people. Both escape CR, LF and control characters (JSON string rules),
so a client-supplied value cannot forge a log line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

# Set by `expense-auth serve --workers N` in each worker ("2/4"); every line that
# worker logs carries it as `worker`.
WORKER_ENV = "EXPENSE_AUTH_WORKER"

_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JSONFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON, with its extra fields at the top level."""
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """`time level logger message key=value ...` with values quoted when needed."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one human-readable line (plus a traceback, if any)."""
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [stamp, record.levelname.lower(), record.name, _quote(record.getMessage())]
        parts += [f"{k}={_quote(v)}" for k, v in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quote(value: Any) -> str:
    text = str(value)
    if text and text.isprintable() and " " not in text and '"' not in text and "=" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


class _Tag(logging.Filter):
    """Adds `worker` to every record."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self._worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        """Tag the record; never drop it."""
        record.worker = self._worker
        return True


def configure(*, production: bool, level: str) -> None:
    """Send all logs to stderr in the format for the environment."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if production else KeyValueFormatter())
    worker = os.environ.get(WORKER_ENV)
    if worker:
        handler.addFilter(_Tag(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
