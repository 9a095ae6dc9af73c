"""The domain's errors: each carries what a client needs to fix the problem.

The transport maps these to Connect codes in one place (server/rpc/errors.py);
anything else that escapes a handler is a bug and becomes `internal`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.domain.models import Identity


class DomainError(Exception):
    """Base of every error the domain raises on purpose.

    Attributes:
        message: A sentence for the client. It may quote the bad value, never internals.
        reason: A short machine-readable reason for logs and the audit log, such as
            `expired`; by default the error's kind (`permission_denied`).
    """

    default_reason = "error"

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class InvalidArgument(DomainError):
    """A request field has a bad value.

    Attributes:
        field: The request field, as a proto field path such as `user.time_zone`.
    """

    default_reason = "invalid_argument"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Unauthenticated(DomainError):
    """The caller has no valid credential (session cookie or ID token).

    Attributes:
        reason: A short machine-readable reason for logs, such as `session_expired`.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)


class InvalidIdToken(Unauthenticated):
    """A Google ID token failed verification (signature, audience, issuer, time...)."""


class PermissionDenied(DomainError):
    """The caller is known but not allowed to do this."""

    default_reason = "permission_denied"


class EmailNotVerified(PermissionDenied):
    """A valid ID token whose account's email is unverified, where that is required.

    Attributes:
        identity: The verified identity (so the refusal can be put on its record).
    """

    def __init__(self, message: str, *, identity: Identity) -> None:
        super().__init__(message, reason="email_not_verified")
        self.identity = identity


class NotFound(DomainError):
    """The named thing does not exist, or is not the caller's to see."""

    default_reason = "not_found"


class FailedPrecondition(DomainError):
    """The thing exists but is not in a state that allows this (yet)."""

    default_reason = "failed_precondition"


class Unavailable(DomainError):
    """A dependency is down or busy; the client may retry later.

    Attributes:
        retry_after_s: When to retry, in seconds (sent as Retry-After), if known.
    """

    default_reason = "unavailable"

    def __init__(self, message: str, *, reason: str = "", retry_after_s: int | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_s = retry_after_s


class RateLimited(DomainError):
    """The caller sent too many requests; they may retry after `retry_after_s`."""

    default_reason = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
