"""Wiring of the datapath agent: programs and maps, endpoints API, policy and endpoint watches,
identity allocation over NATS, the node-local API for proxies, events to flows, conntrack GC."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import Field

from cilia import bus
from cilia.kvstore import EventKind, KVStore, Lease
from cilia.kvstore.errors import LeaseExpiredError
from cilia.service import Service
from cilia.settings import Settings
from services.datapath import localapi, maps
from services.datapath.agent import Agent, EndpointRecord
from services.datapath.eventtypes import DROP_REASONS, RawEvent
from services.datapath.nodes import NodeInfo, node_key
from services.datapath.ringbuf import EventReader
from services.identity.models import AllocateRequest, IdentityReply, ReleaseReply, ReleaseRequest
from services.policy.store import key_of

log = logging.getLogger("cilia.datapath")


class DatapathSettings(Settings):
    service: str = "datapath"
    pod_cidr: IPv4Network = IPv4Network("10.200.0.0/24")
    node_netns: str | None = None
    pin_root: Path | None = None
    policy_bucket: str = bus.BUCKET_POLICIES
    endpoints_bucket: str = bus.BUCKET_ENDPOINTS
    ct_gc_interval_seconds: float = Field(default=30.0, gt=0)
    flow_buffer: int = Field(default=10000, gt=0)
    nodes_bucket: str = bus.BUCKET_NODES
    services_bucket: str = bus.BUCKET_SERVICES
    tunnel: str = Field(default="vxlan", pattern="^(vxlan|disabled)$")
    node_ip: str | None = None  # the address other nodes tunnel to (default: the node's first)
    node_lease_seconds: int = Field(default=15, ge=1)
    devices: str | None = None  # comma-separated uplinks for outside service traffic (default: the node IP's)

    def pins(self) -> Path:
        return self.pin_root or maps.pin_root(self.node)

    def agent_state_dir(self) -> Path:
        return self.state_dir / self.node


class BPFMetrics(Collector):
    """Prometheus view of the datapath's per-CPU counters, read from the map at scrape time."""

    def __init__(self, agent_ref: Any) -> None:
        self.agent_ref = agent_ref

    def collect(self) -> Any:
        agent: Agent | None = self.agent_ref()
        packets = CounterMetricFamily(
            "cilia_datapath_packets",
            "Packets by verdict, reason and direction",
            labels=["verdict", "reason", "direction"],
        )
        nbytes = CounterMetricFamily(
            "cilia_datapath_bytes",
            "Bytes by verdict, reason and direction",
            labels=["verdict", "reason", "direction"],
        )
        endpoints = GaugeMetricFamily("cilia_endpoints", "Local endpoints")
        if agent is not None and agent.maps is not None:
            for (reason, direction), (p, b) in agent.maps.metrics_totals().items():
                verdict = "forwarded" if reason == 0 else "dropped"
                text = "" if reason == 0 else DROP_REASONS.get(reason, str(reason))
                d = {1: "ingress", 2: "egress"}.get(direction, "unknown")
                packets.add_metric([verdict, text, d], p)
                nbytes.add_metric([verdict, text, d], b)
            endpoints.add_metric([], len(agent.endpoints()))
        yield packets
        yield nbytes
        yield endpoints


def build(settings: DatapathSettings | None = None) -> Service:
    settings = settings or DatapathSettings()
    service = Service(
        "datapath",
        settings,
        "The datapath agent of a node: endpoints, eBPF programs and maps, flows.",
        write_roles=("admin", "agent"),
    )
    holder: dict[str, Any] = {}
    recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=settings.flow_buffer)
    service.registry.register(BPFMetrics(lambda: holder.get("agent")))

    from services.datapath.app import router

    service.app.include_router(router(service, lambda: holder.get("agent")))

    @service.app.get("/v1/flows", tags=["flows"], dependencies=[Depends(service.require_read())])
    async def flows(last: int = 100) -> dict[str, Any]:
        """The node's most recent flows (Hubble JSON), newest last."""
        items = list(recent)[-last:] if last > 0 else []
        return {"node": settings.node, "items": items}

    @service.app.get("/v1/datapath/status", tags=["datapath"], dependencies=[Depends(service.require_read())])
    async def datapath_status() -> dict[str, Any]:
        """Policies whose map state is written (with their revision), regenerations, endpoints, proxies."""
        a: Agent | None = holder.get("agent")
        if a is None:
            return {"ready": False}
        return {
            "ready": True,
            "node": a.node,
            "policies_synced": a.policies_synced,
            "policies": a.applied,
            "regenerations": a.regenerations,
            "endpoints": len(a.endpoints()),
            "proxies": {str(p.port): p.mode for p in a.proxies.values()},
            "programs": a.programs.hash if a.programs else None,
        }

    async def allocate(labels: list[str]) -> int:
        if service.nc is None:
            raise RuntimeError("NATS is not connected: cannot allocate an identity")
        reply = await bus.request(
            service.nc,
            bus.IDENTITY_ALLOCATE,
            AllocateRequest(labels=labels, holder=settings.node),
            IdentityReply,
            5.0,
        )
        return reply.id

    async def release(identity: int) -> None:
        if service.nc is not None:
            await bus.request(
                service.nc,
                bus.IDENTITY_RELEASE,
                ReleaseRequest(id=identity, holder=settings.node),
                ReleaseReply,
                2.0,
            )

    agent = Agent(
        settings.node,
        settings.pins(),
        settings.agent_state_dir(),
        settings.pod_cidr,
        allocate,
        release,
        settings.node_netns,
        tunnel=settings.tunnel == "vxlan",
        node_ip=settings.node_ip,
        devices=[d for d in settings.devices.split(",") if d] if settings.devices is not None else None,
    )
    registry: dict[str, NodeInfo] = {}

    async def publish_endpoint(rec: EndpointRecord, what: str) -> None:
        kv: KVStore | None = service.kv
        if kv is None:
            return
        key = f"{settings.endpoints_bucket}/{settings.node}/{rec.namespace}/{rec.name}"
        try:
            if what == "deleted":
                await kv.delete(key)
            else:
                await kv.put(key, rec.model_dump_json().encode())
        except Exception as err:
            log.warning("event=endpoint-publish-failed endpoint=%s error=%r", rec.key, str(err))

    agent.listeners.append(publish_endpoint)

    @service.on_start
    async def start(svc: Service) -> None:
        await agent.start()
        holder["agent"] = agent

        async def proxy_flow(flow: dict[str, Any]) -> None:
            recent.append(flow)
            await holder["publisher"].publish(flow)

        holder["publisher"] = FlowPublisher(svc, settings.node)
        holder["local"] = await localapi.serve(agent, localapi.socket_path(settings.node), proxy_flow)
        # Republish this node's endpoints (a restart, or a kvstore that lost them).
        for rec in agent.endpoints():
            await publish_endpoint(rec, "added")

    @service.on_stop
    async def stop(svc: Service) -> None:
        server = holder.get("local")
        if server is not None:
            server.close()
        reader = holder.get("reader")
        if reader is not None:
            reader.stop()

    @service.task
    async def watch_policies(svc: Service) -> None:
        """Policies from the kvstore: the full snapshot first, then every change."""
        assert svc.kv is not None

        def parse(key: str, value: bytes) -> tuple[dict[str, Any], int]:
            doc = json.loads(value)
            return doc["manifest"], int(doc.get("revision", 0))

        async def apply(current: dict[str, tuple[dict[str, Any], int]]) -> None:
            await agent.set_policies(
                {key_of(k): m for k, (m, _) in current.items()},
                {key_of(k): r for k, (_, r) in current.items()},
            )

        await mirror(svc.kv, f"{settings.policy_bucket}/items/", parse, apply, "policy")

    @service.task
    async def watch_endpoints(svc: Service) -> None:
        """Every node's endpoints: identities and addresses for selectors and the ipcache."""
        assert svc.kv is not None

        def parse(key: str, value: bytes) -> dict[str, Any]:
            doc: dict[str, Any] = json.loads(value)
            return doc

        async def apply(current: dict[str, dict[str, Any]]) -> None:
            await agent.set_cluster_endpoints(current.values())

        await mirror(svc.kv, f"{settings.endpoints_bucket}/", parse, apply, "endpoint")

    @service.task
    async def watch_services(svc: Service) -> None:
        """Services (stored by the lbipam service): frontends and backends for load balancing."""
        assert svc.kv is not None

        def parse(key: str, value: bytes) -> dict[str, Any]:
            doc: dict[str, Any] = json.loads(value)
            return doc

        async def apply(current: dict[str, dict[str, Any]]) -> None:
            await agent.set_services(current.values())

        await mirror(svc.kv, f"{settings.services_bucket}/", parse, apply, "service")

    @service.app.get("/v1/services", tags=["services"], dependencies=[Depends(service.require_read())])
    async def services() -> dict[str, Any]:
        """Service frontends and their backends on this node, like `cilium-dbg service list`."""
        from services.datapath.lb import describe

        return {"node": settings.node, "items": describe(agent.lb) if agent.lb is not None else []}

    @service.app.get("/v1/nodes", tags=["nodes"], dependencies=[Depends(service.require_read())])
    async def nodes() -> dict[str, Any]:
        """The node registry as this node sees it (itself included), with each node's health."""
        items = []
        for info in sorted(registry.values(), key=lambda n: n.name):
            doc = info.model_dump(mode="json")
            doc["health"] = info.health()
            doc["self"] = info.name == settings.node
            items.append(doc)
        return {"node": settings.node, "items": items}

    def own_info() -> NodeInfo | None:
        ip = agent.node_ip
        if ip is None:
            return None
        host, port = settings.http_host_port()
        api_host = ip if host in ("0.0.0.0", "") else host
        return NodeInfo(
            name=settings.node,
            ip=ip,  # type: ignore[arg-type]
            pod_cidr=settings.pod_cidr,
            api=f"http://{api_host}:{port}",
            endpoints=len(agent.endpoints()),
            started=started,
            lease_seconds=settings.node_lease_seconds,
            labels=settings.node_label_map(),
        )

    started = time.time()

    @service.task
    async def announce_node(svc: Service) -> None:
        """Keep this node in the registry: a put under a lease four times per TTL."""
        assert svc.kv is not None
        lease: Lease | None = None
        key = node_key(settings.nodes_bucket, settings.node)
        while True:
            info = own_info()
            if info is not None:
                try:
                    if lease is None:
                        lease = await svc.kv.grant(settings.node_lease_seconds)
                    await svc.kv.put(key, info.model_dump_json().encode(), lease)
                except LeaseExpiredError:
                    lease = None
                    continue
                except Exception as err:
                    log.debug("event=node-heartbeat-failed error=%r", str(err))
            await asyncio.sleep(max(settings.node_lease_seconds / 4, 0.2))

    @service.task
    async def watch_nodes(svc: Service) -> None:
        """Other nodes: tunnel endpoints, pod CIDR routes, and whose endpoints still count."""
        assert svc.kv is not None

        def parse(key: str, value: bytes) -> NodeInfo:
            return NodeInfo.model_validate_json(value)

        async def apply(current: dict[str, NodeInfo]) -> None:
            for gone in set(registry) - {n.name for n in current.values()}:
                log.info("event=node-gone node=%s", gone)
            registry.clear()
            registry.update({n.name: n for n in current.values()})
            await agent.set_nodes(registry.values())

        await mirror(svc.kv, f"{settings.nodes_bucket}/", parse, apply, "node")

    @service.task
    async def events(svc: Service) -> None:
        """Ring-buffer events -> flows: kept locally and published on `cilia.flows.<node>`."""
        queue: asyncio.Queue[RawEvent] = asyncio.Queue(maxsize=65536)
        reader = EventReader(settings.pins() / maps.EVENTS, queue, asyncio.get_running_loop())
        holder["reader"] = reader
        reader.start()
        publisher = holder["publisher"]
        while True:
            raw = await queue.get()
            try:
                flow = build_flow_dict(agent, raw)
            except Exception:
                log.exception("event=flow-build-failed")
                continue
            recent.append(flow)
            await publisher.publish(flow)

    @service.task
    async def ct_gc(svc: Service) -> None:
        """Delete conntrack entries past their timeout (the datapath also ignores them on lookup)."""
        while True:
            await asyncio.sleep(settings.ct_gc_interval_seconds)
            if agent.maps is not None:
                removed = await asyncio.to_thread(gc_conntrack, agent.maps)
                if removed:
                    log.info("event=ct-gc removed=%d", removed)
                gone = await agent.gc_lb_backends()
                if gone:
                    log.info("event=lb-backends-gc removed=%d (terminating, no connection left)", gone)

    return service


T = TypeVar("T")


async def mirror(
    kv: KVStore,
    prefix: str,
    parse: Callable[[str, bytes], T],
    apply: Callable[[dict[str, T]], Awaitable[None]],
    what: str,
) -> None:
    """Keep a parsed copy of a kvstore prefix and hand all of it to `apply` once the first listing is
    complete and after every change from then on (an invalid record is logged and ignored)."""
    current: dict[str, T] = {}
    synced = False
    async with kv.watch(prefix) as events:
        async for ev in events:
            if ev.kind is EventKind.LIST_DONE:
                synced = True
            elif ev.kind is EventKind.PUT:
                try:
                    current[ev.key] = parse(ev.key, ev.value)
                except (ValueError, KeyError, TypeError) as err:
                    log.warning("event=%s-record-invalid key=%s error=%r", what, ev.key, str(err))
                    continue
            else:
                current.pop(ev.key, None)
            if synced:
                await apply(current)


NSEC = 1_000_000_000


def ct_timeout(entry: maps.CTEntryC, proto: int) -> int:
    if proto != 6:
        return 60 * NSEC
    if entry.flags & maps.CT_F_CLOSING:
        return 10 * NSEC
    if entry.flags & maps.CT_F_REPLY_SEEN:
        return 21600 * NSEC
    return 60 * NSEC


def gc_conntrack(m: maps.DatapathMaps) -> int:
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    removed = 0
    for key, entry in m.ct_items():
        if now - int(entry.last_seen) > ct_timeout(entry, int(key.proto)):
            removed += m.ct.delete(key)
    return removed


def build_flow_dict(agent: Agent, raw: RawEvent) -> dict[str, Any]:
    from services.datapath.flowsource import flow_for

    return flow_for(agent, raw)


class FlowPublisher:
    """Publishes flows on JetStream (stream CILIA_FLOWS); a NATS outage only costs flows, never policy."""

    def __init__(self, service: Service, node: str) -> None:
        self.service = service
        self.node = node
        self.ready = False
        self.failed = 0

    async def publish(self, flow: dict[str, Any]) -> None:
        nc = self.service.nc
        if nc is None or not nc.is_connected:
            self.failed += 1
            return
        try:
            from services.datapath.flowsource import publish_flow_dict

            self.ready = await publish_flow_dict(nc, self.node, flow, self.ready)
        except Exception as err:
            self.failed += 1
            log.debug("event=flow-publish-failed error=%r", str(err))


def main() -> None:
    build().run()
