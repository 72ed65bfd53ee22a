"""Services in eBPF: a frontend (ClusterIP:port) DNATed to a backend per connection at the client's
from-container, policy judged on the backend, replies reverse-NATed, on real packets.

Services are written to the kvstore as the lbipam service stores them (`services/<ns>/<name>`, the
whole `v1` Service object): the datapath's input, whoever writes it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import textwrap
from typing import Any

from conftest import VENV_BIN, Node, eventually
from test_datapath_endpoints import cilia

from cilia.kvstore import connect

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


def service(
    name: str, cluster_ip: str, selector: dict[str, str], ports: list[dict[str, Any]], **spec: Any
) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "selector": selector, "ports": ports, **spec},
    }


def store(node: Node, doc: dict | None, name: str) -> None:
    """Put (or delete, for None) a Service where the datapath watches for it."""

    async def run() -> None:
        kv = await connect("nats", node.cp.nats.url)
        try:
            key = f"svc{node.unique}/default/{name}"
            if doc is None:
                await kv.delete(key)
            else:
                await kv.put(key, json.dumps(doc).encode())
        finally:
            await kv.close()

    asyncio.run(run())


def frontends(node: Node) -> list[dict[str, Any]]:
    status, body = node.api("GET", "/v1/services")
    assert status == 200, body
    return list(body["items"])


def wait_backends(node: Node, frontend: str, count: int) -> None:
    eventually(
        lambda: any(f["frontend"] == frontend and len(f["backends"]) == count for f in frontends(node)),
        what=f"{frontend} with {count} backend(s)",
    )


def serve_named(node: Node, ref: str, port: int = 80) -> None:
    name = ref.split("/")[1]
    node.spawn(
        ref, str(VENV_BIN / "python"), "-m", "cilia.demo_apps", "http", "--port", str(port), "--name", name
    )
    eventually(lambda: f":{port} " in node.exec(ref, "ss", "-H", "-ltn").stdout, what=f"http on {ref}")


def curl(node: Node, ref: str, url: str, *extra: str) -> str:
    done = node.exec(ref, "curl", "-s", "-m", "2", *extra, url)
    return done.stdout.strip() if done.returncode == 0 else f"FAILED ({done.returncode})"


def deathstars(node: Node) -> None:
    node.add("deathstar-1", {"org": "empire", "class": "deathstar"})
    node.add("deathstar-2", {"org": "empire", "class": "deathstar"})
    node.add("tiefighter", {"org": "empire", "class": "tiefighter"})
    node.add("xwing", {"org": "alliance", "class": "xwing"})
    serve_named(node, "default/deathstar-1")
    serve_named(node, "default/deathstar-2")


VIP = "10.96.0.20"
DEATHSTAR = service("deathstar", VIP, {"org": "empire", "class": "deathstar"}, [{"name": "http", "port": 80}])


def test_a_cluster_ip_spreads_connections_and_a_deleted_backend_gets_none(node: Node) -> None:
    deathstars(node)
    store(node, DEATHSTAR, "deathstar")
    wait_backends(node, f"{VIP}:80/TCP", 2)
    listing = subprocess.run(
        [str(VENV_BIN / "cilia"), "bpf", "lb", "list", "--node", node.name], capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    assert f"{VIP}:80/TCP" in listing.stdout and "[ClusterIP]" in listing.stdout
    for ref in ("default/deathstar-1", "default/deathstar-2"):
        assert f"{node.ip(ref)}:80/TCP" in listing.stdout
    # `cilia service list`, like `cilium-dbg service list`: the frontend's row carries the first
    # backend, the second one follows on its own row.
    svc = cilia(node, "service", "list")
    assert svc.returncode == 0, svc.stderr
    lines = svc.stdout.splitlines()
    assert lines[0].split() == ["ID", "Frontend", "Service", "Type", "Backend"]
    row = next(i for i, line in enumerate(lines) if f"{VIP}:80/TCP" in line)
    assert lines[row].split()[1:4] == [f"{VIP}:80/TCP", "ClusterIP", "1"]
    assert lines[row].endswith("(active)") and lines[row + 1].strip().startswith("2 => ")
    backends = {lines[row].split()[5], lines[row + 1].split()[2]}
    assert backends == {f"{node.ip(ref)}:80/TCP" for ref in ("default/deathstar-1", "default/deathstar-2")}
    answers = collections.Counter(curl(node, "default/tiefighter", f"http://{VIP}/v1/") for _ in range(30))
    assert set(answers) == {"deathstar-1 /v1/", "deathstar-2 /v1/"}, answers
    status, _ = node.api("DELETE", "/v1/endpoints/default/deathstar-2")
    assert status == 200
    wait_backends(node, f"{VIP}:80/TCP", 1)
    after = [curl(node, "default/tiefighter", f"http://{VIP}/v1/") for _ in range(20)]
    assert after == ["deathstar-1 /v1/"] * 20
    store(node, None, "deathstar")
    eventually(lambda: not frontends(node), what="the frontend removed")
    assert curl(node, "default/tiefighter", f"http://{VIP}/v1/").startswith("FAILED")


def test_policy_judges_the_backend_behind_the_service_ip(node: Node) -> None:
    deathstars(node)
    store(node, DEATHSTAR, "deathstar")
    wait_backends(node, f"{VIP}:80/TCP", 2)
    node.apply(RULE1)
    assert curl(node, "default/tiefighter", f"http://{VIP}/v1/request-landing", "-XPOST") == "Ship landed"
    assert curl(node, "default/xwing", f"http://{VIP}/v1/request-landing", "-XPOST").startswith("FAILED")
    drops = [
        f
        for f in node.flows()
        if f.get("verdict") == "DROPPED" and f.get("source", {}).get("pod_name") == "xwing"
    ]
    # Judged on the backend (a deathstar pod, its port), not on the service address.
    assert drops and all(f["destination"]["pod_name"].startswith("deathstar-") for f in drops)
    assert all(f["l4"]["TCP"]["destination_port"] == 80 for f in drops)


def test_target_ports_by_name_session_affinity_and_udp(node: Node) -> None:
    for i in (1, 2):
        node.add(f"web-{i}", {"app": "web"}, namedPorts={"http": 8080, "echo": "5353/UDP"})
        serve_named(node, f"default/web-{i}", 8080)
        node.serve(f"default/web-{i}", "udp-echo", 5353)
    node.add("client", {"app": "client"})
    web = service(
        "web",
        "10.96.0.30",
        {"app": "web"},
        [
            {"name": "http", "port": 80, "targetPort": "http"},
            {"name": "echo", "port": 53, "protocol": "UDP", "targetPort": "echo"},
        ],
        sessionAffinity="ClientIP",
    )
    store(node, web, "web")
    wait_backends(node, "10.96.0.30:80/TCP", 2)
    wait_backends(node, "10.96.0.30:53/UDP", 2)
    answers = {curl(node, "default/client", "http://10.96.0.30/x") for _ in range(12)}
    assert len(answers) == 1 and answers.pop() in ("web-1 /x", "web-2 /x")  # one client, one backend
    udp = node.exec(
        "default/client",
        str(VENV_BIN / "python"),
        "-m",
        "cilia.demo_apps",
        "probe-udp",
        "--bind",
        "10.96.0.30",
        "--port",
        "53",
    )
    assert udp.returncode == 0  # the echo came back from the frontend's address (reverse NAT)


def test_a_pod_reaches_itself_through_its_service(node: Node) -> None:
    node.add("solo", {"app": "solo"})
    serve_named(node, "default/solo")
    store(node, service("solo", "10.96.0.40", {"app": "solo"}, [{"port": 80}]), "solo")
    wait_backends(node, "10.96.0.40:80/TCP", 1)
    assert curl(node, "default/solo", "http://10.96.0.40/self") == "solo /self"


HOLD = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("connected", flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    print(s.recv(100).decode().strip(), flush=True)
"""


def test_a_backend_leaving_the_selector_gets_no_new_connection_and_keeps_its_open_ones(node: Node) -> None:
    for i in (1, 2):
        ref = f"default/deathstar-{i}"
        node.add(f"deathstar-{i}", {"class": "deathstar", "unit": str(i)})
        serve_named(node, ref)
        node.serve(ref, "tcp-echo", 7)
    node.add("tiefighter", {"class": "tiefighter"})
    ports = [{"name": "http", "port": 80}, {"name": "echo", "port": 7}]
    store(node, service("deathstar", VIP, {"class": "deathstar"}, ports), "deathstar")
    wait_backends(node, f"{VIP}:7/TCP", 2)
    # Connections held open through the frontend, until both backends have one.
    held: dict[str, subprocess.Popen[str]] = {}
    try:
        for _ in range(20):
            before = {ref: established(node, ref) for ref in ("default/deathstar-1", "default/deathstar-2")}
            proc = subprocess.Popen(
                node.argv("default/tiefighter", str(VENV_BIN / "python"), "-c", HOLD, VIP, "7"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None and proc.stdout is not None
            assert proc.stdout.readline().strip() == "connected"
            proc.stdin.write("ping\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "ping"
            # The backend that took it: the one with one more established connection on port 7.
            ref = next(r for r in before if established(node, r) > before[r])
            if ref in held:
                proc.kill()
                proc.wait()
                continue
            held[ref] = proc
            if len(held) == 2:
                break
        assert len(held) == 2, "20 connections all went to one backend"
        # deathstar-2 leaves the selector (its pod stays): new connections all go to deathstar-1 ...
        store(node, service("deathstar", VIP, {"class": "deathstar", "unit": "1"}, ports), "deathstar")
        wait_backends(node, f"{VIP}:7/TCP", 1)
        answers = [curl(node, "default/tiefighter", f"http://{VIP}/v1/") for _ in range(12)]
        assert answers == ["deathstar-1 /v1/"] * 12
        # ... and the connection it holds goes on (its backend entry stays while the connection lives).
        for ref, proc in held.items():
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"still {ref}\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == f"still {ref}"
    finally:
        for proc in held.values():
            proc.kill()
            proc.wait()
        store(node, None, "deathstar")


def established(node: Node, ref: str) -> int:
    out = node.exec(ref, "ss", "-H", "-tn", "state", "established", "( sport = :7 )").stdout
    return len([line for line in out.splitlines() if line.strip()])
