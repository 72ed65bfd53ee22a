# One image for every cilia service (python -m services.<name>), the CLI and nats-server 2.15.
# Debian bookworm, so bcc and pyroute2 come from Debian as on a host (the datapath needs them).
FROM debian:bookworm-slim

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/cilia/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc python3-pyroute2 \
      iproute2 nftables ca-certificates curl \
      gobgpd golang-github-osrg-gobgp-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cilia
COPY requirements.lock pyproject.toml README.md ./
RUN python3 -m venv --system-site-packages .venv \
 && .venv/bin/pip install -r requirements.lock

COPY cilia ./cilia
COPY services ./services
COPY examples ./examples
COPY scripts ./scripts
RUN .venv/bin/pip install --no-deps . \
 && .venv/bin/python scripts/gen_gobgp_api.py

# No credentials are baked in: `cilia auth init` writes them into a volume at first start.
USER root
CMD ["cilia", "--help"]
