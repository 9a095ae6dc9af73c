"""The one mapping from domain errors to Connect errors."""

from __future__ import annotations

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from server.domain.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)

_CODES: tuple[tuple[type[DomainError], Code], ...] = (
    (InvalidArgument, Code.INVALID_ARGUMENT),
    (Unauthenticated, Code.UNAUTHENTICATED),
    (PermissionDenied, Code.PERMISSION_DENIED),
    (NotFound, Code.NOT_FOUND),
    (FailedPrecondition, Code.FAILED_PRECONDITION),
    (Unavailable, Code.UNAVAILABLE),
    (RateLimited, Code.RESOURCE_EXHAUSTED),
)

INTERNAL_MESSAGE = "internal error; it has been logged with this request's x-request-id"


_COMPRESSED_WITHOUT_ENCODING = "sent compressed message without compression support"


def client_fault(error: ConnectError) -> ConnectError | None:
    """A replacement for a transport error that connectrpc reports as `internal` although
    the client caused it (gRPC's spec says `internal`; for our callers it is bad input)."""
    if error.code is Code.INTERNAL and _COMPRESSED_WITHOUT_ENCODING in error.message:
        return ConnectError(
            Code.INVALID_ARGUMENT,
            "the message is flagged as compressed but no grpc-encoding was sent",
        )
    return None


def code_of(error: BaseException | None) -> Code | None:
    """The Connect code a client will see for `error` (None for success)."""
    if error is None:
        return None
    if isinstance(error, ConnectError):
        return (client_fault(error) or error).code
    if isinstance(error, DomainError):
        for kind, code in _CODES:
            if isinstance(error, kind):
                return code
    return Code.INTERNAL


def to_connect_error(error: DomainError) -> ConnectError:
    """The Connect error for a domain error, carrying its message."""
    code = code_of(error)
    assert code is not None
    return ConnectError(code, error.message)
