"""The admin API's credential: a bearer token from the environment.

Compared in constant time. Without ADMIN_TOKEN configured the admin API refuses
every call, so a forgotten setting fails closed.
"""

from __future__ import annotations

import hmac
from typing import Any

from connectrpc.request import RequestContext

from server.domain.errors import PermissionDenied


class AdminAuth:
    """Refuses admin calls without `Authorization: Bearer <ADMIN_TOKEN>`."""

    def __init__(self, token: str | None) -> None:
        self._expected = token.encode() if token else None

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        """Check the credential before the request body is read."""
        if self._expected is None:
            raise PermissionDenied("the admin API is disabled: set ADMIN_TOKEN to enable it")
        scheme, _, presented = ctx.request_headers.get("authorization", "").partition(" ")
        # The scheme name is case-insensitive (RFC 9110); the token is compared in
        # constant time.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), self._expected
        ):
            raise PermissionDenied("the admin API needs 'Authorization: Bearer <ADMIN_TOKEN>'")

    async def on_end(
        self, token: None, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        """Nothing to undo."""
