"""Cluster benchmark: pod-to-pod across nodes (VXLAN) vs within a node, and policy propagation.

1. On a 2-node local cluster (`cilia.cluster`, the code behind `cilia cluster up`): throughput
   (iperf3) and request/response rate (sockperf ping-pong: TCP_RR) from a client pod to a server on
   the same node and to one on the other node, interleaved over --runs rounds, medians and the
   cross/within ratios. Client pinned to CPU 0, servers to CPU 1.
2. Policy propagation on 3 and on 10 nodes: the time from `POST /v1/policies` to the moment every
   node's agent reports the revision written to its maps, over --applies changes: p50 and p99.
   Target (issue 8): p99 under 1 s on 10 nodes. Also, for --joins nodes added and removed: the time
   from an endpoint's creation on a new node until every other node's ipcache points at it through
   the tunnel (join), and from `cilia node delete` until every other node has forgotten the node
   and its endpoint (leave). Target: within a second.
Saved as JSON in bench/out/cluster.json. Needs root.
Run: .venv/bin/python bench/cluster.py [--runs 5] [--seconds 3] [--applies 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cilia import auth  # noqa: E402
from cilia.cluster import ClusterState, LocalCluster  # noqa: E402


def sh(argv: list[str], timeout: float = 60) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()[-400:]}")
    return proc.stdout


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class Harness:
    def __init__(self, nodes: int, name: str, underlay: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"cilia-bench-{name}-"))
        self.lc = LocalCluster(self.dir / "cluster")
        self.state: ClusterState = self.lc.up(nodes, name=name, underlay=underlay, lease_seconds=30)
        self.token = auth.load(self.state.creds_file).tokens["admin"]
        self.http = httpx.Client(headers={"authorization": f"Bearer {self.token}"}, timeout=30)

    def add(self, node: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
        r = self.http.post(
            f"{self.state.nodes[node].api}/v1/endpoints", json={"name": name, "labels": labels}
        )
        r.raise_for_status()
        rec: dict[str, Any] = r.json()
        return rec

    def pod(self, rec: dict[str, Any], argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={rec['network']['netns_path']}", "--", *argv]

    def apply(self, text: str) -> int:
        r = self.http.post(
            f"{self.state.urls['policy']}/v1/policies",
            content=text,
            headers={"content-type": "application/yaml"},
        )
        r.raise_for_status()
        return int(r.json()["revision"])

    def close(self) -> None:
        self.http.close()
        self.lc.down()


# --- 1. across nodes vs within a node ----------------------------------------------------------------


def throughput(h: Harness, client: dict[str, Any], server: dict[str, Any], seconds: float) -> float:
    out = sh(
        [
            "taskset",
            "-c",
            "0",
            *h.pod(client, ["iperf3", "-c", server["ip"], "-p", "5201", "-t", str(seconds), "-J"]),
        ],
        seconds + 30,
    )
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def tcp_rr(h: Harness, client: dict[str, Any], server: dict[str, Any], seconds: float) -> float:
    argv = ["sockperf", "ping-pong", "--tcp", "-i", server["ip"], "-p", "11111", "-t", str(seconds)]
    out = sh(["taskset", "-c", "0", *h.pod(client, argv)], seconds + 30)
    m = re.search(r"avg-latency=([\d.]+)", out) or re.search(r"avg-lat=\s*([\d.]+)", out)
    if not m:
        raise RuntimeError(f"sockperf output not understood: {out[-400:]}")
    return 1e6 / (2 * float(m.group(1)))


def overlay_part(args: argparse.Namespace) -> dict[str, Any]:
    h = Harness(2, "bch", args.underlay)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        n1, n2 = list(h.state.nodes)
        client = h.add(n1, "client", {"app": "client"})
        servers = {
            "within": h.add(n1, "near", {"app": "server"}),
            "across": h.add(n2, "far", {"app": "server"}),
        }
        h.apply(
            """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-client}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
"""
        )
        for rec in servers.values():
            for argv in (
                ["iperf3", "-s", "-B", rec["ip"], "-p", "5201"],
                ["sockperf", "server", "--tcp", "-i", rec["ip"], "-p", "11111"],
            ):
                procs.append(
                    subprocess.Popen(
                        ["taskset", "-c", "1", *h.pod(rec, argv)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(
                ":5201 " in (ss := sh(h.pod(rec, ["ss", "-ltnH"]))) and ":11111 " in ss
                for rec in servers.values()
            ):
                break
            time.sleep(0.2)
        samples: dict[str, dict[str, list[float]]] = {
            k: {"throughput_gbps": [], "tcp_rr_tps": []} for k in servers
        }
        for r in range(args.runs):
            for kind, server in servers.items():
                samples[kind]["throughput_gbps"].append(throughput(h, client, server, args.seconds))
                samples[kind]["tcp_rr_tps"].append(tcp_rr(h, client, server, args.seconds))
                print(
                    f"run {r + 1} {kind:<7} {samples[kind]['throughput_gbps'][-1]:7.2f} Gbit/s "
                    f"{samples[kind]['tcp_rr_tps'][-1]:9.0f} RR/s",
                    flush=True,
                )
        medians = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in samples.items()}
        ratios = {
            "across/within throughput": medians["across"]["throughput_gbps"]
            / medians["within"]["throughput_gbps"],
            "across/within tcp_rr": medians["across"]["tcp_rr_tps"] / medians["within"]["tcp_rr_tps"],
        }
        return {"samples": samples, "medians": medians, "ratios": ratios}
    finally:
        for p in procs:
            p.kill()
            p.wait()
        h.close()


# --- 2. policy propagation ---------------------------------------------------------------------------

POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: prop}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts: [{{ports: [{{port: "{port}", protocol: TCP}}]}}]
"""


async def wait_everywhere(h: Harness, revision: int, started: float) -> float:
    """Seconds from `started` until every node reports `revision` applied for the policy."""
    key = "CiliumNetworkPolicy/default/prop"

    async def one(client: httpx.AsyncClient, api: str) -> float:
        while True:
            r = await client.get(f"{api}/v1/datapath/status")
            if r.status_code == 200 and r.json().get("policies", {}).get(key, -1) >= revision:
                return time.monotonic() - started
            await asyncio.sleep(0.002)

    async with httpx.AsyncClient(headers={"authorization": f"Bearer {h.token}"}, timeout=10) as client:
        done = await asyncio.wait_for(
            asyncio.gather(*(one(client, n.api) for n in h.state.nodes.values())), timeout=30
        )
    return max(done)


def ipcache_has(node: str, ip: str, tunnel: str | None) -> bool:
    """Whether `node`'s ipcache holds `ip` (through `tunnel`, when given)."""
    from services.datapath import maps

    m = maps.DatapathMaps.open(maps.pin_root(node))
    try:
        for prefix, _ident, via in m.ipcache_items():
            if prefix == f"{ip}/32":
                return tunnel is None or via == tunnel
        return False
    finally:
        m.close()


def wait_until(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not converge within 30 s")
        time.sleep(0.002)


def propagation_part(nodes: int, args: argparse.Namespace, underlay: str) -> dict[str, Any]:
    h = Harness(nodes, f"bp{nodes}", underlay)
    try:
        for i, node in enumerate(h.state.nodes):
            h.add(node, f"web{i}", {"app": "web"})
            h.add(node, f"client{i}", {"app": "client"})
        samples = []
        for i in range(args.applies):
            started = time.monotonic()
            revision = h.apply(POLICY.format(port=8000 + i))
            samples.append(asyncio.run(wait_everywhere(h, revision, started)))
        joins, leaves = [], []
        for j in range(args.joins):
            short = f"extra{j}"
            h.lc.add_node(short)
            h.state = h.lc.state()
            full = h.lc.node_name(h.state, short)
            started = time.monotonic()
            rec = h.add(full, f"joiner{j}", {"app": "joiner"})
            others = [n for n in h.state.nodes if n != full]
            tunnel = h.state.nodes[full].ip
            wait_until(lambda r=rec, t=tunnel, o=others: all(ipcache_has(n, r["ip"], t) for n in o))
            joins.append(time.monotonic() - started)
            started = time.monotonic()
            h.lc.delete_node(full)
            wait_until(lambda r=rec, o=others: not any(ipcache_has(n, r["ip"], None) for n in o))
            leaves.append(time.monotonic() - started)
            h.state = h.lc.state()
        result = {
            "nodes": nodes,
            "samples_s": samples,
            "p50_s": statistics.median(samples),
            "p99_s": percentile(samples, 0.99),
            "max_s": max(samples),
            "join_s": joins,
            "leave_s": leaves,
        }
        print(
            f"propagation on {nodes:>2} nodes: p50 {result['p50_s'] * 1000:6.1f} ms  "
            f"p99 {result['p99_s'] * 1000:6.1f} ms  max {result['max_s'] * 1000:6.1f} ms; "
            f"node join max {max(joins, default=0) * 1000:6.1f} ms, leave max {max(leaves, default=0) * 1000:6.1f} ms",
            flush=True,
        )
        return result
    finally:
        h.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--applies", type=int, default=30)
    parser.add_argument("--joins", type=int, default=3)
    parser.add_argument("--underlay", default="10.249.0.0/24")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (namespaces, BPF)", file=sys.stderr)
        return 1
    overlay = overlay_part(args)
    m = overlay["medians"]
    print(f"\n{'path':<8} {'Gbit/s':>8} {'TCP_RR/s':>10}")
    for k in ("within", "across"):
        print(f"{k:<8} {m[k]['throughput_gbps']:8.2f} {m[k]['tcp_rr_tps']:10.0f}")
    for k, v in overlay["ratios"].items():
        print(f"  {k:<26} {v:6.2f}")
    propagation = [propagation_part(n, args, args.underlay) for n in (3, 10)]
    target = propagation[-1]["p99_s"] < 1.0
    churn = all(max(p["join_s"] + p["leave_s"], default=0) < 1.0 for p in propagation)
    print(f"\n  apply -> enforced on 10 nodes, p99 < 1 s: {'OK' if target else 'MISSED'}")
    print(f"  nodes joining and leaving reach every node within 1 s: {'OK' if churn else 'MISSED'}")
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / "cluster.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": "cluster",
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "kernel": platform.release(),
                "runs": args.runs,
                "seconds": args.seconds,
                "overlay": overlay,
                "propagation": propagation,
                "targets": {"10-node apply->enforced p99 < 1 s": target, "join/leave within 1 s": churn},
            },
            indent=2,
        )
    )
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
