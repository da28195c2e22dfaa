"""Shared test setup.

Scapy fills in a missing destination MAC address by asking the network (ARP, IPv6 neighbour
discovery) for the route's next hop, which would put frames on the machine's real network. Tests
build frames with explicit addresses; a test that forgets fails here instead of sending anything.
"""
import scapy.layers.inet
import scapy.layers.inet6


def _refuse_to_resolve(*_args, **_kwargs):
    raise AssertionError("Scapy was about to resolve a MAC address on the network: give Ether() src and dst")


scapy.layers.inet.getmacbyip = _refuse_to_resolve
scapy.layers.inet6.getmacbyip6 = _refuse_to_resolve
