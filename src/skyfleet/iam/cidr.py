"""Client networks: parsing CIDR allow-lists and finding the client's address. Pure functions.

The client address is the ASGI peer (``scope["client"]``). Only when that peer is one of the
configured ``trusted_proxies`` is ``X-Forwarded-For`` consulted: its hops are read from the right
and the first one that is not itself a trusted proxy is the client (hops further left were
written by the client and prove nothing). A malformed hop ends the walk with no address, which no
allow-list admits (fail closed).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Most networks one key's allow-list may hold.
MAX_CIDRS = 64
#: X-Forwarded-For hops examined at most (a longer header is treated as malformed).
MAX_HOPS = 32


def normalise_cidr(value: str) -> str:
    """The canonical form of a network (``10.1.2.3/8`` -> ``10.0.0.0/8``; a bare address is a /32 or /128).

    Raises ValueError for anything that is not an IPv4/IPv6 address or network.
    """
    if not isinstance(value, str) or not value or len(value) > 64:
        raise ValueError("not an IP network")
    net = ipaddress.ip_network(value.strip(), strict=False)
    return str(_unmap_network(net))


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(_unmap_network(ipaddress.ip_network(v, strict=False)) for v in values)


def parse_address(value: str | None) -> IPAddress | None:
    if not value:
        return None
    try:
        addr = ipaddress.ip_address(value.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
    return _unmap(addr)


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]) -> IPAddress | None:
    """The client's address (see the module docstring); None when it cannot be told."""
    addr = parse_address(peer)
    if addr is None or not trusted or not _within(addr, trusted) or not forwarded_for:
        return addr
    hops = forwarded_for.split(",")
    if len(hops) > MAX_HOPS:
        return None
    for hop in reversed(hops):
        addr = parse_address(hop)
        if addr is None:
            return None
        if not _within(addr, trusted):
            return addr
    return addr  # every hop is a trusted proxy: the left-most one is as close to the client as we get


def admitted(addr: IPAddress | None, networks: Sequence[IPNetwork]) -> bool:
    """Whether ``addr`` lies in one of ``networks`` (an unknown address never does)."""
    return addr is not None and _within(addr, networks)


def _within(addr: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(addr.version == net.version and addr in net for net in networks)


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _unmap_network(net: IPNetwork) -> IPNetwork:
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 \
            and net.network_address.ipv4_mapped is not None:
        return ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return net
