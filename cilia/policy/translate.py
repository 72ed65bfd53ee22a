"""Compile policy resources (CNP, CCNP, NetworkPolicy) into the engine's `CompiledRule`s.

This is where Cilium's parsing rules live: a namespaced policy selects only endpoints of its
namespace and its peer selectors stay in it unless they name the namespace label; entities become
reserved-label selectors; a NetworkPolicy peer's namespaceSelector becomes namespace-label keys.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from cilia.labels import (
    CLUSTER,
    DEFAULT_CLUSTER_NAME,
    NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE,
    SOURCE_ANY,
    SOURCE_K8S,
    SOURCE_RESERVED,
)
from cilia.models import cilium as cnp
from cilia.models import networking as knp
from cilia.models.meta import LabelSelector
from cilia.policy.l4 import PROTO_ANY, proto_number
from cilia.policy.l7 import DNSRule, HeaderMatch, HTTPRule, L7Rule
from cilia.policy.rules import (
    EGRESS,
    INGRESS,
    CIDRSelector,
    CompiledRule,
    Direction,
    FQDNSelector,
    PeerSelector,
    PolicyRef,
    PortRule,
    PortSpec,
    RuleEntry,
    ServiceRef,
)
from cilia.policy.selector import NOTHING, WILDCARD, EndpointSelector, Requirement

PolicyResource = cnp.CiliumNetworkPolicy | cnp.CiliumClusterwideNetworkPolicy | knp.NetworkPolicy

_NS_REQ = (SOURCE_K8S, POD_NAMESPACE)


def _reserved(name: str) -> EndpointSelector:
    return EndpointSelector((Requirement(SOURCE_RESERVED, name, "In", ("",)),))


ENTITY_SELECTORS: dict[str, tuple[EndpointSelector, ...]] = {
    "all": (WILDCARD,),
    "world": (_reserved("world"), _reserved("world-ipv4"), _reserved("world-ipv6")),
    "world-ipv4": (_reserved("world-ipv4"),),
    "world-ipv6": (_reserved("world-ipv6"),),
    "host": (_reserved("host"),),
    "remote-node": (_reserved("remote-node"),),
    "kube-apiserver": (_reserved("kube-apiserver"),),
    "init": (_reserved("init"),),
    "health": (_reserved("health"),),
    "unmanaged": (_reserved("unmanaged"),),
    "ingress": (_reserved("ingress"),),
    "none": (NOTHING,),
    "cluster": (
        _reserved("host"),
        _reserved("remote-node"),
        _reserved("init"),
        _reserved("ingress"),
        _reserved("health"),
        _reserved("unmanaged"),
        _reserved("kube-apiserver"),
        EndpointSelector((Requirement(SOURCE_K8S, CLUSTER, "In", (DEFAULT_CLUSTER_NAME,)),)),
    ),
}


def policy_ref(obj: PolicyResource) -> PolicyRef:
    namespace = "" if obj.kind == "CiliumClusterwideNetworkPolicy" else (obj.metadata.namespace or "default")
    return PolicyRef(obj.kind, namespace, obj.metadata.name or "")


def compile_policy(obj: PolicyResource) -> list[CompiledRule]:
    """Every rule of one policy resource, in document order."""
    if isinstance(obj, knp.NetworkPolicy):
        return [_compile_netpol(obj)]
    ref = policy_ref(obj)
    return [_compile_rule(ref, path, rule) for path, rule in obj.rules()]


# --- selectors ---------------------------------------------------------------------------------


def selector_from(ls: LabelSelector | None, key_prefix: str = "") -> EndpointSelector:
    """A label selector as an endpoint selector; `key_prefix` (e.g. `k8s:`) is added to bare keys."""
    if ls is None:
        return WILDCARD

    def key(k: str) -> str:
        return k if (not key_prefix or ":" in k) else key_prefix + k

    exprs = [(key(e.key), e.operator, tuple(e.values or ())) for e in ls.matchExpressions or []]
    return EndpointSelector.build({key(k): v for k, v in (ls.matchLabels or {}).items()}, exprs)


def _has_reserved(sel: EndpointSelector) -> bool:
    return any(r.source == SOURCE_RESERVED for r in sel.requirements)


def _mentions_namespace_labels(sel: EndpointSelector) -> bool:
    return any(
        r.source in (SOURCE_K8S, SOURCE_ANY) and r.key.startswith(NAMESPACE_LABELS_PREFIX)
        for r in sel.requirements
    )


def namespaced_peer(
    sel: EndpointSelector, namespace: str, subject_matches_init: bool = False
) -> EndpointSelector:
    """Cilium's `getEndpointSelector`: keep a peer selector inside the policy's namespace.

    A selector that names the namespace label (any operator), a namespace label
    (`io.cilium.k8s.namespace.labels.*`) or a reserved label is left as written. In a
    cluster-wide policy the selector is limited to pods (`io.kubernetes.pod.namespace` exists).
    """
    if sel.nothing or _has_reserved(sel) or sel.mentions_key(*_NS_REQ):
        return sel
    if namespace == "":
        if subject_matches_init:
            return sel
        return sel.with_requirement(Requirement(SOURCE_K8S, POD_NAMESPACE, "Exists"))
    if _mentions_namespace_labels(sel):
        return sel
    return sel.with_requirement(Requirement(SOURCE_K8S, POD_NAMESPACE, "In", (namespace,)))


def namespaced_subject(sel: EndpointSelector, namespace: str) -> EndpointSelector:
    """The subject of a namespaced policy always lives in that namespace (other namespace matches dropped)."""
    kept = tuple(
        r for r in sel.requirements if not (r.key == POD_NAMESPACE and r.source in (SOURCE_K8S, SOURCE_ANY))
    )
    return EndpointSelector(
        tuple(sorted({*kept, Requirement(SOURCE_K8S, POD_NAMESPACE, "In", (namespace,))}))
    )


# --- ports and L7 ------------------------------------------------------------------------------


def _port_spec(pp: cnp.PortProtocol) -> PortSpec:
    proto = proto_number(pp.protocol)
    if pp.port == "" or pp.port.isdigit():
        return PortSpec(proto, int(pp.port or 0), pp.endPort)
    return PortSpec(proto, 0, None, pp.port.lower())


def _l7_rules(rules: cnp.L7Rules | None) -> tuple[L7Rule, ...]:
    if rules is None:
        return ()
    out: list[L7Rule] = []
    for h in rules.http or []:
        out.append(
            HTTPRule(
                method=h.method or None,
                path=h.path or None,
                host=h.host or None,
                headers=tuple(h.headers or ()),
                header_matches=tuple(
                    HeaderMatch(m.name, m.value, m.mismatch) for m in (h.headerMatches or ()) if m is not None
                ),
            )
        )
    for d in rules.dns or []:
        out.append(DNSRule(d.matchName, d.matchPattern))
    return tuple(out)


def _port_rules(
    to_ports: Sequence[cnp.PortRule | cnp.PortDenyRule] | None,
    icmps: Sequence[cnp.ICMPRule] | None,
) -> tuple[PortRule, ...] | None:
    if to_ports is None and icmps is None:
        return None
    out: list[PortRule] = []
    for pr in to_ports or []:
        rules = pr.rules if isinstance(pr, cnp.PortRule) else None
        out.append(PortRule(tuple(_port_spec(pp) for pp in pr.ports or []), _l7_rules(rules)))
    for icmp in icmps or []:
        specs = []
        for f in icmp.fields or []:
            proto = proto_number("ICMPV6" if f.family == "IPv6" else "ICMP")
            specs.append(PortSpec(proto, f.type_number))
        out.append(PortRule(tuple(specs)))
    return tuple(out)


# --- CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy -------------------------------------


def _cidr_peers(cidrs: Sequence[str] | None, cidr_sets: Sequence[cnp.CIDRRule] | None) -> list[PeerSelector]:
    out: list[PeerSelector] = []
    for c in cidrs or []:
        out.append(CIDRSelector(ipaddress.ip_network(c, strict=False)))
    for cs in cidr_sets or []:
        if cs.cidr is None:
            continue
        excepts = tuple(ipaddress.ip_network(e, strict=False) for e in cs.except_ or [])
        out.append(CIDRSelector(ipaddress.ip_network(cs.cidr, strict=False), excepts))
    return out


def _entity_peers(entities: Sequence[str] | None) -> list[PeerSelector]:
    out: list[PeerSelector] = []
    for e in entities or []:
        out.extend(ENTITY_SELECTORS[e])
    return out


def _service_peers(services: Sequence[cnp.Service] | None, namespace: str) -> list[PeerSelector]:
    out: list[PeerSelector] = []
    for s in services or []:
        if s.k8sService is not None:
            ns = s.k8sService.namespace or namespace or "default"
            out.append(ServiceRef(ns, name=s.k8sService.serviceName))
        elif s.k8sServiceSelector is not None:
            ns = s.k8sServiceSelector.namespace or namespace or "default"
            out.append(ServiceRef(ns, selector=selector_from(s.k8sServiceSelector.selector)))
    return out


def _entry(
    ref: PolicyRef,
    path: str,
    direction: Direction,
    deny: bool,
    rule: cnp.IngressCommonRule | cnp.EgressCommonRule,
    namespace: str,
    subject_init: bool,
) -> RuleEntry:
    if isinstance(rule, cnp.IngressCommonRule):
        endpoints, cidrs, cidr_sets, entities = (
            rule.fromEndpoints,
            rule.fromCIDR,
            rule.fromCIDRSet,
            rule.fromEntities,
        )
        services = fqdns = None
    else:
        endpoints, cidrs, cidr_sets, entities = rule.toEndpoints, rule.toCIDR, rule.toCIDRSet, rule.toEntities
        services = rule.toServices
        fqdns = rule.toFQDNs if isinstance(rule, cnp.EgressRule) else None
    peers: list[PeerSelector] = [
        namespaced_peer(selector_from(es), namespace, subject_init) for es in endpoints or []
    ]
    peers += _cidr_peers(cidrs, cidr_sets)
    peers += _entity_peers(entities)
    peers += _service_peers(services, namespace)
    peers += [FQDNSelector(f.matchName, f.matchPattern) for f in fqdns or []]
    to_ports = getattr(rule, "toPorts", None)
    ports = _port_rules(to_ports, rule.icmps)
    no_peer_fields = all(x is None for x in (endpoints, cidrs, cidr_sets, entities, services, fqdns))
    # A nil peer list with toPorts (or icmps) is an L3 wildcard; an explicit empty list selects nothing.
    wildcard = no_peer_fields and ports is not None
    return RuleEntry(ref, path, direction, deny, tuple(peers), wildcard, ports)


def _compile_rule(ref: PolicyRef, path: str, rule: cnp.Rule) -> CompiledRule:
    namespace = ref.namespace
    host = rule.nodeSelector is not None
    subject = selector_from(rule.nodeSelector if host else rule.endpointSelector)
    if namespace and not host:
        subject = namespaced_subject(subject, namespace)
    subject_init = subject.mentions_key(SOURCE_RESERVED, "init")
    dd = rule.enableDefaultDeny
    prefix = "" if path == "spec" else f"{path}."
    entries: list[RuleEntry] = []
    enforces: set[Direction] = set()
    has: set[Direction] = set()
    sections: list[
        tuple[str, Direction, bool, Sequence[cnp.IngressCommonRule | cnp.EgressCommonRule] | None]
    ] = [
        ("ingress", INGRESS, False, rule.ingress),
        ("ingressDeny", INGRESS, True, rule.ingressDeny),
        ("egress", EGRESS, False, rule.egress),
        ("egressDeny", EGRESS, True, rule.egressDeny),
    ]
    for name, direction, deny, items in sections:
        if not items:
            continue
        flag = (dd.ingress if direction == INGRESS else dd.egress) if dd is not None else None
        default_deny = flag is not False
        has.add(direction)
        if default_deny:
            enforces.add(direction)
        for i, item in enumerate(items):
            entries.append(
                _entry(ref, f"{prefix}{name}[{i}]", direction, deny, item, namespace, subject_init)
            )
    return CompiledRule(ref, path, subject, host, tuple(entries), frozenset(enforces), frozenset(has))


# --- Kubernetes NetworkPolicy -----------------------------------------------------------------


def _netpol_peer(peer: knp.NetworkPolicyPeer, namespace: str) -> PeerSelector:
    if peer.ipBlock is not None:
        excepts = tuple(ipaddress.ip_network(e, strict=False) for e in peer.ipBlock.except_ or [])
        return CIDRSelector(ipaddress.ip_network(peer.ipBlock.cidr, strict=False), excepts)
    pod = selector_from(peer.podSelector, "k8s:") if peer.podSelector is not None else WILDCARD
    if peer.namespaceSelector is None:
        return pod.with_requirement(Requirement(SOURCE_K8S, POD_NAMESPACE, "In", (namespace,)))
    ns = peer.namespaceSelector
    if not ns.matchLabels and not ns.matchExpressions:
        return pod.with_requirement(Requirement(SOURCE_K8S, POD_NAMESPACE, "Exists"))
    reqs = list(pod.requirements)
    for k, v in (ns.matchLabels or {}).items():
        reqs.append(Requirement(SOURCE_K8S, NAMESPACE_LABELS_PREFIX + k, "In", (v,)))
    for e in ns.matchExpressions or []:
        vals = tuple(sorted(set(e.values or ()))) if e.operator in ("In", "NotIn") else ()
        reqs.append(Requirement(SOURCE_K8S, NAMESPACE_LABELS_PREFIX + e.key, e.operator, vals))
    return EndpointSelector(tuple(sorted(set(reqs))))


def _netpol_ports(ports: Sequence[knp.NetworkPolicyPort] | None) -> tuple[PortRule, ...] | None:
    if not ports:
        return None
    specs = []
    for p in ports:
        proto = proto_number(p.protocol)
        if p.port is None:
            specs.append(PortSpec(proto, 0))
        elif p.port.isdigit():
            specs.append(PortSpec(proto, int(p.port), p.endPort))
        else:
            specs.append(PortSpec(proto, 0, None, p.port.lower()))
    return (PortRule(tuple(specs)),)


def _compile_netpol(obj: knp.NetworkPolicy) -> CompiledRule:
    ref = policy_ref(obj)
    namespace = ref.namespace
    spec = obj.spec
    subject = namespaced_subject(selector_from(spec.podSelector, "k8s:"), namespace)
    types = set(spec.policyTypes or [])
    entries: list[RuleEntry] = []
    enforces: set[Direction] = set()
    sections: list[
        tuple[Direction, Sequence[knp.NetworkPolicyIngressRule | knp.NetworkPolicyEgressRule]]
    ] = []
    ingress = list(spec.ingress or [])
    egress = list(spec.egress or [])
    if ingress or "Ingress" in types or "Egress" not in types:
        enforces.add(INGRESS)
        sections.append((INGRESS, ingress))
    if egress or "Egress" in types:
        enforces.add(EGRESS)
        sections.append((EGRESS, egress))
    for direction, items in sections:
        for i, item in enumerate(items):
            peers_in = item.from_ if isinstance(item, knp.NetworkPolicyIngressRule) else item.to
            ports = _netpol_ports(item.ports)
            if not peers_in:
                entries.append(RuleEntry(ref, f"{direction}[{i}]", direction, False, (), True, ports))
            else:
                peers = tuple(_netpol_peer(p, namespace) for p in peers_in)
                entries.append(RuleEntry(ref, f"{direction}[{i}]", direction, False, peers, False, ports))
    return CompiledRule(ref, "spec", subject, False, tuple(entries), frozenset(enforces), frozenset(enforces))


__all__ = ["ENTITY_SELECTORS", "PROTO_ANY", "compile_policy", "namespaced_peer", "selector_from"]
