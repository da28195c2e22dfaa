"""Config: flags, then TRAFFIC_* / SERVER_IP environment, then defaults; errors name the flag."""
import pytest

from exporter.config import Config, ConfigError, parse_config


def test_defaults():
    config = parse_config([], environ={})
    assert config == Config()
    assert config.listen == "0.0.0.0:8000" and config.history_seconds == 300 and config.max_clients == 500


def test_flags_win_over_environment():
    config = parse_config(["--max-clients", "7", "--server-ip", "192.0.2.1", "--server-ip", "2001:db8::/64,10.0.0.1"],
                          environ={"TRAFFIC_MAX_CLIENTS": "9", "SERVER_IP": "198.51.100.1"})
    assert config.max_clients == 7
    assert config.server_ips == ("192.0.2.1", "2001:db8::/64", "10.0.0.1")


def test_environment_fills_what_flags_leave_out():
    config = parse_config([], environ={"SERVER_IP": "192.0.2.1, 192.0.2.2", "TRAFFIC_LISTEN": "[::1]:9100",
                                       "TRAFFIC_LOOP": "yes", "TRAFFIC_REPLAY_SPEED": "realtime",
                                       "TRAFFIC_CORS_ORIGIN": "https://a.example,https://b.example"})
    assert config.server_ips == ("192.0.2.1", "192.0.2.2")
    assert (config.listen_host, config.listen_port, config.listen) == ("::1", 9100, "[::1]:9100")
    assert config.loop and config.replay_speed == "realtime"
    assert config.cors_origins == ("https://a.example", "https://b.example")


def test_traffic_server_ip_wins_over_seed_name():
    assert parse_config([], environ={"TRAFFIC_SERVER_IP": "192.0.2.9", "SERVER_IP": "192.0.2.1"}).server_ips == \
        ("192.0.2.9",)


@pytest.mark.parametrize("argv, environ, message", [
    (["--max-clients", "many"], {}, "--max-clients: expected an integer from 0 to 1000000; got 'many'"),
    (["--history-seconds", "0"], {}, "--history-seconds: expected an integer from 10 to 86400"),
    (["--client-prefix-v4", "33"], {}, "--client-prefix-v4: expected an integer from 0 to 32"),
    (["--replay-speed", "fast"], {}, "--replay-speed: expected one of realtime, max"),
    (["--listen", "8000"], {}, "--listen: expected ADDRESS:PORT"),
    (["--listen", "0.0.0.0:70000"], {}, "--listen: expected ADDRESS:PORT"),
    ([], {"SERVER_IP": "192.0.2.300"}, "--server-ip (from SERVER_IP): expected IP addresses or CIDR networks"),
    ([], {"TRAFFIC_LOOP": "maybe"}, "--loop (from TRAFFIC_LOOP): expected true or false"),
    (["--log-level", "loud"], {}, "--log-level: expected one of debug, info, warning, error"),
    ([], {"TRAFFIC_FANOUT_GROUP": "65536"}, "--fanout-group (from TRAFFIC_FANOUT_GROUP): expected an integer from 0"),
    (["--web-max-connections", "0"], {}, "--web-max-connections: expected an integer from 1 to 65536"),
    ([], {"TRAFFIC_WEB_REQUEST_TIMEOUT": "0"},
     "--web-request-timeout (from TRAFFIC_WEB_REQUEST_TIMEOUT): expected an integer from 1 to 3600"),
    (["--web-idle-timeout", "soon"], {}, "--web-idle-timeout: expected an integer from 1 to 86400; got 'soon'"),
    (["--tcp-health", "maybe"], {}, "--tcp-health: expected on or off; got 'maybe'"),
    ([], {"TRAFFIC_MAX_TCP_FLOWS": "0"}, "--max-tcp-flows (from TRAFFIC_MAX_TCP_FLOWS): expected an integer from 1"),
])
def test_invalid_values_name_the_flag_and_accepted_values(argv, environ, message):
    with pytest.raises(ConfigError, match=None) as error:
        parse_config(argv, environ=environ)
    assert str(error.value).startswith(message)


def test_empty_environment_variables_mean_default():
    config = parse_config([], environ={"TRAFFIC_INTERFACE": "", "SERVER_IP": "", "TRAFFIC_MAX_CLIENTS": " "})
    assert config.interface is None and config.server_ips == () and config.max_clients == 500


def test_fanout_group_from_flag_or_environment_and_none_by_default():
    assert parse_config([], environ={}).fanout_group is None
    assert parse_config(["--fanout-group", "0"], environ={}).fanout_group == 0
    assert parse_config([], environ={"TRAFFIC_FANOUT_GROUP": "42"}).fanout_group == 42


def test_web_limits_have_defaults_and_come_from_flags_or_environment():
    config = parse_config([], environ={})
    assert (config.web_max_connections, config.web_request_timeout, config.web_idle_timeout) == (512, 10, 60)
    config = parse_config(["--web-max-connections", "64", "--web-request-timeout", "5"],
                          environ={"TRAFFIC_WEB_IDLE_TIMEOUT": "120", "TRAFFIC_WEB_MAX_CONNECTIONS": "9"})
    assert (config.web_max_connections, config.web_request_timeout, config.web_idle_timeout) == (64, 5, 120)


def test_tcp_health_is_on_with_100000_flows_by_default_and_set_by_flag_or_environment():
    config = parse_config([], environ={})
    assert (config.tcp_health, config.max_tcp_flows) == (True, 100_000)
    config = parse_config(["--tcp-health", "off"], environ={"TRAFFIC_MAX_TCP_FLOWS": "5000", "TRAFFIC_TCP_HEALTH": "on"})
    assert (config.tcp_health, config.max_tcp_flows) == (False, 5000)


def test_client_by_geoip_db_and_resolver_flags_from_flags_or_environment():
    config = parse_config(["--geoip-db", "/a.mmdb", "--geoip-db", "/b.mmdb", "--client-by", "ASN",
                           "--resolve-names", "--resolve-rate", "5"], environ={})
    assert (config.geoip_dbs, config.client_by, config.resolve_names, config.resolve_rate) == (
        ("/a.mmdb", "/b.mmdb"), "asn", True, 5)
    config = parse_config([], environ={"TRAFFIC_GEOIP_DB": "/a.mmdb,/b.mmdb", "TRAFFIC_CLIENT_BY": "country",
                                       "TRAFFIC_RESOLVE_NAMES": "true"})
    assert (config.geoip_dbs, config.client_by, config.resolve_names, config.resolve_rate) == (
        ("/a.mmdb", "/b.mmdb"), "country", True, 10)
    assert (Config().client_by, Config().resolve_names, Config().geoip_dbs) == ("ip", False, ())


@pytest.mark.parametrize("argv, message", [
    (["--client-by", "asn", "--geoip-db", "/a", "--client-prefix-v4", "24"], "--client-prefix-v4/-v6: only apply"),
    (["--client-by", "country", "--geoip-db", "/a", "--client-prefix-v6", "48"], "--client-prefix-v4/-v6: only apply"),
    (["--client-by", "asn"], "--client-by asn: needs a --geoip-db"),
    (["--client-by", "network"], "--client-by: expected one of ip, asn, country"),
    (["--resolve-rate", "0"], "--resolve-rate: expected an integer from 1 to 1000"),
])
def test_client_by_refuses_what_does_not_go_together(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_config(argv, environ={})
    assert str(error.value).startswith(message)
