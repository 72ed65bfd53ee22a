"""HTTP routes of the policy service."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request

from cilia.models.loader import CLUSTER_SCOPED, POLICY_KINDS
from cilia.service import Service
from services.policy.store import PolicyStore
from services.policy.trace import TraceReply, TraceRequest, trace

_KIND_ALIASES = {
    "cnp": "CiliumNetworkPolicy",
    "ciliumnetworkpolicy": "CiliumNetworkPolicy",
    "ciliumnetworkpolicies": "CiliumNetworkPolicy",
    "ccnp": "CiliumClusterwideNetworkPolicy",
    "ciliumclusterwidenetworkpolicy": "CiliumClusterwideNetworkPolicy",
    "ciliumclusterwidenetworkpolicies": "CiliumClusterwideNetworkPolicy",
    "netpol": "NetworkPolicy",
    "networkpolicy": "NetworkPolicy",
    "networkpolicies": "NetworkPolicy",
}


def canonical_kind(kind: str) -> str:
    if kind in POLICY_KINDS:
        return kind
    k = _KIND_ALIASES.get(kind.lower())
    if k is None:
        raise HTTPException(
            404, detail=f"unknown policy kind {kind!r} (one of {', '.join(sorted(POLICY_KINDS))})"
        )
    return k


def router(service: Service, store_ref: Any) -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["policies"])
    read = Depends(service.require_read())
    write = Depends(service.require_write("admin"))

    def store() -> PolicyStore:
        s: PolicyStore | None = store_ref()
        if s is None:
            raise HTTPException(503, detail="the kvstore is not connected yet")
        return s

    @r.post("/policies", dependencies=[write])
    async def apply(request: Request) -> dict[str, Any]:
        """Apply policies (YAML or JSON, one or many documents): create or replace by kind/namespace/name.

        A batch with any invalid document is rejected whole (422, naming document and field) and
        the repository stays exactly as it was.
        """
        body = (await request.body()).decode("utf-8", errors="replace")
        revision, changes = await store().apply_text(body)
        if any(c.action != "unchanged" for c in changes):
            await service_publish_revision(service, revision)
        return {
            "revision": revision,
            "changes": [
                {"kind": c.key[0], "namespace": c.key[1] or None, "name": c.key[2], "action": c.action}
                for c in changes
            ],
        }

    @r.get("/policies", dependencies=[read])
    async def list_policies() -> dict[str, Any]:
        items = []
        for key, doc in await store().list():
            m = doc["manifest"]
            items.append(
                {
                    "kind": key[0],
                    "namespace": key[1] or None,
                    "name": key[2],
                    "revision": doc["revision"],
                    "description": (
                        (m.get("spec") or {}).get("description") if isinstance(m.get("spec"), dict) else None
                    ),
                }
            )
        return {"revision": await store().revision(), "items": items}

    def _key(kind: str, name: str, namespace: str | None) -> tuple[str, str, str]:
        k = canonical_kind(kind)
        return (k, "" if k in CLUSTER_SCOPED else (namespace or "default"), name)

    @r.get("/policies/{kind}/{name}", dependencies=[read])
    async def get_policy(kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        key = _key(kind, name, namespace)
        doc = await store().get(key)
        if doc is None:
            raise HTTPException(404, detail=f"{key[0]} {'/'.join(x for x in key[1:] if x)} not found")
        return dict(doc["manifest"])

    @r.delete("/policies/{kind}/{name}", dependencies=[write])
    async def delete_policy(kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        key = _key(kind, name, namespace)
        revision, change = await store().delete(key)
        if change is None:
            raise HTTPException(404, detail=f"{key[0]} {'/'.join(x for x in key[1:] if x)} not found")
        await service_publish_revision(service, revision)
        return {
            "revision": revision,
            "changes": [{"kind": key[0], "namespace": key[1] or None, "name": key[2], "action": "deleted"}],
        }

    @r.post("/policy/trace", response_model=TraceReply, dependencies=[read])
    async def trace_route(req: TraceRequest) -> TraceReply:
        """Judge a connection with the stored policies, naming the rule that decided (like `cilium policy trace`)."""
        s = store()
        return trace(await s.repository(), req, revision=await s.revision())

    return r


async def service_publish_revision(service: Service, revision: int) -> None:
    from cilia import bus
    from services.policy.models import RevisionEvent

    if service.nc is not None and service.nc.is_connected:
        await bus.publish(service.nc, bus.POLICY_REVISION, RevisionEvent(revision=revision))
