"""The node-local API the proxies use: names seen by the DNS proxy open `toFQDNs` destinations, the
answer comes only after the maps are written, and it works over a unix socket, not NATS."""

from __future__ import annotations

import json
import socket
import textwrap

from conftest import VENV_BIN, Internet, Node

from services.datapath.localapi import socket_path

FQDN_POLICY = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: fqdn}
    spec:
      endpointSelector: {matchLabels: {class: mediabot}}
      egress:
      - toFQDNs: [{matchPattern: "*.github.com"}]
        toPorts: [{ports: [{port: "443", protocol: TCP}]}]
    """
)


def ask(node: Node, request: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(socket_path(node.name)))
        s.sendall(json.dumps(request).encode() + b"\n")
        return json.loads(s.makefile().readline())


def reach(node: Node, ip: str, port: int = 443) -> bool:
    argv = (
        str(VENV_BIN / "python"),
        "-m",
        "cilia.demo_apps",
        "probe-tcp",
        "--bind",
        ip,
        "--port",
        str(port),
        "--timeout",
        "0.7",
    )
    return node.exec("default/mediabot", *argv).returncode == 0


def test_names_from_the_dns_proxy_open_matching_fqdn_selectors_at_once(
    node: Node, internet: Internet
) -> None:
    mediabot = node.add("mediabot", {"org": "empire", "class": "mediabot"})
    node.apply(FQDN_POLICY)
    internet.serve("tcp-echo", "198.51.100.10", 443)
    internet.serve("tcp-echo", "198.51.100.12", 443)
    assert not reach(node, "198.51.100.10")  # no name resolved yet: world, denied
    answer = ask(
        node,
        {"op": "allow_fqdn", "ips": {"198.51.100.10": ["api.github.com"], "198.51.100.12": ["github.com"]}},
    )
    assert answer["ok"] is True and answer["written"] > 0
    # Written before the answer: the very next connection passes.
    assert reach(node, "198.51.100.10")
    assert not reach(node, "198.51.100.12")  # github.com does not match *.github.com
    ident = ask(node, {"op": "identity", "ip": mediabot["ip"]})
    assert ident == {"ok": True, "identity": mediabot["identity"], "labels": ident["labels"]}
    assert "k8s:class=mediabot" in ident["labels"]
    world = ask(node, {"op": "identity", "ip": "198.51.100.10"})
    assert world["identity"] >= 1 << 24  # a node-local identity for the FQDN IP
    assert ask(node, {"op": "nonsense"})["ok"] is False


def test_the_local_api_answers_with_nats_down(node: Node) -> None:
    node.cp.nats.stop()
    try:
        assert ask(node, {"op": "ping"}) == {"ok": True, "node": node.name}
    finally:
        node.cp.nats.start()


HTTP_POLICY = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: rule1}
    spec:
      endpointSelector: {matchLabels: {class: deathstar}}
      ingress:
      - fromEndpoints: [{matchLabels: {org: empire}}]
        toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules:
            http: [{method: POST, path: /v1/request-landing}]
    """
)


def test_proxies_ask_the_agent_for_l7_verdicts_of_both_directions(node: Node) -> None:
    deathstar = node.add("deathstar-1", {"org": "empire", "class": "deathstar"})
    tie = node.add("tiefighter", {"org": "empire", "class": "tiefighter"})
    node.apply(HTTP_POLICY)
    base = {"op": "check", "src": tie["ip"], "dst": deathstar["ip"], "port": 80, "proto": 6}
    ok = ask(node, {**base, "http": {"method": "POST", "path": "/v1/request-landing"}})
    assert ok["allowed"] is True and ok["ingress_applied"] is True
    assert ok["reason"] == "default/rule1 ingress[0] http[0]"
    assert (ok["src_identity"], ok["dst_identity"]) == (tie["identity"], deathstar["identity"])
    no = ask(node, {**base, "http": {"method": "PUT", "path": "/v1/exhaust-port"}})
    assert no["allowed"] is False and "default/rule1 ingress[0]" in no["reason"]
    assert (
        ask(node, {**base, "port": 81, "http": {"method": "PUT", "path": "/"}})["reason"]
        == "no L7 rule applies"
    )


def test_expired_names_close_what_they_opened(node: Node, internet: Internet) -> None:
    node.add("mediabot", {"org": "empire", "class": "mediabot"})
    node.apply(FQDN_POLICY)
    internet.serve("tcp-echo", "198.51.100.10", 443)
    ask(node, {"op": "allow_fqdn", "ips": {"198.51.100.10": ["api.github.com"]}})
    assert reach(node, "198.51.100.10")
    assert ask(node, {"op": "forget_fqdn", "ips": {"198.51.100.10": ["api.github.com"]}})["ok"] is True
    assert not reach(node, "198.51.100.10")
    assert ask(node, {"op": "ips_in_use", "ips": ["198.51.100.10", "198.51.100.99"]})["ips"] == [
        "198.51.100.10"
    ]


def test_a_proxy_flow_joins_the_nodes_flows(node: Node) -> None:
    flow = {
        "time": "2026-11-23T05:00:00.000000000Z",
        "uuid": "0d3e7c0e-0000-4000-8000-000000000001",
        "verdict": "FORWARDED",
        "Type": "L7",
        "node_name": node.name,
    }
    assert ask(node, {"op": "flow", "flow": flow}) == {"ok": True}
    assert any(f.get("uuid") == flow["uuid"] for f in node.flows())
