"""Hypothesis strategies: random but valid policies, pods, peers and packets for the engine tests."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import strategies as st

from cilia.policy.context import Peer, entity_peer, world_peer
from cilia.policy.inventory import Inventory, ServiceInfo, Workload

APPS = ["a", "b", "c"]
TIERS = ["x", "y"]
NAMESPACES = ["default", "other"]
PORTS = [53, 80, 443, 8080, 9000]
PREFIXES = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "198.51.100.0/24", "198.51.100.10/32", "0.0.0.0/0"]
OUTSIDE_IPS = ["10.1.2.3", "10.1.9.9", "10.200.0.1", "198.51.100.10", "198.51.100.77", "203.0.113.5"]
NAMES = ["api.github.com", "github.com", "a.b.github.com", "example.org", "www.example.org"]
ENTITIES = [
    "all",
    "world",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "health",
    "none",
    "world-ipv4",
]


def inventory() -> Inventory:
    """Six pods over two namespaces, named ports, one service; namespace labels for selectors."""
    pods = []
    n = 0
    for ns in NAMESPACES:
        for app in APPS:
            tier = TIERS[n % 2]
            ports = {"http": (8080 if app == "a" else 80, 6), "dns": (53, 17)}
            pods.append(
                Workload(
                    ns,
                    f"{app}-{ns}",
                    {"app": app, "tier": tier},
                    ipaddress.ip_address(f"10.244.0.{n + 10}"),
                    ports,
                )
            )
            n += 1
    services = [ServiceInfo("default", "svc-a", {"kind": "web"}, {"app": "a"})]
    return Inventory(pods, {"default": {"team": "core"}, "other": {"team": "edge"}}, services)


labels_st = st.one_of(
    st.just({}),
    st.builds(lambda v: {"app": v}, st.sampled_from(APPS)),
    st.builds(lambda v: {"tier": v}, st.sampled_from(TIERS)),
    st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(APPS + TIERS), max_size=2),
)


@st.composite
def selector(draw: Any, allow_ns: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ml = draw(labels_st)
    if ml:
        out["matchLabels"] = dict(ml)
    if draw(st.integers(0, 3)) == 0:
        op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
        key = draw(st.sampled_from(["app", "tier", "k8s:app"]))
        expr: dict[str, Any] = {"key": key, "operator": op}
        if op in ("In", "NotIn"):
            expr["values"] = draw(st.lists(st.sampled_from(APPS + TIERS), min_size=1, max_size=2))
        out["matchExpressions"] = [expr]
    if allow_ns and draw(st.integers(0, 4)) == 0:
        out.setdefault("matchLabels", {})["k8s:io.kubernetes.pod.namespace"] = draw(
            st.sampled_from(NAMESPACES)
        )
    if allow_ns and draw(st.integers(0, 6)) == 0:
        out.setdefault("matchLabels", {})["io.cilium.k8s.namespace.labels.team"] = draw(
            st.sampled_from(["core", "edge"])
        )
    return out


@st.composite
def port_rule(draw: Any, egress: bool, deny: bool, focus: str = "mixed") -> dict[str, Any]:
    if focus == "l7" and not deny:
        if egress and draw(st.booleans()):
            return {
                "ports": [{"port": "53", "protocol": draw(st.sampled_from(["UDP", "ANY"]))}],
                "rules": {"dns": draw(st.lists(dns_rule(), min_size=1, max_size=2))},
            }
        if draw(st.integers(0, 3)) == 0:
            return {"ports": [{"port": "80", "protocol": "TCP"}]}
        return {
            "ports": [{"port": "80", "protocol": "TCP"}],
            "rules": {"http": draw(st.lists(http_rule(), min_size=1, max_size=2))},
        }
    kind = draw(st.sampled_from(["num", "num", "num", "range", "named", "zero"]))
    proto = draw(st.sampled_from(["TCP", "UDP", "SCTP", "ANY", "TCP"]))
    port: dict[str, Any]
    if kind == "num":
        port = {"port": str(draw(st.sampled_from(PORTS))), "protocol": proto}
    elif kind == "range":
        lo = draw(st.sampled_from([50, 79, 80, 440, 8000]))
        port = {"port": str(lo), "endPort": lo + draw(st.sampled_from([1, 5, 100, 1500])), "protocol": proto}
    elif kind == "named":
        port = {"port": draw(st.sampled_from(["http", "dns"])), "protocol": proto}
    else:
        port = {"port": "0", "protocol": proto}
    ports = [port]
    if draw(st.integers(0, 3)) == 0:
        ports.append(
            {"port": str(draw(st.sampled_from(PORTS))), "protocol": draw(st.sampled_from(["TCP", "UDP"]))}
        )
    rule: dict[str, Any] = {"ports": ports}
    if deny:
        return rule
    single = len(ports) == 1 and kind in ("num", "named")
    if single and proto == "TCP" and draw(st.booleans()):
        rule["rules"] = {"http": draw(st.lists(http_rule(), min_size=1, max_size=2))}
    elif egress and single and kind == "num" and draw(st.booleans()):
        rule["rules"] = {"dns": draw(st.lists(dns_rule(), min_size=1, max_size=2))}
    return rule


@st.composite
def http_rule(draw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["method"] = draw(st.sampled_from(["GET", "POST", "GET|PUT"]))
    if draw(st.booleans()):
        out["path"] = draw(st.sampled_from(["/public/.*", "/v1/request-landing", "/"]))
    if draw(st.integers(0, 3)) == 0:
        out["headers"] = [draw(st.sampled_from(["X-Token", "X-Token: yes"]))]
    return out


@st.composite
def dns_rule(draw: Any) -> dict[str, Any]:
    if draw(st.booleans()):
        return {"matchName": draw(st.sampled_from(NAMES))}
    return {"matchPattern": draw(st.sampled_from(["*", "*.github.com", "*.example.org", "**.github.com"]))}


@st.composite
def rule_element(draw: Any, egress: bool, deny: bool, focus: str = "mixed") -> dict[str, Any]:
    prefix = "to" if egress else "from"
    kinds = [
        "Endpoints",
        "Endpoints",
        "Endpoints",
        "CIDR",
        "CIDRSet",
        "Entities",
        "Entities",
        "none",
        "none",
        "empty",
    ]
    if egress and not deny:
        kinds.append("FQDNs")
    if egress:
        kinds.append("Services")
    kind = draw(st.sampled_from(kinds))
    el: dict[str, Any] = {}
    if kind == "Endpoints":
        el[f"{prefix}Endpoints"] = draw(st.lists(st.one_of(st.just({}), selector()), min_size=1, max_size=2))
    elif kind == "CIDR":
        el[f"{prefix}CIDR"] = draw(st.lists(st.sampled_from(PREFIXES), min_size=1, max_size=2))
    elif kind == "CIDRSet":
        cidr = draw(st.sampled_from(["10.0.0.0/8", "198.51.100.0/24", "0.0.0.0/0"]))
        excepts = {
            "10.0.0.0/8": ["10.1.0.0/16", "10.1.2.0/24"],
            "198.51.100.0/24": ["198.51.100.10/32"],
            "0.0.0.0/0": ["10.0.0.0/8"],
        }[cidr]
        el[f"{prefix}CIDRSet"] = [
            {"cidr": cidr, "except": draw(st.lists(st.sampled_from(excepts), max_size=1))}
        ]
    elif kind == "Entities":
        el[f"{prefix}Entities"] = draw(st.lists(st.sampled_from(ENTITIES), min_size=1, max_size=2))
    elif kind == "FQDNs":
        el["toFQDNs"] = [draw(dns_rule())]
    elif kind == "Services":
        el["toServices"] = [{"k8sService": {"serviceName": "svc-a", "namespace": "default"}}]
    elif kind == "empty":
        el[f"{prefix}Endpoints"] = []
    l4 = draw(
        st.sampled_from(
            ["ports", "ports", "none", "icmp"] if focus != "l7" else ["ports", "ports", "ports", "none"]
        )
    )
    if l4 == "ports":
        el["toPorts"] = draw(st.lists(port_rule(egress, deny, focus), min_size=1, max_size=2))
    elif l4 == "icmp":
        el["icmps"] = [{"fields": [{"type": draw(st.sampled_from([0, 8, "EchoRequest"]))}]}]
    return el


@st.composite
def cnp(draw: Any, index: int, focus: str = "mixed") -> dict[str, Any]:
    clusterwide = draw(st.integers(0, 3)) == 0
    spec: dict[str, Any] = {"endpointSelector": draw(selector(allow_ns=clusterwide))}
    for section, egress, deny in (
        ("ingress", False, False),
        ("egress", True, False),
        ("ingressDeny", False, True),
        ("egressDeny", True, True),
    ):
        weight = 1 if not deny or focus == "deny" else 3
        if draw(st.integers(0, weight)) == 0:
            spec[section] = draw(
                st.lists(rule_element(egress, deny, focus), min_size=0 if focus == "mixed" else 1, max_size=2)
            )
    if not any(spec.get(k) for k in ("ingress", "egress", "ingressDeny", "egressDeny")):
        spec["ingress"] = [draw(rule_element(False, False, focus))]
    if draw(st.integers(0, 5)) == 0:
        spec["enableDefaultDeny"] = {"ingress": draw(st.booleans()), "egress": draw(st.booleans())}
    meta: dict[str, Any] = {"name": f"p{index}"}
    if clusterwide:
        return {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": meta,
            "spec": spec,
        }
    meta["namespace"] = draw(st.sampled_from(NAMESPACES))
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": meta, "spec": spec}


@st.composite
def netpol(draw: Any, index: int) -> dict[str, Any]:
    def peer() -> dict[str, Any]:
        kind = draw(st.sampled_from(["pod", "ns", "both", "ip"]))
        if kind == "ip":
            return {
                "ipBlock": {
                    "cidr": "10.0.0.0/8",
                    "except": draw(st.lists(st.just("10.1.0.0/16"), max_size=1)),
                }
            }
        p: dict[str, Any] = {}
        if kind in ("pod", "both"):
            p["podSelector"] = {"matchLabels": dict(draw(labels_st))}
        if kind in ("ns", "both"):
            p["namespaceSelector"] = (
                {"matchLabels": {"team": draw(st.sampled_from(["core", "edge"]))}}
                if draw(st.booleans())
                else {}
            )
        return p

    def rule() -> dict[str, Any]:
        r: dict[str, Any] = {}
        if draw(st.booleans()):
            r["from" if direction == "ingress" else "to"] = [peer() for _ in range(draw(st.integers(1, 2)))]
        if draw(st.booleans()):
            r["ports"] = [
                {
                    "protocol": draw(st.sampled_from(["TCP", "UDP"])),
                    "port": draw(st.sampled_from([80, 53, "http"])),
                }
            ]
        return r

    spec: dict[str, Any] = {"podSelector": {"matchLabels": dict(draw(labels_st))}}
    for direction in ("ingress", "egress"):
        if draw(st.booleans()):
            spec[direction] = [rule() for _ in range(draw(st.integers(0, 2)))]
    if draw(st.booleans()):
        spec["policyTypes"] = draw(st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"np{index}", "namespace": draw(st.sampled_from(NAMESPACES))},
        "spec": spec,
    }


@st.composite
def policies(draw: Any, max_size: int = 5, focus: str = "mixed") -> list[dict[str, Any]]:
    n = draw(st.integers(1, max_size))
    if focus != "mixed":
        return [draw(cnp(i, focus)) for i in range(n)]
    return [draw(netpol(i)) if draw(st.integers(0, 4)) == 0 else draw(cnp(i)) for i in range(n)]


def mentioned_ports(docs: list[dict[str, Any]]) -> list[int]:
    """Port numbers the policies name (and their neighbours), to aim packets where rules apply."""
    out: set[int] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("port", "endPort") and (isinstance(v, int) or (isinstance(v, str) and v.isdigit())):
                    out.update({int(v), int(v) + 1})
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(docs)
    out.discard(0)
    return sorted(p for p in out if p <= 65535)


@st.composite
def peer(draw: Any, inv: Inventory) -> Peer:
    from cilia.policy.context import endpoint_peer

    kind = draw(st.sampled_from(["pod", "pod", "pod", "pod", "world", "world", "entity"]))
    if kind == "pod":
        return endpoint_peer(inv, draw(st.sampled_from(sorted(inv.workloads.values(), key=lambda w: w.key))))
    if kind == "world":
        ip = ipaddress.ip_address(draw(st.sampled_from(OUTSIDE_IPS)))
        names = draw(st.lists(st.sampled_from(NAMES), max_size=1))
        return world_peer(ip, names)
    return entity_peer(
        inv, draw(st.sampled_from(["host", "remote-node", "world", "kube-apiserver", "health"]))
    )


@st.composite
def packet(draw: Any, ports: list[int] | None = None, focus: str = "mixed") -> tuple[int, str, Any]:
    from cilia.policy.l7 import DNSQuery, HTTPRequest

    if focus == "l7":
        if draw(st.booleans()):
            return 53, "UDP", DNSQuery(draw(st.sampled_from(NAMES)))
        req = HTTPRequest(
            draw(st.sampled_from(["GET", "POST", "PUT"])),
            draw(st.sampled_from(["/public/x", "/v1/request-landing", "/", "/private"])),
            headers=draw(st.sampled_from([{}, {"X-Token": "yes"}, {"X-Token": "no"}])),
        )
        return 80, "TCP", req
    proto = draw(st.sampled_from(["TCP", "TCP", "UDP", "SCTP", "ICMP"]))
    candidates = [*PORTS, 81, 5000, 8090, *((ports or []) * 4)]
    port = draw(st.sampled_from([0, 8])) if proto == "ICMP" else draw(st.sampled_from(candidates))
    l7: Any = None
    choice = draw(st.integers(0, 2))
    if choice == 1:
        l7 = HTTPRequest(
            draw(st.sampled_from(["GET", "POST", "PUT"])),
            draw(st.sampled_from(["/public/x", "/v1/request-landing", "/", "/private"])),
            headers=draw(st.sampled_from([{}, {"X-Token": "yes"}, {"X-Token": "no"}])),
        )
    elif choice == 2:
        l7 = DNSQuery(draw(st.sampled_from(NAMES)))
    return port, proto, l7
