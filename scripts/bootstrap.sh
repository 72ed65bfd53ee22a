#!/usr/bin/env bash
# Set up this machine for cilia: Debian packages, kernel headers for bcc, bpffs, and the venv.
# Idempotent and quick when everything is already in place. Needs root for the system parts.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
STAMP="$VENV/.bootstrap-stamp"

# Debian packages: bcc and pyroute2 come from Debian (imported through --system-site-packages),
# the rest are the real clients, servers and peers the tests and benchmarks use.
DEB_PACKAGES=(
  python3-venv python3-dev python3-bpfcc bpfcc-tools python3-pyroute2 linux-headers-amd64
  iproute2 nftables dnsutils curl arping iputils-ping iperf3 sockperf qperf wrk
  nginx-light nsd dnsperf etcd-server gobgpd bird2 tcpdump procps psmisc
  golang-github-osrg-gobgp-dev
)

log() { printf 'bootstrap: %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root to install packages and mount bpffs (run: sudo make bootstrap)" >&2
    exit 1
  fi
}

install_packages() {
  local missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return
  fi
  need_root
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Packaged daemons are started by the tests themselves, on free ports; never as system services.
  for svc in etcd nginx nsd bird gobgpd; do
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
    if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
  done
}

link_kernel_headers() {
  # bcc compiles against /lib/modules/$(uname -r)/build; Debian's headers are for its own kernel
  # version, which is close enough for the BPF helpers and structs cilia uses.
  local mod="/lib/modules/$(uname -r)"
  local arch common
  arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$arch" ] || [ -z "$common" ]; then
    log "kernel headers not found under /usr/src (linux-headers-amd64 missing?)" >&2
    exit 1
  fi
  if [ "$(readlink "$mod/build" 2>/dev/null)" != "$arch" ] || [ "$(readlink "$mod/source" 2>/dev/null)" != "$common" ]; then
    need_root
    mkdir -p "$mod"
    ln -sfn "$arch" "$mod/build"
    ln -sfn "$common" "$mod/source"
    log "linked $mod/build -> $arch"
  fi
}

mount_bpffs() {
  if ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
    need_root
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
    log "mounted bpffs at /sys/fs/bpf"
  fi
}

make_venv() {
  local want
  want=$(cat pyproject.toml requirements.lock 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    return
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV (system site packages, for bcc and pyroute2)"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
  fi
  log "installing Python dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -r requirements.lock
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  echo "$want" >"$STAMP"
}

gobgp_api() {
  # gobgpd's gRPC client, generated from Debian's .proto files (never committed); quick when current.
  "$VENV/bin/python" scripts/gen_gobgp_api.py
}

check() {
  "$VENV/bin/python" - <<'PY'
import importlib
for mod in ("bcc", "pyroute2", "cilia", "gobgpapi.gobgp_pb2_grpc"):
    importlib.import_module(mod)
PY
}

install_packages
link_kernel_headers
mount_bpffs
make_venv
gobgp_api
check
log "ready ($VENV)"
