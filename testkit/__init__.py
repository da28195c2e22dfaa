"""Helpers that start real things for the tests and the benchmark: the exporter as a process, network
namespaces joined by a veth pair, traffic and tcpdump inside them."""
