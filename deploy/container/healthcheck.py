"""The container's HEALTHCHECK: exit 0 when `GET /healthz` on the public port answers 200.

Liveness only (the process answers); readiness is `/readyz`, for load balancers.
Run by the container engine inside the container, so 127.0.0.1 is the server's own
network namespace. Standard library only: it must start fast and import nothing of the
app. With TLS_CERT_FILE set the port speaks HTTPS only; the certificate is for the
public name, not 127.0.0.1, so it is not verified here (the check is about liveness).
`HEALTHCHECK_URL` overrides the address (e.g. when `serve --port` is changed).
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request

TIMEOUT_S = 3


def main() -> int:
    """0 when healthy, 1 otherwise (what HEALTHCHECK expects)."""
    tls = bool(os.environ.get("TLS_CERT_FILE"))
    default = f"{'https' if tls else 'http'}://127.0.0.1:8080/healthz"
    url = os.environ.get("HEALTHCHECK_URL") or default
    context = ssl._create_unverified_context() if url.startswith("https:") else None  # noqa: S323
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:  # noqa: S310
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
