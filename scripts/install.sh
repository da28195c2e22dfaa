#!/usr/bin/env bash
# Install what traffic-exporter needs on Debian/Ubuntu: system packages (as root) and a virtualenv in .venv.
# Usage: sudo bash scripts/install.sh [--test]    (--test adds what the test suite needs)
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(python3 python3-venv tcpdump libpcap0.8 iproute2 gcc libc6-dev)
if [ "${1:-}" = "--test" ]; then
    # prometheus: promtool and a real server for the integration tests; tcpreplay: the benchmark;
    # curl, iputils-ping: live-capture clients; chromium, chromium-driver: the dashboard page test;
    # tshark: an independent pcapng reader the tests compare ours with; docker.io, docker-compose,
    # debootstrap: the container tests (a base image is built where none can be pulled);
    # systemd: systemd-analyze checks the unit
    packages+=(prometheus curl iputils-ping tcpreplay chromium chromium-driver procps tshark docker.io
               docker-compose debootstrap systemd)
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
# The capture record walker and TCP flow tracker (exporter/walk.py and exporter/tcpflows.py run the
# same loops in Python, slower, without it)
cc -O2 -shared -fPIC -o exporter/native/walk.so exporter/native/walk.c
echo "installed: Debian packages ${packages[*]}; Python packages in $(pwd)/.venv"
