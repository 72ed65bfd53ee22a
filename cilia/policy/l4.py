"""Layer 4: protocols, port ranges and their LPM prefixes, ICMP types as ports.

Protocol `ANY` with a port is Cilium's shorthand for TCP, UDP and SCTP; `ANY` with port 0 (an
L3-only rule) covers every protocol, ICMP included. For ICMP the "port" is the ICMP type.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTO_ANY = 0
PROTO_ICMP = 1
PROTO_IGMP = 2
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_VRRP = 112
PROTO_SCTP = 132

PROTO_NUMBERS: dict[str, int] = {
    "ANY": PROTO_ANY,
    "ICMP": PROTO_ICMP,
    "IGMP": PROTO_IGMP,
    "TCP": PROTO_TCP,
    "UDP": PROTO_UDP,
    "ICMPV6": PROTO_ICMPV6,
    "VRRP": PROTO_VRRP,
    "SCTP": PROTO_SCTP,
}
PROTO_NAMES: dict[int, str] = {
    PROTO_ANY: "ANY",
    PROTO_ICMP: "ICMP",
    PROTO_IGMP: "IGMP",
    PROTO_TCP: "TCP",
    PROTO_UDP: "UDP",
    PROTO_ICMPV6: "ICMPv6",
    PROTO_VRRP: "VRRP",
    PROTO_SCTP: "SCTP",
}
# What `ANY` with a port expands to (rule.go: mergeIngress/mergeEgress).
ANY_EXPANSION = (PROTO_TCP, PROTO_UDP, PROTO_SCTP)
# The protocols a map state distinguishes; every other protocol only meets "any protocol" entries.
KNOWN_PROTOS = (PROTO_ICMP, PROTO_IGMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6, PROTO_VRRP, PROTO_SCTP)
# Protocols carrying ports (or, for ICMP, types) in the policy key.
PORTED_PROTOS = (PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP, PROTO_ICMPV6)
MAX_PORT = 65535


def proto_number(name: str) -> int:
    """Protocol number for `TCP`, `udp`, `ICMPv6`, ...; raises KeyError on unknown names."""
    return PROTO_NUMBERS[name.upper()]


def proto_name(number: int) -> str:
    return PROTO_NAMES.get(number, str(number))


@dataclass(frozen=True, order=True)
class PortRange:
    """A protocol and an inclusive port range; proto ANY means every protocol and every port."""

    proto: int
    lo: int = 0
    hi: int = MAX_PORT

    @property
    def is_all(self) -> bool:
        return self.proto == PROTO_ANY

    def covers(self, proto: int, port: int) -> bool:
        if self.proto == PROTO_ANY:
            return True
        return self.proto == proto and self.lo <= port <= self.hi

    def __str__(self) -> str:
        if self.proto == PROTO_ANY:
            return "ANY"
        name = proto_name(self.proto)
        if self.lo == 0 and self.hi == MAX_PORT:
            return name
        if self.lo == self.hi:
            return f"{self.lo}/{name}"
        return f"{self.lo}-{self.hi}/{name}"


ALL_PORTS = PortRange(PROTO_ANY)


def port_ranges(proto: int, port: int, end_port: int | None) -> list[PortRange]:
    """The ranges one `PortProtocol` covers: ANY expands to TCP, UDP and SCTP (never ICMP).

    Port 0 means every port of the protocol; an `endPort` below the port is ignored, as in Cilium.
    Only an L3-only rule (no `toPorts` at all) covers every protocol: that is `ALL_PORTS`.
    """
    if port == 0:
        lo, hi = 0, MAX_PORT
    else:
        lo = port
        hi = end_port if end_port is not None and end_port > port else port
    protos = ANY_EXPANSION if proto == PROTO_ANY else (proto,)
    return [PortRange(p, lo, hi) for p in protos]


def range_prefixes(lo: int, hi: int, bits: int = 16) -> list[tuple[int, int]]:
    """Split [lo, hi] into aligned (value, prefix_len) blocks, the way port ranges become LPM keys."""
    out: list[tuple[int, int]] = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << bits
        while lo + size - 1 > hi:
            size >>= 1
        plen = bits - (size.bit_length() - 1)
        out.append((lo, plen))
        lo += size
    return out
