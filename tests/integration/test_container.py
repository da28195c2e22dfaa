"""The container image and docker-compose.yml, proven on a real Docker engine.

The engine is the running one or Debian's dockerd started for this module (see docker_engine.py).
The Dockerfile's base image is pulled, or reused, or built locally with debootstrap when no registry
is reachable; the project's image is built from the work tree. Images stay in the engine's cache
between runs; containers, networks and volumes made here are removed.

Live capture: the container runs on the host network and captures the host end of a veth whose
other end is a server namespace; a bridge without addresses joins it to a client namespace, so the
traffic stays between the two namespaces. tcpdump records the same interface, and the venv's
``summarize`` of that recording is what the container must have counted.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Iterator, Sequence

import pytest
import yaml

from testkit.live_traffic import Tcpdump, generate_traffic, running_servers
from testkit.netns import NamespacePair, netns_unavailable_reason, run
from testkit.process import free_port, get
from tests.dashboard_queries import panel_queries
from tests.integration.docker_engine import (build_image, docker, docker_engine, engine_unavailable_reason,
                                             ensure_base_image, remove_containers)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(engine_unavailable_reason() is not None, reason=engine_unavailable_reason() or "")]

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "traffic.json"
IMAGE = "traffic-exporter:test"
PROMETHEUS_IMAGE = "traffic-exporter-test/prometheus:bookworm"
NOBODY = "65534"
CAP_NET_RAW_MASK = 1 << 13
DOWNLOAD_BYTES = 1_500_000
# A stand-in for prom/prometheus with its contract: the server is the entrypoint, flags are the
# command, it runs as nobody and keeps its data in /prometheus.
PROMETHEUS_DOCKERFILE = """\
FROM {base}
RUN apt-get update && apt-get install -y --no-install-recommends prometheus && rm -rf /var/lib/apt/lists/* \\
    && install -d -o nobody -g nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
"""


def base_image_name() -> str:
    """The one base image the Dockerfile's stages start from."""
    bases = set(re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE))
    assert len(bases) == 1, f"the stages start from different images: {bases}"
    return bases.pop()


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Iterator[None]:
    with docker_engine(tmp_path_factory.mktemp("dockerd") / "dockerd.log"):
        yield


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory) -> str:
    """The project's image, built from the work tree (base image made available first)."""
    started = time.monotonic()
    how = ensure_base_image(base_image_name(), tmp_path_factory.mktemp("base"))
    based = time.monotonic()
    build_image(IMAGE, REPO_ROOT)
    size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"\nbase image {base_image_name()}: {how} in {based - started:.0f} s; "
          f"{IMAGE} built in {time.monotonic() - based:.0f} s, {size / 1e6:.0f} MB")
    return IMAGE


_numbers = itertools.count(1)


@contextlib.contextmanager
def container(*argv: str) -> Iterator[str]:
    """``docker run --detach ARGV``; yields the container's name; removes it (and its volumes) afterwards."""
    name = f"te-test-{os.getpid()}-{next(_numbers)}"
    try:
        docker("run", "--detach", "--name", name, *argv)
        yield name
    finally:
        remove_containers([name])


def logs(name: str) -> str:
    result = docker("logs", name, check=False)
    return (result.stdout + result.stderr).decode(errors="replace")[-3000:]


def wait_for(condition, timeout: float, what: str, name: str = ""):
    """Poll ``condition()`` until it returns something truthy; AssertionError (with the container's log) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            result = condition()
            if result:
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f":\n{logs(name)}" if name else ""))
        time.sleep(0.3)


def metric_samples(base: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(get(base + "/metrics").decode())
            for sample in family.samples}


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, value in (line.split(":", 1) for line in lines if ":" in line)}


def venv_summarize(pcap: Path, *flags: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "exporter", "summarize", "--format", "json", *flags, str(pcap)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- the image


def test_image_runs_as_an_unprivileged_user_by_default(image):
    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"].split(":")[0] == NOBODY
    assert docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.decode().strip() == NOBODY


def test_image_demo_serves_the_dashboard_on_the_published_port(image):
    port = free_port()
    with container("--publish", f"127.0.0.1:{port}:8000", image, "--demo") as name:
        base = f"http://127.0.0.1:{port}"
        page = wait_for(lambda: get(base + "/dashboard").decode(), 30, "/dashboard", name)
        assert "static/dashboard.js" in page
        assert b"historySeconds" in get(base + "/static/dashboard.js")
        assert json.loads(get(base + "/openapi.json"))["openapi"].startswith("3.0")
        wait_for(lambda: json.loads(get(base + "/traffic?seconds=60"))["clients"], 20, "the demo replay to count clients",
                 name)


def test_image_summarize_of_a_mounted_capture_equals_the_venv(image, tmp_path):
    from bench.generate import write_pcap

    capture = tmp_path / "capture.pcap"
    write_pcap(str(capture), 3000, clients=40)
    capture.chmod(0o644)
    result = docker("run", "--rm", "--network", "none", "--volume", f"{capture}:/data/capture.pcap:ro",
                    image, "summarize", "--format", "json", "/data/capture.pcap")
    in_container = json.loads(result.stdout)
    assert in_container == venv_summarize(capture)
    assert len(in_container["clients"]) == 40


def test_image_without_net_raw_cannot_capture(image):
    # The interpreter's file capability cannot be granted: the kernel refuses to run it at all.
    dropped = docker("run", "--rm", "--network", "host", "--cap-drop", "ALL", image, "--interface", "lo",
                     check=False, timeout=60)
    assert dropped.returncode != 0
    assert b"operation not permitted" in dropped.stderr.lower()
    # no-new-privileges turns file capabilities off: the exporter starts and says what it lacks.
    no_new_privileges = docker("run", "--rm", "--network", "host", "--cap-drop", "ALL", "--cap-add", "NET_RAW",
                               "--security-opt", "no-new-privileges", image, "--interface", "lo",
                               "--listen", f"127.0.0.1:{free_port()}", check=False, timeout=60)
    assert no_new_privileges.returncode == 2
    assert b"permission denied, a packet socket needs CAP_NET_RAW" in no_new_privileges.stderr


# --------------------------------------------------------------------------- live capture


class BridgedPair(NamespacePair):
    """A server and a client namespace whose link runs through a bridge in the host's network namespace.

    Each namespace's veth has its peer in the host namespace, enslaved to a bridge. Neither the bridge
    nor the peers have addresses (IPv6 is off on them), so they send nothing of their own and the
    host's stack never sees the traffic: a packet socket on the server's peer sees the server's frames.
    """

    def __init__(self) -> None:
        super().__init__()
        suffix = os.getpid() % 100_000
        self.bridge, self.server_port, self.client_port = f"teb{suffix}", f"tes{suffix}", f"tec{suffix}"

    def create_link(self) -> None:
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["sysctl", "-qw", f"net.ipv6.conf.{self.bridge}.disable_ipv6=1"])
        run(["ip", "link", "set", self.bridge, "up"])
        for namespace, link, port in ((self.server_ns, self.server_link, self.server_port),
                                      (self.client_ns, self.client_link, self.client_port)):
            run(["ip", "link", "add", "name", port, "type", "veth", "peer", "name", link, "netns", namespace])
            run(["sysctl", "-qw", f"net.ipv6.conf.{port}.disable_ipv6=1"])
            run(["ip", "link", "set", port, "master", self.bridge, "up"])
        for namespace, link, v4, v6 in ((self.server_ns, self.server_link, self.server_v4, self.server_v6),
                                        (self.client_ns, self.client_link, self.client_v4, self.client_v6)):
            run(["ip", "-n", namespace, "addr", "add", f"{v4}/24", "dev", link])
            run(["ip", "-n", namespace, "addr", "add", f"{v6}/64", "dev", link, "nodad"])
            run(["ip", "-n", namespace, "link", "set", link, "up"])
        self.server_mac = self._mac(self.server_ns, self.server_link)
        self.client_mac = self._mac(self.client_ns, self.client_link)
        for namespace, link, peer_v4, peer_v6, peer_mac in (
                (self.server_ns, self.server_link, self.client_v4, self.client_v6, self.client_mac),
                (self.client_ns, self.client_link, self.server_v4, self.server_v6, self.server_mac)):
            for address in (peer_v4, peer_v6):
                run(["ip", "-n", namespace, "neigh", "replace", address, "lladdr", peer_mac, "dev", link,
                     "nud", "permanent"])
        self._wait_carrier()

    def destroy(self) -> None:
        try:
            super().destroy()  # the peers go with their namespaces
        finally:
            run(["ip", "link", "del", self.bridge], check=False)


class HostNetwork:
    """Stands in for a namespace pair in testkit's Tcpdump: the command runs in the host's namespace."""

    @staticmethod
    def server_command(*argv: str) -> list[str]:
        return list(argv)


@contextlib.contextmanager
def bridged_pair() -> Iterator[BridgedPair]:
    pair = BridgedPair()
    try:
        pair.create()
        yield pair
    finally:
        pair.destroy()


def counted_series(samples: dict) -> dict[tuple[str, str, str], list[int]]:
    """(client, direction, protocol) -> [bytes, packets] from /metrics samples."""
    series: dict = {}
    for (name, labels), value in samples.items():
        if name in ("traffic_client_bytes_total", "traffic_client_packets_total"):
            labels = dict(labels)
            entry = series.setdefault((labels["client"], labels["direction"], labels["protocol"]), [0, 0])
            entry[0 if name == "traffic_client_bytes_total" else 1] = int(value)
    return series


def per_client(series: dict) -> dict[str, dict]:
    """The figures summarize gives per client, computed from the per-series counters."""
    clients: dict = {}
    for (client, direction, protocol), (nbytes, packets) in series.items():
        entry = clients.setdefault(client, {"bytes_in": 0, "bytes_out": 0, "packets_in": 0, "packets_out": 0,
                                            "protocols": {}})
        entry[f"bytes_{direction}"] += nbytes
        entry[f"packets_{direction}"] += packets
        entry["protocols"][protocol] = entry["protocols"].get(protocol, 0) + nbytes
    return clients


def summarized_clients(summary: dict) -> dict[str, dict]:
    return {client["ip"]: {"bytes_in": client["bytes_in"], "bytes_out": client["bytes_out"],
                           "packets_in": client["packets_in"], "packets_out": client["packets_out"],
                           "protocols": {label: nbytes for label, nbytes in client["protocols"].items() if nbytes}}
            for client in summary["clients"]}


@pytest.mark.skipif(netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or "")
def test_image_captures_live_on_the_host_network_as_nobody_with_only_net_raw(image, tmp_path):
    """Read-only root filesystem, every capability dropped but NET_RAW; counts equal tcpdump's recording."""
    (tmp_path / "big.bin").write_bytes(bytes(range(256)) * (DOWNLOAD_BYTES // 256))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with bridged_pair() as pair, running_servers(pair, tmp_path):
        servers = f"{pair.server_v4},{pair.server_v6}"
        with container("--network", "host", "--read-only", "--cap-drop", "ALL", "--cap-add", "NET_RAW", image,
                       "--interface", pair.server_port, "--server-ip", servers,
                       "--listen", f"127.0.0.1:{port}") as name:
            wait_for(lambda: metric_samples(base).get(("traffic_exporter_capture_up", ())) == 1, 30,
                     "capture_up 1", name)
            status = proc_status(int(docker("inspect", "--format", "{{.State.Pid}}", name).stdout))
            assert status["Uid"].split() == [NOBODY] * 4
            assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == CAP_NET_RAW_MASK
            tcpdump = Tcpdump(HostNetwork(), tmp_path / "tcpdump.pcap", pair.server_port)
            try:
                generate_traffic(pair, tmp_path, "big.bin")
                wait_quiet(lambda: metric_samples(base)[("traffic_exporter_packets_total", (("result", "counted"),))])
            finally:
                tcpdump_summary = tcpdump.stop()
            samples = metric_samples(base)
    assert "0 packets dropped by kernel" in tcpdump_summary, tcpdump_summary
    assert samples[("traffic_exporter_kernel_dropped_packets_total", ())] == 0
    expected = summarized_clients(venv_summarize(tmp_path / "tcpdump.pcap", "--server-ip", servers))
    assert set(expected) == {pair.client_v4, pair.client_v6}
    assert per_client(counted_series(samples)) == expected


def wait_quiet(frames, timeout: float = 20, quiet: float = 1.5) -> None:
    """Wait until ``frames()`` stops changing for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    previous, since = None, time.monotonic()
    while time.monotonic() < deadline:
        current = frames()
        if current != previous:
            previous, since = current, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.25)
    raise AssertionError(f"frame counters still moving after {timeout} s")


# --------------------------------------------------------------------------- compose


def compose_command() -> list[str]:
    """``docker compose`` (the v2 plugin) when the client has it, else Debian's ``docker-compose``."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30, check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed (Debian package docker-compose)")
    return ["docker-compose"]


def compose(command: Sequence[str], project: str, compose_file: Path, *args: str, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    result = subprocess.run([*command, "--project-name", project, "--file", str(compose_file), *args],
                            capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"compose {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def prometheus_image(image, tmp_path_factory) -> str:
    """The stand-in Prometheus image (Debian's prometheus package on the same base)."""
    context = tmp_path_factory.mktemp("prometheus-image")
    (context / "Dockerfile").write_text(PROMETHEUS_DOCKERFILE.format(base=base_image_name()))
    build_image(PROMETHEUS_IMAGE, context)
    return PROMETHEUS_IMAGE


def test_compose_stack_prometheus_scrapes_the_exporter_through_the_host_gateway(image, prometheus_image, tmp_path):
    """docker-compose.yml as written, but for: the images (no registry here; Grafana left out), the
    exporter replaying the demo and listening on the host-gateway address only (it captures none of
    this machine's traffic), and Prometheus published on a free loopback port."""
    command = compose_command()
    gateway = host_gateway_address(image)
    rendered = subprocess.run([*command, "--file", str(COMPOSE_FILE), "config"], capture_output=True, text=True,
                              timeout=60, check=False, env={**os.environ, "GRAFANA_ADMIN_PASSWORD": "unused"})
    assert rendered.returncode == 0, rendered.stderr
    stack = yaml.safe_load(rendered.stdout)
    del stack["services"]["grafana"]
    stack["volumes"].pop("grafana-data", None)
    exporter = stack["services"]["exporter"]
    exporter.pop("build")
    exporter["image"] = image
    exporter["environment"].update(TRAFFIC_DEMO="true", TRAFFIC_LISTEN=f"{gateway}:8000")
    prometheus = stack["services"]["prometheus"]
    prometheus["image"] = prometheus_image
    port = free_port()
    prometheus["ports"] = [f"127.0.0.1:{port}:9090"]
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(yaml.safe_dump(stack))
    project = f"te-test-{os.getpid()}"
    base = f"http://127.0.0.1:{port}"
    try:
        compose(command, project, compose_file, "up", "--detach", "--no-build")
        target = wait_for(lambda: scraped_target(base), 60, "Prometheus to scrape the exporter")
        assert target["labels"]["job"] == "traffic-exporter"
        assert target["scrapeUrl"] == "http://host.docker.internal:8000/metrics"
        rules = json.loads(get(base + "/api/v1/rules"))["data"]["groups"]
        assert rules and all(rule["health"] != "err" for group in rules for rule in group["rules"])
        query = dict(panel_queries(DASHBOARD))["Client throughput (bytes/s)"]
        result = wait_for(lambda: query_result(base, query), 60, f"data for the dashboard query {query!r}")
        assert sum(float(series["value"][1]) for series in result) > 0
    finally:
        subprocess.run([*command, "--project-name", project, "--file", str(compose_file), "down", "--volumes",
                        "--timeout", "10"], capture_output=True, timeout=180, check=False)


def host_gateway_address(image: str) -> str:
    """The host's address that ``host-gateway`` stands for, as a container resolves it."""
    answer = docker("run", "--rm", "--network", "none", "--add-host", "host.docker.internal:host-gateway",
                    "--entrypoint", "getent", image, "hosts", "host.docker.internal").stdout.decode()
    return answer.split()[0]


def scraped_target(base: str) -> dict | None:
    """The first target Prometheus scraped successfully, or None."""
    targets = json.loads(get(base + "/api/v1/targets"))["data"]["activeTargets"]
    return next((target for target in targets if target["health"] == "up"), None)


def query_result(base: str, query: str) -> list:
    answer = json.loads(get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}"))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]
