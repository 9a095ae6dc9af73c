"""HTTP-level protections around the whole app: security headers and CORS.

They wrap the router, so they apply to every response: RPC results, Connect and
gRPC errors, preflights, 404s and health checks alike.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any
from urllib.parse import quote

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Request headers a Connect or gRPC-Web browser client sends.
CORS_ALLOW_HEADERS = (
    "content-type",
    "connect-protocol-version",
    "connect-timeout-ms",
    "connect-accept-encoding",
    "connect-content-encoding",
    "grpc-timeout",
    "x-grpc-web",
    "x-user-agent",
    "x-request-id",
)
# Response headers the browser client must be able to read.
CORS_EXPOSE_HEADERS = (
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "x-request-id",
    "retry-after",
    "content-encoding",
    "connect-content-encoding",
)
CORS_MAX_AGE_S = 7200  # Chromium caps preflight caching at 2 hours.
HSTS = "max-age=31536000; includeSubDomains"

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-resource-policy", "same-site"),
    ("vary", "Origin"),
)
_BASE_HEADERS = tuple((k.encode(), v.encode()) for k, v in SECURITY_HEADERS if k != "vary")


class Edge:
    """Every HTTP request's header check, CORS and security headers, in one pass.

    - Header values must be UTF-8. connectrpc decodes every header value before
      any interceptor runs, so one stray byte (in a User-Agent, say) would
      otherwise become an `unknown` error quoting Python's exception. Header
      values are ASCII by the Connect and gRPC specifications; UTF-8 is
      tolerated, anything else is `invalid_argument`.
    - CORS is Starlette's `CORSMiddleware`, for requests that carry an `Origin`:
      only those can be cross-origin. For the others (gRPC and server-side
      clients) it would add nothing but `Vary: Origin`, which is added here to
      every response anyway, so they skip it.
    - The security headers go on every response, refusals included; HSTS when
      served over HTTPS.
    """

    def __init__(self, app: ASGIApp, *, allowed_origins: Collection[str], https: bool) -> None:
        self._app = app
        self._cors_options: dict[str, Any] = {
            "allow_origins": list(allowed_origins),
            "allow_credentials": True,
            "allow_methods": ["GET", "POST"],
            "allow_headers": list(CORS_ALLOW_HEADERS),
            "expose_headers": list(CORS_EXPOSE_HEADERS),
            "max_age": CORS_MAX_AGE_S,
        }
        self._cors = CORSMiddleware(app, **self._cors_options)
        headers = list(_BASE_HEADERS)
        if https:
            headers.append((b"strict-transport-security", HSTS.encode()))
        self._headers = tuple(headers)
        self._names = frozenset(name for name, _ in headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        has_origin = False
        bad_header: bytes | None = None
        for name, value in scope.get("headers", ()):
            if name == b"origin":
                has_origin = True
            if bad_header is None and not value.isascii() and not _is_utf8(value):
                bad_header = name
        app: ASGIApp
        if bad_header is not None:
            refusal = _BadHeader(bad_header.decode("latin-1"))
            app = CORSMiddleware(refusal, **self._cors_options) if has_origin else refusal
        else:
            app = self._cors if has_origin else self._app
        names = self._names
        extra = self._headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [h for h in message.get("headers", ()) if h[0].lower() not in names]
                if not any(k.lower() == b"vary" and b"origin" in v.lower() for k, v in kept):
                    kept.append((b"vary", b"Origin"))
                kept.extend(extra)
                message = {**message, "headers": kept}
            await send(message)

        await app(scope, receive, send_with_headers)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


class _BadHeader:
    """Answers a request with a non-UTF-8 header value, in the caller's protocol."""

    def __init__(self, header: str) -> None:
        self._header = header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _refuse(scope, send, self._header)


async def _refuse(scope: Scope, send: Send, header: str) -> None:
    message = f"the value of header {header[:60]!r} is not valid UTF-8"
    content_type = next(
        (v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"content-type"), ""
    )
    if content_type.startswith("application/grpc"):
        # A trailers-only gRPC answer: HTTP 200 with the status in the headers.
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"grpc-status", b"3"),
            (b"grpc-message", quote(message).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    body = json.dumps({"code": "invalid_argument", "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def with_edge(app: ASGIApp, *, allowed_origins: Collection[str], https: bool) -> ASGIApp:
    """The app behind the header check, CORS (exact-origin allowlist, credentials)
    and the security headers."""
    return Edge(app, allowed_origins=allowed_origins, https=https)
