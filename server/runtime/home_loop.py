"""Runs the admin listener's app on the event loop of the public app.

pyvoy gives each listener's app an event loop, in a thread, of its own. The two
apps share objects that belong to one loop: the PostgreSQL store's asyncpg pool
and connections, the readiness computation (a task that /readyz and the admin
/metrics both await), the Redis client of the rate limits. Used from the admin
loop they fail ("another operation is in progress": an admin DisableUser on
PostgreSQL answered `unavailable`) or break a call of the public loop in flight.

So each admin HTTP request is handed to the public loop, learnt when the public
app starts (its lifespan start-up) and forgotten when it shuts down; its
`receive()` and `send()` are handed back to the loop pyvoy called the app on.
Until the public app has started, and after it has begun to shut down, requests
run where pyvoy calls them, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")


class HomeLoop:
    """The public app's event loop, once it has started."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    async def capture(self) -> None:
        """A start-up hook of the public app: its loop is home from now on."""
        self._loop = asyncio.get_running_loop()

    async def release(self) -> None:
        """A shut-down hook of the public app (the first): requests run where they arrive."""
        self._loop = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The home loop, when there is one that runs."""
        loop = self._loop
        return loop if loop is not None and not loop.is_closed() else None


class OnHomeLoop:
    """Wraps an ASGI app so that its HTTP requests run on the home loop."""

    def __init__(self, app: ASGIApp, home: HomeLoop) -> None:
        self._app = app
        self._home = home

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        home = self._home.loop
        here = asyncio.get_running_loop()
        if scope["type"] != "http" or home is None or home is here:
            await self._app(scope, receive, send)
            return

        async def receive_here() -> Message:
            return await receive()

        async def send_here(message: Message) -> None:
            await send(message)

        async def receive_from_home() -> Message:
            return await _run_on(here, receive_here())

        async def send_from_home(message: Message) -> None:
            await _run_on(here, send_here(message))

        # Cancelling this call (the client went away) cancels the request on the home loop.
        await _run_on(home, self._app(scope, receive_from_home, send_from_home))


async def _run_on(loop: asyncio.AbstractEventLoop, work: Awaitable[T]) -> T:
    async def run() -> T:
        return await work

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), loop))
