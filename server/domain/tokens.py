"""Session secrets and public ids: random values, and the stored hash of a secret.

The secret is 256 random bits and goes into the cookie (signed: see
server/rpc/signing.py). The database keeps only SHA-256(secret), so a copy of
it cannot be turned into cookies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def canonical_b64url(text: str) -> bool:
    """Whether `text` is base64url without padding, in the one spelling of its bytes.

    Decoders (Python's, itsdangerous', google-auth's) also accept padding, `+` and
    `/`, and unused bits set in the last character, so that many strings decode
    to the same bytes. Signed values compare as strings only in this form.
    """
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        return False
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return False
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == text


def new_secret() -> str:
    """A fresh 256-bit session secret, URL-safe."""
    return secrets.token_urlsafe(32)


def new_public_id(prefix: str) -> str:
    """A random public identifier such as `ses_5kq...` (128 bits)."""
    return f"{prefix}_{secrets.token_urlsafe(16)}"


def hash_secret(secret: str) -> bytes:
    """The stored form of a session secret."""
    return hashlib.sha256(secret.encode()).digest()
