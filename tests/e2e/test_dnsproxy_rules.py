"""DNS rules and toFQDNs semantics on real packets: what is refused never reaches the server, the
server's own policy sees the pod, names open only what a selector names, and only once resolved."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import Internet, Node, eventually
from dns_harness import DNSProxyProcess, DNSWorld, reach
from test_dnsproxy_scenarios import dns_lines

from cilia.cli.main import cli, register
from cilia.flows import Flow

register()


@pytest.fixture
def world(node: Node, internet: Internet, dnsproxy: DNSProxyProcess, tmp_path: Path) -> Iterator[DNSWorld]:
    w = DNSWorld(node, internet, tmp_path)
    try:
        yield w
    finally:
        w.close()


def dns_policy(selector: str, rules: str, extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: dns}}
        spec:
          endpointSelector: {{matchLabels: {selector}}}
          egress:
          - toEndpoints: [{{matchLabels: {{"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}}}}]
            toPorts:
            - ports: [{{port: "53", protocol: ANY}}]
              rules: {{dns: {rules}}}
        """
    ) + textwrap.indent(textwrap.dedent(extra), "  ")


CLUSTER = {
    "db.svc.cluster.local.": {"A": ["10.96.0.20"], "ttl": 10},
    "reviews.default.svc.cluster.local.": {"A": ["10.96.179.42"], "ttl": 10},
}


def test_a_dns_rule_lets_its_names_through_and_refuses_the_rest_over_udp_and_tcp(
    node: Node, world: DNSWorld, dnsproxy: DNSProxyProcess
) -> None:
    node.add("productpage", {"app": "productpage"})
    world.set_cluster_zone(CLUSTER)
    node.apply(dns_policy("{app: productpage}", '[{matchPattern: "*.svc.cluster.local"}]'))
    pod = "default/productpage"
    for tcp in (False, True):
        ok = world.dig(pod, "db.svc.cluster.local", tcp=tcp)
        assert (ok.status, ok.ips) == ("NOERROR", ["10.96.0.20"]), ok.raw
        # `*` never crosses a dot (Cilium's matchPattern): a two-label prefix is refused ...
        assert world.dig(pod, "reviews.default.svc.cluster.local", tcp=tcp).status == "REFUSED"
        refused = world.dig(pod, "cnn.com", tcp=tcp)
        assert (refused.status, refused.ips) == ("REFUSED", [])
    # ... `**.` does (one or more labels).
    node.apply(dns_policy("{app: productpage}", '[{matchPattern: "**.svc.cluster.local"}]'))
    assert world.dig(pod, "reviews.default.svc.cluster.local").ips == ["10.96.179.42"]
    # Refused queries were never forwarded: kube-dns saw only the allowed ones.
    seen = {q[1] for q in world.queries(world.coredns_log)}
    assert seen == {"db.svc.cluster.local.", "reviews.default.svc.cluster.local."}
    eventually(lambda: any("DROPPED (DNS Query cnn.com. A)" in line for line in dns_lines(node, pod)))
    assert dnsproxy.metric("cilia_dnsproxy_queries_total", verdict="denied", protocol="TCP") == 2
    assert dnsproxy.metric("cilia_dnsproxy_queries_total", verdict="denied", protocol="UDP") == 2


def test_the_reject_response_can_be_nxdomain(
    node: Node, world: DNSWorld, dnsproxy: DNSProxyProcess, tmp_path: Path
) -> None:
    node.add("productpage", {"app": "productpage"})
    node.apply(dns_policy("{app: productpage}", "[{matchName: ifconfig.me}]"))
    assert world.dig("default/productpage", "cnn.com").status == "REFUSED"
    dnsproxy.stop()
    nx = DNSProxyProcess(node, tmp_path, CILIA_TOFQDNS_DNS_REJECT_RESPONSE_CODE="nameError")
    nx.start()
    try:
        assert world.dig("default/productpage", "cnn.com").status == "NXDOMAIN"
        assert world.dig("default/productpage", "ifconfig.me").ips == ["198.51.100.44"]
    finally:
        nx.stop()


def test_the_dns_servers_ingress_policy_sees_the_pod_not_the_node(node: Node, world: DNSWorld) -> None:
    bot = node.add("mediabot", {"org": "empire", "class": "mediabot"})
    spy = node.add("spy", {"org": "alliance", "class": "mediabot"})
    node.apply(dns_policy("{class: mediabot}", '[{matchPattern: "*"}]'))
    node.apply(
        textwrap.dedent(
            """
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {name: kube-dns-ingress, namespace: kube-system}
            spec:
              endpointSelector: {matchLabels: {k8s-app: kube-dns}}
              ingress:
              - fromEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": default, org: empire}}]
                toPorts: [{ports: [{port: "53", protocol: ANY}]}]
            """
        )
    )
    assert world.dig("default/mediabot", "api.github.com").ips == ["198.51.100.10"]
    # The spy's query is allowed by its own DNS rules, forwarded with its identity in the mark,
    # and dropped by kube-dns's ingress policy: the proxy answers SERVFAIL after its timeout.
    assert world.dig("default/spy", "api.github.com", tries=1, timeout=4).status == "SERVFAIL"

    def dropped_from_spy() -> bool:
        for raw in node.flows():
            f = Flow.model_validate(raw)
            if (
                f.verdict == "DROPPED"
                and f.source is not None
                and f.source.identity == spy["identity"]
                and f.destination is not None
                and f.destination.pod_name == "coredns"
            ):
                return True
        return False

    eventually(dropped_from_spy, what="kube-dns's ingress policy dropping the spy's identity")
    assert bot["identity"] != spy["identity"]


FQDN_POLICY = """
- toFQDNs: [{matchName: api.github.com}, {matchPattern: "*.test"}]
  toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""


def test_names_open_only_what_a_selector_names_and_only_once_resolved(
    node: Node, internet: Internet, world: DNSWorld, dnsproxy: DNSProxyProcess
) -> None:
    node.add("mediabot", {"class": "mediabot"})
    node.add("other", {"class": "mediabot"})
    world.set_zone(
        {
            **world.records,
            "api.github.com.": {"A": ["198.51.100.10"], "ttl": 30},
            "evil.github.com.": {"A": ["198.51.100.10"], "ttl": 30},  # shares api's IP
            "shop.github.com.": {"A": ["198.51.100.14"], "ttl": 30},
            "never.test.": {"A": ["198.51.100.13"], "ttl": 30},
        }
    )
    for ip in ("198.51.100.10", "198.51.100.13", "198.51.100.14"):
        internet.serve("tcp-echo", ip, 443)
    node.apply(dns_policy("{class: mediabot}", '[{matchPattern: "*"}]', FQDN_POLICY))
    bot, other = "default/mediabot", "default/other"
    # Resolving a name no selector names opens nothing, even though the query is allowed.
    assert world.dig(bot, "evil.github.com").ips == ["198.51.100.10"]
    assert world.dig(bot, "shop.github.com").ips == ["198.51.100.14"]
    assert not reach(node, bot, "198.51.100.10", 443)
    assert not reach(node, bot, "198.51.100.14", 443)
    # A name selected but never resolved through the proxy opens nothing either.
    assert not reach(node, bot, "198.51.100.13", 443)
    # Resolving api.github.com opens its IP, for every endpoint whose selectors name it (the
    # node's cache feeds all endpoints), and at L3 for evil.github.com too, which shares the IP
    # (Cilium #31803: the datapath sees addresses, not names).
    assert world.dig(bot, "api.github.com").ips == ["198.51.100.10"]
    assert reach(node, bot, "198.51.100.10", 443)
    assert reach(node, other, "198.51.100.10", 443)
    assert not reach(node, bot, "198.51.100.14", 443)
    # The cache lists names, IPs, TTLs and the selectors that matched.
    rows = {(r["fqdn"], tuple(r["ips"])): r for r in dnsproxy.cache(endpoint="default/mediabot")}
    assert rows[("api.github.com.", ("198.51.100.10",))]["selectors"] == ["matchName: api.github.com"]
    assert rows[("evil.github.com.", ("198.51.100.10",))]["selectors"] == []
    # ... and so does `cilia fqdn cache list`.
    result = CliRunner().invoke(
        cli,
        [
            "--dnsproxy-url",
            dnsproxy.url,
            "--token",
            node.token,
            "fqdn",
            "cache",
            "list",
            "-e",
            "default/mediabot",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "Endpoint",
        "Pod",
        "Source",
        "FQDN",
        "TTL",
        "ExpirationTime",
        "IPs",
        "Selectors",
    ]
    api = next(line.split() for line in lines if " api.github.com. " in line)
    assert api[1:4] == ["default/mediabot", "lookup", "api.github.com."] and api[6:] == [
        "198.51.100.10",
        "matchName:",
        "api.github.com",
    ]
    assert not any("other" in line for line in lines[1:])  # only that endpoint's rows
