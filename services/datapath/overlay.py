"""The node's VXLAN overlay device and the routes that send other nodes' pod CIDRs into it.

One device per node, `cilia_vxlan`, in external (collect-metadata) mode on Cilium's port 8472: the
`to_overlay` program picks the remote node per packet from the ipcache's tunnel endpoint and puts the
source identity in the VNI; `from_overlay` reads it back. The device is NOARP, so nothing is resolved
across the tunnel: an inner frame carries the sender's device address as its destination, and
`from_overlay` hands it to the receiving node's stack. Each node's device has its own MAC (the
kernel drops a frame whose source is the receiving device's own address as a loop). Blocking functions (subprocesses); the agent calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping
from ipaddress import IPv4Network

from cilia.errors import CiliaError
from services.datapath.loader import in_netns

DEVICE = "cilia_vxlan"
PORT = 8472  # Cilium's VXLAN port (the Linux default before IANA's 4789)
MTU = 1500


class OverlayError(CiliaError):
    """The overlay device or its routes could not be set up."""


def _run(argv: list[str], netns: str | None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(in_netns(argv, netns), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise OverlayError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc


def device_mac(node: str) -> str:
    """A stable, locally administered MAC for the node's overlay device."""
    digest = hashlib.sha256(node.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, 0xC1, *digest[:4]))


def ensure_device(netns: str | None, node: str, mtu: int = MTU) -> int:
    """Create (or keep) the node's overlay device, up; returns its ifindex."""
    shown = _run(["ip", "-j", "link", "show", "dev", DEVICE], netns, check=False)
    if shown.returncode != 0:
        _run(
            ["ip", "link", "add", DEVICE, "type", "vxlan", "external", "dstport", str(PORT), "nolearning"],
            netns,
        )
    _run(["sysctl", "-qw", f"net.ipv6.conf.{DEVICE}.disable_ipv6=1"], netns, check=False)
    _run(
        ["ip", "link", "set", DEVICE, "address", device_mac(node), "arp", "off", "mtu", str(mtu), "up"], netns
    )
    info = json.loads(_run(["ip", "-j", "link", "show", "dev", DEVICE], netns).stdout)
    return int(info[0]["ifindex"])


def remove_device(netns: str | None) -> None:
    _run(["ip", "link", "del", DEVICE], netns, check=False)


def routes(netns: str | None) -> set[IPv4Network]:
    """The prefixes currently routed into the overlay device."""
    shown = _run(["ip", "-j", "-4", "route", "show", "dev", DEVICE], netns, check=False)
    if shown.returncode != 0 or not shown.stdout.strip():
        return set()
    out = set()
    for r in json.loads(shown.stdout):
        dst = r.get("dst", "")
        if dst and dst != "default":
            out.add(IPv4Network(dst if "/" in dst else f"{dst}/32"))
    return out


def sync_routes(netns: str | None, wanted: Mapping[IPv4Network, str]) -> tuple[int, int]:
    """Route exactly `wanted` (remote pod CIDR -> its node, for the log) into the overlay; returns
    (added, removed)."""
    have = routes(netns)
    added = removed = 0
    for net in sorted(set(wanted) - have):
        _run(["ip", "route", "replace", str(net), "dev", DEVICE], netns)
        added += 1
    for net in sorted(have - set(wanted)):
        _run(["ip", "route", "del", str(net), "dev", DEVICE], netns, check=False)
        removed += 1
    return added, removed
