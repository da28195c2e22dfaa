"""deploy/kubernetes/: valid against the Kubernetes API schemas, and wired together.

The schemas are those kubernetes-validate ships (strict: an unknown field is an error), for the
oldest and newest Kubernetes release this project supports; no cluster or network is needed. The
Prometheus Operator's ServiceMonitor is a custom resource with no schema in that package: it is
checked against the fields of the operator's monitoring.coreos.com/v1 API and its links to the Service.
"""
from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from exporter.config import SERVE_OPTIONS, serve_config

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = REPO_ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.29", "1.37")
APP_LABEL = "app.kubernetes.io/name"
# monitoring.coreos.com/v1 ServiceMonitorSpec and Endpoint fields (Prometheus Operator API reference)
SERVICE_MONITOR_SPEC_FIELDS = {"jobLabel", "targetLabels", "podTargetLabels", "endpoints", "selector",
                               "namespaceSelector", "sampleLimit", "scrapeProtocols", "targetLimit",
                               "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
                               "keepDroppedTargets", "attachMetadata", "scrapeClass", "bodySizeLimit"}
ENDPOINT_FIELDS = {"port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "tlsConfig",
                   "bearerTokenFile", "bearerTokenSecret", "authorization", "honorLabels", "honorTimestamps",
                   "trackTimestampsStaleness", "basicAuth", "oauth2", "metricRelabelings", "relabelings",
                   "proxyUrl", "followRedirects", "enableHttp2", "filterRunning"}
RELABEL_FIELDS = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}
QUANTITY = re.compile(r"\d+(\.\d+)?(m|k|M|G|Ki|Mi|Gi)?")
PROMETHEUS_DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")


def documents() -> list[dict]:
    """Every resource in the manifests the kustomization applies."""
    found = []
    for name in yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"]:
        found += [document for document in yaml.safe_load_all((MANIFESTS / name).read_text()) if document]
    return found


def resource(kind: str) -> dict:
    (match,) = [document for document in documents() if document["kind"] == kind]
    return match


def exporter_container() -> dict:
    (container,) = resource("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_are_valid_against_the_kubernetes_schemas(version):
    core = [document for document in documents() if not document["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {document["kind"] for document in core} == {"Namespace", "DaemonSet", "Service"}
    errors = []
    for document in core:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{document['kind']}: {error.message} at {'.'.join(map(str, error.path))}")
    assert not errors, f"invalid for Kubernetes {version}:\n" + "\n".join(errors)


def test_kustomization_applies_every_manifest_in_the_folder():
    listed = set(yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"])
    assert listed == {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}


def test_daemonset_captures_on_the_host_network_with_net_raw_only_as_the_image_user():
    pod = resource("DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    container = exporter_container()
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_RAW"]}
    # The capability reaches a non-root process only as the interpreter's file capability, which
    # no_new_privs (allowPrivilegeEscalation: false) would switch off.
    assert container["securityContext"]["allowPrivilegeEscalation"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    image_user = re.search(r"^USER\s+(\d+):(\d+)", (REPO_ROOT / "Dockerfile").read_text(), re.MULTILINE).groups()
    assert (str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])) == image_user
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_daemonset_has_resource_limits_and_probes_on_the_root_path():
    container = exporter_container()
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}, kind
        for quantity in container["resources"][kind].values():  # the schema takes any string here
            assert QUANTITY.fullmatch(str(quantity)), f"{kind}: {quantity!r} is not a Kubernetes quantity"
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    listen_port = int(next(env["value"] for env in container["env"] if env["name"] == "TRAFFIC_LISTEN").rsplit(":", 1)[1])
    assert port_names["metrics"] == listen_port
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/", "port": "metrics"}, probe


def test_daemonset_environment_is_a_valid_exporter_configuration():
    environment = {env["name"]: env["value"] for env in exporter_container()["env"]}
    known = {"SERVER_IP"} | {"TRAFFIC_" + flags[0].lstrip("-").upper().replace("-", "_")
                             for _dest, flags, _parse, _help in SERVE_OPTIONS}
    assert set(environment) <= known, f"not exporter settings: {set(environment) - known}"
    config = serve_config([], environ=environment)
    assert config.state_file.startswith(next(mount["mountPath"] for mount in exporter_container()["volumeMounts"]
                                              if mount["name"] == "state"))


def test_namespace_allows_host_network_pods():
    labels = resource("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_service_selects_the_daemonset_pods_by_their_metrics_port():
    service, daemonset = resource("Service"), resource("DaemonSet")
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["clusterIP"] == "None", "each node's exporter must be scraped, not a load-balanced one"
    container_ports = {port["name"] for port in exporter_container()["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= container_ports


def test_service_monitor_fields_exist_in_the_operator_api_and_point_at_the_service():
    monitor, service = resource("ServiceMonitor"), resource("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= SERVICE_MONITOR_SPEC_FIELDS, set(spec) - SERVICE_MONITOR_SPEC_FIELDS
    assert {"selector", "endpoints"} <= set(spec)
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= ENDPOINT_FIELDS, set(endpoint) - ENDPOINT_FIELDS
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
        for duration in (endpoint["interval"], endpoint["scrapeTimeout"]):
            assert PROMETHEUS_DURATION.fullmatch(duration), duration
        for relabeling in endpoint.get("relabelings", []):
            assert set(relabeling) <= RELABEL_FIELDS, set(relabeling) - RELABEL_FIELDS
