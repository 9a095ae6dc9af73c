"""Where a cookie-carrying browser call may come from: the Origin and Fetch Metadata rules.

One rule for every door into the service: the API applies it to each call
(interceptors/browser_guard.py), the forward-auth endpoint to each state-changing
request it authorizes for a gateway (server/edge/forward_auth.py).

- Origin: a request whose Origin is neither allowlisted (CORS_ALLOWED_ORIGIN) nor
  the server's own (the scheme-less `host`) is refused.
- Fetch Metadata: a browser marks a request from another site with
  `Sec-Fetch-Site: cross-site`; such a request is refused unless its Origin is on
  the allowlist (the frontend may live on another site).

Clients that are not browsers (grpcurl, service clients) send neither header and
are unaffected.
"""

from __future__ import annotations

from collections.abc import Collection

from server.domain.errors import PermissionDenied


class BrowserRules:
    """The Origin / Sec-Fetch-Site checks against one allowlist of origins."""

    def __init__(self, allowed_origins: Collection[str]) -> None:
        self._allowed = frozenset(allowed_origins)

    def check(self, *, origin: str | None, fetch_site: str | None, host: str) -> None:
        """Refuse a cross-site browser request.

        Args:
            origin: The request's `Origin` header, if any.
            fetch_site: Its `Sec-Fetch-Site` header, if any.
            host: The host (and port) the browser addressed, for the same-origin case.

        Raises:
            PermissionDenied: The request comes from another site, naming its origin.
        """
        if origin is not None and origin not in self._allowed and not _same_origin(origin, host):
            raise PermissionDenied(
                f"calls from origin {origin[:100]!r} are not allowed; "
                "add it to CORS_ALLOWED_ORIGIN if it is your frontend"
            )
        if fetch_site == "cross-site" and origin not in self._allowed:
            raise PermissionDenied("cross-site calls are not allowed")


def _same_origin(origin: str, host: str) -> bool:
    return bool(host) and origin.partition("://")[2] == host
