"""The DNS proxy on real packets: the mediabot guide and BookInfo's internet egress step, with `dig`
and `curl` from pod namespaces against a kube-dns pod, through the datapath's redirect."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import Internet, Node, eventually
from dns_harness import AUTHORITY, DNSProxyProcess, DNSWorld, reach
from test_datapath_endpoints import cilia

from cilia.flows import Flow, format_line

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def steps(name: str) -> list[dict]:
    return list(yaml.safe_load((EXAMPLES / name).read_text())["steps"])


@pytest.fixture
def world(node: Node, internet: Internet, dnsproxy: DNSProxyProcess, tmp_path: Path) -> Iterator[DNSWorld]:
    w = DNSWorld(node, internet, tmp_path)
    try:
        yield w
    finally:
        w.close()


def dns_lines(node: Node, pod: str) -> list[str]:
    """`cilia observe --protocol dns` lines of a pod, timestamps and source ports masked."""
    out = []
    for raw in node.flows():
        flow = Flow.model_validate(raw)
        if flow.l7 is None or flow.l7.dns is None:
            continue
        line = format_line(flow)
        if pod not in line:
            continue
        line = re.sub(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d\.\d{3}: ", "", line)
        out.append(re.sub(rf"({re.escape(pod)}):\d+", r"\1:PORT", line))
    return out


def test_mediabot_reaches_only_the_github_names_its_policy_allows(
    node: Node, internet: Internet, world: DNSWorld, dnsproxy: DNSProxyProcess
) -> None:
    bot = node.add("mediabot", {"org": "empire", "class": "mediabot"})
    for ip in ("198.51.100.10", "198.51.100.11", "198.51.100.12"):
        internet.serve("tcp-echo", ip, 443)
        internet.serve("tcp-echo", ip, 80)
    pod = "default/mediabot"
    step1, step2, step3 = steps("mediabot-dns.yaml")

    # Step 1, matchName api.github.com: only that name opens, and only once resolved.
    node.apply(yaml.safe_dump_all(step1["apply"]))
    assert not reach(node, pod, "198.51.100.10", 443)
    answer = world.dig(pod, "api.github.com")
    assert answer.status == "NOERROR" and answer.ips == ["198.51.100.10"]
    assert reach(node, pod, "198.51.100.10", 443)  # at once: the answer waited for the datapath
    support = world.dig(pod, "support.github.com")  # the DNS rule (`*`) lets the query through...
    assert support.status == "NOERROR" and support.ips == ["198.51.100.11"]
    assert not reach(node, pod, "198.51.100.11", 443)  # ... but toFQDNs does not select the name
    ident, dns_ident = bot["identity"], world.coredns["identity"]
    peers = f"default/mediabot:PORT (ID:{ident}) {{}} kube-system/coredns:53 (ID:{dns_ident})"
    eventually(lambda: len(dns_lines(node, "default/mediabot")) >= 4, what="the DNS flows")
    assert dns_lines(node, "default/mediabot")[:4] == [
        f"{peers.format('->')} dns-request proxy FORWARDED (DNS Query api.github.com. A)",
        f'{peers.format("<-")} dns-response proxy FORWARDED (DNS Answer "198.51.100.10" TTL: 30 (Proxy api.github.com. A))',
        f"{peers.format('->')} dns-request proxy FORWARDED (DNS Query support.github.com. A)",
        f'{peers.format("<-")} dns-response proxy FORWARDED (DNS Answer "198.51.100.11" TTL: 30 (Proxy support.github.com. A))',
    ]

    # `cilia observe --protocol dns` (from the flow stream the agent publishes the proxy's flows to).
    def observed() -> list[str]:
        out = cilia(node, "observe", "--last", "100", "--protocol", "dns", "--pod", "default/mediabot")
        assert out.returncode == 0, out.stderr
        return [
            re.sub(r"default/mediabot:\d+", "default/mediabot:PORT", line) for line in out.stdout.splitlines()
        ]

    want = f"{peers.format('->')} dns-request proxy FORWARDED (DNS Query api.github.com. A)"
    eventually(
        lambda: any(line.endswith(want) for line in observed()), what="the DNS flows in `cilia observe`"
    )

    # Step 2, matchPattern *.github.com: support opens too, github.com does not.
    node.apply(yaml.safe_dump_all(step2["apply"]))
    assert world.dig(pod, "support.github.com").ips == ["198.51.100.11"]
    assert reach(node, pod, "198.51.100.11", 443)
    assert world.dig(pod, "github.com").ips == ["198.51.100.12"]
    assert not reach(node, pod, "198.51.100.12", 443)

    # Step 3, names and port 443 only.
    node.apply(yaml.safe_dump_all(step3["apply"]))
    assert world.dig(pod, "github.com").ips == ["198.51.100.12"]
    assert reach(node, pod, "198.51.100.12", 443)
    assert reach(node, pod, "198.51.100.10", 443)
    assert not reach(node, pod, "198.51.100.11", 80)
    # curl through the pod's own resolver (libc asks A and AAAA of the kube-dns pod).
    done = world.curl(pod, "telnet://api.github.com:443", timeout=2)
    assert done.returncode in (0, 28), done.stderr  # connected (the echo server never closes)
    assert "Could not resolve" not in done.stderr


def test_bookinfo_internal_client_reaches_only_ifconfig_me(
    node: Node, internet: Internet, world: DNSWorld
) -> None:
    node.add("internal-client", {"app": "internal-client"})
    node.add("productpage-v1", {"app": "productpage", "version": "v1"})
    node.serve("default/productpage-v1", "tcp-echo", 9080)
    internet.serve("http", "198.51.100.44", 80)
    internet.serve("http", "198.51.100.5", 80)
    step4 = steps("bookinfo.yaml")[3]
    node.apply(yaml.safe_dump_all(step4["apply"]))
    pod = "default/internal-client"
    assert world.dig(pod, "ifconfig.me").ips == ["198.51.100.44"]
    assert world.curl(pod, "http://ifconfig.me/").stdout == "200"
    cnn = world.curl(pod, "http://cnn.com/", timeout=1)
    assert cnn.stdout != "200"  # resolved (the DNS rule is `*`), but nothing selects cnn.com
    assert not reach(node, pod, "198.51.100.5", 80)
    assert not reach(node, pod, node.ip("default/productpage-v1"), 9080)
    # The authoritative server saw the pod's queries, forwarded by kube-dns (never the proxy's own).
    names = {q[1] for q in world.queries(world.authority_log)}
    assert {"ifconfig.me.", "cnn.com."} <= names
    assert all(q[0] == world.coredns_ip for q in world.queries(world.authority_log))
    assert AUTHORITY
