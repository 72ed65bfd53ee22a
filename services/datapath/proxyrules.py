"""The nftables half of the proxy redirect: packets the datapath marked for a proxy port are handed
to the proxy's socket in the node's stack.

`dnat` (NAT, for proxies that read the original destination with SO_ORIGINAL_DST, like mitmproxy)
or `tproxy` (for UDP and proxies that bind transparently, like the DNS proxy). One table per node,
`inet cilia_proxy`, rebuilt whole on every change so it never holds a stale port.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from cilia.errors import CiliaError
from services.datapath.loader import in_netns
from services.datapath.maps import MARK_MAGIC_MASK, MARK_TO_PROXY

TABLE = "cilia_proxy"
TPROXY_MARK = 0x00000D00  # after tproxy: routed locally by the policy rule below
ROUTE_TABLE = 2004


class ProxyRulesError(CiliaError):
    """nft or ip refused the proxy rules."""


@dataclass(frozen=True)
class ProxyPort:
    port: int
    mode: str  # "dnat" or "tproxy"


def _run(
    argv: list[str], netns: str | None, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(in_netns(argv, netns), input=stdin, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise ProxyRulesError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc


def ruleset(ports: Mapping[int, ProxyPort], node_ip: str) -> str:
    """The nft script for the current proxy ports."""
    mask = 0xFFFF0000 | MARK_MAGIC_MASK
    nat, mangle = [], []
    for port, p in sorted(ports.items()):
        mark = MARK_TO_PROXY | (port << 16)
        match = f"meta mark & {mask:#010x} == {mark:#010x}"
        if p.mode == "tproxy":
            mangle.append(
                f"    {match} meta l4proto {{ tcp, udp }} tproxy ip to 127.0.0.1:{port} meta mark set {TPROXY_MARK:#x} accept"
            )
            # tproxy finds no socket (the proxy is restarting): the packet would go on to the real
            # destination unjudged. Fail closed instead.
            mangle.append(f"    {match} counter drop")
        else:
            nat.append(f"    {match} meta l4proto tcp dnat ip to {node_ip}:{port}")
    return "\n".join(
        [
            f"table inet {TABLE} {{",
            "  chain prerouting_nat {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            *nat,
            "  }",
            "  chain prerouting_mangle {",
            "    type filter hook prerouting priority mangle; policy accept;",
            *mangle,
            "  }",
            "}",
        ]
    )


def apply(ports: Mapping[int, ProxyPort], node_ip: str, netns: str | None) -> None:
    """Replace the node's proxy table with rules for `ports` (and the local route tproxy needs)."""
    _run(["nft", "delete", "table", "inet", TABLE], netns, check=False)
    _run(["nft", "-f", "-"], netns, stdin=ruleset(ports, node_ip) + "\n")
    if any(p.mode == "tproxy" for p in ports.values()):
        rules = _run(["ip", "rule", "show"], netns).stdout
        if f"lookup {ROUTE_TABLE}" not in rules:
            _run(
                [
                    "ip",
                    "rule",
                    "add",
                    "fwmark",
                    f"{TPROXY_MARK:#x}/{MARK_MAGIC_MASK:#x}",
                    "lookup",
                    str(ROUTE_TABLE),
                ],
                netns,
            )
        _run(["ip", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE)], netns)


def remove(netns: str | None) -> None:
    _run(["nft", "delete", "table", "inet", TABLE], netns, check=False)
    _run(
        ["ip", "rule", "del", "fwmark", f"{TPROXY_MARK:#x}/{MARK_MAGIC_MASK:#x}", "lookup", str(ROUTE_TABLE)],
        netns,
        check=False,
    )
    _run(["ip", "route", "flush", "table", str(ROUTE_TABLE)], netns, check=False)
