"""LoadBalancer addresses seen from outside the cluster, on real packets and with a real BGP peer:
`arping` from a namespace on the nodes' L2 segment gets the elected node's MAC, another node takes
over within 2 s when the leader dies, and a bird2 router learns (and unlearns) the /32 with the
communities of the CiliumBGPPeeringPolicy from the nodes' gobgpd speakers.

The cluster is built by the same code as `cilia cluster up` (LocalCluster): nodes are network
namespaces on a bridge, each with its datapath agent and its announcer.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_support import ClusterHarness, running_cluster
from conftest import eventually

from cilia.cluster import process_alive

MAC = re.compile(r"from ([0-9a-f]{2}(?::[0-9a-f]{2}){5}) ")


def _run(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class Outside:
    """A host on the cluster's L2 segment (the underlay bridge) that is not a node: arping and bird2
    run here. It accepts gratuitous ARP (`arp_accept=1`), as the issue's checks found necessary."""

    def __init__(self, cluster: ClusterHarness, suffix: str, host: int) -> None:
        st = cluster.state
        net = IPv4Network(st.underlay)
        self.netns = f"{st.name}-{suffix}"
        self.veth = f"{st.name}-v{suffix}"
        self.ip = str(net.network_address + host)
        self.prefix = net.prefixlen
        self.procs: list[subprocess.Popen[bytes]] = []
        _run("ip", "netns", "add", self.netns)
        try:
            _run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", f"{self.veth}p")
            _run("ip", "link", "set", f"{self.veth}p", "netns", self.netns)
            _run("ip", "-n", self.netns, "link", "set", f"{self.veth}p", "name", "eth0")
            _run("ip", "-n", self.netns, "addr", "add", f"{self.ip}/{self.prefix}", "dev", "eth0")
            _run("ip", "-n", self.netns, "link", "set", "eth0", "up")
            _run("ip", "-n", self.netns, "link", "set", "lo", "up")
            _run("ip", "netns", "exec", self.netns, "sysctl", "-qw", "net.ipv4.conf.eth0.arp_accept=1")
            _run("ip", "link", "set", self.veth, "master", st.bridge)
            _run("ip", "link", "set", self.veth, "up")
        except BaseException:
            self.close()
            raise

    def exec(self, *argv: str, check: bool = False, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.netns, *argv, check=check, timeout=timeout)

    def arping(self, ip: str, wait: float = 0.3) -> str | None:
        """The MAC that answers `who-has ip` (Habets arping, one request), or None."""
        out = self.exec("arping", "-c", "1", "-w", str(wait), "-I", "eth0", ip).stdout
        m = MAC.search(out)
        return m.group(1) if m else None

    def neighbour(self, ip: str) -> str | None:
        m = re.search(
            r"lladdr ([0-9a-f:]{17})", _run("ip", "-n", self.netns, "neigh", "show", ip, "dev", "eth0").stdout
        )
        return m.group(1) if m else None

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        _run("ip", "link", "del", self.veth, check=False)
        _run("ip", "netns", "delete", self.netns, check=False)


class ArpWatch:
    """arping asking for `ip` every 50 ms for `seconds`; each answer is timestamped as it arrives, so
    a failover is measured to the request, not to when a polling loop got round to it."""

    def __init__(self, host: Outside, ip: str, seconds: float) -> None:
        argv = [
            "ip",
            "netns",
            "exec",
            host.netns,
            "stdbuf",
            "-oL",
            "arping",
            "-W",
            "0.05",
            "-w",
            str(seconds),
        ]
        self.proc = subprocess.Popen(
            [*argv, "-I", "eth0", ip], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.answers: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = MAC.search(line)
            if m:
                self.answers.append((time.monotonic(), m.group(1)))

    def first(self, mac: str, after: float) -> float | None:
        return next((t for t, m in list(self.answers) if m == mac and t >= after), None)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.thread.join(timeout=5)

    def __enter__(self) -> ArpWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def failover_time(host: Outside, ip: str, new_mac: str, kill: Callable[[], None]) -> float:
    """Seconds from `kill()` to the first ARP answer from `new_mac` (fails the test after 5 s)."""
    with ArpWatch(host, ip, 8) as watch:
        eventually(lambda: watch.answers, 5, f"arping answers for {ip}")
        killed = time.monotonic()
        kill()
        first = eventually(lambda: watch.first(new_mac, killed), 5, f"{new_mac} answering for {ip}")
        return float(first) - killed


def node_mac(cluster: ClusterHarness, node: str) -> str:
    out = _run("ip", "-n", cluster.state.nodes[node].netns, "link", "show", "eth0").stdout
    m = re.search(r"link/ether ([0-9a-f:]{17})", out)
    assert m, out
    return m.group(1)


def lbipam(cluster: ClusterHarness, method: str, path: str, body: str | None = None) -> Any:
    code, reply = cluster.request(f"{cluster.state.urls['lbipam']}{path}", method, body, "application/yaml")
    assert code == 200, reply
    return reply


def apply(cluster: ClusterHarness, *docs: dict[str, Any]) -> None:
    lbipam(cluster, "POST", "/v1/resources", yaml.safe_dump_all(docs, sort_keys=False))


def lb_ip(cluster: ClusterHarness, name: str) -> str:
    def ip() -> str | None:
        doc = lbipam(cluster, "GET", f"/v1/resources/svc/{name}")
        ingress = (doc.get("status") or {}).get("loadBalancer", {}).get("ingress") or []
        return str(ingress[0]["ip"]) if ingress else None

    return str(eventually(ip, 10, f"an address for {name}"))


def holder(cluster: ClusterHarness, service: str) -> str | None:
    for lease in lbipam(cluster, "GET", "/v1/leases")["l2"]:
        if lease["service"] == service:
            return str(lease["holderIdentity"])
    return None


def underlay_range(cluster: ClusterHarness, first: int, last: int) -> dict[str, str]:
    net = IPv4Network(cluster.state.underlay)
    return {"start": str(net.network_address + first), "stop": str(net.network_address + last)}


POOL = "CiliumLoadBalancerIPPool"


def pool(cluster: ClusterHarness, name: str, first: int, last: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2alpha1",
        "kind": POOL,
        "metadata": {"name": name, "labels": spec.pop("labels", {})},
        "spec": {"blocks": [underlay_range(cluster, first, last)], **spec},
    }


def service(name: str, labels: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "type": "LoadBalancer",
            "selector": {"org": "empire", "class": name},
            "ports": [{"name": "http", "port": 80}],
            **spec,
        },
    }


@pytest.fixture(scope="module")
def lbcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHarness]:
    labels = {"node1": {"bgp": "yes", "rack": "r1"}, "node2": {"rack": "r1"}, "node3": {"rack": "r2"}}
    with running_cluster(tmp_path_factory.mktemp("lbcluster"), 3, node_labels=labels) as c:
        yield c


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """The tail of the cluster's announcer and lbipam logs, in the captured output pytest shows when a
    test fails."""
    yield
    c = request.getfixturevalue("lbcluster") if "lbcluster" in request.fixturenames else None
    if c is not None:
        for log in sorted((Path(c.state.state_dir) / "logs").glob("*")):
            if "announcer" in log.name or "lbipam" in log.name:
                print(f"--- {log.name}")
                print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))


@pytest.fixture
def outside(lbcluster: ClusterHarness) -> Iterator[Outside]:
    host = Outside(lbcluster, "out", 240)
    try:
        yield host
    finally:
        host.close()


def test_arping_from_outside_gets_the_elected_nodes_mac_and_another_node_takes_over_within_2s(
    lbcluster: ClusterHarness, outside: Outside
) -> None:
    c = lbcluster
    apply(
        c,
        pool(c, "lan", 200, 209, serviceSelector={"matchLabels": {"announce": "l2"}}),
        {
            "apiVersion": "cilium.io/v2alpha1",
            "kind": "CiliumL2AnnouncementPolicy",
            "metadata": {"name": "lan"},
            "spec": {
                "serviceSelector": {"matchLabels": {"announce": "l2"}},
                "nodeSelector": {"matchLabels": {"rack": "r1"}},
                "interfaces": ["^eth[0-9]+"],
                "loadBalancerIPs": True,
            },
        },
        service("deathstar", {"announce": "l2"}),
    )
    vip = lb_ip(c, "deathstar")
    leader = eventually(lambda: holder(c, "default/deathstar"), 10, "an L2 leader")
    assert leader in (f"{c.name}-node1", f"{c.name}-node2")  # rack r1 only
    macs = {n: node_mac(c, n) for n in c.nodes}
    assert eventually(lambda: outside.arping(vip) == macs[leader], 10, f"{leader} answering ARP for {vip}")
    # The outside host's neighbour entry points at the leader (ping resolves it; nothing answers
    # the echo: no datapath on this branch serves the address, and this test is about ARP).
    outside.exec("ping", "-c", "1", "-W", "1", vip)
    assert outside.neighbour(vip) == macs[leader]
    # The leader's announcer dies (SIGKILL: no goodbye). The other rack r1 node takes over.
    other = next(n for n in (f"{c.name}-node1", f"{c.name}-node2") if n != leader)
    pid = c.state.nodes[leader].processes["announcer"]
    try:
        took = failover_time(outside, vip, macs[other], lambda: os.killpg(pid, signal.SIGKILL))
        assert took < 2.0, f"failover took {took:.2f} s"
        # The outside host's neighbour entry follows (the next test shows the gratuitous ARP alone does it).
        assert eventually(lambda: outside.neighbour(vip) == macs[other], 2, "the neighbour entry moving")
        assert holder(c, "default/deathstar") == other
        # rack r2 never answers.
        assert outside.arping(vip) != macs[f"{c.name}-node3"]
    finally:
        c.lc.restart("announcer", leader.removeprefix(f"{c.name}-"))
        c.refresh()
    # Deleting the service releases its lease and nobody answers any more.
    lbipam(c, "DELETE", "/v1/resources/svc/deathstar")
    assert eventually(lambda: outside.arping(vip, wait=0.2) is None, 5, f"{vip} going silent")
    assert holder(c, "default/deathstar") is None
    lbipam(c, "DELETE", "/v1/resources/l2announcement/lan")
    lbipam(c, "DELETE", "/v1/resources/ippools/lan")


BIRD_CONF = """
router id {ip};
log "{log}" all;
protocol device {{}}
{protocols}
"""

BIRD_PEER = """
protocol bgp {name} {{
  local {ip} as 65000;
  neighbor {peer} as 65001;
  passive on;
  hold time 9;
  keepalive time 3;
  ipv4 {{ import all; export none; }};
}}
"""


class Bird:
    """A bird2 router on the outside host, peering with the given nodes (they dial it)."""

    def __init__(self, host: Outside, peers: dict[str, str], workdir: Path) -> None:
        self.host = host
        self.ctl = str(workdir / "bird.ctl")
        conf = workdir / "bird.conf"
        protocols = "".join(
            BIRD_PEER.format(name=n.replace("-", "_"), ip=host.ip, peer=ip) for n, ip in peers.items()
        )
        conf.write_text(BIRD_CONF.format(ip=host.ip, log=workdir / "bird.log", protocols=protocols))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "bird", "-f", "-c", str(conf), "-s", self.ctl],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        host.procs.append(self.proc)
        eventually(lambda: Path(self.ctl).exists(), 10, "bird's control socket")

    def birdc(self, *args: str) -> str:
        return _run("birdc", "-s", self.ctl, *args, check=False).stdout

    def routes(self) -> dict[str, str]:
        """Prefix -> the `show route all` text of that prefix."""
        out: dict[str, str] = {}
        current = None
        for line in self.birdc("show", "route", "all").splitlines():
            m = re.match(r"^(\d+\.\d+\.\d+\.\d+/\d+)\s", line)
            if m:
                current = m.group(1)
                out[current] = line
            elif current and line.startswith(("\t", " ")):
                out[current] += "\n" + line
        return out

    def established(self, name: str) -> bool:
        return "Established" in self.birdc("show", "protocols", name.replace("-", "_"))


def bgp_policy(name: str, bird_ip: str, node_selector: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2alpha1",
        "kind": "CiliumBGPPeeringPolicy",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": node_selector,
            "virtualRouters": [
                {
                    "localASN": 65001,
                    "serviceSelector": {"matchLabels": {"announce": "bgp"}},
                    "neighbors": [
                        {
                            "peerAddress": f"{bird_ip}/32",
                            "peerASN": 65000,
                            "holdTimeSeconds": 9,
                            "keepAliveTimeSeconds": 3,
                            "connectRetryTimeSeconds": 1,
                            "advertisedPathAttributes": [
                                {
                                    "selectorType": POOL,
                                    "selector": {"matchLabels": {"announce": "bgp"}},
                                    "communities": {
                                        "standard": ["65000:100"],
                                        "wellKnown": ["no-export"],
                                        "large": ["65001:1:2"],
                                    },
                                }
                            ],
                        }
                    ],
                }
            ],
        },
    }


def announcer(c: ClusterHarness, node: str) -> dict[str, Any]:
    code, body = c.request(f"{c.state.nodes[node].announcer_api}/v1/announcer", "GET")
    assert code == 200, body
    return dict(body)


@pytest.fixture
def router_host(lbcluster: ClusterHarness) -> Iterator[Outside]:
    # Its own address: nodes may still have the MAC of an earlier outside host in their ARP caches.
    host = Outside(lbcluster, "bgp", 242)
    try:
        yield host
    finally:
        host.close()


def test_a_bird2_peer_learns_the_address_with_its_communities_and_loses_it_with_the_service(
    lbcluster: ClusterHarness, router_host: Outside, tmp_path: Path
) -> None:
    c, outside = lbcluster, router_host
    node1, node2 = f"{c.name}-node1", f"{c.name}-node2"
    bird = Bird(outside, {n: c.state.nodes[n].ip for n in (node1, node2)}, tmp_path)
    apply(
        c,
        pool(
            c,
            "bgp",
            220,
            229,
            labels={"announce": "bgp"},
            serviceSelector={"matchLabels": {"announce": "bgp"}},
        ),
        pool(c, "other", 250, 252),
        bgp_policy("racks", outside.ip, {"matchLabels": {"bgp": "yes"}}),  # node1 only
        service("tiefighter", {"announce": "bgp"}),
        service("local-only", {"announce": "bgp"}, externalTrafficPolicy="Local"),
        service("not-announced", {}),
    )
    vip = lb_ip(c, "tiefighter")
    local_vip = lb_ip(c, "local-only")
    quiet_vip = lb_ip(c, "not-announced")
    assert eventually(lambda: bird.established(node1), 40, "the BGP session with node1")
    route = eventually(lambda: bird.routes().get(f"{vip}/32"), 20, f"bird learning {vip}/32")
    assert "BGP.community: (65000,100) (65535,65281)" in route, route
    assert "BGP.large_community: (65001, 1, 2)" in route, route
    assert f"BGP.next_hop: {c.state.nodes[node1].ip}" in route
    assert "BGP.as_path: 65001" in route
    assert f"{quiet_vip}/32" not in bird.routes()
    # externalTrafficPolicy: Local — advertised only once node1 has a ready backend of it.
    assert f"{local_vip}/32" not in bird.routes()
    c.add(node1, "local-only-1", {"org": "empire", "class": "local-only"})
    assert eventually(lambda: f"{local_vip}/32" in bird.routes(), 20, "the Local service advertised")
    c.remove_endpoints()
    assert eventually(lambda: f"{local_vip}/32" not in bird.routes(), 20, "the Local service withdrawn")
    assert not bird.established(node2)  # not selected by the policy: no session
    status = announcer(c, node1)["bgp"]
    assert status["policy"] == "racks" and status["error"] is None
    assert any(
        p["peer_address"] == outside.ip and p["session_state"] == "established" for p in status["peers"]
    )
    # A second policy selecting node1 too: none applies, the session is cleared, the status says why.
    apply(c, bgp_policy("everyone", outside.ip, {}))
    assert eventually(lambda: not bird.established(node1), 20, "node1's session cleared")
    assert f"{vip}/32" not in bird.routes()
    status = announcer(c, node1)["bgp"]
    assert status["policy"] is None
    assert status["error"].startswith("more then one CiliumBGPPeeringPolicy applies to this node")
    lbipam(c, "DELETE", "/v1/resources/bgpp/everyone")
    assert eventually(lambda: f"{vip}/32" in bird.routes(), 40, "the route back with one policy")
    # Deleting the service withdraws its /32.
    lbipam(c, "DELETE", "/v1/resources/svc/tiefighter")
    assert eventually(lambda: f"{vip}/32" not in bird.routes(), 20, f"bird losing {vip}/32")
    lbipam(c, "DELETE", "/v1/resources/bgpp/racks")
    assert eventually(lambda: not bird.established(node1), 20, "the session closed with its policy")
    for name in ("local-only", "not-announced"):
        lbipam(c, "DELETE", f"/v1/resources/svc/{name}")
    for name in ("bgp", "other"):
        lbipam(c, "DELETE", f"/v1/resources/ippools/{name}")


def test_the_cluster_runs_lbipam_and_an_announcer_on_every_node(lbcluster: ClusterHarness) -> None:
    c = lbcluster
    status = c.lc.status()
    roles = {(r["component"], r["node"]) for r in status["components"] if r["alive"] and r["ready"]}
    assert ("lbipam", "") in roles
    for node in c.nodes:
        assert ("announcer", node) in roles
        assert process_alive(c.state.nodes[node].processes["announcer"])
    assert status["env"]["CILIA_LBIPAM_URL"] == c.state.urls["lbipam"]
    # Node labels reach the registry (the datapath publishes them) and the announcer.
    registry = c.registry(c.nodes[0])
    assert registry[f"{c.name}-node1"]["labels"] == {
        "kubernetes.io/hostname": f"{c.name}-node1",
        "bgp": "yes",
        "rack": "r1",
    }
    assert announcer(c, f"{c.name}-node3")["labels"]["rack"] == "r2"
    # The CLI against the cluster: pools table and a service's row with its address.
    apply(c, pool(c, "cli", 230, 239))
    out = c.cli("lbipam", "pools")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split() == [
        "NAME",
        "DISABLED",
        "CONFLICTING",
        "IPS",
        "AVAILABLE",
        "AGE",
    ]
    assert next(r.split() for r in out.stdout.splitlines() if r.startswith("cli "))[:4] == [
        "cli",
        "false",
        "False",
        "10",
    ]
    text = textwrap.dedent(
        f"""
        apiVersion: v1
        kind: Service
        metadata: {{name: cli-svc, namespace: cli}}
        spec:
          type: LoadBalancer
          selector: {{app: x}}
          ports: [{{port: 8080}}]
          loadBalancerIP: {underlay_range(c, 235, 235)["start"]}
        """
    )
    out = c.cli("apply", "-f", str(_write(c, text)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "service/cli-svc created"
    out = c.cli("service", "get", "cli/cli-svc")
    assert out.returncode == 0, out.stderr
    row = out.stdout.splitlines()[1].split()
    assert row[:3] == ["cli", "cli-svc", "LoadBalancer"]
    assert row[5] == "8080/TCP"
    assert row[4] == underlay_range(c, 235, 235)["start"]
    assert "io.cilium/lb-ipam-request-satisfied" in out.stdout
    lbipam(c, "DELETE", "/v1/resources/svc/cli-svc?namespace=cli")


def _write(c: ClusterHarness, text: str) -> Path:
    path = Path(c.state.state_dir) / "cli-svc.yaml"
    path.write_text(text)
    return path


def test_curl_from_outside_to_the_lb_ip_reaches_a_deathstar_backend(lbcluster: ClusterHarness) -> None:
    """ARP from this branch, load balancing from the datapath's program on the elected node's uplink."""
    c = lbcluster
    outside = Outside(c, "o3", 243)
    try:
        for i, node in enumerate(c.nodes[:2]):
            c.add(node, f"deathstar-{i}", {"org": "empire", "class": "deathstar"})
            c.serve(f"default/deathstar-{i}", "http", 80)
        apply(
            c,
            pool(c, "curl", 244, 246),
            {
                "apiVersion": "cilium.io/v2alpha1",
                "kind": "CiliumL2AnnouncementPolicy",
                "metadata": {"name": "curl"},
                "spec": {"loadBalancerIPs": True},
            },
            service("deathstar", {}),
        )
        vip = lb_ip(c, "deathstar")
        eventually(lambda: holder(c, "default/deathstar"), 10, "an L2 leader")
        for _ in range(20):
            out = outside.exec(
                "curl", "-s", "-m", "2", "-XPOST", f"http://{vip}/v1/request-landing", timeout=10
            )
            assert out.stdout == "Ship landed\n", (out.returncode, out.stdout, out.stderr)
    finally:
        c.remove_endpoints()
        with contextlib.suppress(AssertionError):
            lbipam(c, "DELETE", "/v1/resources/svc/deathstar")
        outside.close()


def test_a_node_that_dies_whole_hands_its_addresses_over(lbcluster: ClusterHarness) -> None:
    """The node (namespace, agents) is killed, not just the announcer. Runs last: it kills a node
    of the module's cluster."""
    c = lbcluster
    outside = Outside(c, "o2", 241)
    try:
        apply(
            c,
            pool(c, "dies", 210, 219),
            {
                "apiVersion": "cilium.io/v2alpha1",
                "kind": "CiliumL2AnnouncementPolicy",
                "metadata": {"name": "all"},
                "spec": {"loadBalancerIPs": True},
            },
            service("xwing", {}),
        )
        vip = lb_ip(c, "xwing")
        leader = eventually(lambda: holder(c, "default/xwing"), 10, "an L2 leader")
        macs = {n: node_mac(c, n) for n in c.nodes}
        assert eventually(lambda: outside.arping(vip) == macs[leader], 10, "the leader answering")
        # Nobody asks during the failover: only the new leader's gratuitous ARP can move the
        # outside host's neighbour entry (created by a ping to the address).
        outside.exec("ping", "-c", "1", "-W", "1", vip)
        assert outside.neighbour(vip) == macs[leader]
        killed = time.monotonic()
        c.lc.kill_node(leader)
        moved = eventually(
            lambda: outside.neighbour(vip) in {macs[n] for n in c.nodes if n != leader} and time.monotonic(),
            5,
            "the neighbour entry moving",
        )
        took = float(moved) - killed
        assert took < 2.0, f"failover (gratuitous ARP) took {took:.2f} s"
        new = holder(c, "default/xwing")
        assert new != leader and outside.arping(vip) == macs[str(new)]
    finally:
        outside.close()
