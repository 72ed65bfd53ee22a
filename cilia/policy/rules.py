"""The engine's own rule form: what every policy kind (CNP, CCNP, NetworkPolicy) compiles to.

A `CompiledRule` is one Cilium rule with its namespace already folded into its selectors; each
element of `ingress`/`egress`/`ingressDeny`/`egressDeny` is a `RuleEntry` that names its origin,
so every verdict can say which rule decided it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cilia.policy.fqdn import selector_matches
from cilia.policy.l4 import ANY_EXPANSION, PROTO_ANY, PortRange, port_ranges, proto_name
from cilia.policy.l7 import L7Rule, parser_of
from cilia.policy.selector import EndpointSelector

Direction = Literal["ingress", "egress"]
INGRESS: Direction = "ingress"
EGRESS: Direction = "egress"
DIRECTIONS: tuple[Direction, Direction] = (INGRESS, EGRESS)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NamedPortResolver = Callable[[str, int], int | None]


@dataclass(frozen=True, order=True)
class PolicyRef:
    """Which policy a rule came from: kind, namespace ("" when cluster-wide) and name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True)
class CIDRSelector:
    """`toCIDR`/`toCIDRSet`/`ipBlock`: addresses in `net` but in none of `excepts`."""

    net: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def selects_ip(self, ip: IPAddress) -> bool:
        if ip.version != self.net.version or ip not in self.net:
            return False
        return not any(ip in e for e in self.excepts if e.version == ip.version)

    def selects_prefix(self, net: IPNetwork) -> bool:
        """For CIDR identities: the prefix lies inside `net` and inside no `except` prefix."""
        if net.version != self.net.version or not net.subnet_of(self.net):  # type: ignore[arg-type]
            return False
        return not any(e.version == net.version and net.subnet_of(e) for e in self.excepts)  # type: ignore[arg-type]

    def selects_world(self) -> bool:
        """The world identity (an address inside no policy prefix) is selected only by a /0."""
        return self.net.prefixlen == 0

    def __str__(self) -> str:
        if self.excepts:
            return f"{self.net} except {', '.join(str(e) for e in self.excepts)}"
        return str(self.net)


@dataclass(frozen=True)
class FQDNSelector:
    """`toFQDNs`: IPs the DNS proxy saw returned for a name that this selector matches."""

    match_name: str | None = None
    match_pattern: str | None = None

    def matches(self, name: str) -> bool:
        return selector_matches(self.match_name, self.match_pattern, name)

    @property
    def label_key(self) -> str:
        """The key of the `fqdn:` label that identities of matching IPs carry."""
        return (
            (self.match_name if self.match_name is not None else self.match_pattern or "").lower().rstrip(".")
        )

    def __str__(self) -> str:
        if self.match_name is not None:
            return f"matchName: {self.match_name}"
        return f"matchPattern: {self.match_pattern}"


@dataclass(frozen=True)
class ServiceRef:
    """`toServices`: the backends of a Kubernetes Service, by name or by service labels."""

    namespace: str
    name: str | None = None
    selector: EndpointSelector | None = None

    def __str__(self) -> str:
        return (
            f"service {self.namespace}/{self.name}"
            if self.name
            else f"services {self.selector} in {self.namespace}"
        )


PeerSelector = EndpointSelector | CIDRSelector | FQDNSelector | ServiceRef


@dataclass(frozen=True)
class PortSpec:
    """One port of a rule: a number (0 = all) with an optional end, or a name to resolve."""

    proto: int
    port: int = 0
    end_port: int | None = None
    name: str | None = None

    def ranges(self, resolve: NamedPortResolver | None = None) -> list[PortRange]:
        """The ranges this port covers; a named port is resolved per protocol (unresolved: nothing)."""
        if self.name is None:
            return port_ranges(self.proto, self.port, self.end_port)
        out: list[PortRange] = []
        protos = ANY_EXPANSION if self.proto == PROTO_ANY else (self.proto,)
        for proto in protos:
            number = resolve(self.name, proto) if resolve is not None else None
            if number:
                out.append(PortRange(proto, number, number))
        return out

    @property
    def exact(self) -> bool:
        """A single port (not a range, not port 0): the only kind a DNS redirect is installed on."""
        return self.name is not None or (
            self.port != 0 and (self.end_port is None or self.end_port <= self.port)
        )

    def __str__(self) -> str:
        what = self.name if self.name is not None else str(self.port)
        if self.end_port:
            what += f"-{self.end_port}"
        return f"{what}/{proto_name(self.proto)}"


@dataclass(frozen=True)
class PortRule:
    """One element of `toPorts` (or of `icmps`): ports plus the L7 rules that apply to them."""

    ports: tuple[PortSpec, ...]
    l7: tuple[L7Rule, ...] = ()

    @property
    def parser(self) -> str | None:
        return parser_of(self.l7)


@dataclass(frozen=True)
class RuleEntry:
    """One element of ingress, egress, ingressDeny or egressDeny.

    `peers` empty with `wildcard` False selects nothing; `wildcard` selects every identity.
    `ports` None is an L3-only rule: every protocol and port, no L7.
    """

    ref: PolicyRef
    path: str  # "ingress[0]", or "specs[1].egressDeny[2]"
    direction: Direction
    deny: bool
    peers: tuple[PeerSelector, ...]
    wildcard: bool
    ports: tuple[PortRule, ...] | None

    @property
    def reason(self) -> str:
        return f"{self.ref} {self.path}"


@dataclass(frozen=True)
class CompiledRule:
    """One Cilium rule: whom it selects, what it allows and denies, and what it enforces."""

    ref: PolicyRef
    path: str  # "spec", "specs[0]"
    subject: EndpointSelector
    host: bool  # nodeSelector rule: selects nodes (their host endpoint), not pods
    entries: tuple[RuleEntry, ...]
    enforces: frozenset[Direction]  # directions this rule turns default-deny on for
    has: frozenset[Direction] = field(default_factory=frozenset)  # directions with any entries

    def entries_for(self, direction: Direction) -> tuple[RuleEntry, ...]:
        return tuple(e for e in self.entries if e.direction == direction)
