"""Decide which client a decoded frame belongs to, in which direction and under which protocol label."""
from __future__ import annotations

import ipaddress
from typing import Iterable, Mapping, Tuple, Union

from .decode import IPPROTO_TCP, IPPROTO_UDP, Decoded

NOT_SERVER = "not_server"
INTERNAL = "internal"
IN = "in"
OUT = "out"
DIRECTIONS = (IN, OUT)  # their order in the counters' arrays
OTHER_LABEL = "OTHER"  # the protocol label of every other port and protocol

DEFAULT_PORT_LABELS: Mapping[tuple[int, int], str] = {
    (IPPROTO_TCP, 80): "HTTP", (IPPROTO_TCP, 8080): "HTTP",
    (IPPROTO_TCP, 443): "HTTPS", (IPPROTO_UDP, 443): "HTTPS",
    (IPPROTO_TCP, 20): "FTP", (IPPROTO_TCP, 21): "FTP",
    (IPPROTO_TCP, 22): "SSH",
    (IPPROTO_UDP, 53): "DNS", (IPPROTO_TCP, 53): "DNS",
}


# A counted flow: (client's packed address, "in" or "out", protocol label).
Classified = Tuple[bytes, str, str]
ClassifyResult = Union[Classified, str]


class ServerSet:
    """Server addresses and networks (IPv4 and IPv6), tested against packed addresses."""

    __slots__ = ("addresses", "networks", "_exact", "_masks")

    def __init__(self, specs: Iterable[str]):
        networks = [ipaddress.ip_network(spec.strip(), strict=False) for spec in specs]
        self.networks = tuple(networks)
        self.addresses = tuple(str(n.network_address) if n.num_addresses == 1 else str(n) for n in networks)
        self._exact = frozenset(n.network_address.packed for n in networks if n.num_addresses == 1)
        # (address length, mask, network) as integers for networks wider than one address
        self._masks = tuple((len(n.network_address.packed), int(n.netmask), int(n.network_address))
                            for n in networks if n.num_addresses > 1)

    def __contains__(self, packed: bytes) -> bool:
        if packed in self._exact:
            return True
        if self._masks:
            value = int.from_bytes(packed, "big")
            size = len(packed)
            return any(size == length and value & mask == network for length, mask, network in self._masks)
        return False

    def __bool__(self) -> bool:
        return bool(self.networks)


def classify(decoded: Decoded, servers: ServerSet,
             port_labels: Mapping[tuple[int, int], str] = DEFAULT_PORT_LABELS) -> ClassifyResult:
    """Return client, direction and label of a decoded frame, or ``NOT_SERVER`` / ``INTERNAL``."""
    src, dst, ip_proto, sport, dport = decoded
    src_is_server = src in servers
    dst_is_server = dst in servers
    if src_is_server == dst_is_server:
        return INTERNAL if src_is_server else NOT_SERVER
    if dst_is_server:
        client, direction, server_port, client_port = src, IN, dport, sport
    else:
        client, direction, server_port, client_port = dst, OUT, sport, dport
    label = port_labels.get((ip_proto, server_port)) or port_labels.get((ip_proto, client_port)) or OTHER_LABEL
    return (client, direction, label)


def protocol_labels(port_labels: Mapping[tuple[int, int], str]) -> tuple[str, ...]:
    """Every label the map can produce, in first-seen order, with ``OTHER_LABEL`` last."""
    labels = dict.fromkeys(label for label in port_labels.values() if label != OTHER_LABEL)
    return (*labels, OTHER_LABEL)
