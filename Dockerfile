# traffic-exporter: captures the host's frames and serves /metrics and the REST API on :8000.
#
#   docker build -t traffic-exporter .
#   docker run -d --network host --cap-drop ALL --cap-add NET_RAW traffic-exporter --interface eth0
#   docker run --rm -p 8000:8000 traffic-exporter --demo
#
# Runs as nobody (65534), as upstream exporters' images do. Opening the AF_PACKET capture socket
# needs CAP_NET_RAW, and Docker gives a non-root user no capability of its own (it sets no ambient
# capabilities), so the interpreter that runs the exporter carries cap_net_raw as a file capability:
# the kernel grants it at exec while NET_RAW is in the container's bounding set (`--cap-add NET_RAW`,
# or Docker's default set). Consequences: a container without NET_RAW (`--cap-drop ALL` alone)
# cannot start the interpreter at all ("operation not permitted"), and `no-new-privileges` switches
# file capabilities off (the exporter then says it lacks CAP_NET_RAW). Replaying a file (--pcap,
# --demo, summarize) uses no capability, but starts the same interpreter: keep NET_RAW there too.
#
# Pinned to Debian bookworm: the libpcap0.8 package is named libpcap0.8t64 from trixie on.

# --- build: the package and its dependencies in a virtual environment; gcc builds the record walker
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/traffic-exporter

# Dependencies first, so a code change does not download them again: pyproject.toml names them,
# requirements.txt pins the versions the tests ran with.
COPY pyproject.toml requirements.txt /src/
RUN python3 -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /src/dependencies.txt \
    && /opt/traffic-exporter/bin/python -m pip install --constraint /src/requirements.txt -r /src/dependencies.txt

COPY README.md /src/
COPY exporter/ /src/exporter/
COPY compat_api/ /src/compat_api/
# Then pip and setuptools go (nothing installs at run time), and the environment gets an interpreter
# file of its own instead of a link to the base image's python, so that only it carries the capability.
RUN /opt/traffic-exporter/bin/python -m pip install --no-deps /src \
    && /opt/traffic-exporter/bin/python -c "import exporter.walk as walk; assert walk.native(), 'walker not built'" \
    && /opt/traffic-exporter/bin/python -m pip uninstall --yes --quiet pip setuptools \
    && cp --remove-destination "$(readlink -f /opt/traffic-exporter/bin/python)" /opt/traffic-exporter/bin/python

# --- runtime
FROM python:3.11-slim-bookworm

# libpcap: compiles --filter programs and is the --capture-backend libpcap; setcap: below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpcap0.8 libcap2-bin \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/traffic-exporter /opt/traffic-exporter
# /var/lib/traffic-exporter: where a volume for --state-file goes, writable by the image's user.
RUN setcap cap_net_raw+ep /opt/traffic-exporter/bin/python \
    && install -d -o 65534 -g 65534 -m 0700 /var/lib/traffic-exporter

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/traffic-exporter/bin:$PATH
USER 65534:65534
EXPOSE 8000
ENTRYPOINT ["traffic-exporter"]
