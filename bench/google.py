"""Google's side of a sign-in, stood in for locally: the certs URL and ID tokens.

Production refuses the development issuer and a certs URL that is not https://,
so the servers under test verify tokens exactly as they verify Google's: they
fetch the certs over HTTPS from this stand-in (its certificate signed by a
throwaway CA that the servers trust through SSL_CERT_FILE), and the tokens carry
Google's issuer, the bench's client id and the nonce of a CreateSignInNonce call.
The stand-in counts fetches: a server caches the certs for their max-age, so each
serving process should fetch once.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
from concurrent.futures import ProcessPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from server.identity.dev_issuer import DevIssuer
from tests.support.pki import Pki, make_pki

ISSUER = "https://accounts.google.com"
CLIENT_ID = "1234567890-bench.apps.googleusercontent.com"


class GoogleStandIn:
    """Serves `/oauth2/v1/certs` over HTTPS and mints tokens signed with its key."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.key_dir = directory
        self.pki: Pki = make_pki(directory)
        body = json.dumps(DevIssuer.load_or_create(directory).certs()).encode()
        self.fetches = 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                stand_in.fetches += 1
                self.send_response(200)
                self.send_header("content-type", "application/json; charset=UTF-8")
                self.send_header("cache-control", "public, max-age=3600, must-revalidate")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def certs_url(self) -> str:
        """GOOGLE_CERTS_URL for the servers (by name: the certificate is checked)."""
        return f"https://localhost:{self._server.server_address[1]}/oauth2/v1/certs"

    @property
    def ca_file(self) -> Path:
        """SSL_CERT_FILE for the servers: the CA that signed the stand-in's certificate."""
        return self.pki.ca_cert

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def _mint(args: tuple[Path, list[tuple[int, str]]]) -> list[str]:
    key_dir, jobs = args
    issuer = DevIssuer.load_or_create(key_dir)
    return [
        issuer.mint(
            email=f"signin{index % 1000}@example.com",
            subject=f"{200000000000000000000 + index % 1000}",
            name="Bench",
            audience=CLIENT_ID,
            nonce=nonce,
            extra={"iss": ISSUER},
        )
        for index, nonce in jobs
    ]


def _all_cores() -> None:
    os.sched_setaffinity(0, range(os.cpu_count() or 1))


def mint_tokens(key_dir: Path, nonces: list[str], *, workers: int = 2) -> list[str]:
    """One Google-shaped token per nonce (unique jti), for 1,000 distinct users."""
    jobs = list(enumerate(nonces))
    chunk = -(-len(jobs) // workers) or 1
    parts = [(key_dir, jobs[i : i + chunk]) for i in range(0, len(jobs), chunk)]
    if workers == 1 or len(parts) == 1:
        return [token for part in parts for token in _mint(part)]
    # The servers idle between cells: minting may use every core, not just the load core.
    with ProcessPoolExecutor(max_workers=workers, initializer=_all_cores) as pool:
        return [token for part in pool.map(_mint, parts) for token in part]
