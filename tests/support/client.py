"""A Python Connect client that keeps the session cookie, as a browser would."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from connectrpc.client import ResponseMetadata
from connectrpc.errors import ConnectError

from gen.expense.auth.v1.auth_connect import AuthServiceClientSync
from gen.expense.auth.v1.auth_pb import SignInRequest, SignInResponse
from gen.expense.user.v1.user_connect import UserServiceClientSync

T = TypeVar("T")


def cookie_from(set_cookie: str) -> tuple[str, str]:
    """(name, value) of a Set-Cookie header."""
    pair = set_cookie.split(";", 1)[0]
    name, _, value = pair.partition("=")
    return name.strip(), value.strip()


class Session:
    """Generated clients plus a cookie jar, as a browser would keep it."""

    def __init__(self, url: str, *, user_agent: str = "expense-auth-tests/1.0") -> None:
        self.url = url
        self.auth = AuthServiceClientSync(url)
        self.users = UserServiceClientSync(url)
        self.jar: dict[str, str] = {}
        self.user_agent = user_agent
        self.last_set_cookies: list[str] = []
        self.last_headers: dict[str, str] = {}

    @property
    def cookie(self) -> str | None:
        """The Cookie header the jar sends, or None when empty."""
        return "; ".join(f"{k}={v}" for k, v in self.jar.items()) or None

    @cookie.setter
    def cookie(self, value: str | None) -> None:
        """Replace the jar with the cookies of a Cookie header."""
        self.jar = {}
        for pair in (value or "").split(";"):
            name, sep, val = pair.strip().partition("=")
            if sep:
                self.jar[name] = val

    @property
    def headers(self) -> dict[str, str]:
        """The headers every call sends."""
        headers = {"user-agent": self.user_agent}
        if self.cookie:
            headers["cookie"] = self.cookie
        return headers

    def call(
        self,
        fn: Callable[..., T],
        request: object,
        *,
        headers: dict[str, str] | None = None,
        **kwargs: object,
    ) -> T:
        """Invoke `fn(request)` with the jar's cookie and absorb any Set-Cookie."""
        with ResponseMetadata() as meta:
            try:
                return fn(request, headers=headers or self.headers, **kwargs)
            finally:
                self._absorb(meta)

    def sign_in(self, token: str) -> SignInResponse:
        """SignIn and keep the cookie."""
        return self.call(self.auth.sign_in, SignInRequest(google_id_token=token))

    def _absorb(self, meta: ResponseMetadata) -> None:
        headers = meta.headers
        self.last_set_cookies = list(headers.getall("set-cookie"))
        self.last_headers = {k: headers[k] for k in headers}
        for set_cookie in self.last_set_cookies:
            name, value = cookie_from(set_cookie)
            if value and "Max-Age=0" not in set_cookie:
                self.jar[name] = value
            else:
                self.jar.pop(name, None)

    def close(self) -> None:
        """Close the HTTP clients."""
        self.auth.close()
        self.users.close()


def code_of(exc: ConnectError) -> str:
    """The error code as its wire name, e.g. `unauthenticated`."""
    return exc.code.value
