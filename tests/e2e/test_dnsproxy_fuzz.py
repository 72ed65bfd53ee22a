"""Fuzzing the proxy through the real redirect: malformed DNS messages from a pod (UDP and TCP) are
dropped and counted, the proxy keeps answering, and nothing malformed reaches the DNS server."""

from __future__ import annotations

import socket
import struct
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Internet, Node
from dns_harness import DNSProxyProcess, DNSWorld
from dnslib import DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.datapath.plumbing import _in_netns

POLICY = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: dns}
    spec:
      endpointSelector: {matchLabels: {class: fuzzer}}
      egress:
      - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}}]
        toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules: {dns: [{matchPattern: "*"}]}
    """
)

VALID = bytes(DNSRecord.question("api.github.com", "A").pack())
HDR = struct.Struct("!HHHHHH")


def malformed() -> st.SearchStrategy[bytes]:
    """Messages the proxy must refuse: truncated, wrong counts, pointer loops, oversized, responses."""
    truncated = st.integers(0, len(VALID) - 1).map(lambda n: VALID[:n])
    counts = st.tuples(st.integers(2, 65535), st.integers(1, 65535)).map(
        lambda c: HDR.pack(7, 0x0100, 1, c[0], c[1], 0) + VALID[12:]
    )
    loop = st.integers(12, 40).map(
        lambda at: HDR.pack(7, 0x0100, 1, 0, 0, 0) + struct.pack("!H", 0xC000 | at) + b"\0\1\0\1"
    )
    oversized = st.integers(4097, 9000).map(lambda n: VALID + b"\0" * (n - len(VALID)))
    response = st.just(VALID[:2] + b"\x81\x80" + VALID[4:])
    trailing = st.binary(min_size=1, max_size=40).map(lambda b: VALID + b)
    return st.one_of(truncated, counts, loop, oversized, response, trailing, st.binary(max_size=11))


@pytest.fixture
def world(node: Node, internet: Internet, dnsproxy: DNSProxyProcess, tmp_path: Path) -> Iterator[DNSWorld]:
    w = DNSWorld(node, internet, tmp_path)
    try:
        yield w
    finally:
        w.close()


def test_malformed_messages_are_dropped_and_counted_and_the_proxy_keeps_answering(
    node: Node, world: DNSWorld, dnsproxy: DNSProxyProcess
) -> None:
    rec = node.add("fuzzer", {"class": "fuzzer"})
    node.apply(POLICY)
    netns = rec["network"]["netns_path"]
    target = (world.coredns_ip, 53)
    udp = _in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sent = {"udp": 0, "tcp": 0, "udp_fragmented": 0}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(malformed(), st.booleans())
    def send(data: bytes, over_tcp: bool) -> None:
        if over_tcp:
            s = _in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            with s:
                s.settimeout(2)
                s.connect(target)
                s.sendall(struct.pack("!H", len(data) & 0xFFFF) + data[:65535])
                s.shutdown(socket.SHUT_WR)
                assert s.recv(4096) == b""  # closed without an answer
            sent["tcp"] += 1
        else:
            udp.sendto(data, target)
            # Datagrams over the MTU leave as fragments, which the datapath itself drops.
            sent["udp_fragmented" if len(data) > 1472 else "udp"] += 1

    try:
        send()
    finally:
        udp.close()
    # Still serving, over both transports.
    for tcp in (False, True):
        answer = world.dig("default/fuzzer", "api.github.com", tcp=tcp)
        assert (answer.status, answer.ips) == ("NOERROR", ["198.51.100.10"]), answer.raw
    dropped = dnsproxy.metric("cilia_dnsproxy_malformed_messages_total", source="client")
    assert dropped == sent["udp"] + sent["tcp"], (dropped, sent)
    # Nothing malformed was forwarded: kube-dns saw only the two real queries.
    assert [q[1] for q in world.queries(world.coredns_log)] == ["api.github.com.", "api.github.com."]
