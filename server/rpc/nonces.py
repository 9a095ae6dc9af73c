"""Sign-in nonces: a random value given to the frontend and bound to a cookie.

CreateSignInNonce returns a nonce and sets a pre-sign-in cookie carrying the
same nonce, signed with a timestamp (itsdangerous) so that it expires after
NONCE_TTL_S. SignIn accepts a token only if its `nonce` claim equals the
cookie's. An attacker cannot make a victim's browser sign in to the attacker's
account (login CSRF): the attacker's token carries the attacker's nonce, which
the victim's cookie does not match. A token stolen from another site's sign-in
fails for the same reason. A nonce is spent by the sign-in that uses it (in the
sign-in's own transaction), so a copied nonce cookie is good for one sign-in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner

from server.domain.clock import Clock
from server.domain.errors import Unauthenticated
from server.domain.models import SingleUse
from server.domain.tokens import canonical_b64url
from server.rpc.cookies import cookie_values, format_cookie

NONCE_TTL_S = 600
BASE_NAME = "expense_signin_nonce"


class SignInNonces:
    """Issues nonce cookies and checks tokens against them."""

    def __init__(
        self, keys_oldest_first: Sequence[str], *, secure: bool, required: bool, clock: Clock
    ) -> None:
        self._clock = clock
        self._signer = _ClockedSigner(
            list(keys_oldest_first), salt="expense-auth.signin-nonce", clock=clock
        )
        self._secure = secure
        self.required = required
        self.name = ("__Host-" if secure else "") + BASE_NAME

    def issue(self) -> tuple[str, str, int]:
        """A fresh nonce, the Set-Cookie value that binds it to this browser, and when it
        expires (epoch ms)."""
        nonce = secrets.token_urlsafe(24)
        expire_ms = self._clock.now_ms() + NONCE_TTL_S * 1000
        return nonce, self._format(self._signer.sign(nonce).decode(), NONCE_TTL_S), expire_ms

    def expire(self) -> str:
        """A Set-Cookie value that deletes the nonce cookie."""
        return self._format("", 0)

    def check(self, token_nonce: str, cookie_headers: Iterable[str]) -> SingleUse | None:
        """Match the token's nonce against this client's nonce cookie.

        Returns what the sign-in must spend when a nonce was checked and matched;
        None when there was nothing to check and nonces are optional.

        Raises:
            Unauthenticated: A nonce is required or present, and it does not match.
        """
        found = self._cookie_nonce(cookie_headers)
        if found is None:
            if self.required:
                raise Unauthenticated(
                    "sign-in needs a nonce: call CreateSignInNonce first and pass its nonce to "
                    "Google Identity Services (the nonce cookie is missing or expired)",
                    reason="nonce_missing",
                )
            return None
        expected, issued_s = found
        if not token_nonce or not hmac.compare_digest(token_nonce, expected):
            raise Unauthenticated(
                "the ID token's nonce does not match this sign-in; start again with "
                "CreateSignInNonce",
                reason="nonce_mismatch",
            )
        return SingleUse(
            key=hashlib.sha256(b"signin-nonce\n" + expected.encode()).digest(),
            expire_ms=(issued_s + NONCE_TTL_S) * 1000,
        )

    def _cookie_nonce(self, cookie_headers: Iterable[str]) -> tuple[str, int] | None:
        """The nonce in a valid cookie, with when it was issued (epoch seconds)."""
        for value in cookie_values(cookie_headers, self.name):
            if not all(canonical_b64url(part) for part in value.split(".")):
                continue
            try:
                nonce, issued = self._signer.unsign(
                    value, max_age=NONCE_TTL_S, return_timestamp=True
                )
                return nonce.decode(), int(issued.timestamp())
            except (SignatureExpired, BadSignature, UnicodeError):
                continue
        return None

    def _format(self, value: str, max_age: int) -> str:
        return format_cookie(self.name, value, max_age=max_age, secure=self._secure)


class _ClockedSigner(TimestampSigner):
    """itsdangerous' timestamp signer on the service's clock (it reads `time.time`)."""

    def __init__(self, keys: list[str], *, salt: str, clock: Clock) -> None:
        super().__init__(keys, salt=salt)
        self._clock = clock

    def get_timestamp(self) -> int:
        """Now, in whole seconds since the epoch."""
        return self._clock.now_ms() // 1000
