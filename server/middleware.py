"""HTTP-level protections around the whole app: security headers and CORS.

They wrap the router, so they apply to every response: RPC results, Connect and
gRPC errors, preflights, 404s and health checks alike.
"""

from __future__ import annotations

from collections.abc import Collection

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

_BASE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-site"),
)


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


def with_edge(app: ASGIApp, *, allowed_origins: Collection[str], https: bool) -> ASGIApp:
    """The app behind CORS (exact-origin allowlist, credentials) and security headers."""
    cors = CORSMiddleware(
        app,
        allow_origins=list(allowed_origins),
        allow_credentials=True,
        allow_methods=["GET", "POST"],
        allow_headers=list(CORS_ALLOW_HEADERS),
        expose_headers=list(CORS_EXPOSE_HEADERS),
        max_age=CORS_MAX_AGE_S,
    )
    return SecurityHeaders(cors, https=https)
