"""`make demo`: the Star Wars story on real packets, on this machine, then the offline matrices.

Starts nats-server, the identity, policy and datapath services as processes, a node namespace,
and the Star Wars pods as namespaces behind the eBPF datapath; shows both ships landing, applies
rule1, shows the xwing timing out and the flows that say why. Everything it made is removed on exit
or Ctrl-C. Needs root (namespaces, BPF).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cilia import auth
from cilia.cli.client import Client
from cilia.cli.policy import print_tables
from cilia.errors import CiliaError
from cilia.scenario import evaluate, load_scenario

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SCENARIOS = ("starwars.yaml", "bookinfo.yaml", "mediabot-dns.yaml")
NODE = "demo"
NODE_NETNS = "cilia-demo-node"
NODE_ADDRESS = "10.250.0.1"
POD_CIDR = "10.250.1.0/24"
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}==> {text}{RESET}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise CiliaError(f"{url} did not become ready within {timeout}s")


class Demo:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cilia-demo-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.client: Client | None = None
        self.endpoints: dict[str, dict[str, Any]] = {}

    def run_bg(self, argv: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        fh = (self.dir / log).open("wb")
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        venv = Path(sys.executable).parent
        nats_bin = shutil.which("nats-server", path=f"{venv}:{os.environ.get('PATH', '')}")
        if nats_bin is None:
            raise CiliaError("nats-server is missing (run make bootstrap)")
        creds = auth.generate()
        creds_file = auth.write(creds, self.dir / "credentials.yaml")
        nport = free_port()
        (self.dir / "nats.conf").write_text(auth.nats_config(creds, "127.0.0.1", nport, self.dir / "js"))
        say(
            f"control plane: nats-server (JetStream, per-role users) on :{nport}, identity and policy services"
        )
        self.run_bg([nats_bin, "-c", str(self.dir / "nats.conf")], "nats.log")
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "CILIA_NATS_URL": f"nats://127.0.0.1:{nport}",
            "CILIA_TOKEN_FILE": str(creds_file),
        }
        urls = {}
        for name in ("identity", "policy"):
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            self.run_bg(
                [sys.executable, "-m", f"services.{name}"],
                f"{name}.log",
                {**env, "CILIA_HTTP_ADDR": f"127.0.0.1:{port}"},
            )
        say(
            f"node {NODE}: a network namespace ({NODE_NETNS}, {NODE_ADDRESS}) and its datapath agent (eBPF via bcc)"
        )
        self.cleanup_node()
        subprocess.run(["ip", "netns", "add", NODE_NETNS], check=True)
        subprocess.run(["ip", "-n", NODE_NETNS, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", NODE_NETNS, "addr", "add", f"{NODE_ADDRESS}/32", "dev", "lo"], check=True)
        port = free_port()
        urls["datapath"] = f"http://127.0.0.1:{port}"
        self.run_bg(
            [sys.executable, "-m", "services.datapath"],
            "datapath.log",
            {
                **env,
                "CILIA_HTTP_ADDR": f"127.0.0.1:{port}",
                "CILIA_NODE": NODE,
                "CILIA_NODE_NETNS": NODE_NETNS,
                "CILIA_POD_CIDR": POD_CIDR,
                "CILIA_STATE_DIR": str(self.dir / "state"),
            },
        )
        for name, url in urls.items():
            wait_http(f"{url}/readyz")
            print(f"  {name:<9} {url}  ready")
        self.client = Client(urls, creds.tokens["admin"])

    def add(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        assert self.client is not None
        rec: dict[str, Any] = self.client.request(
            "datapath", "POST", "/v1/endpoints", json={"name": name, "labels": labels}
        )
        self.endpoints[name] = rec
        print(
            f"  default/{name:<12} identity {rec['identity']:<6} ip {rec['ip']:<12} {', '.join(f'{k}={v}' for k, v in labels.items())}"
        )
        return rec

    def in_pod(self, name: str, *cmd: str) -> list[str]:
        return ["nsenter", f"--net={self.endpoints[name]['network']['netns_path']}", "--", *cmd]

    def serve(self, name: str) -> None:
        self.run_bg(
            self.in_pod(name, sys.executable, "-m", "cilia.demo_apps", "http", "--port", "80"),
            f"{name}.log",
            {**os.environ, "PYTHONPATH": str(REPO)},
        )

    def land(self, ship: str, target: str = "deathstar-1") -> None:
        ip = self.endpoints[target]["ip"]
        cmd = ["curl", "-s", "-m", "2", "-XPOST", f"http://{ip}/v1/request-landing"]
        print(f"{DIM}$ cilia endpoint exec default/{ship} -- {' '.join(cmd)}{RESET}")
        out = subprocess.run(self.in_pod(ship, *cmd), capture_output=True, text=True)
        print(
            out.stdout.strip()
            if out.returncode == 0
            else f"(no answer: curl exit code {out.returncode}, timed out)"
        )

    def flows(self, since: float) -> None:
        from cilia.flows import Flow, format_line

        assert self.client is not None
        time.sleep(0.5)  # the ring buffer is drained asynchronously; give it a moment
        items = self.client.request("datapath", "GET", "/v1/flows", params={"last": 200})["items"]
        print(f"{DIM}$ cilia observe --since ...{RESET}")
        for raw in items:
            flow = Flow.model_validate(raw)
            if flow.time and _ts(flow.time) >= since:
                line = format_line(flow)
                if "policy-verdict" in line or "DROPPED" in line or "SYN" in line:
                    print(line)

    def apply(self, path: Path) -> None:
        assert self.client is not None
        print(f"{DIM}$ cilia apply -f {path.relative_to(REPO)}{RESET}")
        reply = self.client.request(
            "policy", "POST", "/v1/policies", content=path.read_text(), content_type="application/yaml"
        )
        for c in reply["changes"]:
            print(f"ciliumnetworkpolicy.cilium.io/{c['name']} {c['action']}")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status = self.client.request("datapath", "GET", "/v1/datapath/status")
            if all(v >= reply["revision"] for v in status.get("policies", {}).values()) and status.get(
                "policies"
            ):
                return
            time.sleep(0.1)
        raise CiliaError("the datapath did not apply the policy in time")

    def cleanup_node(self) -> None:
        subprocess.run(["ip", "netns", "delete", NODE_NETNS], capture_output=True)

    def stop(self) -> None:
        if self.client is not None:
            for name in list(self.endpoints):
                with contextlib.suppress(Exception):
                    self.client.request("datapath", "DELETE", f"/v1/endpoints/default/{name}")
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        self.cleanup_node()
        from services.datapath import loader, maps

        loader.remove_pins(maps.pin_root(NODE))
        shutil.rmtree(self.dir, ignore_errors=True)


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")[:26] + "+00:00").timestamp()


@contextlib.contextmanager
def demo() -> Iterator[Demo]:
    d = Demo()

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield d
    finally:
        say("cleaning up: endpoints, node namespace, processes, pinned maps")
        d.stop()
        signal.signal(signal.SIGTERM, old)


def live() -> None:
    with demo() as d:
        d.start()
        say("the Star Wars pods, as namespaces behind the datapath")
        d.add("deathstar-1", {"org": "empire", "class": "deathstar"})
        d.add("deathstar-2", {"org": "empire", "class": "deathstar"})
        d.add("tiefighter", {"org": "empire", "class": "tiefighter"})
        d.add("xwing", {"org": "alliance", "class": "xwing"})
        d.serve("deathstar-1")
        d.serve("deathstar-2")
        for name in ("deathstar-1", "deathstar-2"):
            deadline = time.monotonic() + 10
            while (
                time.monotonic() < deadline
                and ":80 "
                not in subprocess.run(d.in_pod(name, "ss", "-ltnH"), capture_output=True, text=True).stdout
            ):
                time.sleep(0.1)
        say("no policy: every ship lands")
        d.land("xwing")
        d.land("tiefighter")
        say("rule1: only empire ships may reach the deathstar, on 80/TCP")
        since = time.time()
        d.apply(EXAMPLES / "policies" / "starwars-l3-l4.yaml")
        d.land("tiefighter")
        d.land("xwing")
        d.land("tiefighter", "deathstar-2")
        say("the flows: who was let in, who was dropped, and the rule that decided")
        d.flows(since)


def offline() -> int:
    failed = 0
    say("offline: the same engine evaluating the shipped scenarios (cilia policy matrix)")
    for name in SCENARIOS:
        path = EXAMPLES / name
        scenario = load_scenario(path.read_text(encoding="utf-8"), str(path))
        results = evaluate(scenario)
        print(f"\n==================== {scenario.name} ({path.name}) ====================\n")
        print_tables(results, [s.name for s in scenario.spec.steps], sys.stdout)
        bad = [r for r in results if not r.matches]
        failed += len(bad)
        print(f"{len(results) - len(bad)}/{len(results)} probes as expected")
    return failed


def main() -> int:
    if os.geteuid() != 0:
        print(
            "error: the live demo needs root (network namespaces and eBPF); run: sudo make demo",
            file=sys.stderr,
        )
        return 1
    try:
        live()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except CiliaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    failed = offline()
    if failed:
        print(f"{failed} probe(s) differ from their expectations", file=sys.stderr)
        return 1
    print("\nTry it yourself:  .venv/bin/cilia policy matrix examples/starwars.yaml --check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
