"""The domain's records: plain, immutable, free of any transport or storage type.

Times are integer milliseconds since the Unix epoch (UTC), as the clock gives them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def subject_hash(issuer: str, subject: str) -> str:
    """SHA-256 of an account's issuer and subject: identifies it without naming it."""
    return hashlib.sha256(f"{issuer}\n{subject}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    """A person as a verified ID token describes them.

    Users are keyed by (issuer, subject), never by email: an email address can
    move between accounts, a subject cannot. `token_hash` and `token_expire_ms`
    identify the token itself, so that it can be accepted only once.
    """

    issuer: str
    subject: str
    email: str
    email_verified: bool
    name: str
    picture: str
    locale: str
    nonce: str = ""
    token_hash: bytes = b""
    token_expire_ms: int = 0
    issued_ms: int = 0

    @property
    def subject_hash(self) -> str:
        """An anonymous, stable reference to the account (for tombstones)."""
        return subject_hash(self.issuer, self.subject)


@dataclass(frozen=True, slots=True)
class SingleUse:
    """A value that may be spent once, such as a sign-in nonce, until it expires.

    Attributes:
        key: A digest naming the value (never the value itself).
        expire_ms: When the value would be refused anyway; the record can go then.
    """

    key: bytes
    expire_ms: int


@dataclass(frozen=True, slots=True)
class User:
    """A person who signed in at least once."""

    id: str
    issuer: str
    subject: str
    email: str
    email_verified: bool
    display_name: str
    picture_uri: str
    currency_code: str
    time_zone: str
    locale: str
    create_ms: int
    update_ms: int
    disabled_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Session:
    """A server-side session. The cookie's secret is stored only as `token_hash`.

    Attributes:
        id: The public id, safe to show and used to revoke the session.
        expire_ms: The absolute end of the session, fixed at sign-in.
        revoke_ms: When it was revoked, or None while it is live.
    """

    id: str
    user_id: str
    token_hash: bytes
    create_ms: int
    last_seen_ms: int
    expire_ms: int
    revoke_ms: int | None
    user_agent: str


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of an authenticated request: their session and user."""

    session: Session
    user: User


@dataclass(frozen=True, slots=True)
class SessionCursor:
    """Where a page of sessions ends: the sort key of its last row."""

    create_ms: int
    session_id: str


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One entry of the append-only audit log.

    Attributes:
        kind: What happened, e.g. `sign_in`, `sign_in_failed`, `account_deleted`.
        user_id: The user concerned; None for events about no known user.
        reason: A machine-readable detail (a failure reason, a revoked session id...).
        subject_hash: For tombstones: SHA-256 of issuer and subject, nothing else.
    """

    time_ms: int
    kind: str
    user_id: str | None = None
    reason: str = ""
    session_id: str = ""
    ip: str = ""
    user_agent: str = ""
    subject_hash: str = ""
    id: int = 0


@dataclass(frozen=True, slots=True)
class UserExport:
    """Everything stored about one user."""

    user: User
    sessions: list[Session]
    events: list[AuditEvent]


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A lifecycle event for one webhook endpoint, written with the change it reports.

    Attributes:
        id: The event's id (`evt_...`), sent as `webhook-id`: the same on every
            attempt and every endpoint, so that receivers can drop duplicates.
        type: `user.created`, `user.updated`, `user.disabled`, `user.enabled` or
            `user.deleted`.
        payload: The JSON body, exactly as it is signed and sent.
        endpoint: The URL it goes to.
    """

    id: str
    user_id: str
    type: str
    payload: str
    endpoint: str
    create_ms: int


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """An outbox entry as the delivery worker and operators see it.

    Attributes:
        seq: The order of the outbox (a user's events go out in this order).
        state: `pending` (waiting for its turn or a retry) or `parked` (its retry
            window ran out; an operator may redeliver it).
        since_ms: When its retry window started (its creation or its redelivery).
        next_attempt_ms: When it may be tried next.
        last_error: Why the last attempt failed (a status code or a network error).
    """

    seq: int
    event: OutboxEvent
    state: str
    attempts: int
    since_ms: int
    next_attempt_ms: int
    last_error: str = ""
