"""A server-side ceiling on how long one unary call may run.

Clients set their own deadline (Connect-Timeout-Ms, grpc-timeout), which
connectrpc enforces; a client that sets none, or a huge one, still gets at most
the configured time, so that a stuck dependency cannot pile up calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

REQ = TypeVar("REQ")
RES = TypeVar("RES")


class Deadline:
    """Bounds every unary call by `seconds`."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], Awaitable[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
    ) -> RES:
        """Run the call with a timeout."""
        try:
            async with asyncio.timeout(self._seconds):
                return await call_next(request, ctx)
        except TimeoutError:
            raise ConnectError(
                Code.DEADLINE_EXCEEDED,
                f"the call did not finish within the server's limit of {self._seconds:g} s",
            ) from None
