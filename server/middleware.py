"""HTTP-level protections around the whole app: security headers and CORS.

They wrap the router, so they apply to every response: RPC results, Connect and
gRPC errors, preflights, 404s and health checks alike.
"""

from __future__ import annotations

import json
from collections.abc import Collection
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


class SecurityHeaders:
    """Adds the security headers to every HTTP response; HSTS when served over HTTPS."""

    def __init__(self, app: ASGIApp, *, https: bool) -> None:
        self._app = app
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

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                existing = list(message.get("headers", ()))
                kept = [(k, v) for k, v in existing if k.lower() not in self._names]
                if not any(k.lower() == b"vary" and b"origin" in v.lower() for k, v in kept):
                    kept.append((b"vary", b"Origin"))
                message = {**message, "headers": [*kept, *self._headers]}
            await send(message)

        await self._app(scope, receive, send_with_headers)


class HeaderEncodingCheck:
    """Refuses requests whose header values are not UTF-8.

    connectrpc decodes every header value as UTF-8 before any interceptor runs,
    so one stray byte (in a User-Agent, say) would otherwise become an `unknown`
    error quoting Python's exception. Header values are ASCII by the Connect and
    gRPC specifications; UTF-8 is tolerated.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                if not value.isascii():
                    try:
                        value.decode()
                    except UnicodeDecodeError:
                        await _refuse(scope, send, name.decode("latin-1"))
                        return
        await self._app(scope, receive, send)


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
    """The app behind header checks, CORS (exact-origin allowlist, credentials) and
    security headers (outermost, so that every response carries them)."""
    cors = CORSMiddleware(
        HeaderEncodingCheck(app),
        allow_origins=list(allowed_origins),
        allow_credentials=True,
        allow_methods=["GET", "POST"],
        allow_headers=list(CORS_ALLOW_HEADERS),
        expose_headers=list(CORS_EXPOSE_HEADERS),
        max_age=CORS_MAX_AGE_S,
    )
    return SecurityHeaders(cors, https=https)
