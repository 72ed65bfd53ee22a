"""The ipcache and the identities it knows: cluster (from labels), reserved, CIDR and FQDN.

CIDR identities are node-local, numbered from 1<<24 | 1, one per prefix that some policy names
(`toCIDR`, `toCIDRSet` and their `except` prefixes); an IP the DNS proxy learned for a `toFQDNs`
name gets a /32 (or /128) identity that also carries the names. An outside address maps to the
identity of the longest such prefix containing it, or to `world` when none does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cilia.identity import HOST, MIN_LOCAL_IDENTITY, REMOTE_NODE, WORLD, cidr_label_key
from cilia.labels import SOURCE_CIDR, SOURCE_RESERVED, Label, LabelSet
from cilia.policy.inventory import Inventory, reserved_identities
from cilia.policy.rules import CIDRSelector, CompiledRule, IPAddress, IPNetwork


@dataclass(frozen=True)
class IdentityInfo:
    """An identity as selectors see it: labels, and for CIDR/FQDN identities the prefix and names."""

    id: int
    labels: LabelSet
    net: IPNetwork | None = None
    names: tuple[str, ...] = ()

    @property
    def outside(self) -> bool:
        """World, CIDR and FQDN identities: the ones CIDR and FQDN selectors may select."""
        return self.id == WORLD or self.net is not None


@dataclass
class IPCache:
    """Identities by number, and outside prefixes -> identity (longest prefix wins)."""

    identities: dict[int, IdentityInfo] = field(default_factory=dict)
    prefixes: dict[IPNetwork, int] = field(default_factory=dict)
    endpoints: dict[IPAddress, int] = field(default_factory=dict)
    _next_local: int = MIN_LOCAL_IDENTITY
    _numbers: dict[IPNetwork, int] = field(default_factory=dict)  # numbers to reuse for known prefixes
    fqdn_only: set[IPNetwork] = field(default_factory=set)  # prefixes that exist only for DNS names

    @classmethod
    def build(
        cls,
        inventory: Inventory,
        rules: Iterable[CompiledRule] = (),
        fqdn_ips: Mapping[IPAddress, Iterable[str]] | None = None,
        previous: IPCache | None = None,
    ) -> IPCache:
        """Build the ipcache; with `previous`, CIDR identities keep their numbers (no churn in maps)."""
        cache = cls()
        if previous is not None:
            cache._next_local = previous._next_local
            cache._numbers = dict(previous.prefixes)
        for num, labels in reserved_identities().items():
            if num == HOST:
                labels = inventory.host_labels()
            elif num == REMOTE_NODE:
                labels = inventory.remote_node_labels()
            cache.identities[num] = IdentityInfo(num, labels)
        for num, labels in inventory.cluster_identities().items():
            cache.identities[num] = IdentityInfo(num, labels)
        for w in inventory.workloads.values():
            if w.ip is not None:
                cache.endpoints[w.ip] = inventory.identity_of(w)
        cache.add_prefixes(policy_prefixes(rules))
        for ip, names in (fqdn_ips or {}).items():
            cache.add_fqdn_ip(ip, names)
        return cache

    def add_prefixes(self, nets: Iterable[IPNetwork]) -> list[int]:
        """Give each new prefix a CIDR identity; returns the new identity numbers."""
        added = []
        for net in sorted(set(nets), key=lambda n: (n.version, n.prefixlen, int(n.network_address))):
            if net in self.prefixes:
                continue
            num = self._numbers.get(net, 0)
            if not num:
                num = self._next_local
                self._next_local += 1
            self.prefixes[net] = num
            self.identities[num] = IdentityInfo(num, cidr_identity_labels(net), net)
            added.append(num)
        return added

    def add_fqdn_ip(self, ip: IPAddress, names: Iterable[str]) -> int:
        """Record an IP the DNS proxy saw for `names`; returns its identity."""
        net = ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
        if net not in self.prefixes:
            self.add_prefixes([net])
            self.fqdn_only.add(net)
        num = self.prefixes[net]
        info = self.identities[num]
        merged = tuple(sorted({*info.names, *(n.lower().rstrip(".") + "." for n in names)}))
        self.identities[num] = IdentityInfo(num, info.labels, net, merged)
        return num

    def remove_fqdn_ip(self, ip: IPAddress, names: Iterable[str] | None = None) -> tuple[int, bool] | None:
        """Forget `names` (all when None) for an IP; returns (identity, still exists) or None if unknown.

        An identity that existed only for DNS names goes away with its last name."""
        net = ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
        num = self.prefixes.get(net)
        if num is None:
            return None
        info = self.identities[num]
        drop = None if names is None else {n.lower().rstrip(".") + "." for n in names}
        kept = () if drop is None else tuple(n for n in info.names if n not in drop)
        if not kept and net in self.fqdn_only:
            del self.prefixes[net]
            del self.identities[num]
            self.fqdn_only.discard(net)
            self._numbers[net] = num  # the same number if the name comes back
            return (num, False)
        self.identities[num] = IdentityInfo(num, info.labels, net, kept)
        return (num, True)

    def lookup(self, ip: IPAddress) -> int:
        """The identity of an address: an endpoint's, else the longest policy prefix's, else world."""
        if ip in self.endpoints:
            return self.endpoints[ip]
        best: tuple[int, int] | None = None
        for net, num in self.prefixes.items():
            if ip.version == net.version and ip in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, num)
        return best[1] if best else WORLD


def cidr_identity_labels(net: IPNetwork) -> LabelSet:
    labels = [Label(SOURCE_RESERVED, "world")]
    if net.prefixlen:
        labels.append(Label(SOURCE_CIDR, cidr_label_key(net)))
    return LabelSet(labels)


def policy_prefixes(rules: Iterable[CompiledRule]) -> set[IPNetwork]:
    """Every prefix a rule names, `except` prefixes included (each gets its own identity)."""
    out: set[IPNetwork] = set()
    for rule in rules:
        for entry in rule.entries:
            for peer in entry.peers:
                if isinstance(peer, CIDRSelector):
                    if peer.net.prefixlen:
                        out.add(peer.net)
                    out.update(peer.excepts)
    return out
