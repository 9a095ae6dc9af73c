"""The ASGI entry: routes each request to the Connect application of its service.

Connect, gRPC-Web and gRPC share URL paths (`/package.Service/Method`), so one
dictionary lookup on the service segment finds the application for all three
protocols. A few plain HTTP routes (GET only: probes, metrics) sit beside them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.types import Receive, Scope, Send

log = logging.getLogger("expense_auth.http")


@dataclass(frozen=True, slots=True)
class PlainResponse:
    """A complete, small HTTP response."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(
        cls, status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> PlainResponse:
        """A JSON response."""
        payload = json.dumps(body, separators=(",", ":")).encode()
        return cls(status=status, body=payload, headers=headers or {})


# A plain route gets the request's ASGI scope (for its client address and headers).
Route = Callable[[Scope], Awaitable[PlainResponse]]
Hook = Callable[[], Awaitable[None]]


class MountedApp(Protocol):
    """A generated Connect application: callable, with its service path."""

    @property
    def path(self) -> str:
        """`/package.Service`."""
        ...

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve one request."""
        ...


async def send_plain(send: Send, response: PlainResponse) -> None:
    """Write a PlainResponse."""
    raw = [
        (b"content-type", response.content_type.encode()),
        (b"content-length", str(len(response.body)).encode()),
    ]
    raw += [(k.encode(), v.encode()) for k, v in response.headers.items()]
    await send({"type": "http.response.start", "status": response.status, "headers": raw})
    await send({"type": "http.response.body", "body": response.body})


class Router:
    """Dispatches by service path; runs start-up and shut-down hooks on lifespan."""

    def __init__(
        self,
        apps: Iterable[MountedApp],
        *,
        get_routes: Mapping[str, Route] | None = None,
        on_startup: Iterable[Hook] = (),
        on_shutdown: Iterable[Hook] = (),
    ) -> None:
        self._apps: dict[str, MountedApp] = {app.path: app for app in apps}
        self._get_routes = dict(get_routes or {})
        self._on_startup = list(on_startup)
        self._on_shutdown = list(on_shutdown)

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
            route = self._get_routes.get(path)
            if route is not None and scope["method"] in ("GET", "HEAD"):
                await send_plain(send, await route(scope))
                return
            await send_plain(
                send,
                PlainResponse.json(
                    404,
                    {"code": "not_found", "message": f"no such procedure or route: {path[:200]}"},
                ),
            )
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise RuntimeError(f"unsupported ASGI scope type {kind!r}")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                for hook in self._on_startup:
                    await hook()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for hook in self._on_shutdown:
                    try:
                        await hook()
                    except Exception:
                        log.exception("shutdown step failed")
                await send({"type": "lifespan.shutdown.complete"})
                return
