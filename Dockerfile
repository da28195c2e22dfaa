# traffic-exporter: captures the host's frames and serves /metrics and the legacy REST API on :8000.
#
# Runs as root on purpose: opening an AF_PACKET capture socket needs CAP_NET_RAW (and
# SO_RCVBUFFORCE / promiscuous mode need CAP_NET_ADMIN). A non-root user in a container gets no
# effective capabilities from `cap_add`, so a non-root default would make live capture fail.
# Limit what root may do from outside instead: docker-compose.yml grants only NET_RAW and
# NET_ADMIN on top of Docker's defaults. Replaying a pcap file (--pcap) needs no capture
# privilege, so that mode can run as any user (`docker run --user ...`).
#
# Pinned to Debian bookworm: the libpcap0.8 package is named libpcap0.8t64 from trixie on.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libpcap: Scapy compiles --filter BPF programs with it; tcpdump: handy for debugging captures;
# gcc builds the capture record walker (exporter/native/walk.c), then goes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tcpdump libpcap0.8 gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, so code changes do not invalidate this layer.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY exporter/ exporter/
COPY compat_api/ compat_api/
RUN cc -O2 -shared -fPIC -o exporter/native/walk.so exporter/native/walk.c \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y

EXPOSE 8000

ENTRYPOINT ["python", "-m", "exporter"]
