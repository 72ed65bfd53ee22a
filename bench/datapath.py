"""Datapath benchmark: two endpoints on one node, five configurations measured side by side.

  (a) no programs          (b) cilia, an allowing policy       (c) cilia, 10,000 CIDR rules
  (d) nftables, the same 10,000 rules as a linear chain        (e) nftables, as a set

Throughput (iperf3), request/response latency (sockperf ping-pong: the TCP_RR figure) and
connection rate (wrk with `Connection: close` against nginx: the TCP_CRR figure). The load
generator is pinned to CPU 0, servers to CPU 1; configurations are interleaved over --runs rounds
and medians compared. Targets (issue 5): (b)/(a) >= 0.95 throughput and >= 0.90 TCP_RR;
(c)/(b) >= 0.95; (c) >= 5x (d) and >= 1x (e) on TCP_CRR. Needs root.
Run: .venv/bin/python bench/datapath.py [--runs 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.datapath import loader, maps, plumbing  # noqa: E402
from services.datapath.agent import Agent, EndpointSpec  # noqa: E402

NODE = "bench"
NETNS = "cilia-bench-node"
NODE_ADDRESS = "10.98.0.1"
POD_CIDR = ipaddress.IPv4Network("10.98.1.0/24")
CONFIGS = ("a", "b", "c", "d", "e")
NAMES = {
    "a": "no programs",
    "b": "cilia, allowing policy",
    "c": "cilia, 10,000 CIDR rules",
    "d": "nftables, 10,000-rule chain",
    "e": "nftables, 10,000-entry set",
}
N_RULES = 10_000


def sh(argv: list[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def in_node(argv: list[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{NETNS}", "--", *argv]


def cidrs(n: int) -> list[str]:
    """n distinct /32s outside the pod CIDR (203.0.x.y and 198.18.x.y)."""
    out = []
    for i in range(n):
        out.append(
            f"198.18.{(i >> 8) & 255}.{i & 255}/32" if i < 65536 else f"203.0.{(i >> 8) & 255}.{i & 255}/32"
        )
    return out


def policy(rules: int, server_ip: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    egress: list[dict[str, Any]] = [{"toEndpoints": [{"matchLabels": {"app": "server"}}]}]
    if rules:
        egress.append({"toCIDR": cidrs(rules)})
    client = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "client", "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": egress},
    }
    server = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "server", "namespace": "default"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}]}],
        },
    }
    return {
        ("CiliumNetworkPolicy", "default", "client"): client,
        ("CiliumNetworkPolicy", "default", "server"): server,
    }


def nft_script(kind: str, client_ip: str, server_ip: str) -> str:
    prefixes = [c.split("/")[0] for c in cidrs(N_RULES)]
    lines = ["table inet cilia_bench {"]
    if kind == "set":
        lines.append(
            "  set allowed { type ipv4_addr; flags interval; elements = { "
            + ", ".join([*prefixes, server_ip])
            + " } }"
        )
    lines += [
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        "    ct state established,related accept",
    ]
    if kind == "set":
        lines.append(f"    ip saddr {client_ip} ip daddr @allowed accept")
    else:
        lines += [f"    ip saddr {client_ip} ip daddr {p} accept" for p in prefixes]
        lines.append(f"    ip saddr {client_ip} ip daddr {server_ip} accept")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


class Bench:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.dir = Path(tempfile.mkdtemp(prefix="cilia-bench-"))
        self.agent: Agent | None = None
        self.servers: list[subprocess.Popen[bytes]] = []
        self.client = self.server = {}  # type: ignore[var-annotated]

    async def setup(self) -> None:
        sh(["ip", "netns", "delete", NETNS], check=False)
        sh(["ip", "netns", "add", NETNS])
        sh(["ip", "-n", NETNS, "link", "set", "lo", "up"])
        sh(["ip", "-n", NETNS, "addr", "add", f"{NODE_ADDRESS}/32", "dev", "lo"])
        numbers = {"client": 30001, "server": 30002}

        async def allocate(labels: list[str]) -> int:
            return next(n for k, n in numbers.items() if f"k8s:app={k}" in labels)

        loader.remove_pins(maps.pin_root(NODE))
        self.agent = Agent(
            NODE, maps.pin_root(NODE), self.dir / "state", POD_CIDR, allocate, node_netns=NETNS
        )
        await self.agent.start()
        await self.agent.set_policies({})
        c = await self.agent.add_endpoint(EndpointSpec(name="client", labels={"app": "client"}))
        s = await self.agent.add_endpoint(EndpointSpec(name="server", labels={"app": "server"}))
        self.client, self.server = c.model_dump(), s.model_dump()
        conf = self.dir / "nginx.conf"
        conf.write_text(
            f"""daemon off; worker_processes 1; pid {self.dir}/nginx.pid; error_log {self.dir}/nginx.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_timeout 0;
  server {{ listen {s.ip}:80 reuseport backlog=4096; location / {{ return 200 "ok\\n"; }} }} }}
"""
        )
        for argv in (
            ["iperf3", "-s", "-B", s.ip, "-p", "5201"],
            ["sockperf", "server", "--tcp", "-i", s.ip, "-p", "11111"],
            ["nginx", "-c", str(conf)],
        ):
            self.servers.append(
                subprocess.Popen(
                    ["taskset", "-c", "1", *self.pod(self.server, argv)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,  # a group of its own: nginx's worker goes with its master
                )
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ss = sh(self.pod(self.server, ["ss", "-ltnH"])).stdout
            if all(f":{p} " in ss for p in (5201, 11111, 80)):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("servers did not start")

    def pod(self, rec: dict[str, Any], argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={rec['network']['netns_path']}", "--", *argv]

    async def configure(self, cfg: str) -> None:
        assert self.agent is not None
        sh(in_node(["nft", "delete", "table", "inet", "cilia_bench"]), check=False)
        ifaces = [r["network"]["host_ifname"] for r in (self.client, self.server)]
        if cfg in ("b", "c"):
            for ifname in ifaces:
                loader.attach(self.agent.programs, ifname, NETNS)  # type: ignore[arg-type]
            await self.agent.set_policies(policy(N_RULES if cfg == "c" else 0, self.server["ip"]))
        else:
            for ifname in ifaces:
                loader.detach(ifname, NETNS)
            if cfg in ("d", "e"):
                sh(
                    in_node(["nft", "-f", "-"]),
                    input=nft_script("set" if cfg == "e" else "chain", self.client["ip"], self.server["ip"]),
                )
        # sanity: the server answers through this configuration
        probe = sh(
            self.pod(self.client, ["curl", "-s", "-m", "3", f"http://{self.server['ip']}/"]), check=False
        )
        if probe.stdout.strip() != "ok":
            raise RuntimeError(f"config {cfg}: the server does not answer ({probe.returncode})")

    def client_run(self, argv: list[str], timeout: float) -> str:
        return sh(["taskset", "-c", "0", *self.pod(self.client, argv)], timeout=timeout).stdout

    def throughput(self) -> float:
        out = self.client_run(
            ["iperf3", "-c", self.server["ip"], "-p", "5201", "-t", str(self.seconds), "-J"],
            self.seconds + 20,
        )
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9

    def tcp_rr(self) -> float:
        out = self.client_run(
            [
                "sockperf",
                "ping-pong",
                "--tcp",
                "-i",
                self.server["ip"],
                "-p",
                "11111",
                "-t",
                str(self.seconds),
            ],
            self.seconds + 20,
        )
        m = re.search(r"avg-latency=([\d.]+)", out) or re.search(r"avg-lat=\s*([\d.]+)", out)
        if not m:
            raise RuntimeError(f"sockperf output not understood: {out[-400:]}")
        return 1e6 / (
            2 * float(m.group(1))
        )  # transactions per second (avg-latency is half a round trip, in usec)

    def tcp_crr(self) -> float:
        out = self.client_run(
            [
                "wrk",
                "-t1",
                "-c16",
                f"-d{int(self.seconds)}s",
                "-H",
                "Connection: close",
                f"http://{self.server['ip']}/",
            ],
            self.seconds + 20,
        )
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m:
            raise RuntimeError(f"wrk output not understood: {out[-400:]}")
        return float(m.group(1))

    async def teardown(self) -> None:
        for p in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        if self.agent is not None:
            for rec in self.agent.endpoints():
                try:
                    await self.agent.delete_endpoint(rec.namespace, rec.name)
                except Exception:
                    plumbing.delete_endpoint(rec.net)
        sh(["ip", "netns", "delete", NETNS], check=False)
        loader.remove_pins(maps.pin_root(NODE))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args.seconds)
    samples: dict[str, dict[str, list[float]]] = {
        c: {"throughput_gbps": [], "tcp_rr_tps": [], "tcp_crr_cps": []} for c in CONFIGS
    }
    try:
        await bench.setup()
        wanted = [c for c in CONFIGS if c in args.configs.split(",")]
        for r in range(args.runs):
            for cfg in wanted:
                await bench.configure(cfg)
                samples[cfg]["throughput_gbps"].append(bench.throughput())
                samples[cfg]["tcp_rr_tps"].append(bench.tcp_rr())
                samples[cfg]["tcp_crr_cps"].append(bench.tcp_crr())
                print(
                    f"run {r + 1} ({cfg}) {NAMES[cfg]:<28} {samples[cfg]['throughput_gbps'][-1]:7.2f} Gbit/s "
                    f"{samples[cfg]['tcp_rr_tps'][-1]:9.0f} RR/s {samples[cfg]['tcp_crr_cps'][-1]:8.0f} CRR/s",
                    flush=True,
                )
    finally:
        await bench.teardown()
    medians = {
        c: {k: statistics.median(v) for k, v in m.items()} for c, m in samples.items() if m["throughput_gbps"]
    }
    return {"samples": samples, "medians": medians}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="a subset to measure, e.g. a,b (ratios need their pairs)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (namespaces, BPF, nftables)", file=sys.stderr)
        return 1
    result = asyncio.run(run(args))
    m = result["medians"]
    print(f"\n{'config':<32} {'Gbit/s':>8} {'TCP_RR/s':>10} {'TCP_CRR/s':>10}")
    for c in m:
        print(
            f"({c}) {NAMES[c]:<28} {m[c]['throughput_gbps']:8.2f} {m[c]['tcp_rr_tps']:10.0f} {m[c]['tcp_crr_cps']:10.0f}"
        )
    if set(m) != set(CONFIGS):
        return 0
    ratios = {
        "b/a throughput": m["b"]["throughput_gbps"] / m["a"]["throughput_gbps"],
        "b/a tcp_rr": m["b"]["tcp_rr_tps"] / m["a"]["tcp_rr_tps"],
        "c/b throughput": m["c"]["throughput_gbps"] / m["b"]["throughput_gbps"],
        "c/b tcp_rr": m["c"]["tcp_rr_tps"] / m["b"]["tcp_rr_tps"],
        "c/b tcp_crr": m["c"]["tcp_crr_cps"] / m["b"]["tcp_crr_cps"],
        "c/d tcp_crr": m["c"]["tcp_crr_cps"] / m["d"]["tcp_crr_cps"],
        "c/e tcp_crr": m["c"]["tcp_crr_cps"] / m["e"]["tcp_crr_cps"],
    }
    targets = {
        "b/a throughput >= 0.95": ratios["b/a throughput"] >= 0.95,
        "b/a tcp_rr >= 0.90": ratios["b/a tcp_rr"] >= 0.90,
        "c/b >= 0.95 (throughput)": ratios["c/b throughput"] >= 0.95,
        "c/d tcp_crr >= 5": ratios["c/d tcp_crr"] >= 5,
        "c/e tcp_crr >= 1": ratios["c/e tcp_crr"] >= 1,
    }
    print("\nratios:")
    for k, v in ratios.items():
        print(f"  {k:<16} {v:6.2f}")
    for k, ok in targets.items():
        print(f"  {k:<28} {'OK' if ok else 'MISSED'}")
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / "datapath.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": "datapath",
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
