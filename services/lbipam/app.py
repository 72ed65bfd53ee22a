"""HTTP routes of the lbipam service: apply (kubectl-style), list, get and delete its kinds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request

from cilia.service import Service
from services.lbipam.store import LBIPAMError, LBIPAMStore, parse_kind


def router(service: Service, store_ref: Callable[[], LBIPAMStore | None]) -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["lbipam"])
    read = Depends(service.require_read())
    write = Depends(service.require_write("admin"))

    def store() -> LBIPAMStore:
        s = store_ref()
        if s is None:
            raise HTTPException(503, detail="the kvstore is not connected yet")
        return s

    def kind_of(kind: str) -> str:
        try:
            return parse_kind(kind)
        except LBIPAMError as err:
            raise HTTPException(404, detail=str(err)) from None

    @r.post("/resources", dependencies=[write])
    async def apply(request: Request) -> dict[str, Any]:
        """Apply Services, pools, L2 and BGP policies (YAML or JSON, one or many documents).

        A batch with any invalid document is rejected whole (422, naming the document and field)
        and nothing changes. Allocation happens before the answer: a `get` right after shows it.
        """
        body = (await request.body()).decode("utf-8", errors="replace")
        changes = await store().apply_text(body)
        return {"changes": [c.to_json() for c in changes]}

    @r.get("/resources/{kind}", dependencies=[read])
    async def list_kind(kind: str, namespace: str | None = None) -> dict[str, Any]:
        return {"items": await store().list_kind(kind_of(kind), namespace)}

    @r.get("/resources/{kind}/{name}", dependencies=[read])
    async def get_one(kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        k = kind_of(kind)
        doc = await store().get(k, name, namespace or "default")
        if doc is None:
            where = f"{namespace or 'default'}/{name}" if k == "Service" else name
            raise HTTPException(404, detail=f"{k} {where} not found")
        return doc

    @r.delete("/resources/{kind}/{name}", dependencies=[write])
    async def delete_one(kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        k = kind_of(kind)
        change = await store().delete(k, name, namespace or "default")
        if change is None:
            where = f"{namespace or 'default'}/{name}" if k == "Service" else name
            raise HTTPException(404, detail=f"{k} {where} not found")
        return {"changes": [change.to_json()]}

    @r.get("/allocations", dependencies=[read])
    async def allocations() -> dict[str, Any]:
        """Every allocated LB address: its pool, sharing key and member services."""
        return {"items": [a.to_json() for a in await store().allocations()]}

    @r.get("/leases", dependencies=[read])
    async def leases() -> dict[str, Any]:
        """L2 announcement leases (which node answers ARP for which service) and announcer reports."""
        return await store().leases_view()

    return r
