"""HTTP routes of the identity service."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException

from cilia.service import Service
from services.identity.allocator import AllocationError, IdentityAllocator
from services.identity.models import AllocateRequest, IdentityList, IdentityReply


def router(service: Service, allocator: IdentityAllocator) -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["identities"])
    read = Depends(service.require_read())
    write = Depends(service.require_write("admin", "service", "agent"))

    @r.post("/identities", response_model=IdentityReply, dependencies=[write])
    async def allocate(req: AllocateRequest) -> IdentityReply:
        """The identity of a label set (allocated if new). Label order and non-security labels never matter."""
        try:
            ident = await allocator.allocate(req.labels, req.holder)
        except AllocationError as err:
            raise HTTPException(422, detail=str(err)) from None
        except ValueError as err:
            raise HTTPException(422, detail=f"invalid label: {err}") from None
        return IdentityReply(id=ident.id, labels=list(ident.labels))

    @r.get("/identities", response_model=IdentityList, dependencies=[read])
    async def list_identities() -> IdentityList:
        return IdentityList(
            items=[IdentityReply(id=i.id, labels=list(i.labels)) for i in await allocator.list()]
        )

    @r.get("/identities/{num}", response_model=IdentityReply, dependencies=[read])
    async def get_identity(num: int) -> IdentityReply:
        ident = await allocator.get(num)
        if ident is None:
            raise HTTPException(404, detail=f"identity {num} not found")
        return IdentityReply(id=ident.id, labels=list(ident.labels))

    return r
