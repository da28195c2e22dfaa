"""libpcap: files read through its offline filter keep exactly what tcpdump keeps; both collectors agree."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from exporter import libpcap, walk
from exporter.bpf import FilterError
from exporter.frames import SourceError
from exporter.libpcap import check_filter, read_filtered
from exporter.replay import PcapSource
from tests.builders import CORPUS_PCAPS, Frame, frames_of, summarize

pytestmark = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is the oracle")
FILTERED = [("mptcp-v0.pcap", "tcp port 22 and tcp[13] & 2 != 0"), ("afs.pcap", "udp and src host 131.151.32.21"),
            ("802.1ad_QinQ.pcap", "vlan"), ("tcp-handshake-nano.pcap", "tcp[tcpflags] & tcp-syn != 0"),
            ("mptcp-v1.pcap", "src host 10.0.1.1 or ip6")]


def tcpdump_frames(path, bpf_filter: str, tmp_path) -> list[Frame]:
    """What ``tcpdump -r FILE FILTER`` keeps, as (wire length, bytes), read back with Scapy."""
    from scapy.utils import RawPcapReader

    kept = tmp_path / "kept.pcap"
    subprocess.run(["tcpdump", "-r", str(path), "-w", str(kept), bpf_filter], check=True, capture_output=True,
                   timeout=60)
    return [Frame(meta.wirelen, data) for data, meta in RawPcapReader(str(kept))]


def filtered_frames(path, bpf_filter: str) -> list[Frame]:
    return [frame for batch in read_filtered(str(path), bpf_filter, timestamps=True) for frame in frames_of(batch)]


@pytest.mark.parametrize("name, bpf_filter", FILTERED)
def test_a_filtered_file_keeps_exactly_the_frames_tcpdump_keeps(tmp_path, name, bpf_filter):
    expected = tcpdump_frames(CORPUS_PCAPS / name, bpf_filter, tmp_path)
    assert filtered_frames(CORPUS_PCAPS / name, bpf_filter) == expected
    assert expected, "the filter keeps something: the case means something"


@pytest.mark.skipif(not walk.native(), reason="exporter/native/walk.so is not built")
def test_the_compiled_and_the_python_collector_collect_the_same(monkeypatch):
    path, bpf_filter = CORPUS_PCAPS / "mptcp-v0.pcap", "tcp"
    native = [(list(batch.timestamps), frames_of(batch)) for batch in read_filtered(str(path), bpf_filter, True)]
    monkeypatch.setattr(libpcap, "native_library", lambda: None)
    python = [(list(batch.timestamps), frames_of(batch)) for batch in read_filtered(str(path), bpf_filter, True)]
    assert native == python and native


def test_an_invalid_filter_is_refused_with_libpcaps_message():
    with pytest.raises(FilterError, match=r"invalid BPF filter 'tcp and and': .*syntax error"):
        check_filter(str(CORPUS_PCAPS / "afs.pcap"), "tcp and and")
    with pytest.raises(FilterError):
        PcapSource(str(CORPUS_PCAPS / "afs.pcap"), capture_filter="port 99999")


def test_a_replay_with_a_filter_counts_what_the_filter_keeps(tmp_path):
    path, server = CORPUS_PCAPS / "afs.pcap", "131.151.32.21"
    everything = json.loads(summarize(str(path), "--server-ip", server, "--format", "json").stdout)
    filtered = json.loads(summarize(str(path), "--server-ip", server, "--format", "json", "--filter", "udp port 7001")
                          .stdout)
    kept = tmp_path / "kept.pcap"
    subprocess.run(["tcpdump", "-r", str(path), "-w", str(kept), "udp port 7001"], check=True, capture_output=True)
    oracle = json.loads(summarize(str(kept), "--server-ip", server, "--format", "json").stdout)
    assert filtered == {**oracle, "ignored": filtered["ignored"]} and filtered["ignored"] == oracle["ignored"]
    assert 0 < filtered["total_bytes"] < everything["total_bytes"]


def test_an_invalid_filter_stops_a_replay_at_start_up_with_one_line():
    result = subprocess.run([sys.executable, "-m", "exporter", "summarize", str(CORPUS_PCAPS / "afs.pcap"),
                             "--filter", "tcp and and"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "traffic-exporter: --filter: invalid BPF filter 'tcp and and': can't parse filter expression: syntax error"]


def test_a_file_libpcap_cannot_read_is_a_source_error(tmp_path):
    broken = tmp_path / "broken.pcap"
    broken.write_bytes(b"\xd4\xc3\xb2\xa1" + bytes(10))
    with pytest.raises(SourceError, match="broken.pcap"):
        list(read_filtered(str(broken), "tcp", timestamps=False))
