"""The interfaces of this network namespace, the one holding the default route, and the server addresses.

Scapy reads them from the kernel (netlink): interfaces with their addresses, and the routing tables.
"""
from __future__ import annotations

import ipaddress
from typing import NamedTuple, Optional, Sequence

from .frames import SourceError

ANY_INTERFACE = "any"
# <linux/if_arp.h> hardware types, <linux/if.h> flags
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
ARPHRD_RAWIP = 519
ARPHRD_NONE = 0xFFFE
IFF_UP = 0x1


class InterfaceNotFound(SourceError):
    """The capture interface does not exist (at start-up: a configuration error)."""


class Interface(NamedTuple):
    """What the capture needs to know about an interface, read through Scapy's netlink provider."""

    name: str
    index: int
    hardware_type: int  # ARPHRD_*
    up: bool
    addresses: tuple[str, ...]  # IPv4 and IPv6, as the kernel lists them


def list_interfaces() -> dict[str, Interface]:
    """Every interface of this host (or network namespace), read fresh: an interface may come and go.

    Scapy's provider for the platform reads them: netlink on Linux, the OS's own calls elsewhere.
    """
    import scapy.arch  # noqa: F401 -- registers the platform's interface provider
    from scapy.config import conf

    conf.ifaces.reload()
    found = {}
    for iface in conf.ifaces.values():
        addresses = tuple(address for version in (4, 6) for address in iface.ips.get(version, ()))
        try:
            up = bool(int(iface.flags) & IFF_UP)  # IFF_UP is 1 on Linux and the BSDs
        except (TypeError, ValueError):
            up = iface.is_valid()
        found[iface.network_name] = Interface(iface.network_name, iface.index, getattr(iface, "type", ARPHRD_ETHER),
                                              up, addresses)
    return found


def server_addresses(interface: str) -> tuple[str, ...]:
    """The default server set: the interface's IPv4 and global IPv6 addresses (all interfaces for ``any``).

    Link-local IPv6 addresses are left out (they carry neighbour discovery, not clients), and so are
    loopback addresses when capturing on ``any``.
    """
    interfaces = list_interfaces()
    if interface == ANY_INTERFACE:
        candidates = [address for iface in interfaces.values() for address in iface.addresses]
    elif interface in interfaces:
        candidates = list(interfaces[interface].addresses)
    else:
        raise InterfaceNotFound(not_found_message(interface, interfaces))
    chosen = []
    for text in candidates:
        address = ipaddress.ip_address(text.split("%")[0])
        if address.version == 6 and address.is_link_local:
            continue
        if interface == ANY_INTERFACE and address.is_loopback:
            continue
        if str(address) not in chosen:
            chosen.append(str(address))
    return tuple(chosen)


def default_route_interface(routes: Sequence[tuple], routes6: Sequence[tuple] = ()) -> Optional[str]:
    """The interface of the IPv4 default route with the lowest metric, else of the IPv6 one.

    ``routes`` and ``routes6`` are Scapy's routing tables (``conf.route.routes``: net, mask, gateway,
    interface, source, metric; ``conf.route6.routes``: prefix, length, next hop, interface, sources,
    metric). A route without an interface (unreachable, prohibit) or through the loopback is no way out.
    """
    for table, is_default in ((routes, lambda route: route[0] == 0 and route[1] == 0),
                              (routes6, lambda route: route[1] == 0)):
        candidates = [(route[5], route[3]) for route in table
                      if is_default(route) and route[3] and route[3] != "lo"]
        if candidates:
            return min(candidates)[1]
    return None


def default_interface() -> str:
    """The interface holding the default route; InterfaceNotFound when there is none."""
    from scapy.config import conf
    import scapy.route  # noqa: F401 -- fills conf.route
    import scapy.route6  # noqa: F401 -- fills conf.route6

    name = default_route_interface(conf.route.routes, conf.route6.routes)
    if name is None:
        raise InterfaceNotFound("no default route to pick a capture interface from; pass --interface NAME")
    return name


def not_found_message(name: str, interfaces: dict) -> str:
    """One line naming the interfaces that do exist."""
    return f"no interface named {name!r} (available: {', '.join(sorted(interfaces)) or 'none'}, any)"


def loopback_index() -> int:
    """The index of the loopback interface, 0 if there is none."""
    for interface in list_interfaces().values():
        if interface.hardware_type == ARPHRD_LOOPBACK:
            return interface.index
    return 0
