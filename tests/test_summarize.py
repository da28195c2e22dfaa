"""`python -m exporter summarize`: equals the independent oracle on the corpus; clean errors on bad files."""
import json

import pytest

from tests.builders import AFS_PCAP, AFS_SERVER, CORPUS_PCAPS, LINKTYPE_USER0, expected_summary, summarize

PCAPS = sorted(CORPUS_PCAPS.iterdir())


def comparable(summary):
    return {c["ip"]: {"bytes_in": c["bytes_in"], "bytes_out": c["bytes_out"], "packets_in": c["packets_in"],
                      "packets_out": c["packets_out"], "protocols": {k: v for k, v in c["protocols"].items() if v}}
            for c in summary["clients"]}


@pytest.mark.parametrize("pcap", PCAPS, ids=lambda p: p.name)
def test_summarize_matches_oracle(pcap):
    expected = expected_summary(pcap.name)
    result = summarize(pcap, "--format", "json", *[f"--server-ip={s}" for s in expected["servers"]])
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    frames = summary["packets"] + sum(summary["ignored"].values())
    if not expected["servers"]:
        # No frame the oracle could read as IP: only a clean run is asserted, and every frame is accounted.
        assert frames > 0 and summary["total_bytes"] == sum(c["total"] for c in summary["clients"])
        return
    if expected["kind"] == "malformed":
        # Frames we reject as malformed may be counted by the more lenient oracle; nothing else may differ.
        assert summary["total_bytes"] <= expected["total_bytes"]
        assert frames >= sum(expected["ignored"].values()) + sum(
            c["packets_in"] + c["packets_out"] for c in expected["clients"].values())
        return
    assert comparable(summary) == expected["clients"]
    assert summary["total_bytes"] == expected["total_bytes"]
    assert {k: summary["ignored"][k] for k in expected["ignored"]} == expected["ignored"]
    assert summary["ignored"]["malformed"] == 0


def test_summarize_table_lists_clients_with_human_units():
    result = summarize(AFS_PCAP, "--server-ip", AFS_SERVER)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["CLIENT", "IN", "OUT", "TOTAL"]
    assert lines[1].startswith("131.151.1.146") and "KiB" in lines[1]
    assert "4 clients" in lines[-1]


def test_summarize_guesses_the_server_when_not_given():
    result = summarize(CORPUS_PCAPS / "dns_udp.pcap", "--format", "json")
    assert json.loads(result.stdout)["servers"] == ["192.168.1.11"]


def one_line_error(result, code):
    assert result.returncode == code
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_missing_file_is_one_line_and_exit_1(tmp_path):
    assert "cannot open" in one_line_error(summarize(tmp_path / "nope.pcap"), 1)


def test_foreign_file_is_one_line(tmp_path):
    path = tmp_path / "text.pcap"
    path.write_text("hello, this is not a capture\n")
    assert "not a pcap or pcapng file" in one_line_error(summarize(path), 1)


def test_truncated_file_reports_truncation(tmp_path):
    data = AFS_PCAP.read_bytes()
    path = tmp_path / "cut.pcap"
    path.write_bytes(data[:len(data) - 7])
    assert "truncated" in one_line_error(summarize(path, "--server-ip", AFS_SERVER), 1)


def test_unsupported_link_type_is_refused(tmp_path):
    data = bytearray((CORPUS_PCAPS / "dns_udp.pcap").read_bytes())
    data[20:24] = LINKTYPE_USER0.to_bytes(4, "little")  # the link type field of the file header
    path = tmp_path / "user0.pcap"
    path.write_bytes(bytes(data))
    assert f"unsupported link type {LINKTYPE_USER0}" in one_line_error(summarize(path, "--server-ip", "192.0.2.1"), 1)


@pytest.mark.parametrize("args, needle", [
    (["--server-ip", "not-an-ip"], "--server-ip"),
    (["--max-clients", "-1"], "--max-clients"),
    (["--format", "xml"], "--format"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_flags_exit_2_with_one_line(args, needle):
    assert needle in one_line_error(summarize(CORPUS_PCAPS / "dns_udp.pcap", *args), 2)


def test_summarize_reports_tcp_health_per_client_and_in_all(tmp_path):
    from tests.tcp_traffic import build

    truth = build(tmp_path / "tcp.pcap")
    result = summarize(tmp_path / "tcp.pcap", "--format", "json", "--server-ip", "10.0.0.1,fd00::1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    old_keys = {"ip", "bytes_in", "bytes_out", "packets_in", "packets_out", "total", "protocols"}
    for client in summary["clients"]:
        assert old_keys < set(client)  # the legacy shape stays; "tcp" is added
        health, expected = client["tcp"], truth[client["ip"]]
        assert health["handshakes"] == sum(expected["handshakes"].values())
        for name in ("segments", "retransmitted", "resets"):
            assert health[name] == expected[name]
        if expected["rtt"]:
            assert health["handshake_rtt_mean_seconds"] == pytest.approx(sum(expected["rtt"]) / len(expected["rtt"]))
        else:
            assert health["handshake_rtt_p50_seconds"] is None and health["handshake_rtt_mean_seconds"] is None
    # one round trip of 12.3 ms: histogram_quantile's estimate, within its bucket (10 ms, 25 ms]
    assert summary["clients"][0]["ip"] == "10.0.0.2"
    assert summary["clients"][0]["tcp"]["handshake_rtt_p50_seconds"] == pytest.approx(0.0175)
    assert summary["tcp"]["segments"] == {d: sum(t["segments"][d] for t in truth.values()) for d in ("in", "out")}


def test_summarize_table_shows_tcp_health_columns_and_none_when_off(tmp_path):
    from tests.tcp_traffic import build

    build(tmp_path / "tcp.pcap")
    lines = summarize(tmp_path / "tcp.pcap", "--server-ip", "10.0.0.1,fd00::1").stdout.splitlines()
    assert lines[0].split()[-5:] == ["RTT", "P50", "RETRANS", "RESETS", "PROTOCOLS"]
    assert lines[1].split()[0] == "10.0.0.2"
    # 1 of 8 payload segments retransmitted, and one reset (from the client)
    assert lines[1].split()[-7:-3] == ["17.5", "ms", "12.5%", "1"]
    off = summarize(tmp_path / "tcp.pcap", "--server-ip", "10.0.0.1,fd00::1", "--tcp-health", "off", "--format", "json")
    summary = json.loads(off.stdout)
    assert "tcp" not in summary and all("tcp" not in client for client in summary["clients"])
