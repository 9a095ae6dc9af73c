"""The domain's records: plain, immutable, free of any transport or storage type.

Times are integer milliseconds since the Unix epoch (UTC), as the clock gives them.
"""

from __future__ import annotations

from dataclasses import dataclass


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
