"""traffic-exporter: count a server's traffic per client, direction and protocol."""

__version__ = "0.1.0"
