"""The client's IP address behind proxies, resistant to forged X-Forwarded-For headers.

The TCP peer is the client, unless the peer is one of the trusted proxies: then
the client is the right-most X-Forwarded-For hop that is not a trusted proxy
(hops to its left were written by the client and prove nothing). A header from
an untrusted peer is ignored entirely. The API's calls (interceptors/client_ip.py),
its plain HTTP probes and the forward-auth endpoint all resolve it here.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

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
