"""No DNS outage on restart (Cilium's users see 25-30 s: cilium/cilium#16364, #30984): a pod queries
and connects in a loop while the DNS proxy, then the datapath agent, restart; every query is answered
within `dig +tries=2 +timeout=1` and every connection to the allowed name opens. And with NATS and
every cluster service down, a new allowed name still resolves and opens."""

from __future__ import annotations

import json
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Internet, Node, eventually
from dns_harness import PY, DNSProxyProcess, DNSWorld, reach

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
      - toFQDNs: [{matchPattern: "*.github.com"}, {matchName: ifconfig.me}]
        toPorts: [{ports: [{port: "443", protocol: TCP}]}]
    """
)

# Runs in the pod: dig and connect in a loop; one JSON line per round.
LOOP = textwrap.dedent(
    """
    import json, socket, subprocess, sys, time
    server, name, ip, port, seconds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        out = subprocess.run(["dig", f"@{server}", name, "+tries=2", "+timeout=1", "+short"],
                             capture_output=True, text=True).stdout.splitlines()
        out = [line for line in out if line and not line.startswith(";")]  # ";; ... timed out" (a retry)
        took = time.monotonic() - t
        try:
            socket.create_connection((ip, port), timeout=1).close()
            connected = True
        except OSError:
            connected = False
        print(json.dumps({"at": t, "answer": out, "took": took, "connected": connected}), flush=True)
        time.sleep(0.05)
    """
)


@pytest.fixture
def world(node: Node, internet: Internet, dnsproxy: DNSProxyProcess, tmp_path: Path) -> Iterator[DNSWorld]:
    w = DNSWorld(node, internet, tmp_path)
    try:
        yield w
    finally:
        w.close()


class QueryLoop:
    def __init__(self, node: Node, world: DNSWorld, pod: str, seconds: float) -> None:
        argv = [
            PY,
            "-u",
            "-c",
            LOOP,
            world.coredns_ip,
            "api.github.com",
            "198.51.100.10",
            "443",
            str(seconds),
        ]
        self.proc = subprocess.Popen(node.argv(pod, *argv), stdout=subprocess.PIPE, text=True)
        self.started = time.monotonic()
        self.lines: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.lines.append(json.loads(line))

    def wait_queries(self, count: int, what: str) -> None:
        """Until the loop has made `count` more queries: traffic all through the phase at hand."""
        target = len(self.lines) + count
        eventually(lambda: len(self.lines) >= target, 20, f"{count} queries {what}")

    def results(self) -> list[dict[str, Any]]:
        self.proc.wait(timeout=120)
        self.reader.join(10)
        return list(self.lines)


def check(results: list[dict[str, Any]]) -> None:
    assert len(results) > 20, results
    unanswered = [r for r in results if r["answer"] != ["198.51.100.10"]]
    assert not unanswered, unanswered
    refused = [r for r in results if not r["connected"]]
    assert not refused, refused


def test_restarting_the_dns_proxy_interrupts_no_query(
    node: Node, internet: Internet, world: DNSWorld, dnsproxy: DNSProxyProcess
) -> None:
    node.add("mediabot", {"class": "mediabot"})
    internet.serve("tcp-echo", "198.51.100.10", 443)
    node.apply(POLICY)
    assert world.dig("default/mediabot", "api.github.com").ips == ["198.51.100.10"]
    loop = QueryLoop(node, world, "default/mediabot", 14)
    loop.wait_queries(15, "before the restarts")
    # A rolling restart: the new process binds beside the old (SO_REUSEPORT) and registers the
    # same port; the old one leaves. Not one query waits for a retry.
    second = dnsproxy.spawn_second()
    second.start()
    t_rolling = time.monotonic()
    dnsproxy.stop()
    loop.wait_queries(15, "after the rolling restart")
    t_rolled = time.monotonic()
    # A stop-and-start, then a crash: the redirect fails closed for the restart's length, dig's
    # second try (1 s later) gets through.
    second.stop()
    dnsproxy.start()
    loop.wait_queries(10, "after the stop-and-start")
    dnsproxy.kill()
    dnsproxy.start()
    results = loop.results()
    check(results)
    rolling = [r for r in results if t_rolling <= r["at"] <= t_rolled]
    assert rolling and max(r["took"] for r in rolling) < 1.0, rolling
    # The restarted proxy restored its cache from the node's disk.
    assert any(r["fqdn"] == "api.github.com." for r in dnsproxy.cache())


def test_restarting_the_datapath_agent_interrupts_no_query_and_no_connection(
    node: Node, internet: Internet, world: DNSWorld, dnsproxy: DNSProxyProcess
) -> None:
    node.add("mediabot", {"class": "mediabot"})
    internet.serve("tcp-echo", "198.51.100.10", 443)
    internet.serve("tcp-echo", "198.51.100.44", 443)
    node.apply(POLICY)
    assert world.dig("default/mediabot", "api.github.com").ips == ["198.51.100.10"]
    loop = QueryLoop(node, world, "default/mediabot", 12)
    loop.wait_queries(10, "before the agent stops")
    node.agent.stop()
    loop.wait_queries(8, "while the agent is away")  # the proxy answers from the rules it has
    node.agent.start(timeout=60)
    eventually(lambda: node.status().get("policies_synced"), 20, "the agent's first policy snapshot")
    eventually(dnsproxy.registered, 10, "the proxy registered again")
    check(loop.results())
    # The agent restored the FQDN IPs before its first write, and a new name still opens.
    assert "198.51.100.10" in str(node.maps().ipcache_items())
    assert world.dig("default/mediabot", "ifconfig.me").ips == ["198.51.100.44"]
    assert reach(node, "default/mediabot", "198.51.100.44", 443)


def test_with_the_control_plane_down_a_new_allowed_name_resolves_and_opens(
    node: Node, internet: Internet, world: DNSWorld, dnsproxy: DNSProxyProcess
) -> None:
    node.add("mediabot", {"class": "mediabot"})
    internet.serve("tcp-echo", "198.51.100.11", 443)
    node.apply(POLICY)
    node.policy.stop()
    node.cp.identity.stop()
    node.cp.nats.stop()
    try:
        answer = world.dig("default/mediabot", "support.github.com")
        assert answer.ips == ["198.51.100.11"]
        assert reach(node, "default/mediabot", "198.51.100.11", 443)
        assert world.dig("default/mediabot", "cnn.com").ips == ["198.51.100.5"]  # resolves ...
        assert not reach(node, "default/mediabot", "198.51.100.5", 443)  # ... but opens nothing
    finally:
        node.cp.ensure_running()
        node.policy.start()


def test_a_redirect_whose_proxy_is_gone_fails_closed_even_while_the_agent_keeps_it(
    node: Node, world: DNSWorld, dnsproxy: DNSProxyProcess
) -> None:
    node.add("mediabot", {"class": "mediabot"})
    node.apply(POLICY)
    assert world.dig("default/mediabot", "api.github.com").ips == ["198.51.100.10"]
    before = len(world.queries(world.coredns_log))
    # The proxy dies while the agent is down; the restarted agent keeps the proxy's registration for
    # its grace period (a running proxy would not notice the restart), but no socket has the port.
    node.agent.stop()
    dnsproxy.stop()
    node.agent.start(timeout=60)
    eventually(lambda: node.status().get("policies_synced"), 20, "the agent's first policy snapshot")
    assert str(10053) in node.status()["proxies"]
    answer = world.dig("default/mediabot", "support.github.com", tries=1, timeout=1)
    assert answer.status == "TIMEOUT"  # dropped, not forwarded unjudged to kube-dns
    assert len(world.queries(world.coredns_log)) == before
    dnsproxy.start()
    assert world.dig("default/mediabot", "support.github.com").ips == ["198.51.100.11"]


def agent_fqdn_ips(node: Node) -> dict[str, list[str]]:
    """What the agent holds for the DNS proxy (the node-local API's fqdn_list)."""
    import socket

    from services.datapath.localapi import socket_path

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(socket_path(node.name)))
        s.sendall(json.dumps({"op": "fqdn_list"}).encode() + b"\n")
        return dict(json.loads(s.makefile().readline())["ips"])


def test_a_restarted_proxy_still_releases_what_it_or_a_lost_cache_opened(
    node: Node, world: DNSWorld, dnsproxy: DNSProxyProcess
) -> None:
    node.add("mediabot", {"class": "mediabot"})
    world.set_zone(
        {
            "a.github.com.": {"A": ["198.51.100.30"], "ttl": 3},
            "b.github.com.": {"A": ["198.51.100.31"], "ttl": 3},
        }
    )
    node.apply(POLICY)
    assert world.dig("default/mediabot", "a.github.com").ips == ["198.51.100.30"]
    assert agent_fqdn_ips(node) == {"198.51.100.30": ["a.github.com."]}
    # Restarted, the proxy restores its cache and still releases the IP when its TTL runs out.
    dnsproxy.stop()
    dnsproxy.start()
    eventually(lambda: agent_fqdn_ips(node) == {}, 15, "a.github.com released by the restarted proxy")
    # A proxy that lost its cache file releases what the agent holds and it does not know.
    assert world.dig("default/mediabot", "b.github.com").ips == ["198.51.100.31"]
    dnsproxy.stop()
    (node.state_dir / node.name / "dnsproxy-cache.json").unlink()
    dnsproxy.start()
    eventually(lambda: agent_fqdn_ips(node) == {}, 15, "b.github.com released although the cache was lost")


def test_an_answer_waits_for_the_datapath_no_longer_than_the_deadline(
    node: Node, internet: Internet, world: DNSWorld, dnsproxy: DNSProxyProcess
) -> None:
    import os
    import signal

    node.add("mediabot", {"class": "mediabot"})
    internet.serve("tcp-echo", "198.51.100.11", 443)
    node.apply(POLICY)
    assert world.dig("default/mediabot", "api.github.com").ips == ["198.51.100.10"]  # rules cached
    before = dnsproxy.metric("cilia_dnsproxy_fqdn_deadline_exceeded_total")
    pid = node.agent._proc.pid if node.agent._proc else 0
    os.kill(pid, signal.SIGSTOP)  # the agent hangs: allow_fqdn gets no answer
    try:
        started = time.monotonic()
        answer = world.dig("default/mediabot", "support.github.com", tries=1, timeout=3)
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert answer.ips == ["198.51.100.11"] and took < 1.0  # released after ~0.1 s, not held
    assert dnsproxy.metric("cilia_dnsproxy_fqdn_deadline_exceeded_total") == before + 1
    # The update was not lost: once the agent runs again, the IP opens.
    eventually(lambda: reach(node, "default/mediabot", "198.51.100.11", 443), 10, "support.github.com open")
