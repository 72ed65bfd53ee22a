"""The datapath agent of one node: endpoints, their identities and map state, written to the BPF maps.

Domain logic only (no FastAPI, no NATS): identities come from an injected allocator, cluster state
from an injected kvstore. The policy engine computes each endpoint's map state; the agent writes
only what differs from what the maps hold. Until the first policy snapshot arrives the maps are
left as they are, so a restarted agent never opens what the previous one closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cilia.errors import CiliaError
from cilia.identity import HOST, REMOTE_NODE
from cilia.labelfilter import identity_labels
from cilia.models.loader import parse_document
from cilia.policy.context import PolicyOptions
from cilia.policy.engine import PolicyEngine, SubjectKey
from cilia.policy.inventory import Inventory, Workload, workload_identity_labels
from cilia.policy.ipcache import IdentityInfo, IPCache, cidr_identity_labels
from cilia.policy.l7 import PARSER_DNS, PARSER_HTTP, DNSRule, L7Request, L7Rule
from cilia.policy.mapstate import EndpointPolicy, MapEntry, MapKey
from cilia.policy.repository import PolicyKey, Repository
from cilia.policy.rules import EGRESS, INGRESS, FQDNSelector
from cilia.policy.translate import PolicyResource
from services.datapath import lb, loader, maps, overlay, plumbing, proxyrules
from services.datapath.ipam import Ipam
from services.datapath.nodes import NodeInfo

log = logging.getLogger("cilia.datapath")

Allocate = Callable[[list[str]], Awaitable[int]]
Release = Callable[[int], Awaitable[None]]


class EndpointError(CiliaError):
    """An endpoint request cannot be done as asked."""


class EndpointSpec(BaseModel):
    """What `POST /v1/endpoints` and `cilia endpoint add` ask for."""

    namespace: str = "default"
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    ip: str | None = None
    netns: str | None = Field(default=None, description="adopt this existing network namespace (a path)")
    named_ports: dict[str, int | str] = Field(default_factory=dict, alias="namedPorts")
    service_account: str = Field(default="default", alias="serviceAccount")

    model_config = {"populate_by_name": True}


class EndpointRecord(BaseModel):
    """A local endpoint as the agent keeps it (state file, kvstore, API)."""

    namespace: str
    name: str
    labels: dict[str, str]
    ip: str
    ep_id: int
    identity: int
    identity_labels: list[str]
    node: str
    named_ports: dict[str, tuple[int, int]] = Field(default_factory=dict)
    service_account: str = "default"
    network: dict[str, Any]
    state: str = "ready"
    created: float = Field(default_factory=time.time)
    ingress_enforced: bool = False
    egress_enforced: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def net(self) -> plumbing.EndpointNetwork:
        return plumbing.EndpointNetwork.from_dict(self.network)

    def workload(self) -> Workload:
        return Workload(
            self.namespace,
            self.name,
            dict(self.labels),
            ip_address(self.ip),
            dict(self.named_ports),
            self.service_account,
            self.node,
            self.identity,
        )


def record_to_workload(doc: Mapping[str, Any]) -> Workload | None:
    """A cluster endpoint record (any node) as an engine workload; None if malformed."""
    try:
        return EndpointRecord.model_validate(doc).workload()
    except Exception:
        return None


EntryTuple = tuple[int, int, int, int, int]  # proxy_port, deny, plen, priority, cookie


@dataclass
class AgentState:
    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)
    next_ep_id: int = 1


class Agent:
    """Owns the node's endpoints and keeps the BPF maps in step with policy and cluster state."""

    def __init__(
        self,
        node: str,
        pin_root: Path,
        state_dir: Path,
        pod_cidr: IPv4Network,
        allocate: Allocate,
        release: Release | None = None,
        node_netns: str | None = None,
        options: PolicyOptions | None = None,
        proxy_ports: Mapping[str, int] | None = None,
        tunnel: bool = True,
        node_ip: str | None = None,
        devices: Iterable[str] | None = None,
        proxy_grace: float = 10.0,
    ) -> None:
        self.node = node
        self.pin_root = pin_root
        self.state_dir = state_dir
        self.node_netns = node_netns
        self.allocate = allocate
        self.release = release
        self.options = options or PolicyOptions()
        self.ipam = Ipam(pod_cidr)
        self.state = AgentState()
        self.lock = asyncio.Lock()
        self.programs: loader.LoadedPrograms | None = None
        self.maps: maps.DatapathMaps | None = None
        self.policies: dict[PolicyKey, dict[str, Any]] = {}
        self.policies_synced = False
        self.cluster: dict[str, Workload] = {}  # every endpoint of the cluster, by ns/name@node
        self.node_ips: set[str] = set()
        self.engine: PolicyEngine | None = None
        self.repo = Repository()
        # parser -> proxy port (DNS and HTTP proxies register theirs through the node-local API)
        self.proxy_ports: dict[str, int] = dict(proxy_ports or {})
        self.proxies: dict[int, proxyrules.ProxyPort] = {}
        self.revision = 0
        self.regenerations = 0
        self.applied: dict[str, int] = {}  # policies whose map state is written, with their revision
        self.listeners: list[Callable[[EndpointRecord, str], Awaitable[None]]] = []
        # Other nodes (the registry), and whether the registry's first listing arrived: until it
        # has, remote endpoints are kept (a restarting agent must not drop anything).
        self.tunnel = tunnel
        self.configured_node_ip = node_ip
        self.nodes: dict[str, NodeInfo] = {}
        self.nodes_synced = False
        self.overlay_ifindex = 0
        self.services: dict[str, lb.ServiceSpec] = {}
        # Uplinks where outside traffic to LoadBalancer/external IPs arrives (None: the device of
        # the node's address).
        self.devices = list(devices) if devices is not None else None
        self.lb: lb.LBWriter | None = None
        # For the DNS proxy (see the section at the end): a generation that changes whenever a DNS
        # verdict or a toFQDNs selection may have, FQDN identities restored before the first map
        # write, and proxy registrations kept across an agent restart for `proxy_grace` seconds.
        self.generation = 0
        self._generation_event = asyncio.Event()
        self._restored_ipcache: IPCache | None = None
        self.proxy_grace = proxy_grace
        self._restored_proxies: set[int] = set()

    # --- start-up and restore ------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / "endpoints.json"

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "next_ep_id": self.state.next_ep_id,
            "endpoints": [r.model_dump(mode="json") for r in self.state.endpoints.values()],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.state_file)

    async def start(self) -> None:
        """Load (or reuse) the programs, open the maps, restore endpoints of a previous run."""
        self.programs = await asyncio.to_thread(loader.load, self.pin_root)
        self.maps = maps.DatapathMaps.open(self.pin_root)
        self.lb = lb.LBWriter(self.maps, self.node)
        self.node_ips = {str(a) for a in await asyncio.to_thread(plumbing.node_addresses, self.node_netns)}
        if self.configured_node_ip:
            self.node_ips.add(self.configured_node_ip)
        if self.tunnel:
            await asyncio.to_thread(self._setup_overlay)
        await asyncio.to_thread(self._setup_devices)
        await self._restore()
        self._restore_ipcache()
        await asyncio.to_thread(self._reset_proxies)
        await asyncio.to_thread(self._write_node_ipcache)
        if self._restored_proxies:
            self._proxy_expiry = asyncio.create_task(self.expire_restored_proxies())

    def _setup_overlay(self) -> None:
        assert self.programs is not None and self.maps is not None
        self.overlay_ifindex = overlay.ensure_device(self.node_netns, self.node)
        loader.attach_overlay(self.programs, overlay.DEVICE, self.node_netns)
        self.maps.config_set(maps.CONFIG_OVERLAY_IFINDEX, self.overlay_ifindex)

    def _setup_devices(self) -> None:
        """from_netdev on the uplinks, and the node address that outside traffic is SNATed to."""
        assert self.programs is not None and self.maps is not None
        ip = self.node_ip
        if ip is not None:
            self.maps.config_set_ip(maps.CONFIG_NODE_IP, ip)
        devices = self.devices
        if devices is None:
            devices = [d for d in [plumbing.device_of(ip, self.node_netns)] if d] if ip else []
        for dev in devices:
            loader.attach_netdev(self.programs, dev, self.node_netns)
        if devices:
            log.info("event=uplinks-attached devices=%s", ",".join(devices))

    @property
    def node_ip(self) -> str | None:
        """The node's address for other nodes (its tunnel endpoint)."""
        if self.configured_node_ip:
            return self.configured_node_ip
        return sorted(self.node_ips, key=lambda a: IPv4Address(a))[0] if self.node_ips else None

    def _reset_proxies(self) -> None:
        """Proxies register again after an agent restart. A registration the previous run saved
        (and whose port the datapath still has) is kept for `proxy_grace` seconds, so a proxy that
        stays up keeps serving through the restart; other ports fail closed at once."""
        assert self.maps is not None
        kept = self._load_proxies()
        for port in self.maps.proxy_port_list():
            if port not in kept:
                self.maps.proxy_port_delete(port)
        if kept:
            self._apply_proxy_rules()
        else:
            proxyrules.remove(self.node_netns)
        live = {rec.ip for rec in self.state.endpoints.values()}
        for ip, _info in self.maps.endpoint_items():
            if ip not in live:
                self.maps.endpoint_delete(ip)

    async def _restore(self) -> None:
        if not self.state_file.exists():
            return
        doc = json.loads(self.state_file.read_text())
        self.state.next_ep_id = int(doc.get("next_ep_id", 1))
        for raw in doc.get("endpoints", []):
            rec = EndpointRecord.model_validate(raw)
            found = await asyncio.to_thread(plumbing.find_endpoint, rec.net)
            if found is None:
                log.warning(
                    "event=endpoint-gone endpoint=%s (its interfaces disappeared while the agent was down)",
                    rec.key,
                )
                await asyncio.to_thread(self._forget_in_maps, rec)
                continue
            rec = rec.model_copy(update={"network": found.to_dict()})
            self.ipam.claim(IPv4Address(rec.ip), rec.key)
            assert self.programs is not None
            await asyncio.to_thread(loader.attach, self.programs, found.host_ifname, self.node_netns)
            self.state.endpoints[rec.key] = rec
            log.info(
                "event=endpoint-restored endpoint=%s ep_id=%d identity=%d", rec.key, rec.ep_id, rec.identity
            )
        self._save()

    def _forget_in_maps(self, rec: EndpointRecord) -> None:
        assert self.maps is not None
        self.maps.endpoint_delete(rec.ip)
        self.maps.policy_flush(rec.ep_id)
        self.maps.bump_policy_revision()

    def _write_node_ipcache(self) -> None:
        assert self.maps is not None
        for ip in self.node_ips:
            self.maps.ipcache_set(f"{ip}/32", HOST)

    # --- endpoints ----------------------------------------------------------------------------

    def endpoints(self) -> list[EndpointRecord]:
        return sorted(self.state.endpoints.values(), key=lambda r: r.ep_id)

    def get(self, namespace: str, name: str) -> EndpointRecord | None:
        return self.state.endpoints.get(f"{namespace}/{name}")

    async def add_endpoint(self, spec: EndpointSpec) -> EndpointRecord:
        """Create (or adopt) the endpoint's namespace and veth, give it an identity, attach the
        programs, and write its map state before it may send its first packet."""
        key = f"{spec.namespace}/{spec.name}"
        async with self.lock:
            if key in self.state.endpoints:
                raise EndpointError(f"endpoint {key} already exists on node {self.node}")
            from cilia.policy.inventory import parse_named_ports

            try:
                named = parse_named_ports(spec.named_ports)
            except (ValueError, KeyError) as err:
                raise EndpointError(f"endpoint {key}: namedPorts: {err}") from None
            ip = self.ipam.claim(spec.ip, key) if spec.ip else self.ipam.allocate(key)
            try:
                probe = Workload(
                    spec.namespace, spec.name, dict(spec.labels), ip, named, spec.service_account, self.node
                )
                labels = workload_identity_labels(probe).sorted_strings()
                identity = await self.allocate(labels)
                net = await asyncio.to_thread(
                    plumbing.create_endpoint,
                    spec.namespace,
                    spec.name,
                    ip,
                    self.node_netns,
                    spec.netns,
                    None if self.node_netns else self.node,
                )
            except BaseException:
                self.ipam.release(ip)
                raise
            ep_id = self.state.next_ep_id
            self.state.next_ep_id += 1
            rec = EndpointRecord(
                namespace=spec.namespace,
                name=spec.name,
                labels=dict(spec.labels),
                ip=str(ip),
                ep_id=ep_id,
                identity=identity,
                identity_labels=labels,
                node=self.node,
                named_ports=named,
                service_account=spec.service_account,
                network=net.to_dict(),
            )
            try:
                assert self.programs is not None
                await asyncio.to_thread(loader.attach, self.programs, net.host_ifname, self.node_netns)
                self.state.endpoints[key] = rec
                self.cluster[self._cluster_key(rec)] = rec.workload()
                if self.policies_synced:
                    await self._regenerate_locked(rebuild=True)
                else:
                    # No policy snapshot yet: deny everything until one arrives (fail closed).
                    await asyncio.to_thread(self._write_endpoint, rec, True, True)
                self._save()
            except BaseException:
                self.state.endpoints.pop(key, None)
                self.cluster.pop(self._cluster_key(rec), None)
                await asyncio.to_thread(self._forget_in_maps, rec)
                await asyncio.to_thread(plumbing.delete_endpoint, net)
                self.ipam.release(ip)
                raise
        log.info("event=endpoint-added endpoint=%s ip=%s ep_id=%d identity=%d", key, ip, ep_id, identity)
        for listener in self.listeners:
            await listener(rec, "added")
        return self.state.endpoints[key]

    async def delete_endpoint(self, namespace: str, name: str) -> EndpointRecord:
        key = f"{namespace}/{name}"
        async with self.lock:
            rec = self.state.endpoints.get(key)
            if rec is None:
                raise EndpointError(f"endpoint {key} not found on node {self.node}")
            await asyncio.to_thread(self._forget_in_maps, rec)
            net = rec.net
            await asyncio.to_thread(loader.detach, net.host_ifname, self.node_netns)
            await asyncio.to_thread(plumbing.delete_endpoint, net)
            self.ipam.release(IPv4Address(rec.ip))
            del self.state.endpoints[key]
            self.cluster.pop(self._cluster_key(rec), None)
            self._save()
            if self.policies_synced:
                await self._regenerate_locked(rebuild=True)
        log.info("event=endpoint-deleted endpoint=%s", key)
        if self.release is not None:
            try:
                await self.release(rec.identity)
            except Exception as err:  # the identity service collects it after its grace period anyway
                log.warning("event=identity-release-failed id=%d error=%r", rec.identity, str(err))
        for listener in self.listeners:
            await listener(rec, "deleted")
        return rec

    def _cluster_key(self, rec: EndpointRecord) -> str:
        return f"{rec.namespace}/{rec.name}@{rec.node}"

    # --- policy and cluster state -------------------------------------------------------------

    async def set_policies(
        self,
        manifests: Mapping[PolicyKey, Mapping[str, Any]],
        revisions: Mapping[PolicyKey, int] | None = None,
    ) -> None:
        """The full set of policies (a kvstore snapshot or its latest state): apply what changed."""
        async with self.lock:
            await self._set_policies_locked(manifests)
            self.applied = {"/".join(x for x in k if x): (revisions or {}).get(k, 0) for k in self.policies}

    async def _set_policies_locked(self, manifests: Mapping[PolicyKey, Mapping[str, Any]]) -> None:
        wanted = {k: dict(v) for k, v in manifests.items()}
        changed = [k for k, v in wanted.items() if self.policies.get(k) != v]
        removed = [k for k in self.policies if k not in wanted]
        objs: list[PolicyResource] = []
        for k in changed:
            try:
                objs.append(parse_document(wanted[k]))  # type: ignore[arg-type]
            except CiliaError as err:
                log.error("event=policy-invalid policy=%s error=%r (skipped)", "/".join(k), str(err))
                wanted.pop(k)
        first = not self.policies_synced
        self.policies = wanted
        self.policies_synced = True
        self.revision += 1
        if first or self.engine is None:
            self.repo = Repository()
            self.repo.apply([parse_document(v) for v in wanted.values()])  # type: ignore[misc]
            await self._regenerate_locked(rebuild=True)
            return
        for k in removed:
            self.engine.delete(k)
        if objs:
            self.engine.apply(objs)
        self.repo = self.engine.repo
        await self._regenerate_locked(rebuild=False)

    async def set_cluster_endpoints(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Every endpoint of the cluster (from the kvstore): identities and named ports for selectors."""
        async with self.lock:
            cluster: dict[str, Workload] = {}
            for doc in records:
                w = record_to_workload(doc)
                if w is not None and w.node != self.node:  # our own come from our state, not the store
                    cluster[f"{w.namespace}/{w.name}@{w.node}"] = w
            for rec in self.state.endpoints.values():
                cluster[self._cluster_key(rec)] = rec.workload()
            if {k: (w.identity, w.ip) for k, w in cluster.items()} == {
                k: (w.identity, w.ip) for k, w in self.cluster.items()
            }:
                return
            self.cluster = cluster
            if self.policies_synced:
                await self._regenerate_locked(rebuild=True)
            else:
                await asyncio.to_thread(self._write_ipcache)

    def remote_workloads(self) -> list[Workload]:
        """Endpoints of other nodes that are (still) in the registry."""
        return [
            w
            for w in self.cluster.values()
            if w.node != self.node and (not self.nodes_synced or w.node in self.nodes)
        ]

    async def set_nodes(self, infos: Iterable[NodeInfo]) -> None:
        """The node registry (a full listing): route other nodes' pod CIDRs into the overlay, point
        their endpoints' ipcache entries at them, and forget the endpoints of nodes that left."""
        async with self.lock:
            remote = {n.name: n for n in infos if n.name != self.node}
            before = {k: v.routing() for k, v in self.nodes.items()}
            first = not self.nodes_synced
            self.nodes = remote
            self.nodes_synced = True
            if not first and before == {k: v.routing() for k, v in remote.items()}:
                return
            if self.tunnel:
                wanted = {n.pod_cidr: n.name for n in remote.values()}
                added, removed = await asyncio.to_thread(overlay.sync_routes, self.node_netns, wanted)
                if added or removed:
                    log.info("event=overlay-routes added=%d removed=%d nodes=%d", added, removed, len(remote))
            if self.policies_synced:
                await self._regenerate_locked(rebuild=True)
            elif self.maps is not None:
                await asyncio.to_thread(self._write_ipcache)

    def workloads(self) -> list[Workload]:
        """Every endpoint of the cluster that counts: other nodes' (still registered) and ours."""
        workloads = self.remote_workloads()
        for rec in self.state.endpoints.values():
            workloads.append(rec.workload())
        seen: dict[str, Workload] = {}
        for w in workloads:
            seen[f"{w.namespace}/{w.name}"] = w
        return list(seen.values())

    def inventory(self) -> Inventory:
        return Inventory(self.workloads())

    async def regenerate(self) -> int:
        """Recompute every local endpoint's map state and write the difference; returns entries written."""
        async with self.lock:
            return await self._regenerate_locked(rebuild=True)

    async def _regenerate_locked(self, rebuild: bool) -> int:
        if rebuild or self.engine is None:
            previous = self.engine.ipcache if self.engine is not None else self._restored_ipcache
            self.engine = PolicyEngine(self.inventory(), self.options, self.repo, previous=previous)
            self._restored_ipcache = None
            await asyncio.to_thread(self.engine.compute_all)
        written = await asyncio.to_thread(self._write_all)
        self.regenerations += 1
        self._bump_generation()
        await self._save_ipcache()
        return written

    def policy_of(self, rec: EndpointRecord) -> EndpointPolicy | None:
        if self.engine is None:
            return None
        w = rec.workload()
        key: SubjectKey = (rec.identity, frozenset(w.named_ports.items()))
        if key not in self.engine.policies:
            if key not in self.engine.subjects:
                return None
            return self.engine.policy_for(w)
        return self.engine.policies[key]

    # --- writing maps -------------------------------------------------------------------------

    def _desired(self, policy: EndpointPolicy) -> dict[MapKey, tuple[MapEntry, EntryTuple]]:
        out = {}
        for key, entry in policy.entries.items():
            c = maps.policy_entry_c(key, entry, self.proxy_ports)
            out[key] = (
                entry,
                (
                    int(c.proxy_port),
                    int(c.deny),
                    int(c.lpm_prefix_length),
                    int(c.proxy_priority),
                    int(c.cookie),
                ),
            )
        return out

    def _write_endpoint(self, rec: EndpointRecord, ingress_enforced: bool, egress_enforced: bool) -> None:
        assert self.maps is not None
        net = rec.net
        flags = (maps.EP_F_INGRESS_ENFORCED if ingress_enforced else 0) | (
            maps.EP_F_EGRESS_ENFORCED if egress_enforced else 0
        )
        self.maps.endpoint_set(rec.ip, net.host_ifindex, rec.ep_id, rec.identity, flags, net.host_mac)

    def _write_all(self) -> int:
        """Write each local endpoint's policy diff (against what the map holds), then its flags."""
        assert self.maps is not None
        current: dict[int, dict[MapKey, EntryTuple]] = {}
        for (ep_id, key), c in self.maps.policy_entries().items():
            current.setdefault(ep_id, {})[key] = (
                int(c.proxy_port),
                int(c.deny),
                int(c.lpm_prefix_length),
                int(c.proxy_priority),
                int(c.cookie),
            )
        written = 0
        self._write_ipcache()
        local_ids = set()
        for rec in list(self.state.endpoints.values()):
            policy = self.policy_of(rec)
            if policy is None:
                continue
            local_ids.add(rec.ep_id)
            desired = self._desired(policy)
            have = current.get(rec.ep_id, {})
            upserts = {k: e for k, (e, t) in desired.items() if have.get(k) != t}
            deletes = {k for k in have if k not in desired}
            # Entries first, flags last: a newly enforced direction never meets a half-written map.
            self.maps.policy_write(rec.ep_id, upserts, deletes, self.proxy_ports)
            written += len(upserts) + len(deletes)
            ing, eg = policy.enforced(INGRESS), policy.enforced(EGRESS)
            self._write_endpoint(rec, ing, eg)
            if (ing, eg) != (rec.ingress_enforced, rec.egress_enforced):
                self.state.endpoints[rec.key] = rec.model_copy(
                    update={"ingress_enforced": ing, "egress_enforced": eg}
                )
        for ep_id in set(current) - local_ids:
            self.maps.policy_flush(ep_id)  # entries of endpoints that no longer exist
        # Connections re-check their next packet against the new entries.
        self.maps.bump_policy_revision()
        self._write_lb()
        return written

    def _write_lb(self) -> int:
        """Service frontends and their backends (the endpoints their selectors pick, cluster-wide)."""
        if self.lb is None:
            return 0
        workloads = list(self.workloads())
        wanted = lb.frontends(self.services.values(), workloads, self.node)
        return self.lb.write(wanted, {str(w.ip) for w in workloads if w.ip is not None})

    async def gc_lb_backends(self) -> int:
        """Let terminating backends go once no open connection made through a frontend uses them."""
        if self.lb is None or not self.lb.terminating or self.maps is None:
            return 0
        m = self.maps

        def in_use() -> set[tuple[str, int, int]]:
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            used: set[tuple[str, int, int]] = set()
            for key, entry in m.ct_items():
                if entry.nat_flags & maps.CT_NAT_SERVICE and ct_alive(entry, int(key.proto), now):
                    _src, dst, _sport, dport, proto = maps.ct_tuple(key)
                    used.add((dst, dport, proto))
            return used

        used = await asyncio.to_thread(in_use)
        async with self.lock:
            return self.lb.gc(used, time.monotonic())

    async def set_services(self, docs: Iterable[Mapping[str, Any]]) -> None:
        """Every Service of the cluster (from the kvstore): write the load-balancing maps."""
        parsed: dict[str, lb.ServiceSpec] = {}
        for doc in docs:
            try:
                svc = lb.parse_service(doc)
            except (ValueError, KeyError, TypeError) as err:
                log.warning("event=service-invalid error=%r", str(err))
                continue
            parsed[svc.key] = svc
        async with self.lock:
            self.services = parsed
            changed = await asyncio.to_thread(self._write_lb)
        if changed:
            log.info("event=services-written services=%d changes=%d", len(parsed), changed)

    def _write_ipcache(self) -> None:
        """Cluster endpoint IPs, the node's addresses, and the engine's CIDR identities."""
        assert self.maps is not None
        desired: dict[str, tuple[int, str | None]] = {}
        for w in self.remote_workloads():
            if w.ip is not None and w.identity is not None:
                node = self.nodes.get(w.node or "")
                tunnel = str(node.ip) if (self.tunnel and node is not None) else None
                desired[f"{w.ip}/32"] = (w.identity, tunnel)
        for n in self.nodes.values():
            desired[f"{n.ip}/32"] = (REMOTE_NODE, None)
        for rec in self.state.endpoints.values():
            desired[f"{rec.ip}/32"] = (rec.identity, None)
        for ip in self.node_ips:
            desired[f"{ip}/32"] = (HOST, None)
        # Before the first policy snapshot after a restart, the previous run's CIDR and FQDN
        # identities (restored from disk) stand in for the engine's: nothing they open closes.
        ipcache = self.engine.ipcache if self.engine is not None else self._restored_ipcache
        if ipcache is not None:
            for net, num in ipcache.prefixes.items():
                if net.version == 4:
                    desired.setdefault(str(net), (num, None))
        have = {prefix: (ident, tunnel) for prefix, ident, tunnel in self.maps.ipcache_items()}
        for prefix, (ident, tunnel) in desired.items():
            if have.get(prefix) != (ident, tunnel):
                self.maps.ipcache_set(prefix, ident, tunnel)
        for prefix in set(have) - set(desired):
            self.maps.ipcache_delete(prefix)

    # --- proxies and FQDNs (the node-local API) -----------------------------------------------

    async def register_proxy(self, parser: str, port: int, mode: str = "dnat") -> None:
        """A proxy listens on `port` for `parser` traffic: steer redirects there (nft + maps)."""
        if parser not in (PARSER_HTTP, PARSER_DNS):
            raise EndpointError(f"unknown proxy type {parser!r} (http or dns)")
        if mode not in ("dnat", "tproxy"):
            raise EndpointError(f"unknown redirect mode {mode!r} (dnat or tproxy)")
        if not 0 < port < 65535:
            raise EndpointError(f"invalid proxy port {port}")
        async with self.lock:
            assert self.maps is not None
            old = self.proxy_ports.get(parser)
            self.proxy_ports[parser] = port
            self.proxies[port] = proxyrules.ProxyPort(port, mode)
            if old is not None and old != port:
                self.proxies.pop(old, None)
                await asyncio.to_thread(self.maps.proxy_port_delete, old)
            await asyncio.to_thread(self._apply_proxy_rules)
            await asyncio.to_thread(self.maps.proxy_port_set, port)
            if self.policies_synced:
                await asyncio.to_thread(self._write_all)
            self._restored_proxies.discard(port)
            await asyncio.to_thread(self._save_proxies)
        log.info("event=proxy-registered type=%s port=%d mode=%s", parser, port, mode)

    async def unregister_proxy(self, port: int) -> None:
        """The proxy on `port` went away: redirects to it fail closed again."""
        async with self.lock:
            assert self.maps is not None
            await asyncio.to_thread(self.maps.proxy_port_delete, port)
            self.proxies.pop(port, None)
            for parser, p in list(self.proxy_ports.items()):
                if p == port:
                    del self.proxy_ports[parser]
            await asyncio.to_thread(self._apply_proxy_rules)
            self._restored_proxies.discard(port)
            await asyncio.to_thread(self._save_proxies)
        log.info("event=proxy-unregistered port=%d", port)

    def _apply_proxy_rules(self) -> None:
        if not self.proxies:
            proxyrules.remove(self.node_netns)
            return
        if not self.node_ips:
            raise EndpointError("the node has no IPv4 address to redirect proxy traffic to")
        proxyrules.apply(self.proxies, sorted(self.node_ips)[0], self.node_netns)

    async def allow_fqdn_ips(self, ips: Mapping[str, list[str]]) -> int:
        """The DNS proxy saw these names resolve to these IPs: open them for matching toFQDNs selectors."""
        async with self.lock:
            if self.engine is None:
                # No policy yet (a restart with the control plane away): keep them for the first one.
                pending = self._restored_ipcache or IPCache()
                for ip, names in ips.items():
                    pending.add_fqdn_ip(ip_address(ip), names)
                self._restored_ipcache = pending
                await self._save_ipcache()
                return 0
            update = await asyncio.to_thread(
                self.engine.add_fqdn_ips, {ip_address(ip): names for ip, names in ips.items()}
            )  # type: ignore[misc]
            await asyncio.to_thread(self._write_all)
            await self._save_ipcache()
            return sum(len(d) for d in update.diffs.values())

    async def forget_fqdn_ips(self, ips: Mapping[str, list[str] | None]) -> int:
        """Names expired for these IPs (their TTL ran out): close what only they opened."""
        async with self.lock:
            if self.engine is None:
                if self._restored_ipcache is not None:
                    for ip, names in ips.items():
                        self._restored_ipcache.remove_fqdn_ip(ip_address(ip), names)
                    await self._save_ipcache()
                return 0
            update = await asyncio.to_thread(
                self.engine.remove_fqdn_ips,
                {ip_address(ip): names for ip, names in ips.items()},  # type: ignore[misc]
            )
            await asyncio.to_thread(self._write_all)
            await self._save_ipcache()
            return sum(len(d) for d in update.diffs.values())

    def ips_in_use(self, ips: Iterable[str]) -> list[str]:
        """Which of these addresses an open connection (a conntrack entry) still uses."""
        assert self.maps is not None
        wanted = set(ips)
        used: set[str] = set()
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for key, entry in self.maps.ct_items():
            if not ct_alive(entry, int(key.proto), now):
                continue  # past its timeout: closed, the GC just has not removed it yet
            src, dst, *_ = maps.ct_tuple(key)
            for a in (src, dst):
                if a in wanted:
                    used.add(a)
        return sorted(used)

    def endpoint_by_ip(self, ip: str) -> EndpointRecord | None:
        for rec in self.state.endpoints.values():
            if rec.ip == ip:
                return rec
        return None

    def check_l7(self, src_ip: str, dst_ip: str, port: int, proto: int, request: L7Request) -> dict[str, Any]:
        """What a proxy asks for each request: the L7 rules of the source's egress and, when the
        destination is local, of its ingress (only directions that redirect to a proxy count)."""
        src_identity, dst_identity = self.identity_of_ip(src_ip), self.identity_of_ip(dst_ip)
        checks = []
        for rec, direction, remote in (
            (self.endpoint_by_ip(src_ip), EGRESS, dst_identity),
            (self.endpoint_by_ip(dst_ip), INGRESS, src_identity),
        ):
            if rec is None:
                continue
            policy = self.policy_of(rec)
            if policy is None:
                continue
            entry = policy.lookup(direction, remote, proto, port)
            if entry is None or entry.deny or entry.parser is None:
                continue
            allowed, reason, parser = policy.decide(direction, remote, proto, port, request)
            checks.append(
                {
                    "direction": direction,
                    "endpoint": rec.key,
                    "allowed": allowed,
                    "reason": reason,
                    "parser": parser,
                }
            )
        allowed = all(c["allowed"] for c in checks)
        reason = (
            "; ".join(str(c["reason"]) for c in checks if c["allowed"] is allowed) or "no L7 rule applies"
        )
        return {
            "ok": True,
            "allowed": allowed,
            "reason": reason,
            "src_identity": src_identity,
            "dst_identity": dst_identity,
            "ingress_applied": any(c["direction"] == INGRESS for c in checks),
            "checks": checks,
        }

    def identity_of_ip(self, ip: str) -> int:
        for rec in self.state.endpoints.values():
            if rec.ip == ip:
                return rec.identity
        for w in self.remote_workloads():
            if w.ip is not None and str(w.ip) == ip and w.identity is not None:
                return w.identity
        if ip in self.node_ips:
            return HOST
        if any(str(n.ip) == ip for n in self.nodes.values()):
            return REMOTE_NODE
        if self.engine is not None:
            return self.engine.ipcache.lookup(ip_address(ip))
        return 2

    def identity_labels(self, identity: int) -> list[str]:
        if self.engine is not None:
            info = self.engine.ipcache.identities.get(identity)
            if info is not None:
                return info.labels.sorted_strings()
        return []

    def reason_for_cookie(self, cookie: int) -> str | None:
        if not cookie or self.engine is None:
            return None
        for policy in self.engine.policies.values():
            for entry in policy.entries.values():
                if maps.cookie_of(entry.reason) == cookie:
                    return entry.reason
        return None

    # --- the HTTP proxy's view of policy (node-local API `l7_policy`) --------------------------

    def l7_policy(self, src_ip: str, dst_ip: str, port: int, proto: int = 6) -> dict[str, Any]:
        """The L7 rules a proxy applies to connections from `src_ip` to `dst_ip`:`port`, per direction
        that redirects them (the source's egress, the local destination's ingress), with the endpoints
        its flows name. `revision` is the datapath's policy revision read *before* the rules were
        computed: the answer stays true while the revision is unchanged, so a proxy may cache it.
        """
        if not self.policies_synced or self.engine is None:
            return {"ok": False, "error": "the agent has no policy snapshot yet"}
        revision = self.maps.policy_revision() if self.maps is not None else 0
        src_identity, dst_identity = self.identity_of_ip(src_ip), self.identity_of_ip(dst_ip)
        checks: list[dict[str, Any]] = []
        for rec, direction, remote in (
            (self.endpoint_by_ip(src_ip), EGRESS, dst_identity),
            (self.endpoint_by_ip(dst_ip), INGRESS, src_identity),
        ):
            if rec is None:
                continue
            policy = self.policy_of(rec)
            if policy is None:
                continue
            entry = policy.lookup(direction, remote, proto, port)
            if entry is None or entry.deny:
                # The datapath drops this traffic now (a policy change): so does the proxy.
                reason = entry.reason if entry is not None else "no map-state entry"
                checks.append({"direction": direction, "endpoint": rec.key, "deny": True, "reason": reason})
                continue
            if entry.parser is None:
                continue
            filters = [f for f in policy.l7_filters(direction) if f.covers(direction, remote, proto, port)]
            checks.append(
                {
                    "direction": direction,
                    "endpoint": rec.key,
                    "parser": entry.parser,
                    "enforced": policy.enforced(direction),
                    "reason": entry.reason,
                    "filters": [
                        {"reason": f.reason, "exact": f.exact, "rules": [l7_rule_doc(r) for r in f.rules]}
                        for f in filters
                    ],
                }
            )
        return {
            "ok": True,
            "revision": revision,
            "src_identity": src_identity,
            "dst_identity": dst_identity,
            "ingress_applied": any(c["direction"] == INGRESS and not c.get("deny") for c in checks),
            "checks": checks,
            "source": self.flow_endpoint(src_ip, src_identity),
            "destination": self.flow_endpoint(dst_ip, dst_identity),
            "source_names": self.names_of_ip(src_ip),
            "destination_names": self.names_of_ip(dst_ip),
        }

    def flow_endpoint(self, ip: str, identity: int) -> dict[str, Any]:
        """`ip` as a Hubble flow endpoint: a pod (local ones with their endpoint ID) or an identity."""
        rec = self.endpoint_by_ip(ip)
        if rec is not None:
            return {
                "ID": rec.ep_id,
                "identity": rec.identity,
                "namespace": rec.namespace,
                "pod_name": rec.name,
                "labels": sorted(rec.identity_labels),
            }
        for w in self.cluster.values():
            if w.ip is not None and str(w.ip) == ip and w.identity is not None:
                return {
                    "identity": w.identity,
                    "namespace": w.namespace,
                    "pod_name": w.name,
                    "labels": sorted(self.identity_labels(w.identity)),
                }
        from cilia.identity import RESERVED_NAMES

        labels = self.identity_labels(identity)
        if not labels and identity in RESERVED_NAMES:
            labels = [f"reserved:{RESERVED_NAMES[identity]}"]
        return {"identity": identity, "labels": sorted(labels)}

    def names_of_ip(self, ip: str) -> list[str]:
        """DNS names the FQDN cache holds for `ip` (Hubble's source/destination names)."""
        if self.engine is None or self.endpoint_by_ip(ip) is not None:
            return []
        info = self.engine.ipcache.identities.get(self.engine.ipcache.lookup(ip_address(ip)))
        if info is None or info.net is None or info.net.prefixlen != info.net.max_prefixlen:
            return []
        return sorted(n.rstrip(".") for n in info.names)

    # --- for the DNS proxy: generations, DNS policy, FQDN state across restarts ------------------

    def _bump_generation(self) -> None:
        """Policies, endpoints or identities changed (every regeneration): wake the watchers.
        FQDN changes do not bump it: they come from the DNS proxy, which knows what it changed."""
        self.generation += 1
        event, self._generation_event = self._generation_event, asyncio.Event()
        event.set()

    async def wait_generation(self, seen: int) -> int:
        """Return the generation as soon as it differs from `seen`."""
        while self.generation == seen:
            await self._generation_event.wait()
        return self.generation

    def peer_info(self, ip: str) -> dict[str, Any]:
        """An address as a flow names it: identity and labels, and the endpoint if it is one."""
        ident = self.identity_of_ip(ip)
        out: dict[str, Any] = {"ip": ip, "identity": ident, "labels": self.identity_labels(ident)}
        rec = self.endpoint_by_ip(ip)
        if rec is not None:
            out.update(id=rec.ep_id, namespace=rec.namespace, pod_name=rec.name, labels=rec.identity_labels)
            return out
        for w in self.remote_workloads():
            if w.ip is not None and str(w.ip) == ip:
                out.update(namespace=w.namespace, pod_name=w.name)
                return out
        if self.engine is not None:
            info = self.engine.ipcache.identities.get(ident)
            if info is not None and info.net is not None and info.net.prefixlen == info.net.max_prefixlen:
                out["names"] = [n.rstrip(".") for n in info.names]
        return out

    def fqdn_selectors(self) -> list[dict[str, str]]:
        """Every `toFQDNs` selector of the policies: the names whose IPs the DNS proxy reports."""
        seen: dict[FQDNSelector, None] = {}
        for rule in self.repo.rules():
            for entry in rule.entries:
                for peer in entry.peers:
                    if isinstance(peer, FQDNSelector):
                        seen[peer] = None
        return [
            {"matchName": s.match_name}
            if s.match_name is not None
            else {"matchPattern": s.match_pattern or ""}
            for s in seen
        ]

    def dns_policy(self, src_ip: str, dst_ip: str) -> dict[str, Any]:
        """What the DNS proxy needs to judge every query from `src_ip` to the server `dst_ip` by
        itself (and to go on judging while the agent restarts): the source's egress L7 filters that
        cover the server's identity, whether egress is enforced, and both peers for flows.
        `ready` is false until the first policy snapshot (the proxy then keeps what it had)."""
        ready = self.policies_synced and self.engine is not None
        src = self.endpoint_by_ip(src_ip)
        dst = self.peer_info(dst_ip)
        out: dict[str, Any] = {
            "ok": True,
            "ready": ready,
            "generation": self.generation,
            "src": self.peer_info(src_ip) if src is not None else None,
            "dst": dst,
            "enforced": False,
            "filters": [],
            "fqdn_selectors": self.fqdn_selectors(),
        }
        policy = self.policy_of(src) if src is not None else None
        if policy is None:
            return out
        out["enforced"] = policy.enforced(EGRESS)
        filters = []
        for f in policy.l7_filters(EGRESS):
            if f.identities is not None and dst["identity"] not in f.identities:
                continue
            rules = [
                {"matchName": r.match_name} if r.match_name is not None else {"matchPattern": r.match_pattern}
                for r in f.rules
                if isinstance(r, DNSRule)
            ]
            filters.append(
                {
                    "proto": f.range.proto,
                    "lo": f.range.lo,
                    "hi": f.range.hi,
                    "exact": f.exact,
                    "dns": rules,
                    "other_l7": len(rules) != len(f.rules),
                    "reason": f.reason,
                }
            )
        out["filters"] = filters
        return out

    def fqdn_ips(self) -> dict[str, list[str]]:
        """The IPs the DNS proxy opened, with their names (what `allow_fqdn` added)."""
        ipcache = self.engine.ipcache if self.engine is not None else self._restored_ipcache
        if ipcache is None:
            return {}
        return {
            str(info.net.network_address): list(info.names)
            for info in ipcache.identities.values()
            if info.names and info.net is not None
        }

    @property
    def ipcache_file(self) -> Path:
        return self.state_dir / "ipcache.json"

    def _restore_ipcache(self) -> None:
        """Node-local identities of the previous run (CIDR prefixes with their numbers, FQDN IPs
        with their names): the first engine reuses them, so the first map write after a restart
        neither renumbers identities nor closes what the DNS proxy had opened."""
        if not self.ipcache_file.exists():
            return
        try:
            doc = json.loads(self.ipcache_file.read_text())
            cache = IPCache()
            cache._next_local = int(doc["next_local"])
            for prefix, num in doc.get("prefixes", {}).items():
                cache.prefixes[ip_network(prefix)] = int(num)
            for prefix, names in doc.get("fqdn", {}).items():
                net = ip_network(prefix)
                num = cache.prefixes[net]
                cache.identities[num] = IdentityInfo(num, cidr_identity_labels(net), net, tuple(names))
                cache.fqdn_only.add(net)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("event=ipcache-restore-failed file=%s error=%r", self.ipcache_file, str(err))
            return
        self._restored_ipcache = cache
        log.info(
            "event=ipcache-restored prefixes=%d fqdn_ips=%d", len(cache.prefixes), len(doc.get("fqdn", {}))
        )

    async def _save_ipcache(self) -> None:
        cache = self.engine.ipcache if self.engine is not None else self._restored_ipcache
        if cache is None:
            return
        doc = {
            "next_local": cache._next_local,
            "prefixes": {str(net): num for net, num in cache.prefixes.items()},
            "fqdn": {
                str(info.net): list(info.names)
                for info in cache.identities.values()
                if info.names and info.net is not None
            },
        }
        if doc == getattr(self, "_saved_ipcache", None):
            return
        self._saved_ipcache = doc
        await asyncio.to_thread(self._write_json, self.ipcache_file, doc)

    def _write_json(self, path: Path, doc: Any) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(path)

    @property
    def proxies_file(self) -> Path:
        return self.state_dir / "proxies.json"

    def _save_proxies(self) -> None:
        parsers = {port: parser for parser, port in self.proxy_ports.items()}
        doc = {
            str(port): {"type": parsers.get(port, ""), "mode": p.mode}
            for port, p in self.proxies.items()
            if port in parsers
        }
        self._write_json(self.proxies_file, doc)

    def _load_proxies(self) -> set[int]:
        """The previous run's registrations whose port the datapath still holds (see _reset_proxies)."""
        assert self.maps is not None
        try:
            doc = json.loads(self.proxies_file.read_text()) if self.proxies_file.exists() else {}
        except (OSError, ValueError):
            doc = {}
        bound = set(self.maps.proxy_port_list())
        kept: set[int] = set()
        for key, value in doc.items():
            port = int(key)
            if port in bound and value.get("type") in (PARSER_HTTP, PARSER_DNS):
                self.proxies[port] = proxyrules.ProxyPort(port, str(value.get("mode", "dnat")))
                self.proxy_ports[str(value["type"])] = port
                kept.add(port)
        self._restored_proxies = set(kept)
        if kept:
            log.info("event=proxies-restored ports=%s grace_seconds=%.1f", sorted(kept), self.proxy_grace)
        return kept

    async def expire_restored_proxies(self) -> None:
        """After the grace period, registrations of the previous run that no proxy renewed go."""
        await asyncio.sleep(self.proxy_grace)
        for port in sorted(self._restored_proxies):
            log.warning("event=proxy-not-back port=%d (not registered again within the grace period)", port)
            await self.unregister_proxy(port)


def ct_alive(entry: maps.CTEntryC, proto: int, now_ns: int) -> bool:
    """Whether a conntrack entry is within its timeout (the timeouts of bpf/lib/conntrack.h)."""
    if proto != 6:
        timeout = 60
    elif entry.flags & maps.CT_F_CLOSING:
        timeout = 10
    elif entry.flags & maps.CT_F_REPLY_SEEN:
        timeout = 21600
    else:
        timeout = 60
    return now_ns - int(entry.last_seen) <= timeout * 1_000_000_000


def filter_labels(labels: Mapping[str, str]) -> list[str]:
    """The security-relevant `k8s:` labels of a label map, as Cilium strings."""
    from cilia.labels import SOURCE_K8S, Label

    return identity_labels(Label(SOURCE_K8S, k, v) for k, v in labels.items()).sorted_strings()


def l7_rule_doc(rule: L7Rule) -> dict[str, Any]:
    """An L7 rule as the node-local API sends it, in CiliumNetworkPolicy's field names."""
    if isinstance(rule, DNSRule):
        return (
            {"matchName": rule.match_name}
            if rule.match_name is not None
            else {"matchPattern": rule.match_pattern}
        )
    doc: dict[str, Any] = {
        k: v for k, v in (("method", rule.method), ("path", rule.path), ("host", rule.host)) if v
    }
    if rule.headers:
        doc["headers"] = list(rule.headers)
    if rule.header_matches:
        doc["headerMatches"] = [
            {
                k: v
                for k, v in (("name", m.name), ("value", m.value), ("mismatch", m.mismatch))
                if v is not None
            }
            for m in rule.header_matches
        ]
    return doc
