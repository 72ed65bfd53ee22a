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
