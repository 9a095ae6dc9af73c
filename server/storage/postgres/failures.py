"""What a PostgreSQL (or connection) error means: one of the store failures."""

from __future__ import annotations

from urllib.parse import urlsplit

import asyncpg

from server.storage.failures import BUSY, UNREACHABLE, DatabaseUnreachable, Failure

# Errors that mean: try the transaction again (another one won a race).
RETRYABLE = (asyncpg.exceptions.SerializationError, asyncpg.exceptions.DeadlockDetectedError)


def classify(exc: BaseException) -> Failure | None:
    """The failure `exc` means, or None when it is not the database's (our own bug)."""
    if isinstance(exc, TimeoutError | OSError | asyncpg.exceptions.InterfaceError):
        return UNREACHABLE  # no connection in time, refused, reset, closed under us
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # asyncpg's protocol out of step with a connection the server is closing: seen
        # when PostgreSQL shut down while the pool reset a connection it was given
        # back ("cannot switch to state 15; another operation (2) is in progress");
        # the pool drops that connection.
        return UNREACHABLE
    if isinstance(exc, (asyncpg.exceptions.QueryCanceledError, *RETRYABLE)):
        return BUSY  # statement_timeout: a lock or the server held the call too long
    if isinstance(exc, asyncpg.exceptions.LockNotAvailableError):
        return BUSY
    if isinstance(exc, asyncpg.exceptions.DiskFullError):
        return Failure(
            "disk_full",
            "the server's disk is full, so nothing can be saved; try again later",
            30,
        )
    if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
        return Failure(
            "read_only",
            "the server's database cannot be written right now; try again later",
            10,
            reconnect=True,
        )
    if isinstance(exc, asyncpg.exceptions.PostgresError):
        sqlstate = getattr(exc, "sqlstate", "") or ""
        # 08: connection exception; 53: insufficient resources; 57: operator
        # intervention (shutdown, restart, cannot connect now); 58: system error.
        if sqlstate[:2] in ("08", "53", "57", "58"):
            return UNREACHABLE
        if sqlstate[:2] == "XX":
            return Failure(
                "damaged",
                "the server's database reports damaged data; try again later",
                60,
            )
    return None


# What a connection attempt raises when the server is not there or refuses us: refused,
# unresolvable, TLS failures (ssl.SSLError is an OSError), timeouts, authentication,
# a database that does not exist.
CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def where(url: str) -> str:
    """host:port/database of a URL, never its password (for messages)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    return f"{host}:{parts.port or 5432}{parts.path or '/'}"


async def connect(url: str, *, timeout_s: float) -> asyncpg.Connection:
    """One connection for a command (migrate, backup, the serving lock...).

    Raises:
        DatabaseUnreachable: It could not be made; the message says where and why.
    """
    try:
        return await asyncpg.connect(url, timeout=timeout_s)
    except CONNECT_ERRORS as exc:
        reason = str(exc) or type(exc).__name__
        raise DatabaseUnreachable(
            f"cannot connect to the PostgreSQL database at {where(url)} (DATABASE_URL): {reason}"
        ) from None
