"""Verification of Google ID tokens (and, in development, of the local issuer's).

google-auth checks the signature, `exp`/`iat` (with a small skew) and `aud`;
this module adds what google-auth leaves to the caller: choosing certificates by
issuer without a fetch per request, checking `iss` (google-auth's
`verify_token` does not), refusing an empty audience list, requiring `sub`, and
the `email_verified` policy. Every failure is a domain error with a message a
client can act on; none is `internal`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import google.auth.exceptions
import google.auth.jwt

from server.domain.errors import EmailNotVerified, InvalidArgument, InvalidIdToken
from server.domain.models import Identity
from server.domain.preferences import clean_locale
from server.identity.certs import CertsSource

log = logging.getLogger(__name__)

GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
CANONICAL_GOOGLE_ISSUER = "https://accounts.google.com"
MAX_TOKEN_LENGTH = 4096  # Google ID tokens are ~1.2 KB
_SUPPORTED_ALGS = frozenset({"RS256"})


class IdTokenVerifier:
    """Verifies ID tokens from a fixed set of issuers for a fixed set of audiences."""

    def __init__(
        self,
        *,
        audiences: Sequence[str],
        issuers: Mapping[str, CertsSource],
        clock_skew_s: int,
        require_verified_email: bool,
    ) -> None:
        if not audiences:
            raise ValueError("at least one audience (client id) is required")
        self._audiences = list(audiences)
        self._issuers = dict(issuers)
        self._skew = clock_skew_s
        self._require_verified_email = require_verified_email

    async def keys_available(self) -> bool:
        """Whether some accepted issuer's keys are at hand (readiness)."""
        for source in {id(s): s for s in self._issuers.values()}.values():
            if await source.available():
                return True
        return False

    async def verify(self, token: str) -> Identity:
        """The identity in a valid token.

        Raises:
            InvalidArgument: The token is missing or not a JWT at all.
            InvalidIdToken: It is a JWT but not one we accept.
            PermissionDenied: Valid, but the email is unverified and that is required.
            Unavailable: The issuer's certificates cannot be fetched.
        """
        token = token.strip()
        if not token:
            raise InvalidArgument("google_id_token", "google_id_token is required")
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidArgument(
                "google_id_token",
                f"google_id_token is {len(token)} characters; an ID token is at most "
                f"{MAX_TOKEN_LENGTH}",
            )
        header, unverified = _peek(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in _SUPPORTED_ALGS:
            raise InvalidIdToken(
                f"the ID token uses algorithm {str(alg)[:20]!r}; only RS256 is accepted",
                reason="bad_alg",
            )
        issuer = unverified.get("iss")
        source = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if source is None or not isinstance(issuer, str):
            raise InvalidIdToken(
                f"the ID token's issuer {str(issuer)[:80]!r} is not accepted", reason="bad_issuer"
            )
        kid = header.get("kid")
        certs = await source.certs(kid if isinstance(kid, str) else None)
        if isinstance(kid, str) and kid not in certs:
            raise InvalidIdToken(
                "the ID token was signed with an unknown key", reason="unknown_key"
            )
        try:
            claims: dict[str, Any] = google.auth.jwt.decode(
                token,
                certs=dict(certs),
                audience=self._audiences,
                clock_skew_in_seconds=self._skew,
            )
        except (
            google.auth.exceptions.GoogleAuthError,
            ValueError,
            TypeError,
            RecursionError,
        ) as exc:
            raise _describe(exc) from None
        if claims.get("iss") != issuer:
            raise InvalidIdToken("the ID token's issuer is not accepted", reason="bad_issuer")
        return self._identity(claims, issuer, token)

    def _identity(self, claims: Mapping[str, Any], issuer: str, token: str) -> Identity:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > 255:
            raise InvalidIdToken("the ID token has no valid subject", reason="bad_subject")
        email = claims.get("email")
        email = email if isinstance(email, str) and len(email) <= 320 else ""
        verified = claims.get("email_verified") in (True, "true")
        expires = claims.get("exp")
        issued = claims.get("iat")
        identity = Identity(
            issuer=CANONICAL_GOOGLE_ISSUER if issuer in GOOGLE_ISSUERS else issuer,
            subject=subject,
            email=email,
            email_verified=verified,
            name=_text(claims.get("name"), 100),
            picture=_text(claims.get("picture"), 2048),
            locale=_locale(claims.get("locale")),
            nonce=_text(claims.get("nonce"), 256),
            token_hash=hashlib.sha256(token.encode()).digest(),
            token_expire_ms=(int(expires) + self._skew) * 1000 if isinstance(expires, int) else 0,
            issued_ms=int(issued) * 1000 if isinstance(issued, int) else 0,
        )
        if self._require_verified_email and not (email and verified):
            raise EmailNotVerified(
                "the Google account's email address is not verified; verify it with Google "
                "and sign in again",
                identity=identity,
            )
        return identity


def _peek(token: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """Header and claims before verification, to choose the issuer and key."""
    try:
        header = google.auth.jwt.decode_header(token)
        claims = google.auth.jwt.decode(token, verify=False)
    except (
        google.auth.exceptions.GoogleAuthError,
        ValueError,
        TypeError,
        UnicodeError,
        RecursionError,
    ):
        raise InvalidIdToken(
            "google_id_token is not a well-formed JWT", reason="malformed"
        ) from None
    if not isinstance(header, Mapping) or not isinstance(claims, Mapping):
        raise InvalidIdToken("google_id_token is not a well-formed JWT", reason="malformed")
    return header, claims


def _describe(exc: Exception) -> InvalidIdToken:
    """google-auth's error as a client-facing message (its text quotes internals)."""
    text = str(exc)
    if "expired" in text:
        return InvalidIdToken("the ID token has expired; sign in again", reason="expired")
    if "too early" in text:
        return InvalidIdToken(
            "the ID token is not valid yet (issued in the future)", reason="not_yet_valid"
        )
    if "audience" in text:
        return InvalidIdToken(
            "the ID token was issued for another application (audience)", reason="bad_audience"
        )
    if "signature" in text or "Certificate" in text:
        return InvalidIdToken("the ID token's signature is not valid", reason="bad_signature")
    if "claim" in text:
        return InvalidIdToken("the ID token lacks a required claim", reason="missing_claim")
    log.info("ID token rejected", extra={"reason": type(exc).__name__})
    return InvalidIdToken("the ID token is not valid", reason="invalid")


def _text(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _locale(value: Any) -> str:
    if not isinstance(value, str) or not value:
        return ""
    try:
        return clean_locale(value)
    except InvalidArgument:
        return ""
