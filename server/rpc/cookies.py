"""The session cookie on the wire: its name, attributes, and parsing.

The cookie is HttpOnly (scripts cannot read it), SameSite=Lax, Path=/ and has a
Max-Age equal to the session's absolute lifetime. With secure cookies on, it is
also Secure and named with the `__Host-` prefix, which browsers accept only from
HTTPS, without a Domain attribute and with Path=/, so a sibling subdomain cannot
plant or overwrite it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from server.rpc.signing import CookieSigner

BASE_NAME = "expense_session"


def format_cookie(name: str, value: str, *, max_age: int, secure: bool) -> str:
    """A Set-Cookie value with the service's attributes (HttpOnly, SameSite=Lax, Path=/)."""
    parts = [f"{name}={value}", "Path=/", f"Max-Age={max_age}", "HttpOnly", "SameSite=Lax"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def cookie_values(cookie_headers: Iterable[str], name: str) -> Iterator[str]:
    """Every value of cookie `name` in the Cookie header(s), in order.

    HTTP/2 clients may split cookies over several headers; each is read, however
    long: the site's other cookies can make the header large, and Envoy already
    bounds all request headers together (MAX_REQUEST_HEADERS_KB).
    """
    for header in cookie_headers:
        for pair in header.split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name:
                yield value.strip().strip('"')


class SessionCookies:
    """Reads and writes the session cookie."""

    def __init__(self, signer: CookieSigner, *, secure: bool, max_age_s: int) -> None:
        self._signer = signer
        self._secure = secure
        self._max_age_s = max_age_s
        self.name = ("__Host-" if secure else "") + BASE_NAME

    def issue(self, secret: str) -> str:
        """A Set-Cookie value for a new session."""
        return self._format(self._signer.sign(secret), self._max_age_s)

    def expire(self) -> str:
        """A Set-Cookie value that deletes the cookie."""
        return self._format("", 0)

    def present(self, cookie_headers: Iterable[str]) -> bool:
        """Whether the request carries a cookie of exactly this name (valid or not)."""
        return any(True for _ in cookie_values(cookie_headers, self.name))

    def secret_from(self, cookie_headers: Iterable[str]) -> str | None:
        """The verified session secret from the request's Cookie header(s), if any."""
        for value in cookie_values(cookie_headers, self.name):
            secret = self._signer.unsign(value)
            if secret is not None:
                return secret
        return None

    def _format(self, value: str, max_age: int) -> str:
        return format_cookie(self.name, value, max_age=max_age, secure=self._secure)
