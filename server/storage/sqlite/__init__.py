"""The SQLite engine: the store, its connection settings and its schema."""

from __future__ import annotations

from server.storage.failures import SchemaTooNew
from server.storage.rows import shorten_ip
from server.storage.sqlite.connection import (
    BUSY_TIMEOUT_MS,
    check_integrity,
    check_schema,
    connect,
    migrate,
)
from server.storage.sqlite.store import SQLiteStore

__all__ = [
    "BUSY_TIMEOUT_MS",
    "SQLiteStore",
    "SchemaTooNew",
    "check_integrity",
    "check_schema",
    "connect",
    "migrate",
    "shorten_ip",
]
