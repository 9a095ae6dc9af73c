"""An ASGI middleware that makes pyvoy's `receive()` wait once the body is read.

The ASGI spec says `receive()` blocks after the last body chunk until the client
disconnects. pyvoy 1.3 instead answers at once with another empty body chunk.
connectrpc watches for a disconnect by calling `receive()` in a loop during
every call, so under pyvoy that loop spins (tens of thousands of calls per
second per request), and when connectrpc cancels the watcher pyvoy's callback
raises `InvalidStateError`, logging a traceback per gRPC call.

Here, after the body is complete, `receive()` checks for a disconnect once per
`poll_s` instead of spinning, and pyvoy's future is shielded from cancellation
so its callback always finds it pending. The price is that a disconnect during
a long call is noticed up to `poll_s` late.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ReceiveAfterBodyFix:
    """Wraps an ASGI app; only HTTP requests are affected."""

    def __init__(self, app: ASGIApp, *, poll_s: float = 1.0) -> None:
        self._app = app
        self._poll_s = poll_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        body_done = False
        poll_s = self._poll_s

        async def patient_receive() -> Message:
            nonlocal body_done
            if not body_done:
                message = await asyncio.shield(receive())
                if message["type"] != "http.request" or not message.get("more_body", False):
                    body_done = True
                return message
            while True:
                message = await asyncio.shield(receive())
                if message["type"] != "http.request":
                    return message
                await asyncio.sleep(poll_s)

        await self._app(scope, patient_receive, send)
