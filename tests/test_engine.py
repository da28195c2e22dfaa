"""The array engine counts exactly what decode_frame + classify count, frame by frame, on any batch."""
from __future__ import annotations

import functools
import ipaddress
import pathlib
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.classify import DEFAULT_PORT_LABELS, IN, OUT, ServerSet, classify, protocol_labels
from exporter.decode import LINKTYPE_ETHERNET, decode_frame
from exporter.clients import ClientGrouping
from exporter.engine import FrameCounter
from exporter.frames import FrameBatch
from exporter.replay import PcapSource
from tests.builders import spans_of
from tests.builders import random_frame

LABELS = protocol_labels(DEFAULT_PORT_LABELS)
CORPUS = pathlib.Path(__file__).parent / "data" / "corpus" / "pcaps"


@functools.lru_cache(maxsize=None)
def frame_pool() -> tuple[tuple[int, bytes], ...]:
    """Random frames of every link type and shape, built with Scapy once."""
    rng = random.Random(7)
    return tuple(random_frame(rng) for _ in range(600))


def reference(link_type, buffer, spans, servers, prefixes=(32, 128)):
    """What the per-frame reference path counts: (client text, direction, label) -> [bytes, packets]."""
    sums, ignored = {}, {}
    for start, end, wire in spans:
        decoded = decode_frame(link_type, buffer, start, end)
        result = decoded if isinstance(decoded, str) else classify(decoded, servers, DEFAULT_PORT_LABELS)
        if isinstance(result, str):
            ignored[result] = ignored.get(result, 0) + 1
            continue
        packed, direction, label = result
        prefix = prefixes[0] if len(packed) == 4 else prefixes[1]
        network = ipaddress.ip_network((packed, prefix), strict=False)
        key = (str(network.network_address) if prefix == len(packed) * 8 else str(network), direction, label)
        total = sums.setdefault(key, [0, 0])
        total[0] += wire
        total[1] += 1
    return sums, ignored


def engine_sums(counts, prefixes=(32, 128)):
    sums = {}
    grouping = ClientGrouping(*prefixes)
    for family, hi, lo, cells in zip(counts.family.tolist(), counts.hi.tolist(), counts.lo.tolist(), counts.counts):
        client = grouping.name((family, hi, lo))
        for d, direction in enumerate((IN, OUT)):
            for index, label in enumerate(LABELS):
                nbytes, packets = int(cells[0, d, index]), int(cells[1, d, index])
                if packets:
                    total = sums.setdefault((client, direction, label), [0, 0])
                    total[0] += nbytes
                    total[1] += packets
    return sums


def count(link_type, buffer, spans, servers, prefixes=(32, 128)):
    counter = FrameCounter(servers, DEFAULT_PORT_LABELS, LABELS, ClientGrouping(*prefixes))
    return counter.count(FrameBatch.from_spans(link_type, buffer, spans))


def servers_for(frames, rng):
    """A server set drawn from the frames' own addresses (some as networks), so every result occurs."""
    addresses = []
    for link_type, data in frames:
        decoded = decode_frame(link_type, data)
        if not isinstance(decoded, str):
            addresses.append(decoded[rng.randrange(2)])
    specs = []
    for packed in rng.sample(addresses, min(len(addresses), rng.randrange(1, 6))):
        bits = len(packed) * 8
        prefix = rng.choice([bits, bits, bits - 8, bits // 2])
        specs.append(str(ipaddress.ip_network((packed, prefix), strict=False)))
    return ServerSet(specs)


def batch_from(pieces):
    """One buffer holding the frames at odd offsets with junk between; the last frame at the very end."""
    buffer, spans = bytearray(b"\xaa" * 3), []
    for data, wire, gap in pieces:
        start = len(buffer)
        buffer += data
        spans.append((start, len(buffer), wire))
        buffer += b"\x55" * gap
    if pieces and pieces[-1][2]:
        del buffer[spans[-1][1]:]  # the last frame ends exactly where the buffer ends
    return bytes(buffer), spans


mutation = st.tuples(st.integers(0, 120), st.integers(0, 255))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), picks=st.lists(st.tuples(
    st.integers(0, 599), st.lists(mutation, max_size=3), st.integers(0, 200), st.integers(0, 9),
    st.sampled_from([None, 0, 1, 65535, 65536, 2**32 - 1])), min_size=1, max_size=40),
    prefixes=st.sampled_from([(32, 128), (24, 48), (0, 0), (31, 127)]))
def test_engine_equals_the_reference_on_mixed_batches(seed, picks, prefixes):
    pool = frame_pool()
    rng = random.Random(seed)
    link_type = pool[picks[0][0]][0]
    pieces, frames = [], []
    for index, mutations, cut, gap, wire in picks:
        frame_link, data = pool[index]
        if frame_link != link_type:
            continue
        data = bytearray(data)
        for position, value in mutations:
            if position < len(data):
                data[position] = value
        data = bytes(data[:max(0, len(data) - cut)] if cut < 150 else data)
        frames.append((link_type, data))
        pieces.append((data, len(data) if wire is None else wire, gap))
    buffer, spans = batch_from(pieces)
    servers = servers_for(frames, rng)
    counts = count(link_type, buffer, spans, servers, prefixes)
    expected, ignored = reference(link_type, buffer, spans, servers, prefixes)
    assert engine_sums(counts, prefixes) == expected
    assert counts.ignored == ignored


def test_common_frames_take_the_fast_path():
    pool = [(link, data) for link, data in frame_pool() if link == LINKTYPE_ETHERNET]
    buffer, spans = batch_from([(data, len(data), 0) for _, data in pool])
    counts = count(LINKTYPE_ETHERNET, buffer, spans, servers_for(pool, random.Random(1)))
    decoded = [decode_frame(LINKTYPE_ETHERNET, data) for _, data in pool]
    assert counts.slow_frames <= sum(1 for _ in decoded) // 5  # only odd shapes (3 tags, long chains)


def test_a_digest_collision_between_two_clients_is_counted_exactly():
    from exporter.clients import _MIX
    # An IPv6 client whose digest equals an IPv4 client's: hi * M0 == 2 and the same low half.
    hi = 2 * pow(int(_MIX[0]), -1, 2**64) % 2**64
    v6 = ipaddress.IPv6Address(hi << 64 | int(ipaddress.IPv4Address("198.51.100.7")))
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    frames = [bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="198.51.100.7", dst="192.0.2.1") / UDP(sport=5, dport=53)),
              bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IPv6(src=str(v6), dst="2001:db8::1") / UDP(sport=5, dport=53))]
    buffer, spans = batch_from([(data, len(data), 0) for data in frames])
    servers = ServerSet(["192.0.2.1", "2001:db8::1"])
    counts = count(LINKTYPE_ETHERNET, buffer, spans, servers)
    assert engine_sums(counts) == reference(LINKTYPE_ETHERNET, buffer, spans, servers)[0]
    assert len(counts.family) == 2


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.pcap*")), ids=lambda p: p.name)
def test_engine_equals_the_reference_on_the_corpus(path):
    try:
        source = PcapSource(str(path))
        batches = list(source.batches(threading.Event()))
    except Exception:
        pytest.skip("not readable as a whole")
    for batch in batches:
        spans = spans_of(batch)
        frames = [(batch.link_type, bytes(batch.buffer[s:e])) for s, e, _ in spans]
        servers = servers_for(frames, random.Random(3)) if frames else ServerSet([])
        counts = count(batch.link_type, batch.buffer, spans, servers)
        expected, ignored = reference(batch.link_type, batch.buffer, spans, servers)
        assert engine_sums(counts) == expected
        assert counts.ignored == ignored


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), batches=st.lists(st.lists(st.integers(0, 599), min_size=1, max_size=30),
                                                    min_size=1, max_size=8),
       capacity=st.sampled_from([1, 4, 16, 1 << 16]))
def test_one_counter_over_many_batches_stays_exact_as_its_client_ids_fill_and_start_afresh(seed, batches, capacity):
    pool = [frame for frame in frame_pool() if frame[0] == LINKTYPE_ETHERNET]
    rng = random.Random(seed)
    servers = servers_for(pool, rng)
    counter = FrameCounter(servers, DEFAULT_PORT_LABELS, LABELS, client_index_capacity=capacity)
    for picks in batches:
        frames = [pool[index % len(pool)][1] for index in picks]
        buffer, spans = batch_from([(data, len(data), 0) for data in frames])
        counts = counter.count(FrameBatch.from_spans(LINKTYPE_ETHERNET, buffer, spans))
        assert engine_sums(counts) == reference(LINKTYPE_ETHERNET, buffer, spans, servers)[0]


# TCP health: the engine's per-client sums of the flow tracker's events, against hand-made ground truth.

def tcp_health_by_client(counts_list, prefixes=(32, 128)):
    """Per client: handshakes by label, round trips (count, sum s, bucket counts), segments, retransmitted, resets."""
    from exporter.tcpflows import tcp_columns

    columns, grouping, found = tcp_columns(len(LABELS)), ClientGrouping(*prefixes), {}
    for counts in counts_list:
        for family, hi, lo, row in zip(counts.family.tolist(), counts.hi.tolist(), counts.lo.tolist(), counts.tcp):
            client = found.setdefault(grouping.name((family, hi, lo)), {
                "handshakes": {}, "rtt_buckets": [0] * 14, "rtt_sum": 0, "segments": {"in": 0, "out": 0},
                "retransmitted": {"in": 0, "out": 0}, "resets": {"in": 0, "out": 0}})
            for index, label in enumerate(LABELS):
                if row[columns.handshakes + index]:
                    client["handshakes"][label] = client["handshakes"].get(label, 0) + int(row[index])
            client["rtt_buckets"] = [a + int(b) for a, b in zip(client["rtt_buckets"],
                                                                row[columns.rtt_buckets:columns.rtt_sum_ns])]
            client["rtt_sum"] += int(row[columns.rtt_sum_ns]) / 1e9
            for name in ("segments", "retransmitted", "resets"):
                first = getattr(columns, name)
                for d, direction in enumerate((IN, OUT)):
                    client[name][direction] += int(row[first + d])
    return found


def expected_health(expected):
    """The ground truth in tcp_health_by_client's shape: each round trip in its bucket (le: at most the bound)."""
    import bisect

    from exporter.tcpflows import RTT_BUCKETS

    shaped = {}
    for client, truth in expected.items():
        buckets = [0] * 14
        for rtt in truth["rtt"]:
            buckets[bisect.bisect_left(RTT_BUCKETS, rtt)] += 1
        shaped[client] = {"handshakes": truth["handshakes"], "rtt_buckets": buckets, "rtt_sum": sum(truth["rtt"]),
                          **{name: truth[name] for name in ("segments", "retransmitted", "resets")}}
    return shaped


def counted_with_tcp_health(path, native=True, batch_frames=None, timestamps=True, prefixes=(32, 128)):
    from exporter.tcpflows import FlowTable, native_library

    if native and native_library() is None:
        pytest.skip("exporter/native/walk.so is not built")
    counter = FrameCounter(ServerSet(["10.0.0.1", "fd00::1"]), DEFAULT_PORT_LABELS, LABELS,
                           ClientGrouping(*prefixes), tcp_flows=FlowTable(1000, native=native))
    results = []
    for batch in PcapSource(str(path), timestamps=timestamps).batches(threading.Event()):
        step = batch_frames or len(batch)
        results.extend(counter.count(batch.part(begin, begin + step)) for begin in range(0, len(batch), step))
    return results, counter


@pytest.fixture(scope="module")
def tcp_capture(tmp_path_factory):
    from tests.tcp_traffic import build

    path = tmp_path_factory.mktemp("tcp") / "tcp.pcap"
    return path, build(path)


def rounded(health: dict) -> dict:
    """Per-client TCP health with the round-trip sum to the microsecond (frame times are float seconds)."""
    return {client: {**figures, "rtt_sum": round(figures["rtt_sum"], 6)} for client, figures in health.items()}


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("batch_frames", [None, 1, 3], ids=["one-batch", "frame-by-frame", "three-a-batch"])
def test_tcp_health_per_client_equals_the_ground_truth(tcp_capture, native, batch_frames):
    path, expected = tcp_capture
    counted, counter = counted_with_tcp_health(path, native, batch_frames)
    assert rounded(tcp_health_by_client(counted)) == rounded(expected_health(expected))
    assert counter.tcp_flows.flows == 5 and counter.tcp_flows.evictions == 0


def test_tcp_health_counts_handshakes_without_round_trips_when_frames_have_no_time(tcp_capture):
    path, expected = tcp_capture
    found = tcp_health_by_client(counted_with_tcp_health(path, timestamps=False)[0])
    assert {client: figures["handshakes"] for client, figures in found.items()} == {
        client: truth["handshakes"] for client, truth in expected.items()}
    assert all(sum(figures["rtt_buckets"]) == 0 for figures in found.values())


def test_tcp_health_follows_the_client_prefix(tcp_capture):
    path, expected = tcp_capture
    found = tcp_health_by_client(counted_with_tcp_health(path, prefixes=(24, 64))[0], prefixes=(24, 64))
    v4 = [truth for client, truth in expected.items() if "." in client]
    assert sorted(found) == ["10.0.0.0/24", "fd00::/64"]
    assert found["10.0.0.0/24"]["segments"] == {d: sum(t["segments"][d] for t in v4) for d in (IN, OUT)}
    assert found["10.0.0.0/24"]["handshakes"] == {"HTTP": 1, "HTTPS": 1}


def test_tcp_health_changes_no_byte_count_and_off_adds_nothing(tcp_capture):
    path, _ = tcp_capture
    counted, _ = counted_with_tcp_health(path)
    plain = FrameCounter(ServerSet(["10.0.0.1", "fd00::1"]), DEFAULT_PORT_LABELS, LABELS)
    without = [plain.count(batch) for batch in PcapSource(str(path)).batches(threading.Event())]
    assert all(counts.tcp is None for counts in without)
    assert engine_sums(without[0]) == engine_sums(counted[0])


@pytest.mark.parametrize("capacity", [1, 2], ids=lambda c: f"client-ids-{c}")
def test_tcp_health_stays_exact_when_clients_are_summed_by_sorting(tcp_capture, capacity):
    from exporter.tcpflows import FlowTable

    path, expected = tcp_capture
    counter = FrameCounter(ServerSet(["10.0.0.1", "fd00::1"]), DEFAULT_PORT_LABELS, LABELS,
                           client_index_capacity=capacity, tcp_flows=FlowTable(1000))
    counted = [counter.count(batch) for batch in PcapSource(str(path), timestamps=True).batches(threading.Event())]
    found = tcp_health_by_client(counted)
    assert {c: (f["segments"], f["retransmitted"], f["resets"], f["handshakes"]) for c, f in found.items()} == {
        c: (t["segments"], t["retransmitted"], t["resets"], t["handshakes"]) for c, t in expected.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), batches=st.lists(st.lists(st.integers(0, 599), min_size=1, max_size=30),
                                                    min_size=1, max_size=6),
       capacity=st.sampled_from([1, 4, 1 << 16]))
def test_tcp_health_on_any_frames_leaves_the_byte_counts_exact(seed, batches, capacity):
    from exporter.tcpflows import FlowTable

    pool = [frame for frame in frame_pool() if frame[0] == LINKTYPE_ETHERNET]
    servers = servers_for(pool, random.Random(seed))
    counter = FrameCounter(servers, DEFAULT_PORT_LABELS, LABELS, client_index_capacity=capacity,
                           tcp_flows=FlowTable(8))
    for picks in batches:
        frames = [pool[index % len(pool)][1] for index in picks]
        buffer, spans = batch_from([(data, len(data), 0) for data in frames])
        counts = counter.count(FrameBatch.from_spans(LINKTYPE_ETHERNET, buffer, spans))
        assert engine_sums(counts) == reference(LINKTYPE_ETHERNET, buffer, spans, servers)[0]
        assert counts.tcp.shape[0] == len(counts.family)


@pytest.mark.parametrize("form", ["pcapng", "nanosecond-pcap"])
def test_tcp_health_is_the_same_from_pcapng_and_nanosecond_pcap(tcp_capture, tmp_path, form):
    """editcap (Wireshark) rewrites the capture; its frame times arrive through the pcapng reader, or as ns."""
    import shutil
    import subprocess

    if not shutil.which("editcap"):
        pytest.skip("editcap not installed")
    path, expected = tcp_capture
    converted = tmp_path / f"tcp.{form}"
    options = ["-F", "pcapng"] if form == "pcapng" else ["-F", "nsecpcap"]
    subprocess.run(["editcap", *options, str(path), str(converted)], check=True, capture_output=True)
    assert rounded(tcp_health_by_client(counted_with_tcp_health(converted)[0])) == rounded(expected_health(expected))
