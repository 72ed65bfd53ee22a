"""Service load-balancing benchmark: connections through a service VIP vs straight to the backend,
and vs kube-proxy's nftables-era equivalents, with 1,000 and 10,000 services.

Two endpoints on one node (the set-up of bench/datapath.py): a client and an nginx backend. Configs:
  direct      cilia's programs, the client connects to the backend's address
  vip-N       cilia with N services (one of them the backend's), the client connects to its VIP
  chain-N     no programs; nftables DNAT with one rule per service in one chain (iptables mode)
  map-N       no programs; nftables DNAT through a verdict map keyed by VIP and port (nftables mode)
New connections per second (wrk with `Connection: close`, the TCP_CRR figure) for every config,
throughput (iperf3) for direct and vip. wrk and iperf3 pinned to CPU 0, servers to CPU 1; configs
interleaved over --runs rounds; medians and ratios saved in bench/out/services.json.
Targets (issue 9): vip >= 0.95x direct; at 10,000 services vip >= 1.5x chain and >= 1x map (CRR).
Run: .venv/bin/python bench/services.py [--runs 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datapath as dp  # noqa: E402  (bench/datapath.py: the two-endpoint set-up)

from services.datapath import loader  # noqa: E402

SIZES = (1000, 10000)
VIP_NET = ipaddress.IPv4Network("10.96.0.0/16")
DUMMY_BACKEND = "10.98.2.1"  # where the other services' rules point (never reached)


def vip_of(i: int) -> str:
    return str(VIP_NET.network_address + 10 + i)


def target_index(n: int) -> int:
    """The measured service sits in the middle: a linear chain's average case."""
    return n // 2


def services(n: int, selector: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    target = target_index(n)
    for i in range(n):
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"svc-{i}", "namespace": "default"},
                "spec": {
                    "clusterIP": vip_of(i),
                    "selector": selector if i == target else {"app": f"none-{i}"},
                    "ports": [{"name": "http", "port": 80}, {"name": "iperf", "port": 5201}],
                },
            }
        )
    return out


def nft_script(kind: str, n: int, backend: str) -> str:
    target = target_index(n)
    lines = ["table ip cilia_bench_svc {"]
    if kind == "chain":
        lines.append("  chain prerouting { type nat hook prerouting priority dstnat; policy accept;")
        for i in range(n):
            to = backend if i == target else DUMMY_BACKEND
            lines.append(f"    ip daddr {vip_of(i)} tcp dport {{ 80, 5201 }} dnat to {to}")
        lines.append("  }")
    else:
        lines.append("  map svcs { type ipv4_addr . inet_service : verdict; elements = {")
        elems = []
        for i in range(n):
            chain = "to_backend" if i == target else "to_dummy"
            elems += [f"{vip_of(i)} . 80 : goto {chain}", f"{vip_of(i)} . 5201 : goto {chain}"]
        lines.append("    " + ",\n    ".join(elems))
        lines.append("  } }")
        lines.append(f"  chain to_backend {{ dnat to {backend}; }}")
        lines.append(f"  chain to_dummy {{ dnat to {DUMMY_BACKEND}; }}")
        lines.append("  chain prerouting { type nat hook prerouting priority dstnat; policy accept;")
        lines.append("    ip daddr . tcp dport vmap @svcs")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


class ServiceBench(dp.Bench):
    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.loaded_services = -1

    async def configure_services(self, cfg: str) -> str:
        """Set the node up for `cfg`; returns the address the client connects to."""
        assert self.agent is not None
        kind, _, size = cfg.partition("-")
        n = int(size) if size else 0
        dp.sh(dp.in_node(["nft", "delete", "table", "ip", "cilia_bench_svc"]), check=False)
        ifaces = [r["network"]["host_ifname"] for r in (self.client, self.server)]
        if kind in ("direct", "vip"):
            for ifname in ifaces:
                loader.attach(self.agent.programs, ifname, dp.NETNS)  # type: ignore[arg-type]
            await self.agent.set_policies({})
            if kind == "vip" and self.loaded_services != n:
                await self.agent.set_services(services(n, {"app": "server"}))
                self.loaded_services = n
            target = vip_of(target_index(n)) if kind == "vip" else self.server["ip"]
        else:
            for ifname in ifaces:
                loader.detach(ifname, dp.NETNS)
            dp.sh(dp.in_node(["nft", "-f", "-"]), input=nft_script(kind, n, self.server["ip"]))
            target = vip_of(target_index(n))
        probe = dp.sh(self.pod(self.client, ["curl", "-s", "-m", "3", f"http://{target}/"]), check=False)
        if probe.stdout.strip() != "ok":
            raise RuntimeError(
                f"config {cfg}: the backend does not answer through {target} ({probe.returncode})"
            )
        return target

    def crr(self, target: str) -> float:
        saved = self.server
        self.server = {**saved, "ip": target}
        try:
            return self.tcp_crr()
        finally:
            self.server = saved

    def tput(self, target: str) -> float:
        saved = self.server
        self.server = {**saved, "ip": target}
        try:
            return self.throughput()
        finally:
            self.server = saved

    async def teardown(self) -> None:
        dp.sh(dp.in_node(["nft", "delete", "table", "ip", "cilia_bench_svc"]), check=False)
        await super().teardown()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    configs = ["direct"] + [f"{k}-{n}" for n in SIZES for k in ("vip", "chain", "map")]
    samples: dict[str, dict[str, list[float]]] = {
        c: {"tcp_crr_cps": [], "throughput_gbps": []} for c in configs
    }
    bench = ServiceBench(args.seconds)
    try:
        await bench.setup()
        for r in range(args.runs):
            for cfg in configs:
                target = await bench.configure_services(cfg)
                samples[cfg]["tcp_crr_cps"].append(bench.crr(target))
                if cfg == "direct" or cfg.startswith("vip"):
                    samples[cfg]["throughput_gbps"].append(bench.tput(target))
                tp = samples[cfg]["throughput_gbps"]
                print(
                    f"run {r + 1} {cfg:<12} {samples[cfg]['tcp_crr_cps'][-1]:9.0f} CRR/s"
                    + (f" {tp[-1]:7.2f} Gbit/s" if tp and len(tp) == r + 1 else ""),
                    flush=True,
                )
    finally:
        await bench.teardown()
    medians = {c: {k: statistics.median(v) for k, v in m.items() if v} for c, m in samples.items()}
    return {"samples": samples, "medians": medians}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (namespaces, BPF, nftables)", file=sys.stderr)
        return 1
    result = asyncio.run(run(args))
    m = result["medians"]
    print(f"\n{'config':<12} {'CRR/s':>9} {'Gbit/s':>8}")
    for c, v in m.items():
        print(f"{c:<12} {v['tcp_crr_cps']:9.0f} {v.get('throughput_gbps', float('nan')):8.2f}")
    ratios = {
        "vip-1000/direct crr": m["vip-1000"]["tcp_crr_cps"] / m["direct"]["tcp_crr_cps"],
        "vip-10000/direct crr": m["vip-10000"]["tcp_crr_cps"] / m["direct"]["tcp_crr_cps"],
        "vip-10000/direct throughput": m["vip-10000"]["throughput_gbps"] / m["direct"]["throughput_gbps"],
        "vip-10000/chain-10000 crr": m["vip-10000"]["tcp_crr_cps"] / m["chain-10000"]["tcp_crr_cps"],
        "vip-10000/map-10000 crr": m["vip-10000"]["tcp_crr_cps"] / m["map-10000"]["tcp_crr_cps"],
        "vip-1000/chain-1000 crr": m["vip-1000"]["tcp_crr_cps"] / m["chain-1000"]["tcp_crr_cps"],
        "vip-1000/map-1000 crr": m["vip-1000"]["tcp_crr_cps"] / m["map-1000"]["tcp_crr_cps"],
    }
    targets = {
        "vip >= 0.95x direct (CRR, 10,000 services)": ratios["vip-10000/direct crr"] >= 0.95,
        "vip >= 0.95x direct (throughput)": ratios["vip-10000/direct throughput"] >= 0.95,
        "vip >= 1.5x chain at 10,000 (CRR)": ratios["vip-10000/chain-10000 crr"] >= 1.5,
        "vip >= 1x map at 10,000 (CRR)": ratios["vip-10000/map-10000 crr"] >= 1.0,
    }
    print("\nratios:")
    for k, v in ratios.items():
        print(f"  {k:<30} {v:6.2f}")
    for k, ok in targets.items():
        print(f"  {k:<44} {'OK' if ok else 'MISSED'}")
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / "services.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": "services",
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "kernel": platform.release(),
                "runs": args.runs,
                "seconds": args.seconds,
                **result,
                "ratios": ratios,
                "targets": targets,
            },
            indent=2,
        )
    )
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
