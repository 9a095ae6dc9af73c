"""The caller's IP address, resistant to forged X-Forwarded-For headers.

The TCP peer is the client, unless the peer is one of the configured trusted
proxies: then the client is the right-most X-Forwarded-For hop that is not a
trusted proxy (the rule is `server.edge.client_address.resolve`, which the
forward-auth endpoint shares).

Per-client rate limits key on the client's network (`context.client_network()`): IPv4
by address, IPv6 by its /64 (see `server.domain.throttle.network_key`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import Token
from typing import Any

from connectrpc.request import RequestContext

from server.domain.throttle import network_key
from server.edge.client_address import IPAddress, IPNetwork, peer_ip, resolve
from server.rpc.context import reset_client, set_client

# Re-exported: the interceptors' own name for them.
__all__ = ["ClientAddress", "IPAddress", "IPNetwork", "peer_ip", "resolve"]


class ClientAddress:
    """Resolves the client IP once per call for the interceptors after it."""

    def __init__(self, trusted_proxies: Sequence[IPNetwork], *, ipv6_prefix: int = 64) -> None:
        self._trusted = list(trusted_proxies)
        self._ipv6_prefix = ipv6_prefix

    async def on_start(self, ctx: RequestContext[Any, Any]) -> tuple[Token[str], Token[str]]:
        """Resolve and remember the client IP and network."""
        forwarded = ctx.request_headers.getall("x-forwarded-for") if self._trusted else ()
        ip = resolve(ctx.client_address, forwarded, self._trusted)
        return set_client(ip, network_key(ip, self._ipv6_prefix))

    async def on_end(
        self,
        tokens: tuple[Token[str], Token[str]],
        ctx: RequestContext[Any, Any],
        error: Exception | None,
    ) -> None:
        """Forget them."""
        reset_client(tokens)
