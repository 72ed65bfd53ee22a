"""The inputs every policy computation shares: compiled rules, the cluster inventory, options,
and the two sides of a connection (`Peer`).

Both `verdict` (which walks rules) and `mapstate` (which computes datapath entries) read a
`PolicyContext`; neither imports the other.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cilia.identity import HOST, KUBE_APISERVER, REMOTE_NODE, RESERVED, WORLD
from cilia.labels import POD_NAMESPACE, SOURCE_K8S, SOURCE_RESERVED, Label, LabelSet
from cilia.policy.inventory import Inventory, Workload, reserved_identities
from cilia.policy.rules import (
    EGRESS,
    INGRESS,
    CIDRSelector,
    CompiledRule,
    Direction,
    FQDNSelector,
    IPAddress,
    IPNetwork,
    PeerSelector,
    ServiceRef,
)
from cilia.policy.selector import NOTHING, EndpointSelector, Requirement

Enforcement = Literal["default", "always", "never"]
ResolvedSelector = EndpointSelector | CIDRSelector | FQDNSelector
PeerKind = Literal["endpoint", "host", "remote-node", "world", "reserved"]


@dataclass(frozen=True)
class PolicyOptions:
    """Agent options that change verdicts (Cilium's `--enable-policy`, `--allow-localhost`, ...)."""

    enforcement: Enforcement = "default"
    allow_localhost: bool = True
    # Cilium's --enable-host-firewall. None (auto): on as soon as some rule has a nodeSelector, which
    # is what differs from "off" only when host policies exist.
    host_firewall: bool | None = None


@dataclass(frozen=True)
class Peer:
    """One side of a connection as policy sees it.

    `net` is the address of an outside peer as a /32 (or /128); `names` are the DNS names the DNS
    proxy saw resolve to it (what `toFQDNs` selects on).
    """

    kind: PeerKind
    name: str
    labels: LabelSet
    identity: int
    workload: Workload | None = None
    net: IPNetwork | None = None
    names: tuple[str, ...] = ()

    @property
    def outside(self) -> bool:
        return self.kind == "world"

    @property
    def namespace(self) -> str | None:
        return self.workload.namespace if self.workload else None

    def __str__(self) -> str:
        return self.name


def endpoint_peer(inv: Inventory, w: Workload) -> Peer:
    return Peer("endpoint", w.key, inv.labels_of(w), inv.identity_of(w), workload=w)


def host_peer(inv: Inventory) -> Peer:
    return Peer("host", "host", inv.host_labels(), HOST)


def remote_node_peer(inv: Inventory) -> Peer:
    return Peer("remote-node", "remote-node", inv.remote_node_labels(), REMOTE_NODE)


def world_peer(ip: IPAddress | None = None, names: Iterable[str] = (), identity: int = WORLD) -> Peer:
    net = None if ip is None else ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
    label = f"{ip}" if ip is not None else "world"
    if names:
        label = f"{next(iter(names))} ({ip})" if ip is not None else next(iter(names))
    return Peer(
        "world", label, LabelSet([Label(SOURCE_RESERVED, "world")]), identity, net=net, names=tuple(names)
    )


def reserved_peer(name: str) -> Peer:
    num = RESERVED[name]
    return Peer("reserved", name, reserved_identities()[num], num)


ENTITY_TARGETS = ("host", "remote-node", "kube-apiserver", "world", "health", "init", "unmanaged", "ingress")


def entity_peer(inv: Inventory, name: str) -> Peer:
    """A probe's `{entity: ...}`: the local host, a remote node, world, or another reserved identity."""
    if name == "host":
        return host_peer(inv)
    if name == "remote-node":
        return remote_node_peer(inv)
    if name == "world":
        return world_peer()
    if name == "kube-apiserver":
        return Peer("reserved", name, reserved_identities()[KUBE_APISERVER], KUBE_APISERVER)
    if name in RESERVED:
        return reserved_peer(name)
    raise KeyError(name)


@dataclass
class PolicyContext:
    """Compiled rules (in repository order), the inventory, and the options."""

    rules: Sequence[CompiledRule]
    inventory: Inventory
    options: PolicyOptions = field(default_factory=PolicyOptions)

    def subject_rules(self, subject: Peer) -> list[CompiledRule]:
        """The rules that select `subject`: pods by endpointSelector, nodes by nodeSelector."""
        if self.options.enforcement == "never":
            return []
        if not self.is_subject(subject):
            return []
        return [r for r in self.rules if rule_selects(r, subject)]

    def host_firewall(self) -> bool:
        if self.options.host_firewall is not None:
            return self.options.host_firewall
        return any(r.host for r in self.rules)

    def is_subject(self, peer: Peer) -> bool:
        """Whether policy can select this peer at all (only endpoints and, with the host firewall, nodes)."""
        return peer.kind == "endpoint" or (peer.kind in ("host", "remote-node") and self.host_firewall())

    def resolve(self, sel: PeerSelector) -> list[ResolvedSelector]:
        """Turn a `toServices` reference into selectors of its services' backends."""
        if isinstance(sel, ServiceRef):
            return service_selectors(self.inventory, sel)
        return [sel]

    def named_port_resolver(self, direction: Direction, subject: Peer) -> NamedPortLookup:
        return NamedPortLookup(self.inventory, direction, subject.workload)


def rule_selects(rule: CompiledRule, subject: Peer) -> bool:
    """Pods are selected by endpointSelector rules of their namespace (or cluster-wide ones); nodes
    only by nodeSelector rules (which apply only with the host firewall on)."""
    if subject.kind == "endpoint":
        return (
            not rule.host
            and rule.ref.namespace in ("", subject.namespace or "")
            and rule.subject.selects(subject.labels)
        )
    if subject.kind in ("host", "remote-node"):
        return rule.host and rule.subject.selects(subject.labels)
    return False


@dataclass(frozen=True)
class NamedPortLookup:
    """Ingress named ports are the subject's own; egress ones are resolved cluster-wide."""

    inventory: Inventory
    direction: Direction
    workload: Workload | None

    def __call__(self, name: str, proto: int) -> int | None:
        if self.direction == INGRESS:
            if self.workload is None:
                return None
            port = self.workload.named_ports.get(name)
            return port[0] if port is not None and port[1] == proto else None
        return self.inventory.egress_named_port(name, proto)


def service_selectors(inv: Inventory, ref: ServiceRef) -> list[ResolvedSelector]:
    """The backends of the services a `toServices` entry names: each one's pod selector in its namespace."""
    out: list[ResolvedSelector] = []
    for (ns, name), svc in inv.services.items():
        if ns != ref.namespace or svc.selector is None:
            continue
        if ref.name is not None and ref.name != name:
            continue
        if ref.selector is not None and not ref.selector.selects(LabelSet.from_k8s(svc.labels)):
            continue
        reqs = {Requirement(SOURCE_K8S, k, "In", (v,)) for k, v in svc.selector.items()}
        reqs.add(Requirement(SOURCE_K8S, POD_NAMESPACE, "In", (ns,)))
        out.append(EndpointSelector(tuple(sorted(reqs))))
    return out or [NOTHING]


def peer_selected(sel: ResolvedSelector, peer: Peer) -> bool:
    """Does a (resolved) peer selector select this peer?"""
    if isinstance(sel, EndpointSelector):
        return sel.selects(peer.labels)
    if not peer.outside:
        return False  # CIDR and FQDN rules never select pods, the host or nodes
    if isinstance(sel, CIDRSelector):
        return sel.selects_world() if peer.net is None else sel.selects_prefix(peer.net)
    return any(sel.matches(n) for n in peer.names)


DIRECTION_NAMES = {INGRESS: "ingress", EGRESS: "egress"}
