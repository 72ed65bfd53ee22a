"""L7 proxy benchmark: HTTP requests straight to nginx vs through the node's L7 proxy, side by side.

Two pods on one node behind the eBPF datapath; nginx (Debian's) in the server pod answers small
responses (`ok\\n`) with keep-alive. Configurations, interleaved over --runs rounds:

  (direct)   an L3/L4 policy allows client -> server:80: no proxy on the path
  (proxy)    the same allow with an HTTP rule (GET /.*): every request through the L7 proxy,
             its rules cached per policy revision (the default)
  (nocache)  as (proxy), but the proxy asks the agent for the rules on every request

wrk (Debian's) runs in the client pod pinned to CPU 0, with 1 and 64 keep-alive connections;
nginx, the proxy and the agent share CPU 1. The agent runs in this process (as in
bench/datapath.py) and serves the node-local API; it turns each flow the proxy sends into its
JSON line, as the real agent does before publishing it. Targets (issue 7): added p50 under 2 ms
(1 connection) and >= 0.3x direct throughput at 64 connections. --profile runs one more
(proxy) round with the proxy's data plane under cProfile and prints where its time goes.
Needs root. Run: .venv/bin/python bench/l7proxy.py [--runs 5] [--seconds 5] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import json
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cilia.flows import Flow, to_json_line  # noqa: E402
from services.datapath import loader, localapi, maps, plumbing  # noqa: E402
from services.datapath.agent import Agent, EndpointSpec  # noqa: E402

NODE = "bench-l7"
NETNS = "cilia-bench-l7"
NODE_ADDRESS = "10.97.0.1"
POD_CIDR = ipaddress.IPv4Network("10.97.1.0/24")
PROXY_PORT = 15001
CONFIGS = ("direct", "proxy", "nocache")
NAMES = {
    "direct": "straight to nginx (L3/L4 allow)",
    "proxy": "through the L7 proxy (rules cached)",
    "nocache": "through the L7 proxy (agent asked per request)",
}
LOADS = (1, 64)
PY = str(REPO / ".venv" / "bin" / "python")


def sh(argv: list[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def policy(l7: bool) -> dict[tuple[str, str, str], dict[str, Any]]:
    port: dict[str, Any] = {"ports": [{"port": "80", "protocol": "TCP"}]}
    if l7:
        port["rules"] = {"http": [{"method": "GET", "path": "/.*"}]}
    server = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "server", "namespace": "default"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}], "toPorts": [port]}],
        },
    }
    return {("CiliumNetworkPolicy", "default", "server"): server}


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(out: str) -> dict[str, float]:
    """Requests/s and the p50 / p99 latency (ms) of `wrk --latency`."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    if rps is None or set(lat) != {"50", "99"}:
        raise RuntimeError(f"wrk output not understood: {out[-600:]}")

    def ms(text: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
        if m is None:
            raise RuntimeError(f"wrk latency not understood: {text}")
        return float(m.group(1)) * _UNITS[m.group(2)]

    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses: {out[-600:]}")
    return {"rps": float(rps.group(1)), "p50_ms": ms(lat["50"]), "p99_ms": ms(lat["99"])}


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Bench:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.dir = Path(tempfile.mkdtemp(prefix="cilia-bench-l7-"))
        self.agent: Agent | None = None
        self.api: asyncio.AbstractServer | None = None
        self.flows: collections.deque[str] = collections.deque(maxlen=100_000)
        self.nginx: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.proxy_cache: bool | None = None
        self.client: dict[str, Any] = {}
        self.server: dict[str, Any] = {}

    async def on_flow(self, flow: dict[str, Any]) -> None:
        # What the agent does with a proxy's flow before publishing it.
        self.flows.append(to_json_line(Flow.model_validate(flow)))

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
            NODE, maps.pin_root(NODE), self.dir / "state", POD_CIDR, allocate, node_netns=NETNS
        )
        await self.agent.start()
        await self.agent.set_policies({})
        self.api = await localapi.serve(self.agent, localapi.socket_path(NODE), self.on_flow)
        c = await self.agent.add_endpoint(EndpointSpec(name="client", labels={"app": "client"}))
        s = await self.agent.add_endpoint(EndpointSpec(name="server", labels={"app": "server"}))
        self.client, self.server = c.model_dump(), s.model_dump()
        conf = self.dir / "nginx.conf"
        conf.write_text(
            f"""daemon off; worker_processes 1; pid {self.dir}/nginx.pid; error_log {self.dir}/nginx.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 120;
  server {{ listen {s.ip}:80 backlog=4096; location / {{ return 200 "ok\\n"; }} }} }}
"""
        )
        self.nginx = subprocess.Popen(
            ["taskset", "-c", "1", *self.pod(self.server, ["nginx", "-c", str(conf)])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: teardown ends the workers with the master
        )
        for _ in range(150):
            if ":80 " in sh(self.pod(self.server, ["ss", "-ltnH"])).stdout:
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("nginx did not start")

    def pod(self, rec: dict[str, Any], argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={rec['network']['netns_path']}", "--", *argv]

    async def start_proxy(self, cache: bool, profile: Path | None = None) -> None:
        await self.stop_proxy()
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "CILIA_NODE": NODE,
            "CILIA_NODE_NETNS": NETNS,
            "CILIA_PROXY_PORT": str(PROXY_PORT),
            "CILIA_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "CILIA_NATS_URL": "nats://127.0.0.1:9",  # nothing there: the data plane needs no NATS
            "CILIA_RULE_CACHE": "true" if cache else "false",
            "CILIA_LOG_LEVEL": "error",
            **({"CILIA_PROFILE": str(profile)} if profile else {}),
        }
        log = (self.dir / "l7proxy.log").open("ab")
        self.proxy = subprocess.Popen(
            ["taskset", "-c", "1", PY, "-m", "services.l7proxy"], env=env, stdout=log, stderr=log
        )
        self.proxy_cache = cache
        assert self.agent is not None
        for _ in range(300):
            if PROXY_PORT in self.agent.proxies:
                return
            if self.proxy.poll() is not None:
                raise RuntimeError(f"the proxy exited: see {self.dir / 'l7proxy.log'}")
            await asyncio.sleep(0.05)
        raise RuntimeError("the proxy did not register")

    async def stop_proxy(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
            for _ in range(200):
                if self.proxy.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                self.proxy.kill()
        self.proxy = None
        assert self.agent is not None
        for _ in range(100):
            if not self.agent.proxies:
                break
            await asyncio.sleep(0.05)

    async def configure(self, cfg: str) -> None:
        assert self.agent is not None
        if cfg != "direct" and (self.proxy is None or self.proxy_cache != (cfg == "proxy")):
            await self.start_proxy(cache=cfg == "proxy")
        await self.agent.set_policies(policy(l7=cfg != "direct"))
        out = await self.run_client(["curl", "-s", "-m", "3", f"http://{self.server['ip']}/"], 10)
        if out.strip() != "ok":
            raise RuntimeError(f"config {cfg}: the server does not answer through it")

    async def run_client(self, argv: list[str], timeout: float) -> str:
        # asyncio, not subprocess.run: the agent in this process keeps answering the proxy meanwhile
        proc = await asyncio.create_subprocess_exec(
            "taskset", "-c", "0", *self.pod(self.client, argv), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        return out.decode()

    def processes(self) -> dict[str, int]:
        """The processes on CPU 1 whose work a request costs: nginx's worker, the proxy, the agent."""
        out = {"agent": os.getpid()}
        if self.nginx is not None:
            out["nginx"] = (children(self.nginx.pid) or [self.nginx.pid])[0]
        if self.proxy is not None and self.proxy.poll() is None:
            out["proxy"] = self.proxy.pid  # taskset execs python: the same process
        return out

    async def wrk(self, conns: int) -> dict[str, float]:
        argv = [
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{int(self.seconds)}s",
            "--latency",
            f"http://{self.server['ip']}/",
        ]
        procs = self.processes()
        before = {k: cpu_seconds(pid) for k, pid in procs.items()}
        got = parse_wrk(await self.run_client(argv, self.seconds + 30))
        requests = got["rps"] * int(self.seconds)
        for k, pid in procs.items():
            (u0, s0), (u1, s1) = before[k], cpu_seconds(pid)
            got[f"{k}_user_us"] = (u1 - u0) * 1e6 / requests
            got[f"{k}_sys_us"] = (s1 - s0) * 1e6 / requests
        return got

    async def teardown(self) -> None:
        await self.stop_proxy() if self.agent is not None else None
        if self.nginx is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.nginx.pid, signal.SIGKILL)
            self.nginx.wait()
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


GROUPS = (
    ("cilia addon: policy, marks, flows", ("services/l7proxy/", "services/datapath/", "cilia/")),
    ("flow models (pydantic)", ("pydantic",)),
    ("mitmproxy HTTP layers", ("mitmproxy/proxy/layers/http",)),
    (
        "mitmproxy layer machinery and hooks",
        ("mitmproxy/proxy/", "mitmproxy/addonmanager", "mitmproxy/hooks"),
    ),
    ("mitmproxy flow, headers, request objects", ("mitmproxy/",)),
    ("HTTP/1 parsing (h11)", ("h11/",)),
    ("asyncio event loop (Python)", ("asyncio/", "selectors.py")),
)
KERNEL = "socket calls (the kernel's network path: veth, eBPF, nft, TCP; waiting for the CPU)"
IDLE = "idle: waiting in epoll"


def _group(filename: str, func: str) -> str:
    if filename == "~":
        if "select.epoll" in func:
            return IDLE
        if "_socket.socket" in func:
            return KERNEL
    for label, needles in GROUPS:
        if any(n in filename for n in needles):
            return label
    return "other (stdlib, builtins)"


def profile_report(path: Path, top: int = 25) -> dict[str, Any]:
    """Where the data-plane thread's (wall-clock) time went, by function and grouped by component;
    shares are of the busy time (idle excluded)."""
    stats = pstats.Stats(str(path))
    groups: dict[str, float] = collections.defaultdict(float)
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        groups[_group(filename, func)] += tottime
        rows.append((tottime, ncalls, cumtime, f"{Path(filename).name}:{line}({func})"))
    rows.sort(reverse=True)
    idle = groups.pop(IDLE, 0.0)
    busy = sum(groups.values())
    return {
        "busy_seconds": busy,
        "idle_seconds": idle,
        "groups": {k: round(v / busy, 4) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top": [
            {"function": f, "self_s": round(t, 4), "calls": n, "cumulative_s": round(c, 4)}
            for t, n, c, f in rows[:top]
        ],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    os.sched_setaffinity(0, {1})  # the agent shares CPU 1 with nginx and the proxy; wrk has CPU 0
    bench = Bench(args.seconds)
    samples: dict[str, dict[str, list[dict[str, float]]]] = {c: {str(n): [] for n in LOADS} for c in CONFIGS}
    profile: dict[str, Any] | None = None
    try:
        await bench.setup()
        wanted = [c for c in CONFIGS if c in args.configs.split(",")]
        for r in range(args.runs):
            for cfg in wanted:
                await bench.configure(cfg)
                for conns in LOADS:
                    got = await bench.wrk(conns)
                    samples[cfg][str(conns)].append(got)
                    cpu = "  ".join(
                        f"{k} {got[f'{k}_user_us'] + got[f'{k}_sys_us']:5.0f}"
                        for k in ("nginx", "proxy", "agent")
                        if f"{k}_user_us" in got
                    )
                    print(
                        f"run {r + 1} {cfg:<8} {conns:>3} conns {got['rps']:10.0f} req/s "
                        f"p50 {got['p50_ms']:7.3f} ms  p99 {got['p99_ms']:7.3f} ms  CPU us/req: {cpu}",
                        flush=True,
                    )
        if args.profile:
            stats_path = bench.dir / "dataplane.prof"
            await bench.start_proxy(cache=True, profile=stats_path)
            await bench.configure("proxy")
            for conns in LOADS:
                await bench.wrk(conns)
            await bench.stop_proxy()
            profile = profile_report(stats_path)
            if args.profile_out:
                shutil.copy(stats_path, args.profile_out)
    finally:
        await bench.teardown()
        shutil.rmtree(bench.dir, ignore_errors=True)
    medians = {
        c: {
            n: {k: statistics.median(s[k] for s in runs) for k in ("rps", "p50_ms", "p99_ms")}
            for n, runs in m.items()
            if runs
        }
        for c, m in samples.items()
    }
    return {"samples": samples, "medians": {c: m for c, m in medians.items() if m}, "profile": profile}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="a subset, e.g. direct,proxy")
    parser.add_argument(
        "--profile", action="store_true", help="profile the proxy's data plane in one more round"
    )
    parser.add_argument("--profile-out", type=Path, help="also keep the cProfile stats in this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (namespaces, BPF, nftables)", file=sys.stderr)
        return 1
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        print("error: needs two CPUs (wrk on one, the servers on the other)", file=sys.stderr)
        return 1
    result = asyncio.run(run(args))
    m = result["medians"]
    print(f"\n{'config':<56} {'conns':>5} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}  CPU us/request")
    for c in m:
        for n, v in m[c].items():
            cpu = "  ".join(
                f"{k} {v[f'{k}_user_us']:.0f}+{v[f'{k}_sys_us']:.0f}"
                for k in ("nginx", "proxy", "agent")
                if f"{k}_user_us" in v
            )
            print(
                f"({c}) {NAMES[c]:<50} {n:>5} {v['rps']:10.0f} {v['p50_ms']:8.3f} {v['p99_ms']:8.3f}  {cpu}"
            )
    print("(CPU: user+system microseconds per request, of the processes that share CPU 1)")
    ratios: dict[str, float] = {}
    targets: dict[str, bool] = {}
    if "direct" in m:
        for c in ("proxy", "nocache"):
            if c not in m:
                continue
            for n in ("1", "64"):
                ratios[f"{c}/direct throughput, {n} conns"] = m[c][n]["rps"] / m["direct"][n]["rps"]
                ratios[f"{c} added p50 ms, {n} conns"] = m[c][n]["p50_ms"] - m["direct"][n]["p50_ms"]
        if "proxy" in m:
            targets["added p50 < 2 ms (1 conn)"] = ratios["proxy added p50 ms, 1 conns"] < 2.0
            targets[">= 0.3x direct throughput (64 conns)"] = (
                ratios["proxy/direct throughput, 64 conns"] >= 0.3
            )
    print("\nratios:")
    for k, v in ratios.items():
        print(f"  {k:<40} {v:8.3f}")
    for k, ok in targets.items():
        print(f"  {k:<40} {'OK' if ok else 'MISSED'}")
    if result["profile"]:
        prof = result["profile"]
        print(
            f"\nwhere the proxy's data-plane thread spends its busy time ({prof['busy_seconds']:.1f} s busy, "
            f"{prof['idle_seconds']:.1f} s idle):"
        )
        for k, share in prof["groups"].items():
            print(f"  {share * 100:5.1f}%  {k}")
        print("\ntop functions by self time:")
        for row in prof["top"]:
            print(f"  {row['self_s']:8.3f} s {row['calls']:>10} calls  {row['function']}")
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / "l7proxy.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": "l7proxy",
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
