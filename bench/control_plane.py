"""Control-plane benchmark: identity allocations per second, and policy apply -> revision event latency,
on NATS JetStream KV and on etcd, side by side in one run.

Starts its own nats-server and etcd on free ports, and the identity and policy services as
processes (as in production). Targets (issue 4): >= 2,000 new identities/s; p99 apply-to-event < 50 ms.
Run: .venv/bin/python bench/control_plane.py [--identities N] [--applies N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nats  # noqa: E402

from cilia import auth, bus  # noqa: E402
from services.identity.models import AllocateRequest, IdentityReply  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(check: Any, timeout: float = 30.0, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout}s")


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def start(
    stack: ExitStack, argv: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    fh = stack.enter_context(log.open("wb"))
    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    stack.callback(stop)
    return proc


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def allocations(nats_url: str, count: int, concurrency: int, tag: str) -> dict[str, float]:
    nc = await nats.connect(nats_url)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    latencies: list[float] = []

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            labels = [f"k8s:app=bench-{tag}-{i}", f"k8s:io.kubernetes.pod.namespace=ns-{i % 10}"]
            t0 = time.perf_counter()
            await bus.request(nc, bus.IDENTITY_ALLOCATE, AllocateRequest(labels=labels), IdentityReply, 10.0)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await nc.close()
    return {
        "identities": count,
        "seconds": elapsed,
        "per_second": count / elapsed,
        "latency_p50_ms": pct(latencies, 50) * 1000,
        "latency_p99_ms": pct(latencies, 99) * 1000,
    }


async def apply_latency(nats_url: str, policy_url: str, token: str, count: int) -> dict[str, float]:
    nc = await nats.connect(nats_url)
    got: asyncio.Queue[tuple[int, float]] = asyncio.Queue()

    async def on_event(msg: Any) -> None:
        got.put_nowait((json.loads(msg.data)["revision"], time.perf_counter()))

    await nc.subscribe(bus.POLICY_REVISION, cb=on_event)
    await nc.flush()
    latencies: list[float] = []
    for i in range(count):
        doc = (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bench}\n"
            "spec:\n  endpointSelector: {matchLabels: {app: bench}}\n"
            f"  ingress:\n  - toPorts: [{{ports: [{{port: '{1000 + i}', protocol: TCP}}]}}]\n"
        )
        req = urllib.request.Request(
            f"{policy_url}/v1/policies",
            data=doc.encode(),
            method="POST",
            headers={"authorization": f"Bearer {token}", "content-type": "application/yaml"},
        )
        t0 = time.perf_counter()
        body = await asyncio.to_thread(lambda r=req: json.loads(urllib.request.urlopen(r, timeout=10).read()))
        while True:
            revision, t1 = await asyncio.wait_for(got.get(), 10)
            if revision == body["revision"]:
                break
        latencies.append(t1 - t0)
    await nc.close()
    return {
        "applies": count,
        "latency_p50_ms": pct(latencies, 50) * 1000,
        "latency_p99_ms": pct(latencies, 99) * 1000,
        "latency_max_ms": max(latencies) * 1000,
    }


def run_backend(backend: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        nport = free_port()
        nats_bin = shutil.which("nats-server", path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
        assert nats_bin, "nats-server missing: run make bootstrap"
        store = workdir / f"nats-{backend}"
        start(
            stack,
            [nats_bin, "-js", "-a", "127.0.0.1", "-p", str(nport), "-sd", str(store)],
            workdir / f"nats-{backend}.log",
        )
        wait(lambda: port_open(nport), what="nats-server")
        nats_url = f"nats://127.0.0.1:{nport}"
        kvstore = "nats"
        if backend == "etcd":
            cport, pport = free_port(), free_port()
            start(
                stack,
                [
                    shutil.which("etcd") or "/usr/bin/etcd",
                    "--data-dir", str(workdir / "etcd-data"),
                    "--listen-client-urls", f"http://127.0.0.1:{cport}",
                    "--advertise-client-urls", f"http://127.0.0.1:{cport}",
                    "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
                    "--initial-cluster", f"default=http://127.0.0.1:{pport}",
                ],
                workdir / "etcd.log",
            )  # fmt: skip
            wait(lambda: http_ok(f"http://127.0.0.1:{cport}/health"), what="etcd")
            kvstore = f"etcd://127.0.0.1:{cport}"
        creds = auth.generate()
        creds_file = auth.write(creds, workdir / f"creds-{backend}.yaml")
        urls = {}
        for name in ("identity", "policy"):
            port = free_port()
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO),
                "CILIA_NATS_URL": nats_url,
                "CILIA_KVSTORE": kvstore,
                "CILIA_HTTP_ADDR": f"127.0.0.1:{port}",
                "CILIA_TOKEN_FILE": str(creds_file),
            }
            start(
                stack,
                [str(VENV_BIN / "python"), "-m", f"services.{name}"],
                workdir / f"{name}-{backend}.log",
                env,
            )
            urls[name] = f"http://127.0.0.1:{port}"
            wait(lambda u=urls[name]: http_ok(f"{u}/readyz"), what=f"{name} service")
        alloc = asyncio.run(allocations(nats_url, args.identities, args.concurrency, backend))
        apply = asyncio.run(apply_latency(nats_url, urls["policy"], creds.tokens["admin"], args.applies))
        return {"backend": backend, "allocation": alloc, "apply_to_event": apply}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--applies", type=int, default=200)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="cilia-bench-") as tmp:
        for backend in ("nats", "etcd"):
            results.append(run_backend(backend, Path(tmp), args))
    print(
        f"{'backend':<8} {'identities/s':>13} {'alloc p50':>10} {'alloc p99':>10} {'apply->event p50':>17} {'p99':>8}"
    )
    for r in results:
        a, p = r["allocation"], r["apply_to_event"]
        print(
            f"{r['backend']:<8} {a['per_second']:>13.0f} {a['latency_p50_ms']:>8.2f}ms {a['latency_p99_ms']:>8.2f}ms"
            f" {p['latency_p50_ms']:>15.2f}ms {p['latency_p99_ms']:>6.2f}ms"
        )
    nats_r, etcd_r = results
    print(
        f"\nratio nats/etcd: identities/s {nats_r['allocation']['per_second'] / etcd_r['allocation']['per_second']:.2f}x, "
        f"apply p99 {nats_r['apply_to_event']['latency_p99_ms'] / etcd_r['apply_to_event']['latency_p99_ms']:.2f}x"
    )
    targets = {
        f"{r['backend']}_identities_per_second_ge_2000": r["allocation"]["per_second"] >= 2000
        for r in results
    } | {f"{r['backend']}_apply_p99_lt_50ms": r["apply_to_event"]["latency_p99_ms"] < 50 for r in results}
    for k, v in targets.items():
        print(f"  {k}: {'OK' if v else 'MISSED'}")
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / "control_plane.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": "control_plane",
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "python": platform.python_version(),
                "results": results,
                "targets": targets,
            },
            indent=2,
        )
    )
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
