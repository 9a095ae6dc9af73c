"""CSRF defences for cookie-authenticated calls, in layers.

1. Connect POSTs must carry `Connect-Protocol-Version: 1`. A browser can only
   send that header after a CORS preflight, which the CORS allowlist decides.
   (Simple content types — text/plain, forms — are already refused with 415 by
   connectrpc, and Connect GET is only served for NO_SIDE_EFFECTS procedures.)
2. Fetch Metadata: a browser marks a request from another site with
   `Sec-Fetch-Site: cross-site`; such a call is refused unless its Origin is on
   the allowlist (the frontend may live on another site).
3. Origin fallback, for browsers without Fetch Metadata: a request whose Origin
   is neither allowlisted nor the server's own is refused.
Clients that are not browsers (grpcurl, service clients) send none of these
headers and are unaffected. Layers 2 and 3 are `server.edge.browser_rules`, which
the forward-auth endpoint applies too.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from connectrpc.request import RequestContext

from server.domain.errors import InvalidArgument
from server.edge.browser_rules import BrowserRules
from server.rpc.context import protocol_of


class BrowserGuard:
    """Refuses cross-site browser calls and Connect POSTs without the protocol header."""

    def __init__(self, allowed_origins: Collection[str]) -> None:
        self._rules = BrowserRules(allowed_origins)

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        """Check the browser-supplied headers before anything else is read."""
        headers = ctx.request_headers
        self._rules.check(
            origin=headers.get("origin"),
            fetch_site=headers.get("sec-fetch-site"),
            host=headers.get("host") or headers.get(":authority") or "",
        )
        if (
            ctx.http_method == "POST"
            and protocol_of(headers.get("content-type", "")) == "connect"
            and headers.get("connect-protocol-version") != "1"
        ):
            raise InvalidArgument(
                "connect-protocol-version",
                "missing required header: set Connect-Protocol-Version to 1",
            )

    async def on_end(
        self, token: None, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        """Nothing to undo."""
