"""The caller's IP address, resistant to forged X-Forwarded-For headers.

The TCP peer is the client, unless the peer is one of the configured trusted
proxies: then the client is the right-most X-Forwarded-For hop that is not a
trusted proxy (hops to its left were written by the client and prove nothing).
A header from an untrusted peer is ignored entirely.

Per-client rate limits key on the client's network (`context.client_network()`): IPv4
by address, IPv6 by its /64 (see `server.domain.throttle.network_key`).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from contextvars import Token
from typing import Any

from connectrpc.request import RequestContext

from server.domain.throttle import network_key
from server.rpc.context import reset_client, set_client

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> IPAddress | None:
    """An IP address, or None; cached, as every call parses its peer's."""
    text = text.strip().strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def peer_ip(address: str | None) -> IPAddress | None:
    """The IP of an `ip:port` peer (connectrpc writes IPv6 peers without brackets)."""
    if not address:
        return None
    if address.startswith("["):
        return _parse(address[1:].partition("]")[0])
    return _parse(address.rpartition(":")[0] if ":" in address else address)


def resolve(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]) -> str:
    """The client IP for a call from `peer` carrying these X-Forwarded-For headers."""
    ip = peer_ip(peer)
    if ip is None:
        return ""
    if not any(ip in net for net in trusted):
        return str(ip)
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        hop_ip = _parse(hop)
        if hop_ip is None:
            break  # garbage in the chain: trust nothing to its left
        if not any(hop_ip in net for net in trusted):
            return str(hop_ip)
        ip = hop_ip
    return str(ip)


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
