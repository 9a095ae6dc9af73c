"""A stand-in for Google's key server: real RSA keys, real signed tokens, local HTTP.

Only Google's side is faked. Tokens are signed with google-auth's RSASigner and
verified by the service's real code path, which fetches the certs over HTTP.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import google.auth.crypt
import google.auth.jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from server.identity.keys import key_id, new_private_key, private_key_pem, self_signed_cert_pem

CLIENT_ID = "1234567890-test.apps.googleusercontent.com"
ISSUER = "https://accounts.google.com"


@dataclass
class _Key:
    key: rsa.RSAPrivateKey
    kid: str
    cert: str
    signer: google.auth.crypt.RSASigner


@dataclass
class _State:
    published: dict[str, str] = field(default_factory=dict)
    max_age: int = 3600
    down: bool = False
    fetches: int = 0
    # Hostile answers: a body of this many bytes, or one byte every `drip_s` seconds.
    huge_bytes: int = 0
    drip_s: float = 0.0


def _new_key() -> _Key:
    key = new_private_key()
    kid = key_id(key)
    return _Key(
        key=key,
        kid=kid,
        cert=self_signed_cert_pem(key, common_name="fake google"),
        signer=google.auth.crypt.RSASigner.from_string(private_key_pem(key), key_id=kid),
    )


class FakeGoogle:
    """Serves `/oauth2/v1/certs` like Google and mints ID tokens."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = _State()
        self.current = _new_key()
        self.state.published[self.current.kid] = self.current.cert
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def certs_url(self) -> str:
        """The URL to give the service as GOOGLE_CERTS_URL."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/oauth2/v1/certs"

    @property
    def fetches(self) -> int:
        """How many times the certs were fetched."""
        with self._lock:
            return self.state.fetches

    def start(self) -> FakeGoogle:
        """Start serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def rotate(self, *, publish: bool = True) -> None:
        """Sign with a new key from now on; publish it unless told otherwise."""
        with self._lock:
            self.current = _new_key()
            if publish:
                self.state.published[self.current.kid] = self.current.cert

    def publish_current(self) -> None:
        """Publish the current signing key (after rotate(publish=False))."""
        with self._lock:
            self.state.published[self.current.kid] = self.current.cert

    @contextmanager
    def hostile(self, *, huge_bytes: int = 0, drip_s: float = 0.0) -> Iterator[None]:
        """Inside the block the certs endpoint answers 200 with `huge_bytes` of body, or
        drips its answer one byte every `drip_s` seconds."""
        with self._lock:
            self.state.huge_bytes, self.state.drip_s = huge_bytes, drip_s
        try:
            yield
        finally:
            with self._lock:
                self.state.huge_bytes, self.state.drip_s = 0, 0.0

    @contextmanager
    def outage(self) -> Iterator[None]:
        """The certs endpoint answers 503 inside the block."""
        with self._lock:
            self.state.down = True
        try:
            yield
        finally:
            with self._lock:
                self.state.down = False

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Google-shaped claims for a fresh token, with `overrides` applied."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "azp": CLIENT_ID,
            "aud": CLIENT_ID,
            "sub": "110169484474386276334",
            "email": "ann@example.com",
            "email_verified": True,
            "name": "Ann Example",
            "picture": "https://lh3.googleusercontent.com/a/photo",
            "locale": "en-GB",
            "iat": now,
            "exp": now + 3600,
            "jti": secrets.token_hex(16),
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, **overrides: Any) -> str:
        """A token signed with the current key."""
        token: bytes = google.auth.jwt.encode(self.current.signer, self.claims(**overrides))
        return token.decode()

    def token_with_header(self, header: dict[str, Any], **overrides: Any) -> str:
        """A token signed with the current key but with a custom JOSE header."""
        token: bytes = google.auth.jwt.encode(
            self.current.signer,
            self.claims(**overrides),
            header=dict(header),
            key_id=header.get("kid"),
        )
        return token.decode()

    def unsigned_token(self, **overrides: Any) -> str:
        """An `alg: none` token: header and claims, empty signature."""

        def part(obj: dict[str, Any]) -> str:
            raw = json.dumps(obj, separators=(",", ":")).encode()
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        header = {"alg": "none", "typ": "JWT", "kid": self.current.kid}
        return f"{part(header)}.{part(self.claims(**overrides))}."

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                with fake._lock:
                    fake.state.fetches += 1
                    down = fake.state.down
                    body = json.dumps(fake.state.published).encode()
                    max_age = fake.state.max_age
                    huge, drip = fake.state.huge_bytes, fake.state.drip_s
                if huge or drip:
                    self._hostile(huge, drip)
                    return
                if down or self.path != "/oauth2/v1/certs":
                    self.send_response(503 if down else 404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/json; charset=UTF-8")
                self.send_header("cache-control", f"public, max-age={max_age}, must-revalidate")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _hostile(self, huge: int, drip: float) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                try:
                    if huge:
                        chunk = b" " * 65536
                        for _ in range(huge // len(chunk)):
                            self.wfile.write(chunk)
                    else:
                        for _ in range(600):  # gives up after 10 min at most
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(drip)
                except OSError:
                    pass  # the service hung up, as it should

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Handler
