"""The per-node announcer (`python -m services.lbipam.announcer`, one per node, in the node's network
namespace like the datapath agent): makes the node's LoadBalancer addresses known outside the
cluster, by ARP (CiliumL2AnnouncementPolicy, one elected node per service) and by BGP
(CiliumBGPPeeringPolicy, a gobgpd per virtual router).

It follows Services, pools and policies (lbipam bucket), this node's endpoints (for
`externalTrafficPolicy: Local`) and the L2 leases in the kvstore, recomputes what to announce with
`services.lbipam.selection`, and applies it. Its report (leases led, BGP peers and routes, errors)
is on `GET /v1/announcer` and in the kvstore at `leases/announcers/<node>` while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import Depends
from prometheus_client import Counter, Gauge
from pydantic import Field

from cilia import bus
from cilia.kvstore import EventKind, KVStore, Lease
from cilia.kvstore.errors import LeaseExpiredError
from cilia.models.services import (
    CiliumBGPPeeringPolicy,
    CiliumL2AnnouncementPolicy,
    CiliumLoadBalancerIPPool,
)
from cilia.models.services import (
    Service as K8sService,
)
from cilia.service import Service
from cilia.settings import Settings
from services.lbipam import arp
from services.lbipam.gobgp import GoBGP
from services.lbipam.l2 import Elector
from services.lbipam.selection import (
    BGPDesired,
    bgp_desired,
    has_ready_local_backend,
    l2_candidates,
)

log = logging.getLogger("cilia.announcer")


class AnnouncerSettings(Settings):
    service: str = "announcer"
    node_ip: str | None = None  # the BGP router ID (default: the node's first IPv4 address)
    pod_cidr: str | None = None  # advertised with exportPodCIDR
    l2_lease_duration_seconds: float = Field(default=1.0, gt=0)
    l2_renew_deadline_seconds: float = Field(default=0.8, gt=0)
    l2_retry_period_seconds: float = Field(default=0.2, gt=0)
    gobgpd: str = "gobgpd"
    report_lease_seconds: int = Field(default=5, ge=1)
    services_bucket: str = bus.BUCKET_SERVICES
    lbipam_bucket: str = bus.BUCKET_LBIPAM
    endpoints_bucket: str = bus.BUCKET_ENDPOINTS
    leases_bucket: str = bus.BUCKET_LEASES


def first_ipv4() -> str | None:
    """The first non-loopback IPv4 address of this network namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=2):
            addr = msg.get_attr("IFA_ADDRESS")
            if addr and not ipaddress.ip_address(addr).is_loopback:
                return str(addr)
    return None


class State:
    """What the announcer follows in the kvstore, parsed."""

    def __init__(self) -> None:
        self.services: dict[str, K8sService] = {}
        self.pools: dict[str, CiliumLoadBalancerIPPool] = {}
        self.l2: dict[str, CiliumL2AnnouncementPolicy] = {}
        self.bgp: dict[str, CiliumBGPPeeringPolicy] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.synced: set[str] = set()

    def ready_local(self) -> dict[str, bool]:
        eps = list(self.endpoints.values())
        return {svc.key: has_ready_local_backend(svc, eps) for svc in self.services.values()}


class Speaker:
    """The node's BGP routers: one gobgpd per local ASN, started, changed and stopped as desired."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.routers: dict[int, GoBGP] = {}
        self.desired = BGPDesired()
        self.lock = asyncio.Lock()

    async def apply(self, desired: BGPDesired) -> None:
        async with self.lock:
            if desired.error and desired.error != self.desired.error:
                log.error("event=bgp-policy-selection-failed error=%r", desired.error)
            self.desired = desired
            for asn in list(self.routers):
                router = self.routers[asn]
                want = desired.routers.get(asn)
                if want is None or want.router_id != router.router_id:
                    await self.routers.pop(asn).stop()
            for asn, want in desired.routers.items():
                if asn not in self.routers:
                    gobgp = GoBGP(asn, want.router_id, self.binary)
                    try:
                        await gobgp.start()
                    except Exception:
                        await gobgp.stop()
                        raise
                    self.routers[asn] = gobgp
                await self.routers[asn].apply(want)

    async def peers(self) -> list[dict[str, Any]]:
        out = []
        for router in list(self.routers.values()):
            with contextlib.suppress(Exception):
                out += await router.peers()
        return out

    async def stop(self) -> None:
        async with self.lock:
            for router in self.routers.values():
                await router.stop()
            self.routers.clear()


def build(settings: AnnouncerSettings | None = None) -> Service:
    settings = settings or AnnouncerSettings()
    service = Service(
        "announcer", settings, "L2 (ARP) and BGP announcements of this node's service addresses."
    )
    labels = settings.node_label_map()
    state = State()
    responder = arp.Responder()
    speaker = Speaker(settings.gobgpd)
    changed = asyncio.Event()
    holder: dict[str, Any] = {}
    leading_gauge = Gauge(
        "cilia_l2_leases_held", "L2 announcement leases this node holds", registry=service.registry
    )
    arp_counter = Counter("cilia_arp_packets", "ARP packets by kind", ["kind"], registry=service.registry)
    arp_seen: dict[str, int] = {}

    def elector() -> Elector:
        e = holder.get("elector")
        assert isinstance(e, Elector)
        return e

    def interfaces_cache() -> list[str]:
        now = time.monotonic()
        cached = holder.get("interfaces")
        if cached is None or now - cached[0] > 1.0:
            holder["interfaces"] = (now, arp.arp_interfaces())
        return list(holder["interfaces"][1])

    def refresh_arp() -> None:
        """Serve ARP for what this node leads, on each service's selected interfaces."""
        if "elector" not in holder:
            return
        leading = elector().leading()
        per_if: dict[str, set[str]] = {}
        for name in interfaces_cache():
            for want in leading.values():
                if want.selects_interface(name):
                    per_if.setdefault(name, set()).update(want.addresses)
        responder.update({i: frozenset(a) for i, a in per_if.items()})
        leading_gauge.set(len(leading))
        for kind, value in responder.stats.items():
            delta = value - arp_seen.get(kind, 0)
            if delta:
                arp_counter.labels(kind).inc(delta)
                arp_seen[kind] = value

    @service.on_start
    async def start(svc: Service) -> None:
        assert svc.kv is not None
        holder["elector"] = Elector(
            svc.kv,
            settings.node,
            settings.leases_bucket,
            refresh_arp,
            settings.l2_lease_duration_seconds,
            settings.l2_renew_deadline_seconds,
            settings.l2_retry_period_seconds,
        )
        holder["router_id"] = settings.node_ip or await asyncio.to_thread(first_ipv4)
        log.info(
            "event=announcer-node node=%s labels=%s router_id=%s", settings.node, labels, holder["router_id"]
        )

    @service.on_stop
    async def stop(svc: Service) -> None:
        # Leave cleanly: another node takes the L2 leases at once, BGP peers get a CEASE.
        if "elector" in holder:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(elector().release_all(), timeout=3)
        responder.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(speaker.stop(), timeout=10)

    async def follow(
        svc: Service, prefix: str, what: str, store: dict[str, Any], parse: Callable[[bytes], Any]
    ) -> None:
        assert svc.kv is not None
        kv: KVStore = svc.kv
        async with kv.watch(prefix) as events:
            async for ev in events:
                if ev.kind is EventKind.LIST_DONE:
                    state.synced.add(what)
                elif ev.kind is EventKind.PUT:
                    try:
                        store[ev.key] = parse(ev.value)
                    except Exception as err:
                        log.warning("event=%s-record-invalid key=%s error=%r", what, ev.key, str(err))
                        store.pop(ev.key, None)
                else:
                    store.pop(ev.key, None)
                changed.set()

    def _svc(value: bytes) -> K8sService:
        return K8sService.model_validate(json.loads(value))

    def _model(model: Any) -> Callable[[bytes], Any]:
        def parse(value: bytes) -> Any:
            doc = json.loads(value)
            doc["status"] = None
            return model.model_validate(doc)

        return parse

    @service.task
    async def follow_services(svc: Service) -> None:
        await follow(svc, f"{settings.services_bucket}/", "services", state.services, _svc)

    @service.task
    async def follow_pools(svc: Service) -> None:
        await follow(
            svc, f"{settings.lbipam_bucket}/pools/", "pools", state.pools, _model(CiliumLoadBalancerIPPool)
        )

    @service.task
    async def follow_l2(svc: Service) -> None:
        await follow(
            svc,
            f"{settings.lbipam_bucket}/l2announcementpolicies/",
            "l2",
            state.l2,
            _model(CiliumL2AnnouncementPolicy),
        )

    @service.task
    async def follow_bgp(svc: Service) -> None:
        await follow(
            svc,
            f"{settings.lbipam_bucket}/bgppeeringpolicies/",
            "bgp",
            state.bgp,
            _model(CiliumBGPPeeringPolicy),
        )

    @service.task
    async def follow_endpoints(svc: Service) -> None:
        await follow(
            svc, f"{settings.endpoints_bucket}/{settings.node}/", "endpoints", state.endpoints, json.loads
        )

    @service.task
    async def follow_leases(svc: Service) -> None:
        await elector().watch()

    @service.task
    async def elect(svc: Service) -> None:
        await elector().run()

    @service.task
    async def announce(svc: Service) -> None:
        """Recompute what to announce after every change (batched for 20 ms) and at least every second."""
        synced_all = {"services", "pools", "l2", "bgp", "endpoints"}
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=1.0)
            await asyncio.sleep(0.02)
            changed.clear()
            if not synced_all <= state.synced:
                continue
            services = list(state.services.values())
            ready = state.ready_local()
            elector().set_candidates(l2_candidates(services, state.l2.values(), labels, ready))
            refresh_arp()
            desired = bgp_desired(
                state.bgp.values(),
                labels,
                services,
                state.pools.values(),
                ready,
                str(holder.get("router_id") or ""),
                settings.pod_cidr,
            )
            try:
                await speaker.apply(desired)
            except Exception as err:
                log.warning("event=bgp-apply-failed error=%r", str(err))
                changed.set()
                await asyncio.sleep(1.0)

    async def report() -> dict[str, Any]:
        e = holder.get("elector")
        leading = e.leading() if isinstance(e, Elector) else {}
        desired = speaker.desired
        return {
            "node": settings.node,
            "labels": labels,
            "l2": {
                "leading": {s: list(w.addresses) for s, w in sorted(leading.items())},
                "candidates": sorted(e.candidates) if isinstance(e, Elector) else [],
                "interfaces": {i: sorted(a) for i, a in responder.announcements.items()},
                "arp": dict(responder.stats),
            },
            "bgp": {
                "policy": desired.policy,
                "error": desired.error,
                "routers": [
                    {"local_asn": asn, "router_id": r.router_id, "routes": sorted(r.routes)}
                    for asn, r in sorted(desired.routers.items())
                ],
                "peers": await speaker.peers(),
            },
            "updated": time.time(),
        }

    @service.app.get("/v1/announcer", tags=["announcer"], dependencies=[Depends(service.require_read())])
    async def announcer_status() -> dict[str, Any]:
        """What this node announces: L2 leases held and ARP counters, BGP policy, peers and routes."""
        return await report()

    @service.task
    async def publish_report(svc: Service) -> None:
        """This node's report in the kvstore, under a lease: it goes when the announcer does."""
        assert svc.kv is not None
        key = f"{settings.leases_bucket}/announcers/{settings.node}"
        lease: Lease | None = None
        while True:
            try:
                if lease is None:
                    lease = await svc.kv.grant(settings.report_lease_seconds)
                await svc.kv.put(key, json.dumps(await report()).encode(), lease)
            except LeaseExpiredError:
                lease = None
                continue
            except Exception as err:
                log.debug("event=report-failed error=%r", str(err))
            await asyncio.sleep(max(settings.report_lease_seconds / 4, 0.5))

    return service


def main() -> None:
    build().run()


if __name__ == "__main__":
    main()
