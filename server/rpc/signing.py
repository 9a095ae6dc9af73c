"""The session cookie's signature: `<secret>.<signature>`, with rotating keys.

The signature (itsdangerous, HMAC-SHA256) lets the server reject a forged or
tampered cookie before touching the database, and key rotation works by listing
keys oldest first: the newest signs, every listed key verifies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from itsdangerous import BadSignature, Signer
from itsdangerous.encoding import want_bytes

from server.domain.tokens import canonical_b64url

SESSION_SALT = "expense-auth.session-cookie"
MAX_COOKIE_VALUE = 256


class _Signer(Signer):
    """itsdangerous' Signer, deriving each key once instead of on every call.

    The derived key is an HMAC of the salt under the key, so it never changes;
    computing it per verification was a third of the cookie check's cost.
    """

    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys, salt=SESSION_SALT, digest_method=hashlib.sha256)
        self._derived: dict[bytes, bytes] = {}

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        """The derived key for `secret_key` (the newest key by default), cached."""
        key = self.secret_keys[-1] if secret_key is None else want_bytes(secret_key)
        derived = self._derived.get(key)
        if derived is None:
            derived = self._derived[key] = super().derive_key(key)
        return derived


class CookieSigner:
    """Signs and verifies session cookie values with a rotating list of keys."""

    def __init__(
        self, keys_oldest_first: Sequence[str], *, on_old_key: Callable[[], None] = lambda: None
    ) -> None:
        if not keys_oldest_first:
            raise ValueError("at least one session key is required")
        self._signer = _Signer(list(keys_oldest_first))
        # Verified first and alone, so that a cookie needing an older key is noticed.
        self._newest = _Signer([keys_oldest_first[-1]])
        self._rotating = len(keys_oldest_first) > 1
        self.old_key_verifications = 0
        self._on_old_key = on_old_key

    def sign(self, secret: str) -> str:
        """The cookie value for `secret`, signed with the newest key."""
        return self._signer.sign(secret).decode()

    def unsign(self, value: str) -> str | None:
        """The secret inside a cookie value, or None when it is not one of ours.

        Only the canonical spelling of the signature is accepted (see
        `canonical_b64url`): a cookie is one string, not a family of them.
        """
        if not value or len(value) > MAX_COOKIE_VALUE:
            return None
        if not canonical_b64url(value.rpartition(".")[2]):
            return None
        try:
            return self._newest.unsign(value).decode()
        except (BadSignature, UnicodeError):
            if not self._rotating:
                return None
        try:
            secret = self._signer.unsign(value).decode()
        except (BadSignature, UnicodeError):
            return None
        self.old_key_verifications += 1
        self._on_old_key()
        return secret
