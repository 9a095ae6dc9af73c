"""What each asyncpg error means to clients: a store failure (`unavailable`), or our bug."""

from __future__ import annotations

import asyncpg
import pytest

from server.storage.postgres.failures import classify

CASES: list[tuple[str, BaseException, str | None]] = [
    ("refused", ConnectionRefusedError(111, "Connection refused"), "io"),
    ("closed under us", asyncpg.exceptions.ConnectionDoesNotExistError("closed"), "io"),
    ("shutting down", asyncpg.exceptions.CannotConnectNowError("shutting down"), "io"),
    (
        # Seen when PostgreSQL shut down while the pool reset a connection given back.
        "protocol out of step",
        asyncpg.exceptions.InternalClientError(
            "cannot switch to state 15; another operation (2) is in progress"
        ),
        "io",
    ),
    ("statement timeout", asyncpg.exceptions.QueryCanceledError("canceling statement"), "busy"),
    ("our bug", ValueError("not a database error"), None),
]


@pytest.mark.parametrize(
    ("error", "kind"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_asyncpg_errors_are_classified(error: BaseException, kind: str | None) -> None:
    failure = classify(error)
    assert (failure.kind if failure is not None else None) == kind
