"""TTLs on real packets: an expired name closes once its connections end; a changed answer opens the
new IP at once and closes the old one after its TTL."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Internet, Node, eventually
from dns_harness import DNSProxyProcess, DNSWorld, reach
from test_datapath_behaviour import Stream

POLICY = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: fqdn}
    spec:
      endpointSelector: {matchLabels: {class: mediabot}}
      egress:
      - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}}]
        toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules: {dns: [{matchPattern: "*"}]}
      - toFQDNs: [{matchPattern: "*.test"}]
        toPorts: [{ports: [{port: "443", protocol: TCP}]}]
    """
)


@pytest.fixture
def world(node: Node, internet: Internet, dnsproxy: DNSProxyProcess, tmp_path: Path) -> Iterator[DNSWorld]:
    w = DNSWorld(node, internet, tmp_path)
    try:
        yield w
    finally:
        w.close()


def cached(proxy: DNSProxyProcess, name: str) -> dict[str, str]:
    """ip -> source (lookup or connection) of `name` in the proxy's cache."""
    return {ip: r["source"] for r in proxy.cache(name=name) for ip in r["ips"]}


def test_an_expired_name_closes_once_its_connections_end_and_a_changed_answer_moves(
    node: Node, internet: Internet, world: DNSWorld, dnsproxy: DNSProxyProcess
) -> None:
    node.add("mediabot", {"class": "mediabot"})
    for ip in ("198.51.100.20", "198.51.100.21", "198.51.100.22"):
        internet.serve("tcp-echo", ip, 443)
    world.set_zone(
        {
            "short.test.": {"A": ["198.51.100.20"], "ttl": 2},
            "moving.test.": {"A": ["198.51.100.21"], "ttl": 3},
        }
    )
    node.apply(POLICY)
    pod = "default/mediabot"

    assert world.dig(pod, "short.test").ips == ["198.51.100.20"]
    stream = Stream(node, pod, "198.51.100.20", 443)  # a connection that outlives the TTL
    try:
        assert world.dig(pod, "moving.test").ips == ["198.51.100.21"]
        assert reach(node, pod, "198.51.100.21", 443)
        world.set_zone(
            {
                "short.test.": {"A": ["198.51.100.20"], "ttl": 2},
                "moving.test.": {"A": ["198.51.100.22"], "ttl": 3},
            }
        )
        # The new answer opens the new IP at once; the old one stays until its own TTL ran out.
        assert world.dig(pod, "moving.test").ips == ["198.51.100.22"]
        assert reach(node, pod, "198.51.100.22", 443)
        assert set(cached(dnsproxy, "moving.test")) == {"198.51.100.21", "198.51.100.22"}
        # short.test's TTL passes; the open connection keeps its IP (a "connection" entry).
        eventually(lambda: cached(dnsproxy, "short.test") == {"198.51.100.20": "connection"}, 10)
        assert stream.echo("still here")
    finally:
        stream.close()
    # The connection ended: once its conntrack entry closes (10 s after FIN), the IP goes.
    eventually(lambda: not cached(dnsproxy, "short.test"), 30, "short.test forgotten")
    assert not reach(node, pod, "198.51.100.20", 443)
    # moving.test's old IP went the same way (its probe connection closed long ago); the new one
    # is still within a TTL refreshed by a new lookup.
    eventually(lambda: "198.51.100.21" not in cached(dnsproxy, "moving.test"), 30, ".21 forgotten")
    assert world.dig(pod, "moving.test").ips == ["198.51.100.22"]
    assert not reach(node, pod, "198.51.100.21", 443)
    assert reach(node, pod, "198.51.100.22", 443)
    assert dnsproxy.metric("cilia_dnsproxy_fqdn_updates_total", op="forget") >= 2
