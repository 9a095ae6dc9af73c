"""What a SQLite error means: one of the store failures of server/storage/failures.py."""

from __future__ import annotations

import sqlite3

from server.storage.failures import BUSY, Failure

# SQLite's primary result codes (the low byte of the extended code).
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB, _PERM = (
    5,
    6,
    8,
    10,
    11,
    13,
    14,
    26,
    3,
)


def classify(exc: sqlite3.Error) -> Failure:
    """The meaning of a SQLite error raised by a store call."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (_BUSY, _LOCKED):
        return BUSY
    if code == _FULL:
        return Failure(
            "disk_full",
            "the server's disk is full, so nothing can be saved; try again later",
            30,
        )
    if code == _READONLY:
        return Failure(
            "read_only",
            "the server's database cannot be written right now; try again later",
            10,
            reconnect=True,
        )
    if code in (_CORRUPT, _NOTADB):
        return Failure(
            "damaged",
            "the server's database is damaged and must be restored by an operator; try again later",
            60,
            reconnect=True,
            damaged=True,
        )
    if code in (_IOERR, _CANTOPEN, _PERM):
        return Failure(
            "io",
            "the server cannot read or write its database right now; try again later",
            10,
            reconnect=True,
        )
    return Failure("error", "the server's database failed; try again later", 5, reconnect=True)
