"""A cluster on one machine: nodes as namespaces, the VXLAN overlay, identities across nodes.

Real packets between pods on different nodes, through both nodes' eBPF programs and the kernel's
VXLAN device; real nats-server; the cluster is built by the same code as `cilia cluster up`.
"""

# ruff: noqa: F811  (the cluster fixtures are imported from cluster_support)
from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from cluster_support import ClusterHarness, ClusterInternet, cluster, cluster3, running_cluster  # noqa: F401
from conftest import VENV_BIN, eventually
from test_datapath_scenarios import pure_l3l4

from cilia.cluster import process_alive
from cilia.scenario import Target, evaluate, load_scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

RULE1 = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: rule1}
    spec:
      endpointSelector: {matchLabels: {org: empire, class: deathstar}}
      ingress:
      - fromEndpoints: [{matchLabels: {org: empire}}]
        toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    """
)


def starwars(c: ClusterHarness) -> None:
    """tiefighter on the first node, xwing on the second, deathstar on the third."""
    nodes = c.nodes
    c.add(nodes[0], "tiefighter", {"org": "empire", "class": "tiefighter"})
    c.add(nodes[1], "xwing", {"org": "alliance", "class": "xwing"})
    c.add(nodes[2], "deathstar-1", {"org": "empire", "class": "deathstar"})
    c.serve("default/deathstar-1", "tcp-echo", 80)


# --- the shared scenarios, pods spread over three nodes ------------------------------------------


@pytest.mark.parametrize("scenario", ["starwars.yaml", "bookinfo.yaml", "mediabot-dns.yaml"])
def test_scenario_probes_across_three_nodes_agree_with_the_matrix(
    cluster: ClusterHarness, scenario: str
) -> None:
    text = (EXAMPLES / scenario).read_text()
    sc = load_scenario(text, scenario)
    expected = evaluate(sc)
    pure = [r for r in expected if pure_l3l4(r)]
    if scenario == "mediabot-dns.yaml":
        # Every probe of this scenario names an FQDN or DNS (the DNS proxy's tests cover it).
        assert pure == []
        return
    assert pure
    nodes = cluster.nodes
    placement: dict[str, str] = {}
    for i, pod in enumerate(sc.spec.pods):
        node = nodes[i % len(nodes)]
        placement[f"{pod.namespace}/{pod.name}"] = node
        cluster.add(
            node,
            pod.name,
            dict(pod.labels),
            pod.namespace,
            namedPorts=dict(pod.ports),
            serviceAccount=pod.serviceAccount,
        )
    assert len(set(placement.values())) == 3
    if any(isinstance(r.probe.to, Target) for r in pure):
        cluster.internet = ClusterInternet(cluster)
    servers = set()
    for r in pure:
        p = r.probe
        if p.protocol == "ICMP":
            continue
        kind = "tcp-echo" if p.protocol == "TCP" else "udp-echo"
        key = (str(p.to), p.protocol, p.port)
        if key in servers:
            continue
        servers.add(key)
        if isinstance(p.to, str):
            cluster.serve(p.to if "/" in p.to else f"default/{p.to}", kind, p.port)
        else:
            assert cluster.internet is not None
            cluster.internet.serve(kind, str(p.to.ip), p.port)
    raw = yaml.safe_load(text)
    mismatches, crossing = [], 0
    for i, step in enumerate(sc.spec.steps):
        if not step.cumulative:
            cluster.delete_all_policies()
        for d in step.delete:
            cluster.delete_policy(str(d["name"]), str(d["kind"]), str(d.get("namespace") or "default"))
        if raw["steps"][i].get("apply"):
            cluster.apply(yaml.safe_dump_all(raw["steps"][i]["apply"], sort_keys=False))
        for r in (x for x in pure if x.step_index == i):
            p = r.probe
            src = str(p.from_) if "/" in str(p.from_) else f"default/{p.from_}"
            if isinstance(p.to, str):
                dst_ref = p.to if "/" in p.to else f"default/{p.to}"
                dst = cluster.ip(dst_ref)
                crossing += placement[src] != placement[dst_ref]
            else:
                dst = str(p.to.ip)
            got = cluster.probe(src, dst, p.port or 0, p.protocol)
            if got != r.verdict.allowed:
                mismatches.append(f"step {i + 1} {r.record()}: real packet {'passed' if got else 'dropped'}")
    assert mismatches == []
    assert crossing > 0, "some probes crossed the overlay"


# --- identity in the VNI --------------------------------------------------------------------------

FORGE = textwrap.dedent(
    """
    import socket, struct, sys
    def csum(b):
        if len(b) % 2:
            b += b"\\0"
        s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF
    node, vni, src, dst, dport, sport = sys.argv[1:7]
    s_ip, d_ip = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", int(sport), int(dport), 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", csum(s_ip + d_ip + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, s_ip, d_ip)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    eth = bytes.fromhex("02c100000001") + bytes.fromhex("02c100000002") + b"\\x08\\x00"
    vxlan = struct.pack("!II", 0x08000000, int(vni) << 8)
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(vxlan + eth + ip + tcp, (node, 8472))
    """
)


def forge(c: ClusterHarness, from_node: str, to_node: str, vni: int, src: str, dst: str, sport: int) -> None:
    netns = c.state.nodes[from_node].netns
    argv = ["nsenter", f"--net=/run/netns/{netns}", "--", str(VENV_BIN / "python"), "-c", FORGE]
    argv += [c.state.nodes[to_node].ip, str(vni), src, dst, "80", str(sport)]
    subprocess.run(argv, check=True, timeout=20)


def verdicts_for(c: ClusterHarness, node: str, sport: int) -> list[dict]:
    return [
        f
        for f in c.flows(node)
        if f.get("event_type", {}).get("type") == 5
        and f.get("l4", {}).get("TCP", {}).get("source_port") == sport
    ]


def test_the_destination_judges_by_the_vni_identity_not_the_inner_source(cluster: ClusterHarness) -> None:
    starwars(cluster)
    cluster.apply(RULE1)
    tie, xwing = cluster.records["default/tiefighter"], cluster.records["default/xwing"]
    target = cluster.ip("default/deathstar-1")
    assert cluster.probe("default/tiefighter", target, 80)
    assert not cluster.probe("default/xwing", target, 80, timeout=0.5)
    # From xwing's node: the tiefighter's address inside, the xwing's identity in the VNI -> denied.
    _n1, n2, n3 = cluster.nodes
    forge(cluster, n2, n3, xwing["identity"], tie["ip"], target, 41001)
    denied = eventually(lambda: verdicts_for(cluster, n3, 41001), what="the forged packet's verdict")
    assert denied[0]["verdict"] == "DROPPED"
    assert denied[0]["source"]["identity"] == xwing["identity"]
    assert denied[0]["IP"]["source"] == tie["ip"]
    # The other way round: the xwing's address, the tiefighter's identity -> judged as tiefighter.
    forge(cluster, n2, n3, tie["identity"], xwing["ip"], target, 41002)
    allowed = eventually(lambda: verdicts_for(cluster, n3, 41002), what="the second packet's verdict")
    assert allowed[0]["verdict"] == "FORWARDED"
    assert allowed[0]["source"]["identity"] == tie["identity"]


def test_flows_show_the_overlay_hops_on_both_nodes(cluster: ClusterHarness) -> None:
    starwars(cluster)
    target = cluster.ip("default/deathstar-1")
    assert cluster.probe("default/tiefighter", target, 80)

    def hop(node: str, point: str) -> dict | None:
        for f in cluster.flows(node):
            if f.get("trace_observation_point") == point and f.get("IP", {}).get("destination") == target:
                return f
        return None

    n1, _n2, n3 = cluster.nodes
    out = eventually(lambda: hop(n1, "TO_OVERLAY"), what="a to-overlay trace on node1")
    assert out["interface"]["name"] == "cilia_vxlan" and out["node_name"] == n1
    assert out["traffic_direction"] == "EGRESS"
    assert out["source"]["pod_name"] == "tiefighter" and out["destination"]["pod_name"] == "deathstar-1"
    inbound = eventually(lambda: hop(n3, "FROM_OVERLAY"), what="a from-overlay trace on node3")
    assert (
        inbound["node_name"] == n3
        and inbound["source"]["identity"] == cluster.records["default/tiefighter"]["identity"]
    )
    compact = cluster.cli("observe", "--last", "500", "--node-name", n1)
    assert compact.returncode == 0, compact.stderr
    assert "default/tiefighter" in compact.stdout and "to-overlay FORWARDED" in compact.stdout


# --- nodes joining, leaving, dying ----------------------------------------------------------------


def test_a_node_that_joins_and_leaves_updates_every_other_node(cluster: ClusterHarness) -> None:
    n1, n2, n3 = cluster.nodes
    n4 = f"{cluster.name}-node4"
    a = cluster.add(n1, "a", {"app": "a"})
    cluster.lc.add_node("node4")
    cluster.refresh()
    try:
        for n in (n1, n2, n3):
            eventually(lambda n=n: n4 in cluster.registry(n), what=f"{n} seeing node4")
        d = cluster.add(n4, "d", {"app": "d"})
        node4 = cluster.state.nodes[n4]
        eventually(
            lambda: cluster.ipcache(n1).get(f"{d['ip']}/32") == (d["identity"], node4.ip),
            what="node1's ipcache pointing d at node4",
        )
        assert cluster.probe("default/a", d["ip"], 0, "ICMP")
        assert cluster.exec("default/d", "ping", "-c1", "-W1", a["ip"]).returncode == 0
        listing = cluster.cli("node", "list")
        assert listing.returncode == 0, listing.stderr
        assert n4 in listing.stdout and node4.pod_cidr in listing.stdout
    finally:
        cluster.records.pop("default/d", None)
        cluster.lc.delete_node("node4")
        cluster.refresh()
    eventually(lambda: n4 not in cluster.registry(n1), 30, "node1 forgetting node4")
    eventually(lambda: f"{d['ip']}/32" not in cluster.ipcache(n1), what="node4's pod leaving node1's ipcache")
    routes = subprocess.run(["ip", "-n", n1, "route"], capture_output=True, text=True).stdout
    assert node4.pod_cidr not in routes


def test_a_dead_node_is_dropped_after_its_lease_and_the_others_never_stop(tmp_path: Path) -> None:
    with running_cluster(tmp_path, 3, lease_seconds=6) as c:
        n1, n2, n3 = c.nodes
        a = c.add(n1, "a", {"app": "a"})
        b = c.add(n2, "b", {"app": "b"})
        z = c.add(n3, "z", {"app": "z"})
        eventually(lambda: f"{z['ip']}/32" in c.ipcache(n1), what="node1 knowing node3's pod")
        pinger = subprocess.Popen(
            c.argv("default/a", "ping", "-q", "-c", "60", "-i", "0.2", "-W", "1", b["ip"]),
            stdout=subprocess.PIPE,
            text=True,
        )
        c.lc.kill_node(n3)
        eventually(lambda: n3 not in c.registry(n1), 30, "node1 dropping node3 after its lease")
        eventually(
            lambda: f"{z['ip']}/32" not in c.ipcache(n1), what="node3's endpoint leaving node1's ipcache"
        )
        eventually(lambda: n3 not in c.registry(n2), 30, "node2 dropping node3")
        out, _ = pinger.communicate(timeout=60)
        assert " 0% packet loss" in out, out
        assert c.exec("default/b", "ping", "-c1", "-W1", a["ip"]).returncode == 0


def test_nats_restarting_while_traffic_crosses_nodes_drops_nothing_allowed(cluster: ClusterHarness) -> None:
    starwars(cluster)
    cluster.apply(RULE1)
    target = cluster.ip("default/deathstar-1")
    pinger = subprocess.Popen(
        cluster.argv(
            "default/tiefighter",
            "ping",
            "-q",
            "-c",
            "40",
            "-i",
            "0.2",
            "-W",
            "1",
            cluster.ip("default/xwing"),
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    stream = subprocess.Popen(
        cluster.argv(
            "default/tiefighter",
            str(VENV_BIN / "python"),
            "-c",
            # One line every 0.2 s (paced by the select timeout) for 8 s, each echoed in time.
            "import select,socket,sys\n"
            "s=socket.create_connection((sys.argv[1],80),timeout=2)\n"
            "for i in range(40):\n"
            "    s.sendall(b'x%d\\n'%i); assert s.recv(64)\n"
            "    print('echoed', i, flush=True) if i == 0 else None\n"
            "    select.select([], [], [], 0.2)\n"
            "print('stream ok')",
            target,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert stream.stdout is not None and stream.stdout.readline().startswith("echoed"), "the stream started"
    cluster.lc.restart("nats")
    out, _ = pinger.communicate(timeout=60)
    sout, serr = stream.communicate(timeout=60)
    assert " 0% packet loss" in out, out
    assert "stream ok" in sout, serr
    assert not cluster.probe("default/xwing", target, 80, timeout=0.5)
    # The control plane caught up: a new policy reaches every node.
    cluster.apply(RULE1.replace("org: empire}}]", "class: xwing}}]"))
    assert cluster.probe("default/xwing", target, 80)


def test_the_cli_builds_reports_and_removes_a_cluster(tmp_path: Path) -> None:
    from cluster_support import _free_underlay

    state = tmp_path / "kind"
    env = {"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "CILIA_CLUSTER_DIR": str(state)}
    cilia = str(VENV_BIN / "cilia")
    name = f"k{int(time.time()) % 100000}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cilia, *args], capture_output=True, text=True, timeout=180, env=env)

    up = run("cluster", "up", "--nodes", "2", "--name", name, "--underlay", str(_free_underlay()))
    try:
        assert up.returncode == 0, up.stderr
        assert "export CILIA_POLICY_URL=" in up.stdout and "export CILIA_DATAPATH_URL=" in up.stdout
        status = run("cluster", "status")
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("yes") >= 10
        added = run(
            "endpoint", "add", "--name", "web", "--labels", "app=web", "--node", "node2", "-o", "json"
        )
        assert added.returncode == 0, added.stderr
        web = json.loads(added.stdout)
        assert web["node"] == f"{name}-node2"
        run("endpoint", "add", "--name", "cli", "--labels", "app=cli", "--node", "node1")
        ping = run("endpoint", "exec", "default/cli", "--", "ping", "-c1", "-W1", web["ip"])
        assert ping.returncode == 0, ping.stdout + ping.stderr
        # web lives on node2, the CLI's default agent is node1's: exec finds it through the registry.
        inside = run("endpoint", "exec", "default/web", "--", "ip", "-4", "-br", "addr", "show", "eth0")
        assert inside.returncode == 0 and web["ip"] in inside.stdout, inside.stdout + inside.stderr
        nodes = run("node", "list")
        assert f"{name}-node1 (this node)" in nodes.stdout and f"{name}-node2" in nodes.stdout
        pid = json.loads((state / "cluster.json").read_text())["nodes"][f"{name}-node2"]["processes"][
            "datapath"
        ]
    finally:
        down = run("cluster", "down")
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{name}-" not in netns
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert f"{name}-br" not in links and f"{name}-u" not in links
    assert not Path(f"/sys/fs/bpf/cilia/{name}-node2").exists()
    eventually(lambda: not process_alive(pid), what=f"the agent (pid {pid}) exiting")


def test_a_cluster_on_etcd_keeps_its_registry_and_overlay_there(tmp_path: Path) -> None:
    with running_cluster(tmp_path, 2, kvstore="etcd") as c:
        assert c.state.kvstore_url.startswith("etcd://")
        n1, n2 = c.nodes
        a = c.add(n1, "a", {"app": "a"})
        b = c.add(n2, "b", {"app": "b"})
        eventually(lambda: set(c.registry(n1)) == {n1, n2}, what="both nodes in the etcd registry")
        eventually(lambda: f"{b['ip']}/32" in c.ipcache(n1), what="node1 learning b from etcd")
        assert c.probe("default/a", b["ip"], 0, "ICMP")
        c.apply(
            textwrap.dedent(
                """
                apiVersion: cilium.io/v2
                kind: CiliumNetworkPolicy
                metadata: {name: b-from-nobody}
                spec:
                  endpointSelector: {matchLabels: {app: b}}
                  ingress: [{}]
                """
            )
        )
        assert not c.probe("default/a", b["ip"], 0, "ICMP")
        assert c.exec("default/b", "ping", "-c1", "-W1", a["ip"]).returncode == 0


def test_a_service_with_backends_on_two_nodes_serves_a_client_on_a_third(cluster: ClusterHarness) -> None:
    n1, n2, n3 = cluster.nodes
    for i, node in ((1, n1), (2, n2)):
        cluster.add(node, f"deathstar-{i}", {"org": "empire", "class": "deathstar"})
        ref = f"default/deathstar-{i}"
        cluster.spawn(
            ref, str(VENV_BIN / "python"), "-m", "cilia.demo_apps", "http", "--port", "80", "--name", ref
        )
        eventually(
            lambda ref=ref: ":80 " in cluster.exec(ref, "ss", "-H", "-ltn").stdout, what=f"http on {ref}"
        )
    cluster.add(n3, "tiefighter", {"org": "empire", "class": "tiefighter"})
    cluster.add(n3, "xwing", {"org": "alliance", "class": "xwing"})
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "deathstar", "namespace": "default"},
        "spec": {"clusterIP": "10.96.1.10", "selector": {"class": "deathstar"}, "ports": [{"port": 80}]},
    }
    cluster.store("services/default/deathstar", svc)
    try:

        def backends() -> int:
            code, body = cluster.request(f"{cluster.api(n3)}/v1/services", "GET")
            return max((len(f["backends"]) for f in body.get("items", [])), default=0) if code == 200 else 0

        eventually(lambda: backends() == 2, what="node3 seeing both backends")
        seen = set()
        for _ in range(30):
            got = cluster.exec("default/tiefighter", "curl", "-s", "-m", "2", "http://10.96.1.10/")
            assert got.returncode == 0, got.stderr
            seen.add(got.stdout.strip())
        assert seen == {"default/deathstar-1 /", "default/deathstar-2 /"}
        cluster.apply(RULE1)
        assert cluster.exec("default/xwing", "curl", "-s", "-m", "1", "http://10.96.1.10/").returncode != 0
        assert (
            cluster.exec("default/tiefighter", "curl", "-s", "-m", "2", "http://10.96.1.10/").returncode == 0
        )
    finally:
        cluster.store("services/default/deathstar", None)


def test_outside_traffic_to_a_load_balancer_ip_reaches_backends_on_every_node(
    cluster: ClusterHarness,
) -> None:
    """The L2/BGP announcement is stood in for by a static route to the first node (the announcers
    have tests of their own); what is tested here is the datapath on that node's uplink."""
    n1, n2, _n3 = cluster.nodes
    for i, node in ((1, n1), (2, n2)):
        ref = f"default/deathstar-{i}"
        cluster.add(node, f"deathstar-{i}", {"org": "empire", "class": "deathstar"})
        cluster.spawn(
            ref, str(VENV_BIN / "python"), "-m", "cilia.demo_apps", "http", "--port", "80", "--name", ref
        )
        eventually(
            lambda ref=ref: ":80 " in cluster.exec(ref, "ss", "-H", "-ltn").stdout, what=f"http on {ref}"
        )
    lb_ip = "198.18.0.10"
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "deathstar", "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.1.20",
            "selector": {"class": "deathstar"},
            "ports": [{"port": 80}],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}},
    }
    outside = cluster.internet = ClusterInternet(cluster)
    subprocess.run(
        ["ip", "-n", outside.netns, "route", "add", f"{lb_ip}/32", "via", cluster.state.nodes[n1].ip],
        check=True,
    )

    def from_outside() -> str:
        argv = [
            "nsenter",
            f"--net=/run/netns/{outside.netns}",
            "--",
            "curl",
            "-s",
            "-m",
            "2",
            f"http://{lb_ip}/",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else f"FAILED ({done.returncode})"

    def frontend_backends(node: str) -> int:
        code, body = cluster.request(f"{cluster.api(node)}/v1/services", "GET")
        items = body.get("items", []) if code == 200 else []
        return max((len(f["backends"]) for f in items if f["frontend"].startswith(lb_ip)), default=0)

    cluster.store("services/default/deathstar", svc)
    try:
        eventually(lambda: frontend_backends(n1) == 2, what="node1's LoadBalancer frontend")
        seen = {from_outside() for _ in range(30)}
        assert seen == {"default/deathstar-1 /", "default/deathstar-2 /"}, seen
        # Policy still sees the outside client as world, also on the other node (the VNI says so).
        cluster.apply(RULE1)
        assert {from_outside() for _ in range(6)} == {"FAILED (28)"}
        world = RULE1.replace("fromEndpoints: [{matchLabels: {org: empire}}]", "fromEntities: [world]")
        cluster.apply(world)
        assert {from_outside() for _ in range(20)} == {"default/deathstar-1 /", "default/deathstar-2 /"}
        # externalTrafficPolicy: Local keeps outside traffic on the receiving node's backends.
        svc["spec"]["externalTrafficPolicy"] = "Local"
        cluster.store("services/default/deathstar", svc)
        eventually(
            lambda: {from_outside() for _ in range(10)} == {"default/deathstar-1 /"}, what="Local policy"
        )
    finally:
        cluster.store("services/default/deathstar", None)


# --- each node's proxies (the cluster starts a DNS and an HTTP proxy beside every agent) ----------

L7_RULE1 = (EXAMPLES / "policies" / "starwars-l7.yaml").read_text()

MEDIABOT = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: mediabot}
    spec:
      endpointSelector: {matchLabels: {class: mediabot}}
      egress:
      - toEndpoints:
        - matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}
        toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules: {dns: [{matchPattern: "*.github.com"}]}
      - toFQDNs: [{matchName: api.github.com}]
        toPorts: [{ports: [{port: "443", protocol: TCP}]}]
    """
)


def test_every_node_runs_its_proxies_and_l7_and_dns_rules_hold_across_nodes(cluster: ClusterHarness) -> None:
    nodes = cluster.nodes
    status = cluster.cli("cluster", "status", "-o", "json")
    assert status.returncode == 0, status.stderr
    rows = {(r["node"], r["component"]): r for r in json.loads(status.stdout)["components"]}
    for node in nodes:
        for role in ("datapath", "dnsproxy", "l7proxy", "announcer"):
            assert rows[(node, role)]["alive"] and rows[(node, role)]["ready"], rows.get((node, role))
        assert len(cluster.status(node)["proxies"]) == 2  # both proxies registered with the node's agent
    # HTTP: tiefighter on node1, deathstar on node3 (the rule is enforced by node3's proxy, on the
    # identity the overlay carried), xwing on node2 dropped at L3/L4.
    starwars(cluster)
    cluster.serve("default/deathstar-1", "http", 8080)  # a second server, for the HTTP answers
    cluster.apply(L7_RULE1.replace("'80'", "'8080'"))
    url = f"http://{cluster.ip('default/deathstar-1')}:8080"

    def http(ref: str, method: str, path: str) -> str:
        out = cluster.exec(ref, "curl", "-s", "-m", "2", "-X", method, f"{url}{path}")
        return out.stdout.strip() if out.returncode == 0 else f"FAILED ({out.returncode})"

    landed = eventually(
        lambda: http("default/tiefighter", "POST", "/v1/request-landing") == "Ship landed" or None,
        what="tiefighter landing through node3's L7 proxy",
    )
    assert landed
    assert http("default/tiefighter", "PUT", "/v1/exhaust-port") == "Access denied"
    assert http("default/xwing", "POST", "/v1/request-landing") == "FAILED (28)"
    flows = cluster.flows(nodes[2])
    assert any(
        f.get("l7", {}).get("http", {}).get("method") == "PUT" and f.get("verdict") == "DROPPED"
        for f in flows
    ), "node3's proxy reports the denied request"

    # DNS: mediabot on node1 asks kube-dns on node2; node1's DNS proxy judges and opens the answer.
    cluster.add(nodes[0], "mediabot", {"class": "mediabot"})
    dns = cluster.add(nodes[1], "coredns", {"k8s-app": "kube-dns"}, namespace="kube-system")
    cluster.internet = ClusterInternet(cluster)
    cluster.internet.serve("tcp-echo", "198.51.100.10", 443)
    cluster.internet.serve("tcp-echo", "198.51.100.11", 443)
    zone = Path(cluster.state.state_dir) / "github.zone"
    zone.write_text("api.github.com. 30 IN A 198.51.100.10\nsupport.github.com. 30 IN A 198.51.100.11\n")
    resolver = [str(VENV_BIN / "python"), "-m", "dnslib.zoneresolver", "--zone", str(zone)]
    cluster.spawn("kube-system/coredns", *resolver, "--address", dns["ip"], "--log=-request,-reply")
    eventually(lambda: ":53 " in cluster.exec("kube-system/coredns", "ss", "-H", "-lun").stdout, what="dns")
    cluster.apply(MEDIABOT)

    def dig(name: str) -> str:
        out = cluster.exec(
            "default/mediabot", "dig", "+short", "+tries=1", "+timeout=2", f"@{dns['ip']}", name
        )
        return out.stdout.strip()

    assert not cluster.probe("default/mediabot", "198.51.100.10", 443)
    assert dig("api.github.com") == "198.51.100.10"
    assert cluster.probe("default/mediabot", "198.51.100.10", 443)  # opened before the answer came
    assert dig("support.github.com") == "198.51.100.11"
    assert not cluster.probe("default/mediabot", "198.51.100.11", 443)  # not selected by toFQDNs
    refused = cluster.exec("default/mediabot", "dig", "+tries=1", "+timeout=2", f"@{dns['ip']}", "cnn.com")
    assert "status: REFUSED" in refused.stdout


def test_cluster_up_sweeps_what_a_killed_cluster_left_but_never_a_live_one() -> None:
    from cilia.cluster import sweep_leftovers

    name = f"sw{os.getpid() % 100000}"
    made = [["ip", "netns", "add", f"{name}-node1"], ["ip", "link", "add", f"{name}-br", "type", "bridge"]]
    try:
        for cmd in made:
            subprocess.run(cmd, check=True, capture_output=True)
        # A process still runs in one of its namespaces: a live cluster, left alone.
        sleeper = subprocess.Popen(["ip", "netns", "exec", f"{name}-node1", "sleep", "30"])
        try:
            eventually(
                lambda: subprocess.run(
                    ["ip", "netns", "pids", f"{name}-node1"], capture_output=True, text=True
                ).stdout.strip(),
                what="the sleeper in the namespace",
            )
            assert sweep_leftovers(name) is False
            assert f"{name}-node1" in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
        finally:
            sleeper.kill()
            sleeper.wait()
        # Nothing runs any more: its namespace and bridge go.
        assert sweep_leftovers(name) is True
        assert f"{name}-node1" not in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
        assert subprocess.run(["ip", "link", "show", f"{name}-br"], capture_output=True).returncode != 0
    finally:
        subprocess.run(["ip", "netns", "delete", f"{name}-node1"], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{name}-br"], capture_output=True)
