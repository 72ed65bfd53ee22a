"""What a node announces, as pure functions of the cluster's state: which services it may answer ARP
for (CiliumL2AnnouncementPolicy), and the BGP routers, sessions and routes it runs
(CiliumBGPPeeringPolicy v2alpha1), with Cilium's rules for each. The announcer applies the result.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cilia.models.meta import selector_matches
from cilia.models.services import (
    BGPNeighbor,
    CiliumBGPPeeringPolicy,
    CiliumL2AnnouncementPolicy,
    CiliumLoadBalancerIPPool,
    Service,
    community_pair,
)

# Cilium's own words (pkg/bgpv1/agent/controller.go), so operators find them in its docs.
ERR_MULTIPLE_POLICIES = (
    "more then one CiliumBGPPeeringPolicy applies to this node, please ensure only a single Policy "
    "matches this node's labels"
)


def has_ready_local_backend(svc: Service, endpoints: Iterable[Mapping[str, object]]) -> bool:
    """Whether one of this node's endpoints (records of `endpoints/<node>/...`) is a ready backend."""
    for ep in endpoints:
        labels = ep.get("labels")
        if (
            ep.get("state", "ready") == "ready"
            and isinstance(labels, dict)
            and svc.selects_backend(str(ep.get("namespace", "")), {str(k): str(v) for k, v in labels.items()})
        ):
            return True
    return False


# --- L2 ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class L2Want:
    """A service this node is a candidate to announce: its addresses and the interface patterns."""

    service: str
    addresses: tuple[str, ...]
    policies: tuple[CiliumL2AnnouncementPolicy, ...]

    def selects_interface(self, name: str) -> bool:
        return any(p.spec.selects_interface(name) for p in self.policies)


def l2_candidates(
    services: Iterable[Service],
    policies: Iterable[CiliumL2AnnouncementPolicy],
    labels: Mapping[str, str],
    ready_local: Mapping[str, bool],
) -> dict[str, L2Want]:
    """Services this node takes part in the leader election for: selected by a policy that selects
    this node and has addresses to announce. With `externalTrafficPolicy: Local` only nodes with a
    ready local backend take part, so the elected node can serve the traffic itself."""
    node_policies = [p for p in policies if p.selects_node(dict(labels))]
    out: dict[str, L2Want] = {}
    for svc in services:
        chosen = [p for p in node_policies if p.selects_service(svc)]
        addresses: list[str] = []
        for p in chosen:
            addresses += [a for a in p.addresses(svc) if a not in addresses]
        if not addresses:
            continue
        if svc.spec.externalTrafficPolicy == "Local" and not ready_local.get(svc.key, False):
            continue
        out[svc.key] = L2Want(svc.key, tuple(addresses), tuple(chosen))
    return out


# --- BGP -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathAttributes:
    communities: tuple[str, ...] = ()  # standard and well-known, as `high:low`
    large: tuple[str, ...] = ()
    local_preference: int | None = None

    def __bool__(self) -> bool:
        return bool(self.communities or self.large or self.local_preference is not None)

    def merged(self, other: PathAttributes) -> PathAttributes:
        """Several matching attribute sets: communities add up, the highest local preference wins."""
        prefs = [p for p in (self.local_preference, other.local_preference) if p is not None]
        return PathAttributes(
            tuple(dict.fromkeys(self.communities + other.communities)),
            tuple(dict.fromkeys(self.large + other.large)),
            max(prefs) if prefs else None,
        )


@dataclass(frozen=True)
class Neighbor:
    address: str
    asn: int
    port: int = 179
    hold_time: int = 90
    keepalive: int = 30
    connect_retry: int = 120
    multihop_ttl: int = 1
    graceful_restart: bool = False
    restart_time: int = 120
    families: tuple[tuple[str, str], ...] = (("ipv4", "unicast"), ("ipv6", "unicast"))

    @classmethod
    def of(cls, n: BGPNeighbor) -> Neighbor:
        gr = n.gracefulRestart
        return cls(
            n.address,
            n.peerASN,
            n.peerPort,
            n.holdTimeSeconds,
            n.keepAliveTimeSeconds,
            n.connectRetryTimeSeconds,
            n.eBGPMultihopTTL,
            bool(gr and gr.enabled),
            (gr.restartTimeSeconds or 120) if gr else 120,
            tuple((f.afi, f.safi) for f in n.families) if n.families else cls.families,
        )


@dataclass
class Router:
    """One virtual router: a BGP instance with its sessions and the routes it advertises; each route
    carries the path attributes per neighbor."""

    asn: int
    router_id: str
    neighbors: dict[str, Neighbor] = field(default_factory=dict)
    routes: dict[str, dict[str, PathAttributes]] = field(default_factory=dict)


@dataclass
class BGPDesired:
    policy: str | None = None
    error: str | None = None
    routers: dict[int, Router] = field(default_factory=dict)


def _attributes(
    neighbor: BGPNeighbor, selector_type: str, labels: Mapping[str, str] | None
) -> PathAttributes:
    out = PathAttributes()
    for attrs in neighbor.advertisedPathAttributes or []:
        if attrs.selectorType != selector_type or labels is None:
            continue
        if not selector_matches(attrs.selector, dict(labels)):
            continue
        c = attrs.communities
        out = out.merged(
            PathAttributes(
                tuple(community_pair(x) for x in [*(c.standard or []), *(c.wellKnown or [])]) if c else (),
                tuple(c.large or []) if c else (),
                attrs.localPreference,
            )
        )
    return out


def _host_prefix(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


def pool_of(ip: str, pools: Iterable[CiliumLoadBalancerIPPool]) -> CiliumLoadBalancerIPPool | None:
    addr = ipaddress.ip_address(ip)
    for pool in pools:
        for block in pool.spec.all_blocks():
            version, first, last, _ = block.bounds()
            if version == addr.version and first <= int(addr) <= last:
                return pool
    return None


def bgp_desired(
    policies: Iterable[CiliumBGPPeeringPolicy],
    labels: Mapping[str, str],
    services: Iterable[Service],
    pools: Iterable[CiliumLoadBalancerIPPool],
    ready_local: Mapping[str, bool],
    router_id: str,
    pod_cidr: str | None = None,
) -> BGPDesired:
    """The routers of this node. Exactly one policy may select a node: with several, none applies
    and every session is cleared (Cilium's ErrMultiplePolicies)."""
    chosen = sorted(
        (p for p in policies if p.selects_node(dict(labels))), key=lambda p: p.metadata.name or ""
    )
    if not chosen:
        return BGPDesired()
    if len(chosen) > 1:
        names = ", ".join(p.metadata.name or "" for p in chosen)
        return BGPDesired(error=f"{ERR_MULTIPLE_POLICIES} (selected by: {names})")
    policy = chosen[0]
    services = list(services)
    pools = list(pools)
    out = BGPDesired(policy=policy.metadata.name)
    for vr in policy.spec.virtualRouters:
        router = Router(vr.localASN, router_id)
        for n in vr.neighbors:
            router.neighbors[n.address] = Neighbor.of(n)
        routes: dict[str, dict[str, PathAttributes]] = {}
        if vr.exportPodCIDR and pod_cidr:
            routes[str(ipaddress.ip_network(pod_cidr, strict=False))] = {
                n.address: _attributes(n, "PodCIDR", labels) for n in vr.neighbors
            }
        kinds = vr.advertisements()
        for svc in services:
            if not vr.selects_service(svc):
                continue
            # externalTrafficPolicy: Local is advertised only from nodes with a ready local backend.
            external_ok = svc.spec.externalTrafficPolicy != "Local" or ready_local.get(svc.key, False)
            if "LoadBalancerIP" in kinds and svc.spec.type == "LoadBalancer" and external_ok:
                for ip in svc.lb_ips():
                    pool = pool_of(ip, pools)
                    pool_labels = pool.metadata.labels if pool is not None else None
                    routes[_host_prefix(ip)] = {
                        n.address: _attributes(n, "CiliumLoadBalancerIPPool", pool_labels)
                        for n in vr.neighbors
                    }
            if "ExternalIP" in kinds and external_ok:
                for ip in svc.spec.externalIPs or []:
                    routes.setdefault(_host_prefix(ip), {n.address: PathAttributes() for n in vr.neighbors})
            if "ClusterIP" in kinds and svc.spec.clusterIP:
                routes.setdefault(
                    _host_prefix(svc.spec.clusterIP), {n.address: PathAttributes() for n in vr.neighbors}
                )
        router.routes = routes
        out.routers[vr.localASN] = router
    return out
