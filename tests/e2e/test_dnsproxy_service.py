"""DNS through a ClusterIP and the DNS proxy, on real packets: a pod asks the kube-dns Service's
address, the datapath DNATs the query to the kube-dns pod and redirects it to the proxy (policy
judged on the backend), the proxy forwards it to that pod, and its answer reaches the pod from the
ClusterIP (reverse NAT), over UDP and TCP, as in Cilium."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VENV_BIN, Internet, Node, eventually
from dns_harness import DNSProxyProcess, DNSWorld, reach
from test_dnsproxy_scenarios import dns_lines
from test_services import wait_backends

from cilia.kvstore import connect

KUBE_DNS_IP = "10.96.0.10"
KUBE_DNS = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "kube-dns", "namespace": "kube-system"},
    "spec": {
        "type": "ClusterIP",
        "clusterIP": KUBE_DNS_IP,
        "selector": {"k8s-app": "kube-dns"},
        "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ],
    },
}

# A client resolving with an unconnected UDP socket prints the address the answer came from: the
# kernel would hand it any source, so this shows what the datapath made of the proxy's answer.
RECVFROM = textwrap.dedent(
    """
    import socket, sys
    from dnslib import DNSRecord
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(DNSRecord.question(sys.argv[1]).pack(), (sys.argv[2], 53))
    data, peer = s.recvfrom(4096)
    print(peer[0], peer[1], DNSRecord.parse(data).short().replace(chr(10), ","))
    """
)


def dns_policy(dns_rules: str) -> str:
    return textwrap.dedent(
        f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: fqdn}}
        spec:
          endpointSelector: {{matchLabels: {{org: empire, class: mediabot}}}}
          egress:
          - toFQDNs: [{{matchName: api.github.com}}]
          - toEndpoints: [{{matchLabels: {{"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}}}}]
            toPorts:
            - ports: [{{port: "53", protocol: ANY}}]
              rules: {{dns: {dns_rules}}}
        """
    )


def store_service(node: Node, doc: dict) -> None:
    """Write a Service where the node's agent watches for it (the lbipam service's key)."""

    async def run() -> None:
        kv = await connect("nats", node.cp.nats.url)
        try:
            meta = doc["metadata"]
            await kv.put(f"svc{node.unique}/{meta['namespace']}/{meta['name']}", json.dumps(doc).encode())
        finally:
            await kv.close()

    asyncio.run(run())


@pytest.fixture
def world(node: Node, internet: Internet, dnsproxy: DNSProxyProcess, tmp_path: Path) -> Iterator[DNSWorld]:
    w = DNSWorld(node, internet, tmp_path)
    try:
        store_service(node, KUBE_DNS)
        wait_backends(node, f"{KUBE_DNS_IP}:53/UDP", 1)
        wait_backends(node, f"{KUBE_DNS_IP}:53/TCP", 1)
        yield w
    finally:
        w.close()


def test_dns_through_the_kube_dns_cluster_ip_is_proxied_and_answered_from_the_cluster_ip(
    node: Node, internet: Internet, world: DNSWorld, dnsproxy: DNSProxyProcess
) -> None:
    bot = node.add("mediabot", {"org": "empire", "class": "mediabot"})
    internet.serve("tcp-echo", "198.51.100.10", 443)
    internet.serve("tcp-echo", "198.51.100.11", 443)
    pod = "default/mediabot"
    node.apply(dns_policy('[{matchPattern: "*"}]'))
    assert not reach(node, pod, "198.51.100.10", 443)

    # UDP: dig only takes an answer from the address it asked, so NOERROR means reverse NAT.
    answer = world.dig(pod, "api.github.com", server=KUBE_DNS_IP)
    assert (answer.status, answer.ips) == ("NOERROR", ["198.51.100.10"]), answer.raw
    assert reach(node, pod, "198.51.100.10", 443)  # toFQDNs opened the name's IP at once
    peer = node.exec(pod, str(VENV_BIN / "python"), "-c", RECVFROM, "support.github.com", KUBE_DNS_IP)
    assert peer.returncode == 0, peer.stderr
    assert peer.stdout.split() == [KUBE_DNS_IP, "53", "198.51.100.11"]
    assert not reach(node, pod, "198.51.100.11", 443)  # resolved, but no toFQDNs selector names it

    # TCP: the proxy's transparent listener accepted the connection to the backend's address; the
    # pod's connection to the ClusterIP gets every segment back from it.
    tcp = world.dig(pod, "api.github.com", server=KUBE_DNS_IP, tcp=True)
    assert (tcp.status, tcp.ips) == ("NOERROR", ["198.51.100.10"]), tcp.raw

    # The proxy saw (and reported) the query as going to the backend, the kube-dns pod, on its port:
    # the policy was judged there, and the pod's queries reached kube-dns from the pod itself.
    ident, dns_ident = bot["identity"], world.coredns["identity"]
    peers = f"default/mediabot:PORT (ID:{ident}) -> kube-system/coredns:53 (ID:{dns_ident})"
    want = f"{peers} dns-request proxy FORWARDED (DNS Query api.github.com. A)"
    eventually(lambda: dns_lines(node, pod).count(want) >= 2, what="the DNS flows of both queries")
    assert dnsproxy.metric("cilia_dnsproxy_queries_total", verdict="allowed", protocol="UDP") == 2
    assert dnsproxy.metric("cilia_dnsproxy_queries_total", verdict="allowed", protocol="TCP") == 1
    assert {q[1] for q in world.queries(world.coredns_log)} == {"api.github.com.", "support.github.com."}

    # A name the DNS rules do not allow is refused by the proxy, also answered from the ClusterIP.
    node.apply(dns_policy('[{matchPattern: "*.github.com"}]'))
    for over_tcp in (False, True):
        refused = world.dig(pod, "cnn.com", server=KUBE_DNS_IP, tcp=over_tcp)
        assert (refused.status, refused.ips) == ("REFUSED", []), refused.raw
        allowed = world.dig(pod, "api.github.com", server=KUBE_DNS_IP, tcp=over_tcp)
        assert (allowed.status, allowed.ips) == ("NOERROR", ["198.51.100.10"]), allowed.raw
    assert "cnn.com." not in {q[1] for q in world.queries(world.coredns_log)}
    # The libc resolver of a pod whose resolv.conf names the Service, as Kubernetes writes it (it
    # asks A and AAAA from one socket, and takes only answers from the address it asked).
    world.resolv.write_text(f"nameserver {KUBE_DNS_IP}\noptions timeout:1 attempts:2\n")
    done = world.curl(pod, "telnet://api.github.com:443", timeout=2)
    assert done.returncode in (0, 28), done.stderr  # connected (the echo server never closes)
    assert "Could not resolve" not in done.stderr
    eventually(
        lambda: dns_lines(node, pod).count(f"{peers} dns-request proxy DROPPED (DNS Query cnn.com. A)") == 2,
        what="the refused queries' flows",
    )
