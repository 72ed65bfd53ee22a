"""Services, pools and announcement policies in the kvstore, ClusterIP allocation, and the LB-IPAM
reconciler, safe under any number of lbipam replicas (every decision is a compare-and-set).

Keys:
  services/<namespace>/<name>             the whole v1 Service: spec (clusterIP filled in, defaults set)
                                          and status (loadBalancer.ingress, conditions)
  lbipam/pools/<name>                     CiliumLoadBalancerIPPool, with its status conditions
  lbipam/l2announcementpolicies/<name>    CiliumL2AnnouncementPolicy
  lbipam/bgppeeringpolicies/<name>        CiliumBGPPeeringPolicy
  lbipam/ips/<ip>                         an allocated LB address: pool, sharing key, member services
  lbipam/clusterips/<ip>                  an allocated ClusterIP: {"service": "<ns>/<name>"}

An address belongs to a service when the service is a member of `lbipam/ips/<ip>` AND the address is
in the service's `status.loadBalancer.ingress`. Allocating writes the membership first (create, or
compare-and-set to join a shared address), then the status (compare-and-set on the service's revision);
releasing does it the other way round. So a status never names an address whose record does not name
the service, `create` hands an address to one record only, and joining one is checked against every
member: no address is ever held by two services that may not share it. A replica that loses the
status write (another replica or an apply changed the service) rolls its memberships back and tries
again; memberships left behind by a replica that died between the two writes are removed after
`grace` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from cilia import bus
from cilia.errors import CiliaError, PolicyError, ResourceError
from cilia.kvstore import Entry, KeyExistsError, KVStore, RevisionMismatchError
from cilia.models.loader import load_documents, parse_documents
from cilia.models.services import (
    LBIPAM_KINDS,
    CiliumBGPPeeringPolicy,
    CiliumL2AnnouncementPolicy,
    CiliumLoadBalancerIPPool,
    Service,
)
from services.lbipam import ipam
from services.lbipam.ipam import Allocation, Pool

log = logging.getLogger("cilia.lbipam")

KIND_PATHS = {
    "CiliumLoadBalancerIPPool": "pools",
    "CiliumL2AnnouncementPolicy": "l2announcementpolicies",
    "CiliumBGPPeeringPolicy": "bgppeeringpolicies",
}
KIND_MODELS: dict[str, type[BaseModel]] = {
    "Service": Service,
    "CiliumLoadBalancerIPPool": CiliumLoadBalancerIPPool,
    "CiliumL2AnnouncementPolicy": CiliumL2AnnouncementPolicy,
    "CiliumBGPPeeringPolicy": CiliumBGPPeeringPolicy,
}
ATTEMPTS = 50


def now_rfc3339(precise: bool = False) -> str:
    t = time.time()
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return f"{base}.{int((t % 1) * 1e6):06d}Z" if precise else base + "Z"


@dataclass(frozen=True)
class Change:
    kind: str
    namespace: str
    name: str
    action: str  # created, configured, unchanged, deleted

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "namespace": self.namespace or None,
            "name": self.name,
            "action": self.action,
        }


class LBIPAMError(CiliaError):
    """A request LB-IPAM cannot carry out (not a validation error of a document)."""


def set_condition(
    conditions: list[dict[str, Any]],
    ctype: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """meta.SetStatusCondition: replace the condition of `ctype`, keeping its transition time when the
    status did not change."""
    out = [dict(c) for c in conditions]
    for c in out:
        if c.get("type") == ctype:
            if c.get("status") != status:
                c["lastTransitionTime"] = now_rfc3339()
            c.update(status=status, reason=reason, message=message)
            if generation is not None:
                c["observedGeneration"] = generation
            return out
    cond: dict[str, Any] = {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now_rfc3339(),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    out.append(cond)
    return out


def normalized_service(svc: Service) -> dict[str, Any]:
    """The service as the API server would store it: namespace and defaults filled in."""
    doc = svc.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc.pop("status", None)
    meta = doc.setdefault("metadata", {})
    meta["namespace"] = svc.namespace
    meta.setdefault("labels", {})
    meta.setdefault("annotations", {})
    spec = doc["spec"]
    for port in spec["ports"]:
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port["port"])
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    if spec["sessionAffinity"] == "ClientIP":
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": svc.spec.affinity_timeout()}}
    if spec["type"] == "LoadBalancer" or spec.get("externalIPs"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    spec["ipFamilies"] = ["IPv4"]
    spec["ipFamilyPolicy"] = "SingleStack"
    spec.pop("clusterIPs", None)
    return doc


class LBIPAMStore:
    """Apply, delete and read the LB-IPAM kinds and Services; reconcile allocations and statuses."""

    def __init__(
        self,
        kv: KVStore,
        service_cidr: str = "10.96.0.0/16",
        services_bucket: str = bus.BUCKET_SERVICES,
        lbipam_bucket: str = bus.BUCKET_LBIPAM,
        leases_bucket: str = bus.BUCKET_LEASES,
        grace: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.kv = kv
        self.service_cidr = ipaddress.ip_network(service_cidr)
        if self.service_cidr.version != 4:
            raise LBIPAMError(f"service CIDR {service_cidr}: only IPv4 is supported")
        self.services = services_bucket
        self.lbipam = lbipam_bucket
        self.leases = leases_bucket
        self.grace = grace
        self.rng = rng or random.Random()
        self._lock = asyncio.Lock()

    # --- keys -------------------------------------------------------------------------------------

    def service_key(self, namespace: str, name: str) -> str:
        return f"{self.services}/{namespace}/{name}"

    def object_key(self, kind: str, name: str, namespace: str = "") -> str:
        if kind == "Service":
            return self.service_key(namespace or "default", name)
        return f"{self.lbipam}/{KIND_PATHS[kind]}/{name}"

    def ip_key(self, ip: str) -> str:
        return f"{self.lbipam}/ips/{ip}"

    def cluster_ip_key(self, ip: str) -> str:
        return f"{self.lbipam}/clusterips/{ip}"

    async def ensure_buckets(self) -> None:
        """Create the buckets agents may only read (an agent cannot create them itself)."""
        for prefix in (f"{self.services}/", f"{self.lbipam}/", f"{self.leases}/"):
            await self.kv.list(prefix)

    # --- apply ------------------------------------------------------------------------------------

    async def apply_text(self, text: str, origin: str = "<request>") -> list[Change]:
        """Validate every document of `text`, then create or replace each; a rejected batch changes nothing."""
        docs = load_documents(text, origin)
        objs = parse_documents(docs, kinds=LBIPAM_KINDS)
        return await self.apply(objs)

    async def apply(self, objs: Iterable[BaseModel]) -> list[Change]:
        objs = list(objs)
        # Decide everything (and claim ClusterIPs) before writing anything.
        planned: list[tuple[str, dict[str, Any], Entry | None, Change]] = []
        claimed: list[str] = []
        try:
            for i, obj in enumerate(objs):
                if isinstance(obj, Service):
                    planned.append(await self._plan_service(obj, claimed))
                elif isinstance(
                    obj, CiliumLoadBalancerIPPool | CiliumL2AnnouncementPolicy | CiliumBGPPeeringPolicy
                ):
                    planned.append(await self._plan_object(obj))
                else:
                    raise LBIPAMError(f"document {i + 1}: not a kind the lbipam service manages")
        except BaseException:
            for ip in claimed:
                with contextlib.suppress(Exception):
                    await self.kv.delete(self.cluster_ip_key(ip))
            raise
        changes = []
        for key, doc, old, change in planned:
            if change.action != "unchanged":
                await self._write(key, doc, old)
            changes.append(change)
        if any(c.action != "unchanged" for c in changes):
            await self.reconcile()
        return changes

    async def _write(self, key: str, doc: dict[str, Any], old: Entry | None) -> None:
        """Write `doc`, keeping whatever status the stored object has now (the reconciler owns it)."""
        for _ in range(ATTEMPTS):
            current = await self.kv.get(key)
            if current is not None:
                cur = json.loads(current.value)
                if "status" in cur:
                    doc["status"] = cur["status"]
                try:
                    await self.kv.update(key, json.dumps(doc).encode(), current.revision)
                    return
                except RevisionMismatchError:
                    continue
            try:
                await self.kv.create(key, json.dumps(doc).encode())
                return
            except KeyExistsError:
                continue
        raise LBIPAMError(f"{key}: too much contention, try again")

    async def _plan_object(
        self, obj: CiliumLoadBalancerIPPool | CiliumL2AnnouncementPolicy | CiliumBGPPeeringPolicy
    ) -> tuple[str, dict[str, Any], Entry | None, Change]:
        kind = obj.kind
        name = str(obj.metadata.name)
        key = self.object_key(kind, name)
        doc = obj.model_dump(mode="json", by_alias=True, exclude_none=True)
        doc.pop("status", None)
        old = await self.kv.get(key)
        m = doc.setdefault("metadata", {})
        m.pop("namespace", None)
        if old is None:
            m["creationTimestamp"] = now_rfc3339(precise=True)
            m["generation"] = 1
            return key, doc, old, Change(kind, "", name, "created")
        prev = json.loads(old.value)
        pm = prev.get("metadata", {})
        m["creationTimestamp"] = pm.get("creationTimestamp") or now_rfc3339(precise=True)
        m["generation"] = int(pm.get("generation", 1))
        if prev.get("spec") == doc.get("spec") and _user_meta(pm) == _user_meta(m):
            return key, doc, old, Change(kind, "", name, "unchanged")
        if prev.get("spec") != doc.get("spec"):
            m["generation"] += 1
        return key, doc, old, Change(kind, "", name, "configured")

    async def _plan_service(
        self, svc: Service, claimed: list[str]
    ) -> tuple[str, dict[str, Any], Entry | None, Change]:
        key = self.service_key(svc.namespace, svc.name)
        doc = normalized_service(svc)
        old = await self.kv.get(key)
        prev = json.loads(old.value) if old is not None else None
        document = f"Service {svc.key}"
        current_ip = (prev or {}).get("spec", {}).get("clusterIP")
        wanted = svc.spec.clusterIP
        if current_ip:
            if wanted and wanted != current_ip:
                raise ResourceError(
                    [
                        PolicyError(
                            "spec.clusterIP", f"Invalid value: {wanted!r}: field is immutable", document
                        )
                    ]
                )
            doc["spec"]["clusterIP"] = current_ip
        else:
            doc["spec"]["clusterIP"] = await self._claim_cluster_ip(svc, wanted, document)
            claimed.append(doc["spec"]["clusterIP"])
        doc["spec"]["clusterIPs"] = [doc["spec"]["clusterIP"]]
        meta = doc["metadata"]
        if prev is None:
            meta["creationTimestamp"] = now_rfc3339()
            meta["generation"] = 1
            return key, doc, old, Change("Service", svc.namespace, svc.name, "created")
        pm = prev.get("metadata", {})
        meta["creationTimestamp"] = pm.get("creationTimestamp") or now_rfc3339()
        meta["generation"] = int(pm.get("generation", 1))
        if prev.get("spec") == doc["spec"] and _user_meta(pm) == _user_meta(meta):
            return key, doc, old, Change("Service", svc.namespace, svc.name, "unchanged")
        if prev.get("spec") != doc["spec"]:
            meta["generation"] += 1
        return key, doc, old, Change("Service", svc.namespace, svc.name, "configured")

    async def _claim_cluster_ip(self, svc: Service, wanted: str | None, document: str) -> str:
        owner = json.dumps({"service": svc.key}).encode()
        net = self.service_cidr
        if wanted:
            addr = ipaddress.ip_address(wanted)
            if addr not in net:
                raise ResourceError(
                    [
                        PolicyError(
                            "spec.clusterIP",
                            f"Invalid value: {wanted!r}: provided IP is not in the valid range."
                            f" The range of valid IPs is {net}",
                            document,
                        )
                    ]
                )
            try:
                await self.kv.create(self.cluster_ip_key(wanted), owner)
            except KeyExistsError:
                entry = await self.kv.get(self.cluster_ip_key(wanted))
                if entry is None or json.loads(entry.value).get("service") != svc.key:
                    raise ResourceError(
                        [
                            PolicyError(
                                "spec.clusterIP",
                                f"Invalid value: {wanted!r}: provided IP is already allocated",
                                document,
                            )
                        ]
                    ) from None
            return wanted
        first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
        for attempt in range(256):
            value = self.rng.randint(first, last) if attempt < 128 else first + attempt - 128
            ip = str(ipaddress.IPv4Address(value))
            try:
                await self.kv.create(self.cluster_ip_key(ip), owner)
                return ip
            except KeyExistsError:
                continue
        taken = {e.key.rsplit("/", 1)[1] for e in await self.kv.list(f"{self.lbipam}/clusterips/")}
        for value in range(first, last + 1):
            ip = str(ipaddress.IPv4Address(value))
            if ip in taken:
                continue
            try:
                await self.kv.create(self.cluster_ip_key(ip), owner)
                return ip
            except KeyExistsError:
                continue
        raise LBIPAMError(f"the service CIDR {net} has no free address left")

    # --- delete and read --------------------------------------------------------------------------

    async def delete(self, kind: str, name: str, namespace: str = "") -> Change | None:
        key = self.object_key(kind, name, namespace)
        entry = await self.kv.get(key)
        if entry is None:
            return None
        await self.kv.delete(key)
        if kind == "Service":
            doc = json.loads(entry.value)
            ip = doc.get("spec", {}).get("clusterIP")
            ns = namespace or "default"
            if ip:
                cip = await self.kv.get(self.cluster_ip_key(ip))
                if cip is not None and json.loads(cip.value).get("service") == f"{ns}/{name}":
                    with contextlib.suppress(RevisionMismatchError):
                        await self.kv.delete(cip.key, revision=cip.revision)
            await self.kv.delete(f"{self.leases}/l2announce/{ns}/{name}")
        await self.reconcile()
        return Change(kind, namespace if kind == "Service" else "", name, "deleted")

    async def get(self, kind: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        entry = await self.kv.get(self.object_key(kind, name, namespace))
        return None if entry is None else dict(json.loads(entry.value))

    async def list_kind(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        if kind == "Service":
            prefix = f"{self.services}/{namespace}/" if namespace else f"{self.services}/"
        else:
            prefix = f"{self.lbipam}/{KIND_PATHS[kind]}/"
        return [json.loads(e.value) for e in await self.kv.list(prefix)]

    async def allocations(self) -> list[Allocation]:
        return [Allocation.from_json(json.loads(e.value)) for e in await self.kv.list(f"{self.lbipam}/ips/")]

    async def leases_view(self) -> dict[str, Any]:
        """L2 leases (`leases/l2announce/<ns>/<name>`) and each node announcer's report."""
        l2 = []
        for e in await self.kv.list(f"{self.leases}/l2announce/"):
            _, _, ns, name = e.key.split("/", 3)
            l2.append({"service": f"{ns}/{name}", **json.loads(e.value)})
        announcers = [json.loads(e.value) for e in await self.kv.list(f"{self.leases}/announcers/")]
        return {"l2": l2, "announcers": announcers}

    # --- reconcile --------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """One full pass: settle pool conflicts, bring every service's allocation and status in line
        with the pools, drop dead memberships, and write pool counts. Idempotent; safe to run
        concurrently on several replicas (this replica runs one pass at a time)."""
        async with self._lock:
            pools = await self._pools()
            entries = await self.kv.list(f"{self.services}/")
            keys = [e.key.split("/", 1)[1] for e in entries]
            for skey in sorted(keys):
                await self._reconcile_service(skey, pools)
            await self._gc_allocations()
            await self._write_pool_status(pools)

    async def _pools(self) -> list[Pool]:
        pools = []
        for entry in await self.kv.list(f"{self.lbipam}/pools/"):
            doc = json.loads(entry.value)
            try:
                obj = CiliumLoadBalancerIPPool.model_validate({**doc, "status": None})
            except Exception as err:  # written by someone else: skip, say so
                log.warning("event=bad-pool key=%s error=%r", entry.key, str(err))
                continue
            created = str(doc.get("metadata", {}).get("creationTimestamp", ""))
            pools.append(Pool(obj, ipam.ranges_of(obj), created))
        ipam.settle_conflicts(pools)
        return pools

    async def _allocations_by_ip(self) -> dict[str, tuple[Allocation, int]]:
        out = {}
        for e in await self.kv.list(f"{self.lbipam}/ips/"):
            a = Allocation.from_json(json.loads(e.value))
            out[a.ip] = (a, e.revision)
        return out

    async def _services_by_key(self, keys: Iterable[str]) -> dict[str, Service]:
        out = {}
        for k in keys:
            ns, _, name = k.partition("/")
            entry = await self.kv.get(self.service_key(ns, name))
            if entry is not None:
                with contextlib.suppress(Exception):
                    out[k] = _service(json.loads(entry.value))
        return out

    async def _reconcile_service(self, skey: str, pools: list[Pool]) -> None:
        ns, _, name = skey.partition("/")
        key = self.service_key(ns, name)
        for _attempt in range(ATTEMPTS):
            entry = await self.kv.get(key)
            if entry is None:
                return
            doc = json.loads(entry.value)
            try:
                svc = _service(doc)
            except Exception as err:
                log.warning("event=bad-service key=%s error=%r", key, str(err))
                return
            allocs = await self._allocations_by_ip()
            claims: list[str] = []
            try:
                status, drop = await self._decide(svc, doc, pools, allocs, claims)
            except _Retry:
                await self._rollback(skey, claims)
                continue
            if status != doc.get("status"):
                new = {**doc, "status": status}
                try:
                    await self.kv.update(key, json.dumps(new).encode(), entry.revision)
                except RevisionMismatchError:
                    await self._rollback(skey, claims)
                    continue
                for ip in claims:
                    log.info("event=lb-ip-assigned service=%s ip=%s", skey, ip)
            for ip in drop:
                await self._leave(skey, ip)
                log.info("event=lb-ip-released service=%s ip=%s", skey, ip)
            return
        log.warning("event=reconcile-gave-up service=%s attempts=%d", skey, ATTEMPTS)

    async def _decide(
        self,
        svc: Service,
        doc: dict[str, Any],
        pools: list[Pool],
        allocs: dict[str, tuple[Allocation, int]],
        claims: list[str],
    ) -> tuple[dict[str, Any] | None, list[str]]:
        """The service's new status, and the addresses it must leave once that status is written.
        New memberships are made here (and listed in `claims`)."""
        skey = svc.key
        status = dict(doc.get("status") or {})
        conditions = [c for c in status.get("conditions") or [] if isinstance(c, dict)]
        current = svc.lb_ips()
        generation = doc.get("metadata", {}).get("generation")
        if not pools or not svc.wants_lbipam():
            # Not ours to serve: a service of another type or load balancer class (Cilium leaves it
            # alone), or LB-IPAM dormant, as Cilium's is until the first pool exists. Only what this
            # service got from LB-IPAM is taken back, with LB-IPAM's condition; the rest stays.
            ours = [ip for ip in current if ip in allocs and skey in allocs[ip][0].members]
            drop = ours + [ip for ip, (a, _) in allocs.items() if skey in a.members and ip not in ours]
            mine = any(c.get("type") == ipam.SATISFIED for c in conditions)
            wants = svc.wants_lbipam()
            if not ours and not (mine and not wants):
                return doc.get("status"), drop
            lb = dict(status.get("loadBalancer") or {})
            ingress = [i for i in lb.get("ingress") or [] if i.get("ip") not in ours]
            lb = {**lb, "ingress": ingress} if ingress else {k: v for k, v in lb.items() if k != "ingress"}
            new_status = {**status, "loadBalancer": lb}
            if wants:  # its last pool went: say so, as Cilium does before it goes dormant
                rest = set_condition(
                    conditions,
                    ipam.SATISFIED,
                    "False",
                    "no_pool",
                    "There are no enabled CiliumLoadBalancerIPPools that match this service",
                    generation,
                )
            else:
                rest = [c for c in conditions if c.get("type") != ipam.SATISFIED]
            if rest:
                new_status["conditions"] = rest
            else:
                new_status.pop("conditions", None)
            return new_status, drop
        by_name = {p.name: p for p in pools}
        keep: list[str] = []
        drop = []
        requested = svc.requested_ips()
        members_cache: dict[str, dict[str, Service]] = {}
        for ip in current:
            hit = allocs.get(ip)
            if hit is None:
                # An address someone else put in the status: adopt it when a pool may give it to
                # this service (Cilium's stripOrImportIngresses), else drop it.
                one_v4 = not requested and any(ipaddress.ip_address(k).version == 4 for k in keep)
                if (requested and ip not in requested) or one_v4:
                    continue
                found = ipam.find_range_of_ip(pools, svc, ip)
                if found.range is not None:
                    with contextlib.suppress(_Taken):
                        await self._create(svc, ip, found.range.pool, claims)
                        keep.append(ip)
                continue
            if skey not in hit[0].members:
                continue  # not ours (any more): simply not kept
            alloc = hit[0]
            pool = by_name.get(alloc.pool)
            valid = (
                pool is not None
                and pool.range_of(ip) is not None
                and pool.selects(svc)
                and (not requested or ip in requested)
                and (len(alloc.members) == 1 or alloc.sharing_key == svc.sharing_key())
            )
            if valid and len(alloc.members) > 1:
                others = await self._services_by_key(k for k in alloc.members if k != skey)
                members_cache[ip] = others
                valid = ipam.compatible_with_all(svc, others.values())[0]
            if (
                valid
                and not requested
                and ipaddress.ip_address(ip).version == 4
                and any(ipaddress.ip_address(k).version == 4 for k in keep)
            ):
                valid = False  # one IPv4 address per service unless more are requested
            (keep if valid else drop).append(ip)
        # Memberships this service has but whose address is not in its status: someone's
        # allocation in flight (leave it alone) or a dead one (garbage collection removes it).
        reason, message = "satisfied", ""
        satisfied = True
        if requested:
            for ip in requested:
                if ip in keep:
                    continue
                ok, reason_, message_ = await self._claim_specific(svc, ip, pools, allocs, claims)
                if ok:
                    keep.append(ip)
                else:
                    satisfied, reason, message = False, reason_, message_
        elif not any(ipaddress.ip_address(ip).version == 4 for ip in keep):
            got, reason_, message_ = await self._claim_generic(svc, pools, allocs, claims)
            if got is not None:
                keep.append(got)
            else:
                satisfied, reason, message = False, reason_, message_
        ingress = [{"ip": ip} for ip in keep]
        conditions = set_condition(
            conditions, ipam.SATISFIED, "True" if satisfied else "False", reason, message, generation
        )
        new_status = {"loadBalancer": {"ingress": ingress} if ingress else {}, "conditions": conditions}
        return new_status, drop

    async def _claim_specific(
        self,
        svc: Service,
        ip: str,
        pools: list[Pool],
        allocs: dict[str, tuple[Allocation, int]],
        claims: list[str],
    ) -> tuple[bool, str, str]:
        found = ipam.find_range_of_ip(pools, svc, ip)
        if found.range is None:
            return False, found.reason, found.message
        hit = allocs.get(ip)
        if hit is not None:
            alloc, revision = hit
            if svc.key in alloc.members:
                return True, "", ""  # ours already (an allocation whose status write we lost)
            if not svc.sharing_key() or alloc.sharing_key != svc.sharing_key():
                return False, "already_allocated", f"The IP '{ip}' is already allocated to another service"
            others = await self._services_by_key(alloc.members)
            ok, why = ipam.compatible_with_all(svc, others.values())
            if not ok:
                return (
                    False,
                    "already_allocated_incompatible_service",
                    f"The IP '{ip}' is already allocated to an incompatible service. Reason: {why}",
                )
            await self._join(svc, alloc, revision, claims)
            return True, "", ""
        try:
            await self._create(svc, ip, found.range.pool, claims)
        except _Taken:
            raise _Retry() from None
        return True, "", ""

    async def _claim_generic(
        self,
        svc: Service,
        pools: list[Pool],
        allocs: dict[str, tuple[Allocation, int]],
        claims: list[str],
    ) -> tuple[str | None, str, str]:
        # A membership that has not reached the status yet (an allocation in flight on another
        # replica, or ours whose status write was lost): take it rather than allocate a second one.
        for ip, (alloc, _) in sorted(allocs.items()):
            pool = next((p for p in pools if p.name == alloc.pool), None)
            if (
                svc.key in alloc.members
                and ipaddress.ip_address(ip).version == 4
                and pool is not None
                and pool.range_of(ip) is not None
                and pool.selects(svc)
                and alloc.sharing_key == svc.sharing_key()
            ):
                return ip, "", ""
        key = svc.sharing_key()
        if key:
            for ip, (alloc, revision) in sorted(allocs.items()):
                if alloc.sharing_key != key or ipaddress.ip_address(ip).version != 4:
                    continue
                pool = next((p for p in pools if p.name == alloc.pool), None)
                if pool is None or not pool.selects(svc):
                    continue
                others = await self._services_by_key(alloc.members)
                if not others or not ipam.compatible_with_all(svc, others.values())[0]:
                    continue
                await self._join(svc, alloc, revision, claims)
                return ip, "", ""
        eligible = [
            p for p in sorted(pools, key=lambda p: (p.created, p.name)) if p.allocates and p.selects(svc)
        ]
        taken = set(allocs)
        full = False
        for pool in eligible:
            for r in pool.ranges:
                if r.version != 4:
                    continue
                for ip in ipam.free_addresses(r, taken):
                    try:
                        await self._create(svc, ip, pool.name, claims)
                        return ip, "", ""
                    except _Taken:
                        taken.add(ip)
                        continue
                full = True
        if full or any(r.version == 4 for p in eligible for r in p.ranges):
            return (
                None,
                "out_of_ips",
                "All enabled CiliumLoadBalancerIPPools that match this service ran out of allocatable IPs",
            )
        return None, "no_pool", "There are no enabled CiliumLoadBalancerIPPools that match this service"

    async def _create(self, svc: Service, ip: str, pool: str, claims: list[str]) -> None:
        alloc = Allocation(ip, pool, svc.sharing_key(), {svc.key: time.time()})
        try:
            await self.kv.create(self.ip_key(ip), json.dumps(alloc.to_json()).encode())
        except KeyExistsError:
            raise _Taken() from None
        claims.append(ip)

    async def _join(self, svc: Service, alloc: Allocation, revision: int, claims: list[str]) -> None:
        joined = Allocation(alloc.ip, alloc.pool, alloc.sharing_key, {**alloc.members, svc.key: time.time()})
        try:
            await self.kv.update(self.ip_key(alloc.ip), json.dumps(joined.to_json()).encode(), revision)
        except RevisionMismatchError:
            raise _Retry() from None
        claims.append(alloc.ip)

    async def _leave(self, skey: str, ip: str) -> None:
        """Remove `skey` from the address's members; delete the record when nobody is left."""
        for _ in range(ATTEMPTS):
            entry = await self.kv.get(self.ip_key(ip))
            if entry is None:
                return
            alloc = Allocation.from_json(json.loads(entry.value))
            if skey not in alloc.members:
                return
            members = {k: v for k, v in alloc.members.items() if k != skey}
            try:
                if members:
                    alloc.members = members
                    await self.kv.update(entry.key, json.dumps(alloc.to_json()).encode(), entry.revision)
                else:
                    await self.kv.delete(entry.key, revision=entry.revision)
                return
            except RevisionMismatchError:
                continue

    async def _rollback(self, skey: str, claims: list[str]) -> None:
        for ip in claims:
            await self._leave(skey, ip)
        claims.clear()

    async def _gc_allocations(self) -> None:
        """Remove memberships of services that are gone, or whose status has not named the address
        for `grace` seconds after joining (their allocator died between its two writes)."""
        now = time.time()
        for entry in await self.kv.list(f"{self.lbipam}/ips/"):
            alloc = Allocation.from_json(json.loads(entry.value))
            for skey, since in list(alloc.members.items()):
                ns, _, name = skey.partition("/")
                svc_entry = await self.kv.get(self.service_key(ns, name))
                if svc_entry is not None:
                    try:
                        svc = _service(json.loads(svc_entry.value))
                    except Exception:
                        continue
                    if alloc.ip in svc.lb_ips() or now - since < self.grace:
                        continue
                await self._leave(skey, alloc.ip)
                log.info("event=lb-ip-membership-removed service=%s ip=%s", skey, alloc.ip)
            if not alloc.members:
                with contextlib.suppress(RevisionMismatchError):
                    await self.kv.delete(entry.key, revision=entry.revision)

    async def _write_pool_status(self, pools: list[Pool]) -> None:
        allocated = [a.ip for a in await self.allocations()]
        for pool in pools:
            counts = ipam.pool_counts(pool, allocated)
            key = self.object_key("CiliumLoadBalancerIPPool", pool.name)
            for _ in range(ATTEMPTS):
                entry = await self.kv.get(key)
                if entry is None:
                    break
                doc = json.loads(entry.value)
                gen = doc.get("metadata", {}).get("generation")
                conds = list((doc.get("status") or {}).get("conditions") or [])
                if pool.conflict is not None:
                    conds = set_condition(
                        conds, ipam.POOL_CONFLICT, "True", "cidr_overlap", pool.conflict, gen
                    )
                else:
                    conds = set_condition(conds, ipam.POOL_CONFLICT, "False", "resolved", "", gen)
                for ctype, value in (
                    (ipam.IPS_TOTAL, counts.total),
                    (ipam.IPS_AVAILABLE, counts.available),
                    (ipam.IPS_USED, counts.used),
                ):
                    conds = set_condition(conds, ctype, "Unknown", "noreason", str(value), gen)
                status = {"conditions": conds}
                if doc.get("status") == status:
                    break
                try:
                    await self.kv.update(key, json.dumps({**doc, "status": status}).encode(), entry.revision)
                    break
                except RevisionMismatchError:
                    continue


class _Taken(Exception):
    """The address was created by someone else first."""


class _Retry(Exception):
    """A shared address changed under us: decide again from fresh reads."""


def _user_meta(meta: dict[str, Any]) -> tuple[Any, Any]:
    return meta.get("labels") or {}, meta.get("annotations") or {}


def _service(doc: dict[str, Any]) -> Service:
    """A stored service as a model (spec and status as stored, server metadata allowed)."""
    return Service.model_validate(doc)


def parse_kind(kind: str) -> str:
    """`svc`, `services`, `ippools`, `ciliumloadbalancerippool`... -> the kind's name."""
    aliases = {
        "service": "Service",
        "services": "Service",
        "svc": "Service",
        "ciliumloadbalancerippool": "CiliumLoadBalancerIPPool",
        "ciliumloadbalancerippools": "CiliumLoadBalancerIPPool",
        "ippool": "CiliumLoadBalancerIPPool",
        "ippools": "CiliumLoadBalancerIPPool",
        "pool": "CiliumLoadBalancerIPPool",
        "pools": "CiliumLoadBalancerIPPool",
        "ciliuml2announcementpolicy": "CiliumL2AnnouncementPolicy",
        "ciliuml2announcementpolicies": "CiliumL2AnnouncementPolicy",
        "l2announcement": "CiliumL2AnnouncementPolicy",
        "l2announcements": "CiliumL2AnnouncementPolicy",
        "ciliumbgppeeringpolicy": "CiliumBGPPeeringPolicy",
        "ciliumbgppeeringpolicies": "CiliumBGPPeeringPolicy",
        "bgpp": "CiliumBGPPeeringPolicy",
    }
    if kind in KIND_MODELS:
        return kind
    found = aliases.get(kind.lower())
    if found is None:
        raise LBIPAMError(f"unknown kind {kind!r} (one of {', '.join(sorted(KIND_MODELS))})")
    return found
