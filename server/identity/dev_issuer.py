"""The development issuer: sign in without a Google account and without a network.

In development the server also accepts ID tokens from this local issuer. Its RSA
key lives in DATA_DIR (created on first use) and its tokens go through exactly
the same verification as Google's (google-auth's signature, audience and time
checks, then ours); only the certificates come from the key file instead of
Google. `expense-auth dev-token` mints tokens with the same key. Production
refuses to start with this issuer enabled.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

import google.auth.crypt
import google.auth.jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from server.identity.keys import key_id, new_private_key, private_key_pem, self_signed_cert_pem
from server.storage.files import private_dir

DEV_ISSUER = "https://dev-issuer.expense-auth.invalid"
DEV_AUDIENCE = "expense-auth-development"
KEY_FILE = "dev-identity-key.pem"
TOKEN_LIFETIME_S = 3600


def dev_subject(email: str) -> str:
    """The default subject for an email: stable, so one email is one development user."""
    return "dev-" + hashlib.sha256(email.strip().lower().encode()).hexdigest()[:20]


class DevIssuer:
    """A local token issuer backed by an RSA key file."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key
        self.key_id = key_id(key)
        self._cert = self_signed_cert_pem(key, common_name="expense-auth development issuer")
        self._signer = google.auth.crypt.RSASigner.from_string(
            private_key_pem(key), key_id=self.key_id
        )

    @classmethod
    def load_or_create(cls, data_dir: Path) -> DevIssuer:
        """The issuer whose key is in `data_dir`, creating the key on first use."""
        path = data_dir / KEY_FILE
        private_dir(data_dir)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as out:
                out.write(private_key_pem(new_private_key()))
        # Another process may be writing the key right now: wait for a whole file.
        for _ in range(50):
            pem = path.read_bytes()
            if pem.rstrip().endswith(b"-----END PRIVATE KEY-----"):
                break
            time.sleep(0.05)
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path.name} does not hold an RSA private key")
        return cls(key)

    def certs(self) -> dict[str, str]:
        """The public certificates, in Google's v1 format."""
        return {self.key_id: self._cert}

    def mint(
        self,
        *,
        email: str,
        audience: str,
        name: str = "",
        subject: str = "",
        nonce: str = "",
        now_s: int | None = None,
        lifetime_s: int = TOKEN_LIFETIME_S,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """A signed ID token with Google's claim layout."""
        issued = int(time.time()) if now_s is None else now_s
        payload: dict[str, Any] = {
            "iss": DEV_ISSUER,
            "aud": audience,
            "azp": audience,
            "sub": subject or dev_subject(email),
            "email": email,
            "email_verified": True,
            "name": name or email.split("@", 1)[0],
            "iat": issued,
            "exp": issued + lifetime_s,
            "jti": secrets.token_hex(16),
        }
        if nonce:
            payload["nonce"] = nonce
        payload.update(extra or {})
        token: bytes = google.auth.jwt.encode(self._signer, payload)
        return token.decode()
