"""DNS verdicts judged in the proxy from the agent's `dns_policy` answer agree with the agent's own
`check` (the engine's decide): the same rules, the same reasons, for every query and port."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from cilia.models.loader import parse_document
from cilia.policy.engine import PolicyEngine
from cilia.policy.l7 import DNSQuery
from cilia.policy.repository import Repository
from services.datapath.agent import Agent, EndpointRecord
from services.dnsproxy.policy import DNSPolicy

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules: {dns: [{matchPattern: "*.svc.cluster.local"}, {matchName: api.github.com}]}
  - toFQDNs: [{matchPattern: "*.github.com"}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns2, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}}]
    toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules: {dns: [{matchName: ifconfig.me}]}
  - toCIDR: [198.51.100.53/32]
    toPorts:
    - ports: [{port: "5353", protocol: UDP}]
      rules: {dns: [{matchPattern: "*"}]}
"""


def record(ns: str, name: str, ip: str, labels: dict[str, str], ep_id: int, identity: int) -> EndpointRecord:
    return EndpointRecord(
        namespace=ns,
        name=name,
        labels=labels,
        ip=ip,
        ep_id=ep_id,
        identity=identity,
        identity_labels=[f"k8s:{k}={v}" for k, v in labels.items()],
        node="n1",
        network={},
    )


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    async def allocate(_labels: list[str]) -> int:
        raise AssertionError("not used")

    a = Agent("n1", tmp_path / "pins", tmp_path / "state", IPv4Network("10.0.0.0/24"), allocate)
    for rec in (
        record("default", "client", "10.0.0.2", {"app": "client"}, 1, 3001),
        record("default", "other", "10.0.0.3", {"app": "other"}, 2, 3002),
        record("kube-system", "coredns", "10.0.0.10", {"k8s-app": "kube-dns"}, 3, 3003),
    ):
        a.state.endpoints[rec.key] = rec
        a.cluster[f"{rec.key}@n1"] = rec.workload()
    a.repo = Repository()
    a.repo.apply([parse_document(d) for d in yaml.safe_load_all(POLICY)])  # type: ignore[misc]
    a.engine = PolicyEngine(a.inventory(), a.options, a.repo)
    a.engine.compute_all()
    a.policies_synced = True
    return a


CASES = [
    ("10.0.0.2", "10.0.0.10", 53, 17, "reviews.default.svc.cluster.local."),
    ("10.0.0.2", "10.0.0.10", 53, 6, "reviews.default.svc.cluster.local."),
    ("10.0.0.2", "10.0.0.10", 53, 17, "api.github.com."),
    ("10.0.0.2", "10.0.0.10", 53, 17, "API.GitHub.com."),
    ("10.0.0.2", "10.0.0.10", 53, 17, "support.github.com."),
    ("10.0.0.2", "10.0.0.10", 53, 17, "ifconfig.me."),  # only dns2, UDP
    ("10.0.0.2", "10.0.0.10", 53, 6, "ifconfig.me."),
    ("10.0.0.2", "10.0.0.10", 53, 17, "svc.cluster.local."),  # `*.` needs a label
    ("10.0.0.2", "198.51.100.53", 5353, 17, "anything.test."),
    ("10.0.0.2", "198.51.100.53", 53, 17, "anything.test."),
    ("10.0.0.2", "10.0.0.10", 53, 17, "api\\.github.com."),
]


@pytest.mark.parametrize(("src", "dst", "port", "proto", "name"), CASES)
def test_the_proxys_verdict_is_the_agents(
    agent: Agent, src: str, dst: str, port: int, proto: int, name: str
) -> None:
    doc = json.loads(json.dumps(agent.dns_policy(src, dst)))  # as it crosses the socket
    policy = DNSPolicy.from_json(doc)
    expected = agent.check_l7(src, dst, port, proto, DNSQuery(name))
    got = policy.judge(proto, port, name.lower())
    if expected["checks"]:
        assert got == (expected["allowed"], expected["reason"])
    else:  # the agent would not have redirected it: the proxy, asked anyway, refuses
        assert got[0] is False


def test_the_answer_names_both_peers_and_the_node_selectors(agent: Agent) -> None:
    doc = agent.dns_policy("10.0.0.2", "10.0.0.10")
    assert doc["ready"] is True and doc["enforced"] is True
    assert doc["src"]["pod_name"] == "client" and doc["src"]["id"] == 1
    assert doc["dst"] == {
        "ip": "10.0.0.10",
        "identity": 3003,
        "labels": ["k8s:k8s-app=kube-dns"],
        "id": 3,
        "namespace": "kube-system",
        "pod_name": "coredns",
    }
    assert doc["fqdn_selectors"] == [{"matchPattern": "*.github.com"}]
    sel = DNSPolicy.from_json(doc).selectors
    assert sel.matching("api.github.com.") == ("matchPattern: *.github.com",)
    assert sel.matching("github.com.") == ()


def test_an_unknown_source_is_refused(agent: Agent) -> None:
    policy = DNSPolicy.from_json(agent.dns_policy("10.0.0.99", "10.0.0.10"))
    assert policy.judge(17, 53, "api.github.com.") == (False, "the source is not an endpoint of this node")


def test_a_pod_without_egress_policy_is_not_judged(agent: Agent) -> None:
    policy = DNSPolicy.from_json(agent.dns_policy("10.0.0.3", "10.0.0.10"))
    assert policy.judge(17, 53, "anything.test.") == (True, "egress not enforced")


def test_the_agent_is_not_ready_before_its_first_policy_snapshot(tmp_path: Path) -> None:
    async def allocate(_labels: list[str]) -> int:
        return 0

    a = Agent("n1", tmp_path / "pins", tmp_path / "state", IPv4Network("10.0.0.0/24"), allocate)
    doc: dict[str, Any] = a.dns_policy("10.0.0.2", "10.0.0.10")
    assert doc["ready"] is False and doc["src"] is None


def test_fqdn_ips_learned_before_the_first_policy_wait_for_it(tmp_path: Path) -> None:
    async def allocate(_labels: list[str]) -> int:
        return 0

    a = Agent("n1", tmp_path / "pins", tmp_path / "state", IPv4Network("10.0.0.0/24"), allocate)
    asyncio.run(a.allow_fqdn_ips({"198.51.100.10": ["api.github.com"]}))
    assert a.fqdn_ips() == {"198.51.100.10": ["api.github.com."]}
    saved = json.loads(a.ipcache_file.read_text())
    assert saved["fqdn"] == {"198.51.100.10/32": ["api.github.com."]}
    b = Agent("n1", tmp_path / "pins", tmp_path / "state", IPv4Network("10.0.0.0/24"), allocate)
    b._restore_ipcache()
    assert b.fqdn_ips() == {"198.51.100.10": ["api.github.com."]}
    b.engine = PolicyEngine(b.inventory(), b.options, Repository(), previous=b._restored_ipcache)
    num = b.engine.ipcache.lookup(__import__("ipaddress").ip_address("198.51.100.10"))
    assert num == saved["prefixes"]["198.51.100.10/32"]  # the same identity number as before
