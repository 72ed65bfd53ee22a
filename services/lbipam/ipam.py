"""LB-IPAM's rules as pure functions: pool ranges, reserved addresses, conflicts between pools, counts,
which pools serve a service, and which services may share an address (Cilium's pkg/lbipam).

Nothing here does I/O; `services.lbipam.store` applies these rules to what the kvstore holds.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from cilia.models.meta import selector_matches
from cilia.models.services import CiliumLoadBalancerIPPool, Service

# Service condition (Cilium 1.15/1.16 name) and its reasons.
SATISFIED = "io.cilium/lb-ipam-request-satisfied"
# Pool conditions.
POOL_CONFLICT = "cilium.io/PoolConflict"
IPS_TOTAL = "cilium.io/IPsTotal"
IPS_AVAILABLE = "cilium.io/IPsAvailable"
IPS_USED = "cilium.io/IPsUsed"


def ip_text(version: int, value: int) -> str:
    return str(ipaddress.ip_address(value) if version == 4 else ipaddress.IPv6Address(value))


@dataclass(frozen=True)
class Range:
    """One block of a pool as integers, with the addresses it never hands out."""

    pool: str
    version: int
    first: int
    last: int
    text: str
    reserved: frozenset[int] = frozenset()

    def contains(self, ip: int, version: int) -> bool:
        return version == self.version and self.first <= ip <= self.last

    @property
    def size(self) -> int:
        return self.last - self.first + 1 - len(self.reserved)

    def cidr_text(self) -> str:
        """The range as Cilium's messages print it: a CIDR when it is one, else `first - last`."""
        return self.text


@dataclass
class Pool:
    """A pool as LB-IPAM sees it: its ranges, selector, and whether it may hand out new addresses."""

    obj: CiliumLoadBalancerIPPool
    ranges: list[Range]
    created: str
    conflict: str | None = None  # why the pool conflicts, or None

    @property
    def name(self) -> str:
        return self.obj.metadata.name or ""

    @property
    def disabled(self) -> bool:
        return self.obj.spec.disabled

    @property
    def allocates(self) -> bool:
        """New addresses come only from enabled pools that conflict with none older."""
        return not self.disabled and self.conflict is None

    def selects(self, svc: Service) -> bool:
        return selector_matches(self.obj.spec.serviceSelector, svc.selection_labels())

    def range_of(self, ip: str) -> Range | None:
        addr = ipaddress.ip_address(ip)
        for r in self.ranges:
            if r.contains(int(addr), addr.version):
                return r
        return None


def ranges_of(pool: CiliumLoadBalancerIPPool) -> list[Range]:
    """The pool's blocks as ranges. A CIDR's first and last address (network and broadcast) are
    reserved unless `allowFirstLastIPs: "Yes"`, except in /31, /32, /127, /128 where that would leave
    nothing; start/stop ranges reserve nothing (they are slices of routable ranges)."""
    name = pool.metadata.name or ""
    out = []
    for block in pool.spec.all_blocks():
        version, first, last, from_cidr = block.bounds()
        reserved: frozenset[int] = frozenset()
        if from_cidr and pool.spec.allowFirstLastIPs != "Yes" and last - first >= 2:
            reserved = frozenset({first, last})
        text = str(ipaddress.ip_network(block.cidr, strict=False)) if block.cidr else block.text()
        out.append(Range(name, version, first, last, text, reserved))
    return out


def _overlap(a: Range, b: Range) -> bool:
    return a.version == b.version and a.first <= b.last and b.first <= a.last


def settle_conflicts(pools: list[Pool]) -> None:
    """Mark conflicting pools (`Pool.conflict`), oldest first: a pool whose blocks overlap each other,
    or overlap a block of an older pool that does not itself conflict, stops allocating. Age is the
    creation timestamp, then the name, so every replica reaches the same answer."""
    ordered = sorted(pools, key=lambda p: (p.created, p.name))
    settled: list[Pool] = []
    for pool in ordered:
        pool.conflict = None
        for i, a in enumerate(pool.ranges):
            for b in pool.ranges[i + 1 :]:
                if _overlap(a, b):
                    pool.conflict = f"Pool conflicts since CIDR '{a.text}' overlaps CIDR '{b.text}' from IP Pool '{pool.name}'"
                    break
            if pool.conflict:
                break
        if pool.conflict is None:
            for older in settled:
                if older.conflict is not None:
                    continue
                hit = next(((a, b) for a in pool.ranges for b in older.ranges if _overlap(a, b)), None)
                if hit is not None:
                    pool.conflict = (
                        f"Pool conflicts since CIDR '{hit[0].text}' overlaps CIDR '{hit[1].text}'"
                        f" from IP Pool '{older.name}'"
                    )
                    break
        settled.append(pool)


@dataclass(frozen=True)
class Counts:
    total: int
    available: int
    used: int


def pool_counts(pool: Pool, allocated: Iterable[str]) -> Counts:
    """IPsTotal (allocatable addresses), IPsUsed (allocated ones, a shared address once) and
    IPsAvailable (the rest)."""
    total = sum(r.size for r in pool.ranges)
    used = 0
    for ip in allocated:
        addr = ipaddress.ip_address(ip)
        if any(r.contains(int(addr), addr.version) and int(addr) not in r.reserved for r in pool.ranges):
            used += 1
    return Counts(total, max(total - used, 0), used)


def free_addresses(r: Range, taken: set[str]) -> Iterator[str]:
    """Addresses of `r` not reserved and not in `taken`, lowest first."""
    for value in range(r.first, r.last + 1):
        if value in r.reserved:
            continue
        text = ip_text(r.version, value)
        if text not in taken:
            yield text


@dataclass
class Lookup:
    """Where a requested address could come from for a service."""

    range: Range | None
    pool: Pool | None
    reason: str = ""
    message: str = ""


def find_range_of_ip(pools: list[Pool], svc: Service, ip: str) -> Lookup:
    """The allocating pool range holding `ip` whose pool selects `svc` (Cilium's findRangeOfIP)."""
    found_pool = False
    addr = ipaddress.ip_address(ip)
    for pool in sorted(pools, key=lambda p: (p.created, p.name)):
        if not pool.allocates:
            continue
        r = pool.range_of(ip)
        if r is None:
            continue
        found_pool = True
        if not pool.selects(svc):
            continue
        if int(addr) in r.reserved:
            return Lookup(
                None,
                pool,
                "already_allocated",
                f"The IP '{ip}' is reserved: it is the first or last address of CIDR '{r.text}'"
                ' (set allowFirstLastIPs: "Yes" on the pool to use it)',
            )
        return Lookup(r, pool)
    if found_pool:
        return Lookup(
            None,
            None,
            "pool_selector_mismatch",
            f"The pool with the CIDR containing '{ip}', doesn't select this service",
        )
    return Lookup(None, None, "no_pool", f"No pool exists with a CIDR containing '{ip}'")


def compatible(a: Service, b: Service) -> tuple[bool, str]:
    """Whether two services may share an address (Cilium's ServiceView.isCompatible)."""
    if a.sharing_key() != b.sharing_key():
        return False, "different sharing key"
    if a.namespace != b.namespace:
        a_ns, b_ns = a.sharing_cross_namespace(), b.sharing_cross_namespace()
        if not (b.namespace in a_ns or "*" in a_ns) or not (a.namespace in b_ns or "*" in b_ns):
            return False, "different and not permitted namespace"
    # Like Cilium, the protocol is not considered: the datapath tells services apart by port only.
    if {p.port for p in a.spec.ports} & {p.port for p in b.spec.ports}:
        return False, "same port"
    a_etp = a.spec.externalTrafficPolicy or "Cluster"
    b_etp = b.spec.externalTrafficPolicy or "Cluster"
    if a_etp != b_etp:
        return False, "different ExternalTrafficPolicy"
    if a_etp == "Local" and (
        not a.spec.selector or not b.spec.selector or a.spec.selector != b.spec.selector
    ):
        return False, "compatible ExternalTrafficPolicy local but selecting different set of pods"
    return True, ""


def compatible_with_all(svc: Service, others: Iterable[Service]) -> tuple[bool, str]:
    for other in others:
        if other.key == svc.key:
            continue
        ok, reason = compatible(svc, other)
        if not ok:
            return False, reason
    return True, ""


@dataclass
class Allocation:
    """One allocated address (`lbipam/ips/<ip>`): its pool, sharing key and the services using it,
    each with the unix time it joined (so a member that never made it into the service's status,
    because its allocator died, can be told from one that is being committed right now)."""

    ip: str
    pool: str
    sharing_key: str = ""
    members: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"ip": self.ip, "pool": self.pool, "sharingKey": self.sharing_key, "members": self.members}

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> Allocation:
        members = doc.get("members") or {}
        assert isinstance(members, dict)
        return cls(
            str(doc["ip"]),
            str(doc.get("pool", "")),
            str(doc.get("sharingKey", "")),
            {str(k): float(v) for k, v in members.items()},
        )
