"""Checks of the deployment files: Prometheus config and rules, docker-compose wiring, dashboard.

Plain file checks (no Docker, no network); promtool runs when it is installed (CI installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.dashboard_queries import iter_panels, panel_queries, substitute_variables

REPO_ROOT = Path(__file__).resolve().parents[2]

PROMETHEUS_CONFIG = REPO_ROOT / "prometheus" / "prometheus.yml"
RULES_FILE = REPO_ROOT / "prometheus" / "traffic.rules.yml"
RULES_TEST_FILE = REPO_ROOT / "prometheus" / "tests" / "traffic.rules.test.yml"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "traffic.json"
DATASOURCE_PROVISIONING = REPO_ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVISIONING = REPO_ROOT / "grafana" / "provisioning" / "dashboards" / "traffic.yml"

EXPECTED_ALERTS = {
    "TrafficExporterDown",
    "TrafficCaptureNotRunning",
    "TrafficKernelDrops",
    "TrafficClientTableFull",
    "TrafficNoTraffic",
    "TrafficTcpRetransmissionsHigh",
}
INSTANCE_FILTER = 'instance=~"$instance"'
# Series a dashboard query may read: the exporter's metrics, Prometheus' per-target series, and
# recording rules (level:metric:operations).
_SERIES_NAME = re.compile(
    r"(?<![\w:])(traffic_\w+|up|scrape_duration_seconds|[a-z_]+:[a-z_]+:[a-z0-9_]+)(?![\w:(])\s*(\{[^}]*\})?"
)


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def recorded_series_names() -> set[str]:
    return {
        rule["record"]
        for group in load_yaml(RULES_FILE)["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def alerting_rules() -> list[dict]:
    return [rule for group in load_yaml(RULES_FILE)["groups"] for rule in group["rules"] if "alert" in rule]


def query_panels(dashboard: dict) -> list[dict]:
    return [panel for panel in iter_panels(dashboard) if panel.get("type") != "row"]


def panel_queries_raw() -> list[tuple[str, str]]:
    """(panel title, expression as written in the dashboard) per query."""
    return [
        (panel["title"], target["expr"])
        for panel in query_panels(load_dashboard())
        for target in panel["targets"]
    ]


# --------------------------------------------------------------------------- promtool


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'; CI installs it)")
    return subprocess.run(
        [promtool, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus/prometheus.yml"),
        ("check", "rules", "prometheus/traffic.rules.yml"),
        ("test", "rules", "prometheus/tests/traffic.rules.test.yml"),
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_accepts_prometheus_files(args):
    result = run_promtool(*args)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


# --------------------------------------------------------------------------- rules


def test_prometheus_config_scrapes_the_exporter_and_loads_the_rules():
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["traffic-exporter"]
    assert job["scrape_interval"] == "15s"
    assert job["static_configs"][0]["targets"] == ["host.docker.internal:8000"]
    assert config["rule_files"] == ["traffic.rules.yml"]


def test_recording_rules_follow_level_metric_operations_naming():
    names = recorded_series_names()
    assert "client_direction:traffic_client_bytes:rate5m" in names
    for name in names:
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), name
        assert not name.split(":")[1].endswith("_total"), f"{name}: drop _total after rate()"


def test_every_alert_has_severity_summary_and_description():
    alerts = alerting_rules()
    assert {rule["alert"] for rule in alerts} == EXPECTED_ALERTS
    for rule in alerts:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert "for" in rule, f"{rule['alert']} would fire on a single bad evaluation"


def test_rule_unit_tests_cover_every_alert_firing_and_not_firing():
    firing, quiet = set(), set()
    for case in load_yaml(RULES_TEST_FILE)["tests"]:
        for alert_test in case.get("alert_rule_test", []):
            (firing if alert_test.get("exp_alerts") else quiet).add(alert_test["alertname"])
    assert firing >= EXPECTED_ALERTS, f"never tested firing: {EXPECTED_ALERTS - firing}"
    assert quiet >= EXPECTED_ALERTS, f"never tested not firing: {EXPECTED_ALERTS - quiet}"


def test_rule_unit_tests_check_a_recording_rule_value():
    tested = {
        expr_test["expr"]
        for case in load_yaml(RULES_TEST_FILE)["tests"]
        for expr_test in case.get("promql_expr_test", [])
    }
    assert tested & recorded_series_names()


# --------------------------------------------------------------------------- compose


def compose_services() -> dict:
    return load_yaml(COMPOSE_FILE)["services"]


def split_volume(spec) -> tuple[str, str]:
    """(source, container path) of a short ("src:dst[:mode]") or long volume entry."""
    if isinstance(spec, dict):
        return str(spec.get("source", "")), spec["target"]
    source, target = spec.split(":")[:2]
    return source, target


def is_bind_source(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def container_path_to_host(service: dict, container_path: str) -> Path | None:
    """The repo file behind a path inside a container, through the service's bind mounts."""
    wanted = PurePosixPath(container_path)
    for spec in service.get("volumes", []):
        source, target = split_volume(spec)
        if not is_bind_source(source):
            continue
        try:
            relative = wanted.relative_to(PurePosixPath(target))
        except ValueError:
            continue
        return (REPO_ROOT / source / relative).resolve()
    return None


def test_compose_defines_the_three_services():
    assert {"exporter", "prometheus", "grafana"} <= set(compose_services())


def test_compose_exporter_captures_on_the_host_network_with_raw_capabilities():
    exporter = compose_services()["exporter"]
    assert exporter["network_mode"] == "host"
    assert exporter["cap_add"] == ["NET_RAW"] and exporter["cap_drop"] == ["ALL"]
    assert "ports" not in exporter, "port mappings are meaningless with host networking"
    assert exporter["build"] in (".", {"context": "."})
    assert (REPO_ROOT / "Dockerfile").is_file()
    environment = exporter["environment"]
    for name in ("SERVER_IP", "TRAFFIC_INTERFACE", "TRAFFIC_FILTER"):
        assert environment[name] == f"${{{name}:-}}"


def test_compose_bind_mounts_exist_and_named_volumes_are_declared():
    declared = set(load_yaml(COMPOSE_FILE).get("volumes") or {})
    used = set()
    for name, service in compose_services().items():
        for spec in service.get("volumes", []):
            source, _target = split_volume(spec)
            if is_bind_source(source):
                assert (REPO_ROOT / source).exists(), f"{name}: bind source {source} missing"
            else:
                used.add(source)
    assert used == declared, f"named volumes used {used}, declared {declared}"


def test_compose_prometheus_mounts_its_config_and_the_rule_files_it_references():
    prometheus = compose_services()["prometheus"]
    config_flag = next(
        (arg for arg in prometheus.get("command", []) if arg.startswith("--config.file=")),
        "--config.file=/etc/prometheus/prometheus.yml",
    )
    config_in_container = PurePosixPath(config_flag.split("=", 1)[1])
    config_on_host = container_path_to_host(prometheus, str(config_in_container))
    assert config_on_host == PROMETHEUS_CONFIG.resolve()
    for rule_file in load_yaml(PROMETHEUS_CONFIG)["rule_files"]:
        rule_in_container = config_in_container.parent / rule_file
        rule_on_host = container_path_to_host(prometheus, str(rule_in_container))
        assert rule_on_host is not None and rule_on_host.is_file(), f"{rule_in_container} not mounted"
    assert "host.docker.internal:host-gateway" in prometheus["extra_hosts"]
    assert "prometheus-data:/prometheus" in prometheus["volumes"]


def test_compose_grafana_gets_provisioning_dashboards_and_a_required_password():
    grafana = compose_services()["grafana"]
    provider = load_yaml(DASHBOARD_PROVISIONING)["providers"][0]
    dashboards_dir = container_path_to_host(grafana, provider["options"]["path"])
    assert dashboards_dir == DASHBOARD.parent.resolve()
    assert container_path_to_host(grafana, "/etc/grafana/provisioning/datasources/prometheus.yml") == (
        DATASOURCE_PROVISIONING.resolve()
    )
    password = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD:?"), "no default admin password"
    assert "grafana-data:/var/lib/grafana" in grafana["volumes"]


def test_grafana_datasource_points_at_the_compose_prometheus():
    datasource = load_yaml(DATASOURCE_PROVISIONING)["datasources"][0]
    assert (datasource["name"], datasource["type"], datasource["uid"]) == (
        "Prometheus",
        "prometheus",
        "prometheus",
    )
    assert datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose_services()["prometheus"]["ports"]


# --------------------------------------------------------------------------- dashboard


def test_dashboard_identity_and_template_variables():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "traffic-exporter"
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert (instance["multi"], instance["includeAll"], instance["allValue"]) == (True, True, ".*")
    assert variables["client"]["type"] == "query"
    for name in ("instance", "client"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    assert INSTANCE_FILTER in variables["client"]["definition"]


def test_dashboard_panels_use_the_datasource_variable():
    for panel in query_panels(load_dashboard()):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}", panel["title"]


def test_dashboard_panel_ids_are_unique():
    ids = [panel["id"] for panel in iter_panels(load_dashboard())]
    assert len(ids) == len(set(ids))


def test_every_series_in_every_query_is_filtered_by_instance():
    for panel in query_panels(load_dashboard()):
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            selectors = _SERIES_NAME.findall(target["expr"])
            assert selectors, f"{panel['title']}: no series found in {target['expr']!r}"
            for name, matchers in selectors:
                assert INSTANCE_FILTER in matchers, f"{panel['title']}: {name} not filtered by instance"


def test_dashboard_reads_only_recording_rules_that_exist():
    recorded = recorded_series_names()
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            for name, _matchers in _SERIES_NAME.findall(target["expr"]):
                if ":" in name:
                    assert name in recorded, f"{panel['title']}: {name} is not a recording rule"


def test_dashboard_tcp_health_row_reads_the_tcp_health_recording_rules():
    placed = load_dashboard()["panels"]
    row = next(index for index, panel in enumerate(placed) if panel["type"] == "row" and panel["title"] == "TCP health")
    end = next((index for index in range(row + 1, len(placed)) if placed[index]["type"] == "row"), len(placed))
    exprs = " ".join(target["expr"] for panel in placed[row + 1:end] for target in panel["targets"])
    tcp_rules = {name for name in recorded_series_names() if "_tcp_" in name}
    read = {name for name, _matchers in _SERIES_NAME.findall(exprs) if ":" in name}
    # The per-client ratio rule is for per-exporter queries: the table divides rates summed across
    # exporters, so a client several servers see gets one ratio.
    assert read == tcp_rules - {"client:traffic_client_tcp_retransmitted_segments_per_segments:ratio_rate5m"}
    assert {placed[index]["type"] for index in range(row + 1, end)} >= {"stat", "table", "timeseries"}


def test_dashboard_panels_have_units():
    for panel in query_panels(load_dashboard()):
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert unit, f"{panel['title']} ({panel['type']}) has no unit"
    timeseries_units = {
        panel["fieldConfig"]["defaults"]["unit"]
        for panel in query_panels(load_dashboard())
        if panel["type"] == "timeseries"
    }
    assert {"binBps", "pps"} <= timeseries_units


def test_dashboard_rate_queries_on_raw_counters_use_rate_interval():
    for title, expr in panel_queries_raw():
        for window in re.findall(r"\b(?:rate|irate)\((?:[^()]|\([^()]*\))*?\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", f"{title}: rate over [{window}]"


def test_panel_queries_substitute_every_variable():
    queries = panel_queries(DASHBOARD)
    assert len(queries) == len(panel_queries_raw())
    for title, expr in queries:
        assert "$" not in expr and "[[" not in expr, f"{title}: {expr}"
        assert 'instance=~".*"' in expr, title


def test_panel_queries_include_panels_of_collapsed_rows(tmp_path):
    dashboard = {
        "panels": [
            {"type": "timeseries", "title": "top", "targets": [{"expr": 'up{instance=~"$instance"}'}]},
            {
                "type": "row",
                "title": "collapsed",
                "collapsed": True,
                "panels": [
                    {
                        "type": "timeseries",
                        "title": "nested",
                        "targets": [
                            {"expr": 'rate(x{instance=~"${instance:regex}", client=~"[[client]]"}[$__rate_interval])'},
                            {"expr": "sum_over_time(y[$__range]) / $__range_s + z[$__interval]"},
                        ],
                    }
                ],
            },
        ]
    }
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps(dashboard), encoding="utf-8")
    assert panel_queries(path) == [
        ("top", 'up{instance=~".*"}'),
        ("nested", 'rate(x{instance=~".*", client=~".*"}[1m])'),
        ("nested", "sum_over_time(y[5m]) / 300 + z[15s]"),
    ]


def test_substitute_variables_rejects_unknown_variables_and_keeps_regex_anchors():
    assert substitute_variables('x{a=~"foo$"}') == 'x{a=~"foo$"}'
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        substitute_variables('x{a=~"$nope"}')


# --------------------------------------------------------------------------- what Grafana requires
# Grafana's image cannot be pulled here, so these check what Grafana's provisioning and dashboard
# loading need (Grafana docs: "Provision Grafana", "JSON model").

# Keys Grafana reads in provisioning files (anything else is a typo Grafana ignores silently).
DATASOURCE_KEYS = {"name", "type", "uid", "access", "orgId", "url", "user", "database", "basicAuth",
                   "basicAuthUser", "withCredentials", "isDefault", "jsonData", "secureJsonData", "version",
                   "editable"}
PROVIDER_KEYS = {"name", "orgId", "folder", "folderUid", "type", "disableDeletion", "updateIntervalSeconds",
                 "allowUiUpdates", "options"}
# Panel types built into Grafana 11: a provisioned dashboard cannot install plugins.
BUILTIN_PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "piechart", "text", "barchart",
                       "heatmap", "histogram", "logs", "nodeGraph", "state-timeline", "status-history", "trend",
                       "xychart", "canvas", "geomap", "news", "dashlist", "alertlist", "annolist", "flamegraph",
                       "traces", "candlestick", "datagrid"}
VARIABLE_TYPES = {"query", "custom", "constant", "datasource", "interval", "textbox", "adhoc", "groupby"}
GRID_COLUMNS = 24


def test_grafana_provisioning_files_use_version_1_and_known_keys():
    datasources = load_yaml(DATASOURCE_PROVISIONING)
    providers = load_yaml(DASHBOARD_PROVISIONING)
    assert datasources["apiVersion"] == providers["apiVersion"] == 1
    for datasource in datasources["datasources"]:
        assert set(datasource) <= DATASOURCE_KEYS, set(datasource) - DATASOURCE_KEYS
        assert {"name", "type", "url"} <= set(datasource)
        assert datasource["access"] in {"proxy", "direct"}
    assert sum(bool(datasource.get("isDefault")) for datasource in datasources["datasources"]) == 1
    for provider in providers["providers"]:
        assert set(provider) <= PROVIDER_KEYS, set(provider) - PROVIDER_KEYS
        assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
        assert isinstance(provider["updateIntervalSeconds"], int)


def test_dashboard_is_loadable_by_file_provisioning():
    dashboard = load_dashboard()
    assert dashboard.get("id") is None, "a provisioned dashboard must not carry a database id"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["title"].strip()
    text = DASHBOARD.read_text(encoding="utf-8")
    assert "__inputs" not in dashboard and "${DS_" not in text, \
        "an 'export for sharing' dashboard: file provisioning cannot fill in its data source inputs"
    names = [variable["name"] for variable in dashboard["templating"]["list"]]
    assert len(names) == len(set(names))
    assert {variable["type"] for variable in dashboard["templating"]["list"]} <= VARIABLE_TYPES
    assert {panel["type"] for panel in iter_panels(dashboard)} <= BUILTIN_PANEL_TYPES


def test_dashboard_panels_fit_the_grid_without_overlapping():
    placed = load_dashboard()["panels"]
    for panel in placed:
        if panel["type"] == "row":
            # An open row's panels are top-level; only a collapsed row holds its panels.
            assert panel["collapsed"] or not panel.get("panels"), panel["title"]
    for panel in placed:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
    for index, first in enumerate(placed):
        for second in placed[index + 1:]:
            a, b = first["gridPos"], second["gridPos"]
            overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                       and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
            assert not overlap, f"{first['title']} overlaps {second['title']}"
