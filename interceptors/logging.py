"""Structured request logging: one line per RPC, never a cookie, token or secret.

Each call gets a request id: the caller's `X-Request-Id` when it is a short,
safe token, a fresh one otherwise. It is returned in the `X-Request-Id`
response header so that a user's bug report can be matched to the log line.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from connectrpc.code import Code
from connectrpc.request import RequestContext

from server.rpc.context import (
    REQUEST_ID_HEADER,
    client_ip,
    procedure_of,
    protocol_of,
    request_id_of,
    set_request_id,
)
from server.rpc.errors import code_of

log = logging.getLogger("expense_auth.rpc")

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class RequestLogger:
    """Logs procedure, protocol, code, duration, client address and request id."""

    async def on_start(self, ctx: RequestContext[Any, Any]) -> float:
        """Assign the request id and start the timer."""
        incoming = ctx.request_headers.get(REQUEST_ID_HEADER, "")
        request_id = incoming if _SAFE_ID.fullmatch(incoming) else secrets.token_hex(8)
        ctx.response_headers[REQUEST_ID_HEADER] = request_id
        set_request_id(request_id)
        return time.perf_counter()

    async def on_end(
        self, started: float, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        """Write the access log line."""
        code = code_of(error)
        duration_ms = (time.perf_counter() - started) * 1000
        level = logging.ERROR if code is Code.INTERNAL else logging.INFO
        if not log.isEnabledFor(level):
            return
        log.log(
            level,
            "rpc",
            extra={
                "procedure": procedure_of(ctx),
                "protocol": protocol_of(ctx.request_headers.get("content-type", "")),
                "http_method": ctx.http_method,
                "code": "ok" if code is None else code.value,
                "duration_ms": round(duration_ms, 3),
                "client": client_ip() or ctx.client_address or "",
                "peer": ctx.client_address or "",
                "request_id": request_id_of(ctx),
            },
        )
