"""Verification of Google ID tokens (and, in development, of the local issuer's).

The checks are google-auth's `jwt.decode` (the RS256 signature by the key the
header names, or by any published key when it names none; `iat` and `exp`
present, with a small skew; `aud` among the accepted audiences) plus what it
leaves to the caller: choosing certificates by issuer without a fetch per
request, checking `iss`, refusing an empty audience list, requiring `sub`,
honouring `nbf`, and the `email_verified` policy. They are made here, on a token
decoded once, with each certificate's RSA key parsed once (`jwt.decode` takes
PEM text and decodes the token again, parsing the certificate on every call);
the signature itself is checked by google-auth's `RSAVerifier`. Every failure
is a domain error with a message a client can act on; none is `internal`.

A token must be in canonical compact form: base64url without padding, and no
other spelling of the same bytes. google-auth's decoder also accepts padding,
`+`/`/` and stray bits in the last character, which would turn one token into
many strings; "each token is accepted once" is therefore keyed on the decoded
signature, and other spellings are refused before anything else. Numeric
claims are bounded before google-auth converts them to dates, and the claims
copied into the account (name, picture) follow the same rules as a profile
edit.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import google.auth.crypt

from server.domain.clock import Clock
from server.domain.errors import EmailNotVerified, InvalidArgument, InvalidIdToken
from server.domain.models import Identity
from server.domain.preferences import MAX_DISPLAY_NAME, clean_display_name, clean_locale
from server.domain.tokens import canonical_b64url
from server.identity.certs import CertsSource

GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
CANONICAL_GOOGLE_ISSUER = "https://accounts.google.com"
MAX_TOKEN_LENGTH = 4096  # Google ID tokens are ~1.2 KB
MAX_PICTURE_URI = 2048
_SUPPORTED_ALGS = frozenset({"RS256"})
# NumericDate claims: seconds since the epoch, up to the year 2286. Anything
# outside would overflow google-auth's conversion to a datetime.
_TIME_CLAIMS = ("exp", "iat", "nbf", "auth_time")
_MAX_NUMERIC_DATE = 10**10
# Certificates in use at once: a few per issuer (Google publishes two or three).
_PARSED_KEYS = 32


class IdTokenVerifier:
    """Verifies ID tokens from a fixed set of issuers for a fixed set of audiences."""

    def __init__(
        self,
        *,
        audiences: Sequence[str],
        issuers: Mapping[str, CertsSource],
        clock_skew_s: int,
        require_verified_email: bool,
        clock: Clock,
    ) -> None:
        if not audiences:
            raise ValueError("at least one audience (client id) is required")
        self._clock = clock
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
        token_parts = _decode(token)
        header, unverified = token_parts.header, token_parts.claims
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
        if kid:
            if not isinstance(kid, str) or kid not in certs:
                raise InvalidIdToken(
                    "the ID token was signed with an unknown key", reason="unknown_key"
                )
            candidates: Sequence[str] = [certs[kid]]
        else:
            candidates = list(certs.values())
        if not any(_signed_by(pem, token_parts) for pem in candidates):
            raise InvalidIdToken("the ID token's signature is not valid", reason="bad_signature")
        claims = unverified
        self._check_times(claims)
        if claims.get("aud") not in self._audiences:
            raise InvalidIdToken(
                "the ID token was issued for another application (audience)", reason="bad_audience"
            )
        not_before = claims.get("nbf")
        if not_before is not None and self._clock.now_ms() < (not_before - self._skew) * 1000:
            raise InvalidIdToken(
                "the ID token is not valid yet (its nbf is in the future)", reason="not_yet_valid"
            )
        return self._identity(claims, issuer, token_parts.signature)

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        """google-auth's `iat`/`exp` rule: both present, `iat` not ahead and `exp` not
        behind by more than the skew, on the wall clock in whole seconds as there."""
        if "iat" not in claims or "exp" not in claims:
            raise InvalidIdToken("the ID token lacks a required claim", reason="missing_claim")
        now = int(time.time())
        if now < claims["iat"] - self._skew:
            raise InvalidIdToken(
                "the ID token is not valid yet (issued in the future)", reason="not_yet_valid"
            )
        if claims["exp"] + self._skew < now:
            raise InvalidIdToken("the ID token has expired; sign in again", reason="expired")

    def _identity(self, claims: Mapping[str, Any], issuer: str, signature: bytes) -> Identity:
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
            name=_display_name(claims.get("name")),
            picture=_picture_uri(claims.get("picture")),
            locale=_locale(claims.get("locale")),
            nonce=_text(claims.get("nonce"), 256),
            # The decoded signature names the token whatever its spelling (RS256
            # signatures are deterministic, so one token has exactly one).
            token_hash=hashlib.sha256(issuer.encode() + b"\n" + signature).digest(),
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


@dataclass(frozen=True, slots=True)
class _Token:
    """A compact JWT decoded once: what was signed, and the signature's bytes."""

    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    signed: bytes
    signature: bytes


def _decode(token: str) -> _Token:
    """Header, claims and signature, before verification, to choose the issuer and key.

    Refuses what is not a canonical compact JWT, and numeric claims out of range.
    """
    malformed = InvalidIdToken("google_id_token is not a well-formed JWT", reason="malformed")
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise malformed
    if not all(canonical_b64url(part) for part in parts):
        raise InvalidIdToken(
            "google_id_token is not a well-formed JWT: each part must be base64url without "
            "padding, exactly as Google issued it",
            reason="malformed",
        )
    try:
        header, claims = (json.loads(_b64(part).decode("utf-8")) for part in parts[:2])
        signature = _b64(parts[2])
    except (ValueError, binascii.Error, UnicodeError, RecursionError):
        raise malformed from None
    if not isinstance(header, Mapping) or not isinstance(claims, Mapping):
        raise malformed
    for name in _TIME_CLAIMS:
        value = claims.get(name)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 <= value <= _MAX_NUMERIC_DATE
        ):
            raise InvalidIdToken(
                f"the ID token's {name} claim is not a valid time", reason="bad_claim"
            )
    signed = f"{parts[0]}.{parts[1]}".encode("ascii")
    return _Token(header=header, claims=claims, signed=signed, signature=signature)


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _signed_by(pem: str, token: _Token) -> bool:
    """Whether the certificate's key made the token's RS256 signature."""
    try:
        verifier = _verifier(pem)
    except (ValueError, TypeError):  # an unparsable certificate verifies nothing
        return False
    return bool(verifier.verify(token.signed, token.signature))


@functools.lru_cache(maxsize=_PARSED_KEYS)
def _verifier(pem: str) -> google.auth.crypt.RSAVerifier:
    """The certificate's public key, parsed once while it stays in use."""
    verifier: google.auth.crypt.RSAVerifier = google.auth.crypt.RSAVerifier.from_string(pem)
    return verifier


def _text(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _display_name(value: Any) -> str:
    """The `name` claim under the display-name rules of UpdateCurrentUser.

    Characters a profile edit would refuse (controls, bidi overrides and other
    format characters) are dropped rather than refusing the sign-in; what is left
    must pass the rules, or the account starts without a name.
    """
    if not isinstance(value, str):
        return ""
    kept = "".join(
        ch for ch in value if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp")
    ).strip()[:MAX_DISPLAY_NAME]
    try:
        return clean_display_name(kept)
    except InvalidArgument:
        return ""


def _picture_uri(value: Any) -> str:
    """The `picture` claim if it is an https URL (browsers will load it), else nothing."""
    if not isinstance(value, str) or len(value) > MAX_PICTURE_URI or not value.isprintable():
        return ""
    if " " in value:
        return ""
    try:
        parts = urlsplit(value)
    except ValueError:
        return ""
    if parts.scheme != "https" or not parts.hostname:
        return ""
    return value


def _locale(value: Any) -> str:
    if not isinstance(value, str) or not value:
        return ""
    try:
        return clean_locale(value)
    except InvalidArgument:
        return ""
