"""What an operator without capture privileges is told, and which users --user accepts."""
from __future__ import annotations


import pytest

from exporter import config as config_module
from exporter.privileges import permission_message


def test_permission_message_is_one_line_naming_every_fix():
    message = permission_message("eth0")
    assert "\n" not in message
    for advice in ("CAP_NET_RAW", "sudo", "setcap cap_net_raw+ep /", "cap_add: [NET_RAW]"):
        assert advice in message


def test_user_flag_accepts_known_users_and_refuses_unknown_ones():
    assert config_module.parse_config(["--user", "root"], environ={}).user == "root"
    assert config_module.parse_config([], environ={"TRAFFIC_USER": "0"}).user == "0"
    assert config_module.parse_config([], environ={"TRAFFIC_USER": ""}).user is None
    with pytest.raises(config_module.ConfigError, match=r"--user: no such user"):
        config_module.parse_config(["--user", "te-no-such-user"], environ={})
