"""The ASGI entry: routes each request to the Connect application of its service.

Connect, gRPC-Web and gRPC share URL paths (`/package.Service/Method`), so one
dictionary lookup on the service segment finds the application for all three
protocols. A few plain HTTP routes (GET only) sit beside them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from starlette.types import Receive, Scope, Send

log = logging.getLogger("expense_auth.http")

JSONHandler = Callable[[], tuple[int, Mapping[str, Any], Mapping[str, str]]]


class MountedApp(Protocol):
    """A generated Connect application: callable, with its service path."""

    @property
    def path(self) -> str:
        """`/package.Service`."""
        ...

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve one request."""
        ...


async def send_json(
    send: Send, status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> None:
    """A complete JSON response."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class Router:
    """Dispatches by service path; handles lifespan for the whole server."""

    def __init__(
        self,
        apps: Iterable[MountedApp],
        *,
        get_routes: Mapping[str, JSONHandler] | None = None,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        self._apps: dict[str, MountedApp] = {app.path: app for app in apps}
        self._get_routes = dict(get_routes or {})
        self._on_shutdown = on_shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            service, _, method = path.rpartition("/")
            app = self._apps.get(service) if method else None
            if app is not None:
                await app(scope, receive, send)
                return
            handler = self._get_routes.get(path)
            if handler is not None and scope["method"] in ("GET", "HEAD"):
                status, body, headers = handler()
                await send_json(send, status, body, headers)
                return
            await send_json(
                send,
                404,
                {"code": "not_found", "message": f"no such procedure or route: {path[:200]}"},
            )
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise RuntimeError(f"unsupported ASGI scope type {kind!r}")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._on_shutdown is not None:
                    self._on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
