"""Service load balancing, the agent's half: Services (as the lbipam service stores them) and the
cluster's endpoints become the datapath's frontend, slot and backend maps (bpf/lib/lb.h).

Pure functions compute what the maps should hold; `LBWriter` writes the difference from what it
wrote last (it starts from what the pinned maps hold, so backend and frontend numbers survive an
agent restart and connections keep their backends).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cilia.policy.inventory import Workload
from services.datapath import maps

log = logging.getLogger("cilia.datapath.lb")

PROTOCOLS = {"TCP": 6, "UDP": 17}
PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}
DEFAULT_AFFINITY_TIMEOUT = 10800  # Kubernetes' default for sessionAffinity: ClientIP
TERMINATING_MAX_SECONDS = 3600.0  # a terminating backend goes after this even with connections open


@dataclass(frozen=True)
class ServicePort:
    name: str
    protocol: int
    port: int
    target: int | str  # a number, or the name of a container port


@dataclass(frozen=True)
class ServiceSpec:
    """What the datapath needs of a `v1` Service."""

    namespace: str
    name: str
    type: str
    cluster_ip: str | None
    external: tuple[str, ...]  # LoadBalancer ingress IPs and externalIPs
    selector: Mapping[str, str] | None
    ports: tuple[ServicePort, ...]
    affinity_timeout: int | None  # None: no session affinity
    local_only: bool  # externalTrafficPolicy: Local

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_service(doc: Mapping[str, Any]) -> ServiceSpec:
    """A stored `v1` Service (already validated by the lbipam service); ValueError if unusable."""
    if doc.get("kind") != "Service":
        raise ValueError(f"not a Service: kind {doc.get('kind')!r}")
    meta = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    status = doc.get("status") or {}
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    if not name:
        raise ValueError("metadata.name is missing")
    ports = []
    for i, p in enumerate(spec.get("ports") or []):
        proto = PROTOCOLS.get(str(p.get("protocol") or "TCP").upper())
        if proto is None:
            raise ValueError(f"spec.ports[{i}].protocol {p.get('protocol')!r}: TCP or UDP")
        port = int(p["port"])
        target = p.get("targetPort", port)
        ports.append(
            ServicePort(
                str(p.get("name") or ""), proto, port, target if isinstance(target, str) else int(target)
            )
        )
    cluster_ip = spec.get("clusterIP")
    if cluster_ip in ("None", ""):
        cluster_ip = None
    external = [str(i["ip"]) for i in (status.get("loadBalancer") or {}).get("ingress") or [] if i.get("ip")]
    external += [str(ip) for ip in spec.get("externalIPs") or []]
    affinity = None
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds")
        affinity = int(cfg) if cfg else DEFAULT_AFFINITY_TIMEOUT
    return ServiceSpec(
        namespace=namespace,
        name=str(name),
        type=str(spec.get("type") or "ClusterIP"),
        cluster_ip=str(cluster_ip) if cluster_ip else None,
        external=tuple(dict.fromkeys(external)),
        selector=dict(spec["selector"]) if spec.get("selector") else None,
        ports=tuple(ports),
        affinity_timeout=affinity,
        local_only=spec.get("externalTrafficPolicy") == "Local",
    )


@dataclass(frozen=True)
class Backend:
    address: str
    port: int
    protocol: int
    node: str | None
    pod: str  # ns/name


@dataclass(frozen=True)
class Frontend:
    address: str
    port: int
    protocol: int
    service: str  # ns/name
    type: str  # ClusterIP, LoadBalancer, ExternalIPs
    external: bool
    local_only: bool
    affinity_timeout: int | None
    backends: tuple[Backend, ...] = field(default=())  # local ones first

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.address, self.port, self.protocol)


def backends_of(
    svc: ServiceSpec, port: ServicePort, workloads: Iterable[Workload], node: str
) -> list[Backend]:
    """The endpoints the Service selects, on the port its targetPort names; this node's first."""
    if not svc.selector:
        return []
    out = []
    for w in workloads:
        if w.namespace != svc.namespace or w.ip is None or w.ip.version != 4:
            continue
        if any(w.labels.get(k) != v for k, v in svc.selector.items()):
            continue
        if isinstance(port.target, str):
            named = w.named_ports.get(port.target.lower())
            if named is None or named[1] != port.protocol:
                continue
            target = named[0]
        else:
            target = port.target
        out.append(Backend(str(w.ip), target, port.protocol, w.node, w.key))
    return sorted(out, key=lambda b: (b.node != node, b.address, b.port))


def frontends(services: Iterable[ServiceSpec], workloads: Iterable[Workload], node: str) -> list[Frontend]:
    by_namespace: dict[str, list[Workload]] = {}
    for w in workloads:
        by_namespace.setdefault(w.namespace, []).append(w)
    out: dict[tuple[str, int, int], Frontend] = {}
    for svc in sorted(services, key=lambda s: s.key):
        pods = by_namespace.get(svc.namespace, [])
        for port in svc.ports:
            backends = tuple(backends_of(svc, port, pods, node))
            addrs = ([(svc.cluster_ip, "ClusterIP", False)] if svc.cluster_ip else []) + [
                (ip, "LoadBalancer" if svc.type == "LoadBalancer" else "ExternalIPs", True)
                for ip in svc.external
            ]
            for addr, kind, external in addrs:
                fe = Frontend(
                    addr,
                    port.port,
                    port.protocol,
                    svc.key,
                    kind,
                    external,
                    svc.local_only,
                    svc.affinity_timeout,
                    backends,
                )
                out.setdefault(fe.key, fe)  # the first service to claim a frontend keeps it
    return list(out.values())


BackendKey = tuple[str, int, int]


class LBWriter:
    """Writes frontends to the maps, only what changed since the last write."""

    def __init__(self, m: maps.DatapathMaps, node: str) -> None:
        self.maps = m
        self.node = node
        self.backend_ids: dict[BackendKey, int] = {
            (a, p, proto): i for i, (a, p, proto) in m.lb_backend_items().items()
        }
        self.written: dict[tuple[str, int, int, int], tuple[int, ...]] = {}
        self.rev_nat: dict[tuple[str, int, int], int] = {}
        for (addr, port, proto, slot), v in m.lb_service_items().items():
            self.written[(addr, port, proto, slot)] = _value_tuple(v)
            if slot == 0:
                self.rev_nat[(addr, port, proto)] = int(v.rev_nat_id)
        self.frontends: list[Frontend] = []
        # Backends no slot points at any more whose pod still exists (it left the selector): they
        # get no new connection, but keep their entry while connections through them are open
        # (see `gc`), as Cilium keeps terminating backends. key -> when it stopped being wanted.
        self.terminating: dict[BackendKey, float] = {}

    @staticmethod
    def _next_id(used: set[int], after: int, limit: int) -> int:
        """The first free id after `after` (wrapping), marked used."""
        i = after
        for _ in range(limit):
            i = i + 1 if i + 1 < limit else 1
            if i not in used:
                used.add(i)
                return i
        raise RuntimeError("no free load-balancer id")

    def write(self, wanted: list[Frontend], pods: set[str] | None = None) -> int:
        """Make the maps hold exactly `wanted`; returns the number of entries changed. A backend no
        longer wanted whose address is still a pod's (`pods`) becomes terminating instead of going."""
        changes = 0
        needed = {(b.address, b.port, b.protocol) for fe in wanted for b in fe.backends}
        for key in needed & set(self.terminating):
            del self.terminating[key]
        used = set(self.backend_ids.values())
        bid = max(used, default=0)
        for key in sorted(needed - set(self.backend_ids)):
            self.backend_ids[key] = bid = self._next_id(used, bid, 1 << 31)
            self.maps.lb_backend_set(bid, *key)
            changes += 1
        desired: dict[tuple[str, int, int, int], tuple[int, ...]] = {}
        live = {fe.key for fe in wanted}
        for key in list(self.rev_nat):
            if key not in live:
                del self.rev_nat[key]
        used_rev = set(self.rev_nat.values())
        rev = max(used_rev, default=0)
        for fe in wanted:
            if fe.key not in self.rev_nat:
                self.rev_nat[fe.key] = rev = self._next_id(used_rev, rev, 1 << 16)
            flags = (
                (maps.SVC_F_AFFINITY if fe.affinity_timeout else 0)
                | (maps.SVC_F_EXTERNAL if fe.external else 0)
                | (maps.SVC_F_LOCAL_ONLY if fe.local_only else 0)
            )
            local = sum(1 for b in fe.backends if b.node == self.node)
            for slot, b in enumerate(fe.backends, start=1):
                desired[(*fe.key, slot)] = (self.backend_ids[(b.address, b.port, b.protocol)], 0, 0, 0, 0, 0)
            desired[(*fe.key, 0)] = (
                0,
                len(fe.backends),
                self.rev_nat[fe.key],
                flags,
                min(local, 255),
                fe.affinity_timeout or 0,
            )
        # Backends and slots first, then each frontend's count: a reader never meets a slot
        # the count promises but the map does not hold yet.
        order = sorted(desired, key=lambda k: k[3] == 0)
        for slot_key in order:
            if self.written.get(slot_key) != desired[slot_key]:
                bid, count, rev, flags, local, timeout = desired[slot_key]
                value = maps.LBServiceC(
                    backend_id=bid,
                    count=count,
                    rev_nat_id=rev,
                    flags=flags,
                    local_count=local,
                    affinity_timeout=timeout,
                )
                self.maps.lb_service_set(*slot_key, value)
                self.written[slot_key] = desired[slot_key]
                changes += 1
        # Then what is gone: counts first (a frontend without count sends nothing to old slots).
        for slot_key in sorted(set(self.written) - set(desired), key=lambda k: k[3] != 0):
            self.maps.lb_service_delete(*slot_key)
            del self.written[slot_key]
            changes += 1
        now = time.monotonic()
        for key in sorted(set(self.backend_ids) - needed):
            if pods is not None and key[0] in pods:
                self.terminating.setdefault(key, now)
                continue
            self.terminating.pop(key, None)
            self.maps.lb_backend_delete(self.backend_ids.pop(key))
            changes += 1
        self.frontends = wanted
        return changes

    def gc(self, in_use: set[BackendKey], now: float, max_age: float = TERMINATING_MAX_SECONDS) -> int:
        """Delete the terminating backends no open connection uses any more (`in_use`: the
        backends of live conntrack entries made through a frontend), or kept longer than `max_age`."""
        removed = 0
        for key, since in list(self.terminating.items()):
            if key in in_use and now - since < max_age:
                continue
            del self.terminating[key]
            bid = self.backend_ids.pop(key, None)
            if bid is not None:
                self.maps.lb_backend_delete(bid)
                removed += 1
        return removed


def _value_tuple(v: maps.LBServiceC) -> tuple[int, ...]:
    return (
        int(v.backend_id),
        int(v.count),
        int(v.rev_nat_id),
        int(v.flags),
        int(v.local_count),
        int(v.affinity_timeout),
    )


def describe(writer: LBWriter) -> list[dict[str, Any]]:
    """The frontends as `GET /v1/services` shows them (like `cilium-dbg service list`)."""
    out = []
    for fe in sorted(writer.frontends, key=lambda f: writer.rev_nat.get(f.key, 0)):
        out.append(
            {
                "id": writer.rev_nat.get(fe.key, 0),
                "frontend": f"{fe.address}:{fe.port}/{PROTO_NAMES.get(fe.protocol, fe.protocol)}",
                "type": fe.type,
                "service": fe.service,
                "backends": [
                    {
                        "id": writer.backend_ids.get((b.address, b.port, b.protocol), 0),
                        "address": f"{b.address}:{b.port}/{PROTO_NAMES.get(b.protocol, b.protocol)}",
                        "state": "active",
                        "node": b.node,
                        "pod": b.pod,
                    }
                    for b in fe.backends
                ],
            }
        )
    return out
