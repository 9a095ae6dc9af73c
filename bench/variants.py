"""Experimental builds of the real app, for measuring proposed changes without editing server/.

Each attribute is the service exactly as server/runtime/asgi.py builds it, with one
change patched in before `create_app` runs; `python -m bench.ab` serves them
with `expense-auth serve --app bench.variants:NAME` and compares them with the
unchanged app in interleaved rounds. Nothing here is used by the service.

- `no_limits`: the two rate-limit interceptors removed: the most a cheaper
  limiter could save.
- `without_X`: interceptor X replaced by one that does nothing: what X costs.
- `cheap_request_id`: request ids from a per-process random prefix and a counter
  instead of `secrets.token_hex(8)` (an os.urandom call per request).
- `no_edge`: without the CORS and security-header middleware (their cost).
- `no_principal_cache`: every session lookup goes to SQLite (the cache of
  SQLiteStore.find_principal off): what the cache saves.
- `no_security_headers`: the middleware without its six security headers: what
  handing them to pyvoy costs per response.
- `fused_interceptors`: the leading metadata interceptors of the public services
  run by one interceptor, in the same order with the same unwinding, instead of
  by connectrpc's loop: what a hop per concern costs.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any


class _Nothing:
    """An interceptor that does nothing: stands in for a removed one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def on_start(self, ctx: Any) -> None:
        return None

    async def on_end(self, token: Any, ctx: Any, error: Any) -> None:
        return None


def _without(*names: str) -> Callable[[], None]:
    def patch() -> None:
        import server.app as app

        for name in names:
            setattr(app, name, _Nothing)

    return patch


_no_limits = _without("NetworkRateLimit", "PrincipalRateLimit")


def _cheap_request_id() -> None:
    import interceptors.logging as logging_interceptor

    prefix = os.urandom(4).hex()
    counter = itertools.count()

    class Ids:
        @staticmethod
        def token_hex(n: int) -> str:
            return f"{prefix}{next(counter):08x}"

    setattr(logging_interceptor, "secrets", Ids)  # noqa: B010


def _no_edge() -> None:
    import server.app as app

    setattr(app, "with_edge", lambda router, **kwargs: router)  # noqa: B010


def _no_security_headers() -> None:
    import server.edge.middleware as middleware

    setattr(middleware, "_BASE_HEADERS", ())  # noqa: B010


def _no_principal_cache() -> None:
    from server.storage.sqlite import store

    def unknown(self: Any) -> None:
        return None  # as when the database cannot answer at once: the cache is skipped

    setattr(store.SQLiteStore, "_generation", unknown)  # noqa: B010


class _Fused:
    """Metadata interceptors run as one: on_start in order, on_end in reverse, an
    error raised by an on_end replacing the call's for the ones outside it, as
    connectrpc's MetadataInterceptorsRun does."""

    def __init__(self, parts: Any) -> None:
        self._parts = tuple(parts)

    async def on_start(self, ctx: Any) -> list[tuple[Any, Any]]:
        started: list[tuple[Any, Any]] = []
        try:
            for part in self._parts:
                started.append((part, await part.on_start(ctx)))
        except Exception as exc:
            raise await self._unwind(started, ctx, exc) from None
        return started

    async def on_end(self, started: list[tuple[Any, Any]], ctx: Any, error: Any) -> None:
        final = await self._unwind(started, ctx, error)
        if final is not None and final is not error:
            raise final

    @staticmethod
    async def _unwind(started: list[tuple[Any, Any]], ctx: Any, error: Any) -> Any:
        while started:
            part, token = started.pop()
            try:
                await part.on_end(token, ctx, error)
            except Exception as exc:
                error = exc
        return error


def _fused_interceptors() -> None:
    from connectrpc._interceptor_async import split_leading_metadata_interceptors

    import server.app as app

    def fusing(application: Any) -> Any:
        def build(service: Any, *, interceptors: Any = (), **kwargs: Any) -> Any:
            leading, rest = split_leading_metadata_interceptors(interceptors)
            chain = (_Fused(leading), *rest) if leading else tuple(rest)
            return application(service, interceptors=chain, **kwargs)

        return build

    for name in ("AuthServiceASGIApplication", "UserServiceASGIApplication"):
        setattr(app, name, fusing(getattr(app, name)))


PATCHES: dict[str, tuple[Callable[[], None], ...]] = {
    "baseline": (),
    "no_limits": (_no_limits,),
    **{
        f"without_{name}": (_without(name),)
        for name in (
            "ErrorBoundary",
            "ClientAddress",
            "RequestLogger",
            "MetricsRecorder",
            "BrowserGuard",
            "PrincipalRateLimit",
            "Deadline",
        )
    },
    "cheap_request_id": (_cheap_request_id,),
    "no_edge": (_no_edge,),
    "no_security_headers": (_no_security_headers,),
    "no_principal_cache": (_no_principal_cache,),
    "fused_interceptors": (_fused_interceptors,),
}


def __getattr__(name: str) -> Any:
    """Build the named variant on first access (pyvoy asks for one attribute)."""
    if name not in PATCHES:
        raise AttributeError(name)
    for patch in PATCHES[name]:
        patch()
    from server.app import app_from_environment

    app = app_from_environment().asgi
    globals()[name] = app
    return app
