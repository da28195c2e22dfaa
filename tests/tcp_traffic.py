"""A capture of TCP connections with known handshake delays, retransmissions, reordering, keep-alives,
sequence wrap-around, resets, SYN and SYN-ACK retransmissions and half-open connections, and the exact
TCP health figures it must give (worked out here by hand, not by the code under test)."""
from __future__ import annotations

from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from exporter.tally import Tally

SERVER_V4, SERVER_V6 = "10.0.0.1", "fd00::1"
START = 1_700_000_000.0
MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}


class Connection:
    """Frames of one TCP connection between a client and the server, appended with their times."""

    def __init__(self, frames: list, client: str, client_port: int, server_port: int, client_isn: int,
                 server_isn: int, vlan: int = 0):
        self.frames, self.client, self.server = frames, client, SERVER_V6 if ":" in client else SERVER_V4
        self.client_port, self.server_port, self.vlan = client_port, server_port, vlan
        self.seq = {"in": client_isn, "out": server_isn}  # next sequence number per direction

    def send(self, at: float, direction: str, flags: str, payload: int = 0, seq: int = None, ack: int = None):
        """A segment at ``START + at`` s; ``seq`` defaults to the direction's next sequence number."""
        inbound = direction == "in"
        network = IPv6 if ":" in self.client else IP
        ip = network(src=self.client, dst=self.server) if inbound else network(src=self.server, dst=self.client)
        mine, theirs = ("in", "out") if inbound else ("out", "in")
        tcp = TCP(sport=self.client_port if inbound else self.server_port,
                  dport=self.server_port if inbound else self.client_port, flags=flags,
                  seq=(self.seq[mine] if seq is None else seq) % 2**32,
                  ack=(self.seq[theirs] if ack is None else ack) % 2**32 if "A" in flags else 0)
        layers = ip / tcp / Raw(bytes(payload)) if payload else ip / tcp
        frame = Ether(**MACS) / Dot1Q(vlan=self.vlan) / layers if self.vlan else Ether(**MACS) / layers
        frame.time = START + at
        self.frames.append(frame)
        if seq is None:
            self.seq[mine] += payload + ("S" in flags)

    def handshake(self, at: float, rtt: float, server_delay: float = 0.0001):
        self.send(at, "in", "S")
        self.send(at + server_delay, "out", "SA")
        self.send(at + server_delay + rtt, "in", "A")


def build(path: Path) -> dict:
    """Write the capture to ``path``; return per client the figures TCP health must report."""
    frames: list = []
    # A (IPv4): HTTP, handshake 12.3 ms; the server's second segment retransmitted once; an
    # out-of-order pair that fills its own hole (no retransmission); a keep-alive; a reset from the client.
    a = Connection(frames, "10.0.0.2", 40001, 80, 1000, 2**31)
    a.handshake(0.0, 0.0123)
    a.send(0.02, "in", "PA", 100)
    for at in (0.03, 0.031):
        a.send(at, "out", "A", 1000)
    a.send(0.25, "out", "A", 1000, seq=a.seq["out"] - 1000)  # retransmission of the second
    first = a.seq["out"]
    a.send(0.26, "out", "A", 1000, seq=first + 1000)  # arrives before the segment in front of it
    a.send(0.261, "out", "A", 1000, seq=first)        # fills the hole: new data
    a.seq["out"] = first + 2000
    a.send(5.0, "in", "A", 1, seq=a.seq["in"] - 1)   # keep-alive: one byte below the next sequence number
    a.send(5.1, "in", "RA")
    # B (IPv4, VLAN 7): HTTPS, SYN sent twice, SYN-ACK sent twice: 40 ms from the last SYN-ACK; the
    # server's sequence numbers wrap past 2**32 and the segment across the wrap is retransmitted.
    b = Connection(frames, "10.0.0.3", 40002, 443, 77, 2**32 - 500, vlan=7)
    b.send(1.0, "in", "S")
    b.send(2.0, "in", "S", seq=77)
    b.send(2.001, "out", "SA")
    b.send(3.001, "out", "SA", seq=2**32 - 500)
    b.send(3.041, "in", "A")
    for at in (3.05, 3.051):
        b.send(at, "out", "PA", 400)  # the second runs from 2**32 - 99 across the wrap
    b.send(3.3, "out", "PA", 400, seq=2**32 - 99)
    b.send(3.31, "out", "PA", 400)
    # C (IPv6): SSH, handshake 0.7 s; the client retransmits one segment; the server resets.
    c = Connection(frames, "fd00::3", 40003, 22, 5, 9)
    c.handshake(4.0, 0.7)
    c.send(4.8, "in", "PA", 50)
    c.send(5.2, "in", "PA", 50, seq=c.seq["in"] - 50)
    c.send(5.3, "out", "PA", 60)
    c.send(5.4, "out", "R", seq=c.seq["out"])
    # D (IPv4): a half-open connection (SYN, SYN-ACK, then nothing), and a connection whose start
    # was not captured, with one duplicated segment.
    d = Connection(frames, "10.0.0.4", 40004, 80, 3000, 4000)
    d.send(6.0, "in", "S")
    d.send(6.0002, "out", "SA")
    mid = Connection(frames, "10.0.0.4", 40005, 80, 123456, 654321)
    for at in (6.1, 6.2):
        mid.send(at, "out", "PA", 700)
    mid.send(6.5, "out", "PA", 700, seq=mid.seq["out"] - 700)
    mid.send(6.6, "in", "A")
    frames.sort(key=lambda frame: frame.time)
    wrpcap(str(path), frames)
    return {
        "10.0.0.2": {"handshakes": {"HTTP": 1}, "rtt": [0.0123], "segments": {"in": 1, "out": 5},
                     "retransmitted": {"in": 0, "out": 1}, "resets": {"in": 1, "out": 0}},
        "10.0.0.3": {"handshakes": {"HTTPS": 1}, "rtt": [0.040], "segments": {"in": 0, "out": 4},
                     "retransmitted": {"in": 0, "out": 1}, "resets": {"in": 0, "out": 0}},
        "fd00::3": {"handshakes": {"SSH": 1}, "rtt": [0.7], "segments": {"in": 2, "out": 1},
                    "retransmitted": {"in": 1, "out": 0}, "resets": {"in": 0, "out": 1}},
        "10.0.0.4": {"handshakes": {}, "rtt": [], "segments": {"in": 0, "out": 3},
                     "retransmitted": {"in": 0, "out": 1}, "resets": {"in": 0, "out": 0}},
    }


def tcp_health_tally(tmp_path: Path, max_clients: int = 1000, clock=None):
    """A tally fed with tests/tcp_traffic.py's capture, TCP health on; and the capture's ground truth."""
    import threading

    from exporter.classify import DEFAULT_PORT_LABELS, ServerSet, protocol_labels
    from exporter.engine import FrameCounter
    from exporter.replay import PcapSource
    from exporter.tcpflows import FlowTable
    expected = build(tmp_path / "tcp.pcap")
    labels = protocol_labels(DEFAULT_PORT_LABELS)
    counter = FrameCounter(ServerSet(["10.0.0.1", "fd00::1"]), DEFAULT_PORT_LABELS, labels,
                           tcp_flows=FlowTable(1000))
    tally = Tally(max_clients=max_clients, labels=labels, max_tcp_flows=1000,
                  **({"clock": clock} if clock else {}))
    for batch in PcapSource(str(tmp_path / "tcp.pcap"), timestamps=True).batches(threading.Event()):
        tally.record(counter.count(batch))
    return tally, expected
