"""DNS proxy benchmark: queries per second and added latency through the proxy vs straight to the server.

A node with two endpoints behind the eBPF datapath: `client` runs dnsperf, `server` runs nsd
(authoritative for bench.test). Two configurations, interleaved over --runs rounds:
  (direct) the client's egress policy allows 53/UDP to the server (no DNS rules: no redirect)
  (proxy)  the same with `rules.dns: [matchPattern: "*"]` and a toFQDNs selector for the names:
           every query goes through cilia's DNS proxy (judged, forwarded, its IPs in the FQDN cache)
The proxy runs alone on CPU 1; dnsperf, nsd and the agent (in this process) on CPU 0. Measured:
maximum queries per second (dnsperf, 20 clients, 100 outstanding) and latency at a fixed 1,000 qps
(every query's latency from `dnsperf -v`: p50, p99). Targets (issue 6): p99 added latency < 2 ms at
1,000 qps; >= 5,000 qps through the proxy on one core. Needs root. Saves bench/out/dnsproxy.json.
Run: .venv/bin/python bench/dnsproxy.py [--runs 5] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import re
import shutil
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

from services.datapath import loader, localapi, maps, plumbing  # noqa: E402
from services.datapath.agent import Agent, EndpointSpec  # noqa: E402

NODE = "benchdns"
NETNS = "cilia-benchdns-node"
NODE_ADDRESS = "10.97.0.1"
POD_CIDR = ipaddress.IPv4Network("10.97.1.0/24")
NAMES = 200
CONFIGS = ("direct", "proxy")
PROXY_PORT = 10053
LATENCY_QPS = 1000


def sh(argv: list[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def policy(dns_rules: bool) -> dict[tuple[str, str, str], dict[str, Any]]:
    port: dict[str, Any] = {"ports": [{"port": "53", "protocol": "UDP"}]}
    if dns_rules:
        port["rules"] = {"dns": [{"matchPattern": "*"}]}
    spec = {
        "endpointSelector": {"matchLabels": {"app": "client"}},
        "egress": [
            {"toEndpoints": [{"matchLabels": {"app": "server"}}], "toPorts": [port]},
            {"toFQDNs": [{"matchPattern": "*.bench.test"}]},
        ],
    }
    doc = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "client", "namespace": "default"},
        "spec": spec,
    }
    return {("CiliumNetworkPolicy", "default", "client"): doc}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Bench:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.dir = Path(tempfile.mkdtemp(prefix="cilia-bench-dns-"))
        self.agent: Agent | None = None
        self.server_ip = ""
        self.client: dict[str, Any] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.api: asyncio.AbstractServer | None = None
        self.flows = 0

    async def setup(self) -> None:
        sh(["ip", "netns", "delete", NETNS], check=False)
        sh(["ip", "netns", "add", NETNS])
        sh(["ip", "-n", NETNS, "link", "set", "lo", "up"])
        sh(["ip", "-n", NETNS, "addr", "add", f"{NODE_ADDRESS}/32", "dev", "lo"])
        numbers = {"client": 31001, "server": 31002}

        async def allocate(labels: list[str]) -> int:
            return next(n for k, n in numbers.items() if f"k8s:app={k}" in labels)

        loader.remove_pins(maps.pin_root(NODE))
        self.agent = Agent(
            NODE, maps.pin_root(NODE), self.dir / "state" / NODE, POD_CIDR, allocate, node_netns=NETNS
        )
        await self.agent.start()
        await self.agent.set_policies({})

        async def on_flow(_flow: dict[str, Any]) -> None:
            self.flows += 1

        self.api = await localapi.serve(self.agent, localapi.socket_path(NODE), on_flow)
        c = await self.agent.add_endpoint(EndpointSpec(name="client", labels={"app": "client"}))
        s = await self.agent.add_endpoint(EndpointSpec(name="server", labels={"app": "server"}))
        self.client, self.server_ip = c.model_dump(), s.ip
        zone = ["$ORIGIN bench.test.", "$TTL 300", "@ IN SOA ns admin 1 3600 600 86400 300", "@ IN NS ns"]
        zone += ["ns IN A 198.51.100.250"] + [
            f"a{i} IN A 198.51.{100 + i // 250}.{i % 250}" for i in range(NAMES)
        ]
        (self.dir / "bench.test.zone").write_text("\n".join(zone) + "\n")
        (self.dir / "queries.txt").write_text("".join(f"a{i}.bench.test A\n" for i in range(NAMES)))
        d = self.dir
        (d / "nsd.conf").write_text(
            f"""server:
  ip-address: {s.ip}
  port: 53
  username: ""
  chroot: ""
  zonesdir: "{d}"
  pidfile: "{d}/nsd.pid"
  database: ""
  zonelistfile: "{d}/zone.list"
  xfrdfile: "{d}/xfrd.state"
  xfrdir: "{d}"
  logfile: "{d}/nsd.log"
  server-count: 1
  verbosity: 0
  rrl-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: "bench.test"
  zonefile: "bench.test.zone"
"""
        )
        self.spawn(
            ["taskset", "-c", "0", *self.pod(s.model_dump(), ["nsd", "-d", "-c", str(d / "nsd.conf")])]
        )
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "CILIA_NODE": NODE,
            "CILIA_NODE_NETNS": NETNS,
            "CILIA_STATE_DIR": str(self.dir / "state"),
            "CILIA_HTTP_ADDR": "127.0.0.1:0",
            "CILIA_NATS_URL": "nats://127.0.0.1:1",  # no control plane: the packet path needs none
            "CILIA_TOFQDNS_PROXY_PORT": str(PROXY_PORT),
            "CILIA_LOG_LEVEL": "warning",
        }
        log = (self.dir / "dnsproxy.log").open("wb")
        self.procs.append(
            subprocess.Popen(
                ["taskset", "-c", "1", sys.executable, "-m", "services.dnsproxy"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + 30
        while PROXY_PORT not in self.agent.proxies:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the DNS proxy did not register: {(self.dir / 'dnsproxy.log').read_text()[-800:]}"
                )
            await asyncio.sleep(0.1)

    def spawn(self, argv: list[str]) -> None:
        self.procs.append(
            subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
        )

    def pod(self, rec: dict[str, Any], argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={rec['network']['netns_path']}", "--", *argv]

    async def run(self, argv: list[str], timeout: float) -> str:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {err.decode()[-400:]}")
        return out.decode()

    async def configure(self, cfg: str) -> None:
        assert self.agent is not None
        await self.agent.set_policies(policy(cfg == "proxy"))
        out = await self.run(
            self.pod(
                self.client,
                ["dig", f"@{self.server_ip}", "a1.bench.test", "+short", "+tries=3", "+timeout=1"],
            ),
            20,
        )
        if out.strip() != "198.51.100.1":
            raise RuntimeError(f"{cfg}: the server does not answer through this configuration: {out!r}")

    def dnsperf(self, *extra: str) -> list[str]:
        return [
            "taskset",
            "-c",
            "0",
            *self.pod(
                self.client,
                [
                    "dnsperf",
                    "-s",
                    self.server_ip,
                    "-d",
                    str(self.dir / "queries.txt"),
                    "-l",
                    str(self.seconds),
                    *extra,
                ],
            ),
        ]

    async def throughput(self) -> float:
        out = await self.run(self.dnsperf("-c", "20", "-q", "100", "-t", "2"), self.seconds + 30)
        m = re.search(r"Queries per second:\s+([\d.]+)", out)
        lost = re.search(r"Queries lost:\s+(\d+)", out)
        if not m:
            raise RuntimeError(f"dnsperf output not understood: {out[-400:]}")
        if lost and int(lost.group(1)) > 0.01 * float(m.group(1)) * self.seconds:
            print(f"  (note: {lost.group(1)} queries lost)", flush=True)
        return float(m.group(1))

    async def latency(self) -> dict[str, float]:
        out = await self.run(
            self.dnsperf("-Q", str(LATENCY_QPS), "-c", "4", "-v", "-t", "2"), self.seconds + 30
        )
        values = [float(x) * 1000 for x in re.findall(r"^> NOERROR \S+ A ([\d.]+)$", out, re.M)]
        if len(values) < LATENCY_QPS * self.seconds * 0.9:
            raise RuntimeError(f"too few answered queries at {LATENCY_QPS} qps: {len(values)}")
        return {"p50_ms": percentile(values, 0.50), "p99_ms": percentile(values, 0.99), "n": len(values)}

    async def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        if self.api is not None:
            self.api.close()
        if self.agent is not None:
            for rec in self.agent.endpoints():
                try:
                    await self.agent.delete_endpoint(rec.namespace, rec.name)
                except Exception:
                    plumbing.delete_endpoint(rec.net)
        sh(["ip", "netns", "delete", NETNS], check=False)
        loader.remove_pins(maps.pin_root(NODE))
        shutil.rmtree(self.dir, ignore_errors=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args.seconds)
    samples: dict[str, dict[str, list[float]]] = {c: {"qps": [], "p50_ms": [], "p99_ms": []} for c in CONFIGS}
    try:
        await bench.setup()
        for r in range(args.runs):
            for cfg in CONFIGS:
                await bench.configure(cfg)
                qps = await bench.throughput()
                lat = await bench.latency()
                samples[cfg]["qps"].append(qps)
                samples[cfg]["p50_ms"].append(lat["p50_ms"])
                samples[cfg]["p99_ms"].append(lat["p99_ms"])
                print(
                    f"run {r + 1} {cfg:<7} {qps:9.0f} qps   at {LATENCY_QPS} qps: p50 {lat['p50_ms']:6.3f} ms"
                    f"  p99 {lat['p99_ms']:6.3f} ms",
                    flush=True,
                )
    finally:
        flows = bench.flows
        await bench.teardown()
    medians = {c: {k: statistics.median(v) for k, v in m.items()} for c, m in samples.items() if m["qps"]}
    return {"samples": samples, "medians": medians, "proxy_flows": flows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (namespaces, BPF, nftables)", file=sys.stderr)
        return 1
    os.sched_setaffinity(0, {0})  # the agent (this process) beside the load, away from the proxy
    result = asyncio.run(run(args))
    m = result["medians"]
    print(f"\n{'config':<8} {'qps':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for c in m:
        print(f"{c:<8} {m[c]['qps']:9.0f} {m[c]['p50_ms']:8.3f} {m[c]['p99_ms']:8.3f}")
    added = {
        "p50_ms": m["proxy"]["p50_ms"] - m["direct"]["p50_ms"],
        "p99_ms": m["proxy"]["p99_ms"] - m["direct"]["p99_ms"],
    }
    ratios = {"proxy/direct qps": m["proxy"]["qps"] / m["direct"]["qps"]}
    targets = {
        "p99 added latency < 2 ms at 1,000 qps": added["p99_ms"] < 2.0,
        ">= 5,000 qps through the proxy on one core": m["proxy"]["qps"] >= 5000,
    }
    print(f"\nadded latency through the proxy: p50 {added['p50_ms']:.3f} ms, p99 {added['p99_ms']:.3f} ms")
    for k, v in ratios.items():
        print(f"  {k:<20} {v:6.2f}")
    for k, ok in targets.items():
        print(f"  {k:<46} {'OK' if ok else 'MISSED'}")
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / "dnsproxy.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": "dnsproxy",
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "kernel": platform.release(),
                "runs": args.runs,
                "seconds": args.seconds,
                **result,
                "added_latency": added,
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
