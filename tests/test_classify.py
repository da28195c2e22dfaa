"""classify: direction, client, protocol label by server-side port first, ignore reasons."""
import ipaddress

import pytest

from exporter.classify import (DEFAULT_PORT_LABELS, INTERNAL, NOT_SERVER, OTHER_LABEL, ServerSet, classify,
                               protocol_labels)


def frame(src, dst, proto=6, sport=-1, dport=-1):
    return ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, proto, sport, dport


def packed(address):
    return ipaddress.ip_address(address).packed


SERVERS = ServerSet(["192.0.2.10", "2001:db8::/64"])


def test_inbound_frame_belongs_to_its_source():
    assert classify(frame("198.51.100.7", "192.0.2.10", 6, 51000, 443), SERVERS) == \
        (packed("198.51.100.7"), "in", "HTTPS")


def test_outbound_frame_belongs_to_its_destination():
    assert classify(frame("2001:db8::5", "2001:db8:1::9", 6, 22, 40000), SERVERS) == \
        (packed("2001:db8:1::9"), "out", "SSH")


def test_frames_between_servers_are_internal_and_between_others_not_server():
    assert classify(frame("192.0.2.10", "2001:db8::1"), SERVERS) == INTERNAL
    assert classify(frame("198.51.100.1", "198.51.100.2"), SERVERS) == NOT_SERVER


def test_server_side_port_wins_over_client_side_port():
    # client uses source port 53 towards the server's HTTP port: the server side decides
    assert classify(frame("198.51.100.7", "192.0.2.10", 6, 53, 80), SERVERS)[2] == "HTTP"
    # the server answers from 8080 to a client port 22: still HTTP
    assert classify(frame("192.0.2.10", "198.51.100.7", 6, 8080, 22), SERVERS)[2] == "HTTP"


def test_client_side_port_used_when_server_port_is_unknown():
    # the server itself is the client of a DNS resolver: reply comes from port 53
    assert classify(frame("198.51.100.53", "192.0.2.10", 17, 53, 40000), SERVERS)[2] == "DNS"


@pytest.mark.parametrize("proto, port, label", [
    (6, 80, "HTTP"), (6, 8080, "HTTP"), (6, 443, "HTTPS"), (17, 443, "HTTPS"), (6, 20, "FTP"), (6, 21, "FTP"),
    (6, 22, "SSH"), (17, 53, "DNS"), (6, 53, "DNS"), (17, 80, OTHER_LABEL), (17, 22, OTHER_LABEL), (6, 5432, OTHER_LABEL),
])
def test_default_port_map(proto, port, label):
    assert classify(frame("198.51.100.7", "192.0.2.10", proto, 60000, port), SERVERS)[2] == label


def test_frames_without_ports_are_other():
    assert classify(frame("198.51.100.7", "192.0.2.10", 1), SERVERS)[2] == OTHER_LABEL


def test_custom_port_map_and_label_set():
    labels = {**DEFAULT_PORT_LABELS, (6, 5432): "POSTGRES"}
    assert classify(frame("198.51.100.7", "192.0.2.10", 6, 60000, 5432), SERVERS, labels)[2] == "POSTGRES"
    assert protocol_labels(labels) == ("HTTP", "HTTPS", "FTP", "SSH", "DNS", "POSTGRES", "OTHER")


def test_server_set_matches_addresses_and_networks_of_both_families():
    servers = ServerSet(["192.0.2.10", "10.1.0.0/16", "2001:db8::/32", "::1"])
    assert packed("192.0.2.10") in servers and packed("10.1.255.3") in servers
    assert packed("10.2.0.1") not in servers and packed("192.0.2.11") not in servers
    assert packed("2001:db8:ffff::1") in servers and packed("::1") in servers
    assert packed("2001:db9::1") not in servers
    # an IPv4 network must not match an IPv6 address with the same leading bits
    assert packed("a01::1") not in ServerSet(["10.1.0.0/16"])
    assert servers.addresses == ("192.0.2.10", "10.1.0.0/16", "2001:db8::/32", "::1")
