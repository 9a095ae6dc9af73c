"""The error boundary, outermost: no exception reaches a client unmapped.

connectrpc sends `str(exc)` of an unexpected exception to the client as
`unknown`; that can leak internals. Here domain errors become their Connect
code with their own message, and anything unexpected becomes `internal` with a
generic message while the traceback goes to the server log only, tagged with
the request id the client also sees, and to the error tracker when there is one.
"""

from __future__ import annotations

import logging
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from server.domain.errors import DomainError, RateLimited, Unavailable
from server.ops.reports import Report
from server.rpc.context import current_request_id, procedure_of, request_id_of
from server.rpc.errors import INTERNAL_MESSAGE, client_fault, to_connect_error

log = logging.getLogger("expense_auth.errors")


class ErrorBoundary:
    """Maps every error leaving a handler or an inner interceptor to a clean Connect error.

    Args:
        report: Where unexpected errors go besides the log (the error tracker).
    """

    def __init__(self, *, report: Report | None = None) -> None:
        self._report = report

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        """Nothing to do before the call."""
        return None

    async def on_end(
        self, token: None, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        """Replace the call's error by its public form."""
        if error is None:
            return
        if isinstance(error, ConnectError):
            replacement = client_fault(error)
            if replacement is not None:
                raise replacement from None
            return
        if isinstance(error, DomainError):
            if isinstance(error, RateLimited | Unavailable) and error.retry_after_s:
                ctx.response_headers["retry-after"] = str(error.retry_after_s)
            raise to_connect_error(error) from None
        request_id = request_id_of(ctx)
        log.error(
            "unhandled exception in %s/%s",
            ctx.method.service_name,
            ctx.method.name,
            exc_info=error,
            extra={"request_id": request_id},
        )
        if self._report is not None:
            self._report(error, tags={"request_id": request_id, "procedure": procedure_of(ctx)})
        raise ConnectError(Code.INTERNAL, INTERNAL_MESSAGE) from None

    def encode_failed(self, error: Exception) -> None:
        """A response could not be encoded (server/rpc/codecs.py GuardedEncoding): log
        and report it as any unexpected error; the client gets `internal`."""
        request_id = current_request_id()
        log.error("could not encode a response", exc_info=error, extra={"request_id": request_id})
        if self._report is not None:
            self._report(error, tags={"request_id": request_id, "stage": "encode"})
