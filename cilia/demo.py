"""`make demo`: Star Wars and BookInfo on real packets, on a two-node cluster on this machine, then the
offline matrices.

Builds a cluster with `cilia.cluster` (what `cilia cluster up --nodes 2` does: NATS, the identity and
policy services, two node namespaces joined by a VXLAN overlay, each with its datapath agent), runs
the pods as namespaces behind the eBPF datapath, spread over both nodes, and tells two stories:
Star Wars (both ships land; rule1; the xwing times out; then rule1 with an HTTP rule through each
node's L7 proxy: the landing request lands, the exhaust port is `Access denied`) and BookInfo (productpage locked down, then
allowed to reviews and details on the other node), with the flows that say why, one of them
crossing the overlay. Everything it made is removed on exit or Ctrl-C. Needs root.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from cilia import auth
from cilia.cli.client import Client
from cilia.cli.policy import print_tables
from cilia.cluster import DEFAULT_UNDERLAY, ClusterState, LocalCluster
from cilia.errors import CiliaError
from cilia.scenario import evaluate, load_scenario

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SCENARIOS = ("starwars.yaml", "bookinfo.yaml", "mediabot-dns.yaml")
CLUSTER = "demo"
SERVICE_HOST = "deathstar.default.svc.cluster.local"  # the name the guide's ships use
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}==> {text}{RESET}", flush=True)


def free_underlay() -> IPv4Network:
    """The default underlay, or another /24 if this machine already routes it."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for third in range(0, 250):
        net = IPv4Network(f"10.250.{third}.0/24") if third else DEFAULT_UNDERLAY
        if str(net) not in routes:
            return net
    raise CiliaError("no free /24 in 10.250.0.0/16 for the demo's underlay")


class Demo:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cilia-demo-"))
        self.cluster = LocalCluster(self.dir / "cluster")
        self.state: ClusterState | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.client: Client | None = None
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.cleanup: list[list[str]] = []  # commands that undo what a story made outside the cluster

    @property
    def nodes(self) -> list[str]:
        assert self.state is not None
        return list(self.state.nodes)

    def start(self) -> None:
        say("a two-node cluster on this machine (what `cilia cluster up --nodes 2` builds)")
        old = LocalCluster(self.cluster.dir)
        started = time.monotonic()
        self.state = old.up(2, name=CLUSTER, underlay=free_underlay())
        st = self.state
        print(f"  control plane  nats-server (JetStream, per-role users) {st.nats_url}")
        for role, url in st.urls.items():
            print(f"                 {role:<9} {url}")
        for n in st.nodes.values():
            print(f"  node {n.name:<12} netns {n.netns}, underlay {n.ip}, pods {n.pod_cidr}, agent {n.api}")
        print(f"  ready in {time.monotonic() - started:.1f}s")
        self.client = Client(
            {role: st.urls[role] for role in ("identity", "policy", "lbipam") if role in st.urls},
            auth.load(st.creds_file).tokens["admin"],
        )

    def node_client(self, node: str) -> Client:
        assert self.client is not None and self.state is not None
        return Client({**self.client.urls, "datapath": self.state.nodes[node].api}, self.client.token)

    def add(self, node: str, name: str, labels: dict[str, str], namespace: str = "default") -> dict[str, Any]:
        rec: dict[str, Any] = self.node_client(node).request(
            "datapath", "POST", "/v1/endpoints", json={"namespace": namespace, "name": name, "labels": labels}
        )
        self.endpoints[name] = rec
        short = node.removeprefix(f"{CLUSTER}-")
        print(
            f"  {namespace}/{name:<16} {short:<6} identity {rec['identity']:<6} ip {rec['ip']:<11} "
            f"{', '.join(f'{k}={v}' for k, v in labels.items())}"
        )
        return rec

    def in_pod(self, name: str, *cmd: str) -> list[str]:
        return ["nsenter", f"--net={self.endpoints[name]['network']['netns_path']}", "--", *cmd]

    def serve(self, name: str, port: int = 80) -> None:
        fh = (self.dir / f"{name}.log").open("wb")
        argv = [sys.executable, "-m", "cilia.demo_apps", "http", "--port", str(port), "--name", name]
        self.procs.append(
            subprocess.Popen(
                self.in_pod(name, *argv),
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ss = subprocess.run(self.in_pod(name, "ss", "-ltnH"), capture_output=True, text=True).stdout
            if f":{port} " in ss:
                return
            time.sleep(0.1)
        raise CiliaError(f"the demo server in {name} did not start")

    def curl(self, src: str, dst: str, path: str = "/", port: int = 80, method: str = "GET") -> None:
        ip = self.endpoints[dst]["ip"]
        cmd = ["curl", "-s", "-m", "2", f"-X{method}", f"http://{ip}:{port}{path}"]
        shown = " ".join(cmd).replace(f"{ip}:80", ip)
        print(f"{DIM}$ cilia endpoint exec default/{src} -- {shown}{RESET}")
        out = subprocess.run(self.in_pod(src, *cmd), capture_output=True, text=True)
        print(
            out.stdout.strip()
            if out.returncode == 0
            else f"(no answer: curl exit code {out.returncode}, timed out)"
        )

    def land(self, ship: str, target: str = "deathstar-1") -> None:
        self.curl(ship, target, "/v1/request-landing", method="POST")

    def flows(self, since: float, want: tuple[str, ...] = ("policy-verdict", "DROPPED", "SYN")) -> None:
        from cilia.flows import Flow, format_line

        time.sleep(0.5)  # the ring buffers are drained asynchronously; give them a moment
        print(f"{DIM}$ cilia observe --since ... --print-node-name{RESET}")
        lines = []
        for node in self.nodes:
            for raw in self.node_client(node).request("datapath", "GET", "/v1/flows", params={"last": 300})[
                "items"
            ]:
                flow = Flow.model_validate(raw)
                if flow.time and _ts(flow.time) >= since:
                    line = format_line(flow, node_name=True)
                    if any(w in line for w in want):
                        lines.append((flow.time, line))
        for _, line in sorted(lines):
            print(line)

    # --- the L7 step: each node's HTTP proxy ----------------------------------------------------

    def show_l7proxies(self) -> None:
        """Each node's L7 proxy runs beside its agent (the cluster started it): show that it registered."""
        assert self.state is not None
        for name in self.state.nodes:
            status = self.node_client(name).request("datapath", "GET", "/v1/datapath/status")
            ports = ", ".join(sorted(status.get("proxies") or {}))
            print(f"  {name}: l7proxy and dnsproxy registered with the datapath agent (proxy ports {ports})")

    def http(self, ship: str, method: str, path: str, target: str = "deathstar-1") -> None:
        ip = self.endpoints[target]["ip"]
        cmd = ["curl", "-s", "-m", "2", "-X", method, "-H", f"Host: {SERVICE_HOST}", f"http://{ip}{path}"]
        print(f"{DIM}$ cilia endpoint exec default/{ship} -- {shlex.join(cmd)}{RESET}")
        out = subprocess.run(self.in_pod(ship, *cmd), capture_output=True, text=True)
        print(
            out.stdout.strip()
            if out.returncode == 0
            else f"(no answer: curl exit code {out.returncode}, timed out)"
        )

    def http_flows(self, since: float) -> None:
        from cilia.flows import Flow, format_line

        time.sleep(0.5)  # the proxies send their flows to the agents in batches
        print(f"{DIM}$ cilia observe --pod deathstar --protocol http --since ... --print-node-name{RESET}")
        lines = []
        for node in self.nodes:
            items = self.node_client(node).request("datapath", "GET", "/v1/flows", params={"last": 500})[
                "items"
            ]
            for raw in items:
                flow = Flow.model_validate(raw)
                if flow.l7 is not None and flow.l7.http is not None and flow.time and _ts(flow.time) >= since:
                    lines.append((flow.time, format_line(flow, node_name=True)))
        for _, line in sorted(lines):
            print(line)

    def apply(self, path: Path) -> None:
        assert self.client is not None
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
        print(f"{DIM}$ cilia apply -f {shown}{RESET}")
        reply = self.client.request(
            "policy", "POST", "/v1/policies", content=path.read_text(), content_type="application/yaml"
        )
        for c in reply["changes"]:
            print(f"ciliumnetworkpolicy.cilium.io/{c['name']} {c['action']}")
        names = ["/".join(x for x in (c["kind"], c["namespace"], c["name"]) if x) for c in reply["changes"]]
        deadline = time.monotonic() + 15
        for node in self.nodes:
            while True:
                applied = (
                    self.node_client(node)
                    .request("datapath", "GET", "/v1/datapath/status")
                    .get("policies", {})
                )
                if all(applied.get(n, -1) >= reply["revision"] for n in names):
                    break
                if time.monotonic() > deadline:
                    raise CiliaError(f"node {node} did not apply the policy in time")
                time.sleep(0.05)

    def stop(self) -> None:
        for cmd in reversed(self.cleanup):
            subprocess.run(cmd, capture_output=True)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.cluster.down()
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
        say("cleaning up: the cluster's processes, namespaces, links and pinned maps")
        d.stop()
        signal.signal(signal.SIGTERM, old)


def starwars(d: Demo) -> None:
    n1, n2 = d.nodes
    say("Star Wars: the pods, as namespaces behind the datapath, on both nodes")
    d.add(n1, "deathstar-1", {"org": "empire", "class": "deathstar"})
    d.add(n2, "deathstar-2", {"org": "empire", "class": "deathstar"})
    d.add(n2, "tiefighter", {"org": "empire", "class": "tiefighter"})
    d.add(n1, "xwing", {"org": "alliance", "class": "xwing"})
    d.serve("deathstar-1")
    d.serve("deathstar-2")
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
    services(d)
    say("L7: rule1 with an HTTP rule, tiefighter may only POST /v1/request-landing (each node's L7 proxy)")
    d.show_l7proxies()
    since = time.time()
    d.apply(EXAMPLES / "policies" / "starwars-l7.yaml")
    d.http("tiefighter", "POST", "/v1/request-landing")
    d.http("tiefighter", "PUT", "/v1/exhaust-port")
    d.http("xwing", "POST", "/v1/request-landing")
    say("the HTTP flows: each request and its response, DROPPED for the 403")
    d.http_flows(since)


def services(d: Demo) -> None:
    """The deathstar behind its Service: a ClusterIP balanced in eBPF, a LoadBalancer IP from an
    LB-IPAM pool, answered by ARP by one elected node, reached from a host outside the cluster."""
    import re

    from cilia.cli.output import table
    from cilia.cli.service import service_list_rows, service_row

    assert d.client is not None and d.state is not None
    st = d.state
    net = IPv4Network(st.underlay)
    say("Services: the deathstar behind a ClusterIP and a LoadBalancer IP (LB-IPAM, L2 announcement)")
    text = (EXAMPLES / "services" / "deathstar-lb.yaml").read_text()
    prefix = str(net.network_address).rsplit(".", 1)[0]
    text = text.replace("10.250.0.", f"{prefix}.")  # the pool lies on this demo's underlay
    print(f"{DIM}$ cilia apply -f examples/services/deathstar-lb.yaml{RESET}")
    reply = d.client.request("lbipam", "POST", "/v1/resources", content=text, content_type="application/yaml")
    for c in reply.get("changes", []):
        print(f"{c.get('kind', '').lower()}/{c.get('name', '')} {c.get('action', 'configured')}")

    def svc() -> dict[str, Any]:
        doc: dict[str, Any] = d.client.request(  # type: ignore[union-attr]
            "lbipam", "GET", "/v1/resources/svc/deathstar", params={"namespace": "default"}
        )
        return doc

    deadline = time.monotonic() + 20
    while not ((svc().get("status") or {}).get("loadBalancer") or {}).get("ingress"):
        if time.monotonic() > deadline:
            raise CiliaError("the deathstar service got no LoadBalancer IP")
        time.sleep(0.1)
    doc = svc()
    vip, lb_ip = doc["spec"]["clusterIP"], doc["status"]["loadBalancer"]["ingress"][0]["ip"]
    print(f"{DIM}$ cilia service get{RESET}")
    print(
        table(
            ("namespace", "name", "type", "cluster-ip", "external-ip", "port(s)", "age"), [service_row(doc)]
        )
    )
    node = d.nodes[0]
    deadline = time.monotonic() + 20
    while True:
        items = d.node_client(node).request("datapath", "GET", "/v1/services")["items"]
        mine = [f for f in items if f["frontend"].startswith((f"{vip}:", f"{lb_ip}:"))]
        if len(mine) == 2 and all(len(f["backends"]) == 2 for f in mine):
            break
        if time.monotonic() > deadline:
            raise CiliaError(f"node {node} did not load-balance {vip} and {lb_ip} to both deathstars")
        time.sleep(0.1)
    print(f"{DIM}$ cilia service list --node {node.removeprefix(f'{CLUSTER}-')}{RESET}")
    print(table(("ID", "Frontend", "Service Type", "Backend"), service_list_rows(mine), upper=False))
    say(f"tiefighter through the ClusterIP {vip}: connections spread over both deathstars, on both nodes")
    cmd = ["curl", "-s", "-m", "2", f"http://{vip}/v1/"]
    print(
        f"{DIM}$ for i in 1..6; do cilia endpoint exec default/tiefighter -- {shlex.join(cmd)}; done{RESET}"
    )
    for _ in range(6):
        out = subprocess.run(d.in_pod("tiefighter", *cmd), capture_output=True, text=True)
        print(out.stdout.strip() if out.returncode == 0 else f"(no answer: curl exit code {out.returncode})")
    say("xwing through the ClusterIP: rule1 judges the backend it was sent to, and drops it")
    print(f"{DIM}$ cilia endpoint exec default/xwing -- {shlex.join(cmd)}{RESET}")
    out = subprocess.run(d.in_pod("xwing", *cmd), capture_output=True, text=True)
    print(
        out.stdout.strip()
        if out.returncode == 0
        else f"(no answer: curl exit code {out.returncode}, timed out)"
    )

    say(f"from outside the cluster: who has {lb_ip}? one elected node answers ARP")
    outside, veth = f"{CLUSTER}-out", f"{CLUSTER}-vout"
    out_ip = str(net.network_address + 240)
    subprocess.run(["ip", "netns", "delete", outside], capture_output=True)
    d.cleanup.append(["ip", "netns", "delete", outside])
    d.cleanup.append(["ip", "link", "del", veth])
    for c in (
        ["ip", "netns", "add", outside],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", outside],
        ["ip", "link", "set", veth, "master", st.bridge, "up"],
        ["ip", "-n", outside, "addr", "add", f"{out_ip}/{net.prefixlen}", "dev", "eth0"],
        ["ip", "-n", outside, "link", "set", "eth0", "up"],
        ["ip", "-n", outside, "link", "set", "lo", "up"],
    ):
        subprocess.run(c, check=True, capture_output=True)
    macs = {}
    for name, n in st.nodes.items():
        link = subprocess.run(["ip", "-n", n.netns, "link", "show", "eth0"], capture_output=True, text=True)
        m = re.search(r"link/ether ([0-9a-f:]{17})", link.stdout)
        if m:
            macs[m.group(1)] = name
    arping = ["arping", "-c", "1", "-w", "1", "-I", "eth0", lb_ip]
    print(f"{DIM}$ ip netns exec {outside} {shlex.join(arping)}{RESET}")
    answer = ""
    deadline = time.monotonic() + 10
    while not answer and time.monotonic() < deadline:
        got = subprocess.run(["ip", "netns", "exec", outside, *arping], capture_output=True, text=True)
        answer = next((line for line in got.stdout.splitlines() if "from" in line and "bytes" in line), "")
    if not answer:
        raise CiliaError(f"no node answered ARP for {lb_ip}")
    print(answer)
    mac = re.search(r"from ([0-9a-f:]{17})", answer)
    if mac and mac.group(1) in macs:
        print(f"  {mac.group(1)} is the eth0 of {macs[mac.group(1)]}, the node elected for default/deathstar")
    say("the world may land too: a policy for the `world` entity, then curl from outside to the LB IP")
    d.apply(EXAMPLES / "policies" / "deathstar-from-world.yaml")
    curl = ["curl", "-s", "-m", "2", f"http://{lb_ip}/v1/"]
    print(f"{DIM}$ ip netns exec {outside} {shlex.join(curl)}{RESET}")
    got = subprocess.run(["ip", "netns", "exec", outside, *curl], capture_output=True, text=True)
    print(
        got.stdout.strip()
        if got.returncode == 0
        else f"(no answer: curl exit code {got.returncode}, timed out)"
    )
    d.client.request(
        "policy",
        "DELETE",
        "/v1/policies/CiliumNetworkPolicy/deathstar-from-world",
        params={"namespace": "default"},
    )


def bookinfo(d: Demo) -> None:
    n1, n2 = d.nodes
    say("BookInfo: productpage on one node, reviews and details spread over both")
    d.add(n1, "productpage-v1", {"app": "productpage", "version": "v1"})
    d.add(n2, "reviews-v1", {"app": "reviews", "version": "v1"})
    d.add(n1, "reviews-v2", {"app": "reviews", "version": "v2"})
    d.add(n2, "details-v1", {"app": "details", "version": "v1"})
    d.add(n2, "ratings-v1", {"app": "ratings", "version": "v1"})
    for name in ("reviews-v1", "reviews-v2", "details-v1", "ratings-v1"):
        d.serve(name, 9080)
    say("step 1: productpage may send nothing (an egress rule with an empty rule: default deny)")
    d.apply(EXAMPLES / "policies" / "bookinfo-productpage-deny-all.yaml")
    d.curl("productpage-v1", "reviews-v1", port=9080)
    say("step 3: productpage may reach reviews and details (on either node) and nothing else")
    since = time.time()
    d.apply(EXAMPLES / "policies" / "bookinfo-productpage-reviews-details.yaml")
    d.curl("productpage-v1", "reviews-v1", port=9080)
    d.curl("productpage-v1", "reviews-v2", port=9080)
    d.curl("productpage-v1", "details-v1", port=9080)
    d.curl("productpage-v1", "ratings-v1", port=9080)
    say("the flows on both nodes: to-overlay on the sender, from-overlay on the receiver")
    d.flows(since, ("policy-verdict", "DROPPED", "overlay FORWARDED (TCP Flags: SYN"))


GITHUB = {"api.github.com": "198.51.100.10", "support.github.com": "198.51.100.11"}


def mediabot_inet() -> str:
    """The mediabot story's stand-in for the internet: a namespace named after the cluster."""
    return f"cilia-{CLUSTER}-inet"


def mediabot(d: Demo) -> None:
    """The mediabot guide on real packets: node1's DNS proxy, a kube-dns pod, toFQDNs."""
    import ipaddress

    import yaml

    from cilia.cli.fqdn import cache_table
    from cilia.flows import Flow, format_line

    assert d.state is not None and d.client is not None
    st, n1 = d.state, d.state.nodes[d.nodes[0]]
    inet, veth = mediabot_inet(), f"{CLUSTER}-inet"  # named after the cluster: demos may run side by side
    say("mediabot: egress by DNS name (toFQDNs), through the node's transparent DNS proxy")
    # The node's DNS proxy runs inside the node, beside its datapath agent (the cluster started it).
    api = n1.dnsproxy_api
    client = Client({**d.client.urls, "dnsproxy": api, "datapath": n1.api}, d.client.token)
    # A stand-in for the internet: GitHub's addresses in a namespace on the underlay bridge.
    subprocess.run(["ip", "netns", "delete", inet], capture_output=True)
    net = ipaddress.IPv4Network(st.underlay)
    inet_ip = str(net.network_address + 250)
    sh = [
        ["ip", "netns", "add", inet],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", inet],
        ["ip", "link", "set", veth, "master", st.bridge, "up"],
        ["ip", "-n", inet, "addr", "add", f"{inet_ip}/{net.prefixlen}", "dev", "eth0"],
        ["ip", "-n", inet, "link", "set", "eth0", "up"],
        ["ip", "-n", inet, "link", "set", "lo", "up"],
        ["ip", "-n", inet, "route", "add", n1.pod_cidr, "via", n1.ip],
    ]
    for ip in GITHUB.values():
        sh.append(["ip", "-n", inet, "addr", "add", f"{ip}/32", "dev", "lo"])
        sh.append(["ip", "-n", n1.netns, "route", "add", f"{ip}/32", "via", inet_ip])
    try:
        for cmd in sh:
            subprocess.run(cmd, check=True, capture_output=True)
        for name, ip in GITHUB.items():
            app = [
                sys.executable,
                "-m",
                "cilia.demo_apps",
                "http",
                "--bind",
                ip,
                "--port",
                "443",
                "--name",
                name,
            ]
            d.procs.append(
                subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{inet}", "--", *app],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                    start_new_session=True,
                )
            )
        dns = d.add(d.nodes[0], "coredns", {"k8s-app": "kube-dns"}, namespace="kube-system")
        d.add(d.nodes[0], "mediabot", {"org": "empire", "class": "mediabot"})
        zone = d.dir / "github.zone"
        zone.write_text("".join(f"{name}. 30 IN A {ip}\n" for name, ip in GITHUB.items()))
        resolver = [sys.executable, "-m", "dnslib.zoneresolver", "--zone", str(zone), "--address", dns["ip"]]
        d.procs.append(
            subprocess.Popen(
                d.in_pod("coredns", *resolver, "--tcp", "--log=-request,-reply"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(CiliaError):
                if client.request("dnsproxy", "GET", "/v1/dnsproxy/status").get("registered"):
                    break
            if time.monotonic() > deadline:
                raise CiliaError("the DNS proxy did not register with the datapath")
            time.sleep(0.1)
        step = yaml.safe_load((EXAMPLES / "mediabot-dns.yaml").read_text())["steps"][0]
        policy = d.dir / "mediabot-fqdn.yaml"
        policy.write_text(yaml.safe_dump_all(step["apply"]))
        print('toFQDNs matchName: api.github.com, and DNS to kube-dns with `rules.dns: [matchPattern: "*"]`')
        d.apply(policy)
        for name in GITHUB:
            cmd = ["dig", "+short", "+tries=2", "+timeout=1", f"@{dns['ip']}", name]
            print(f"{DIM}$ cilia endpoint exec default/mediabot -- {' '.join(cmd)}{RESET}")
            ip = subprocess.run(d.in_pod("mediabot", *cmd), capture_output=True, text=True).stdout.strip()
            print(ip)
            curl = ["curl", "-s", "-m", "2", "--resolve", f"{name}:443:{ip}", f"http://{name}:443/"]
            print(f"{DIM}$ cilia endpoint exec default/mediabot -- {' '.join(curl)}{RESET}")
            out = subprocess.run(d.in_pod("mediabot", *curl), capture_output=True, text=True)
            print(
                f"reached {out.stdout.strip()}"
                if out.returncode == 0
                else f"(no answer: curl exit code {out.returncode}: {name} is not selected by toFQDNs)"
            )
        say("the DNS flows, and the proxy's FQDN cache")
        time.sleep(0.3)
        print(f"{DIM}$ cilia observe --protocol dns{RESET}")
        for raw in client.request("datapath", "GET", "/v1/flows", params={"last": 500})["items"]:
            flow = Flow.model_validate(raw)
            if flow.l7 is not None and flow.l7.dns is not None:
                print(format_line(flow))
        print(f"{DIM}$ cilia fqdn cache list{RESET}")
        print(cache_table(client.request("dnsproxy", "GET", "/v1/fqdn/cache")["items"]))
    finally:
        subprocess.run(["ip", "netns", "delete", inet], capture_output=True)


def live() -> None:
    with demo() as d:
        d.start()
        starwars(d)
        bookinfo(d)
        mediabot(d)


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
