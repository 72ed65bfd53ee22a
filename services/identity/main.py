"""Wiring of the identity service: allocator on the kvstore, NATS request handlers, HTTP, GC."""

from __future__ import annotations

import asyncio
import logging

from pydantic import Field

from cilia import bus
from cilia.service import Service
from cilia.settings import Settings
from services.identity.allocator import AllocationError, IdentityAllocator
from services.identity.app import router
from services.identity.models import (
    AllocateRequest,
    GetRequest,
    IdentityEvent,
    IdentityReply,
    ReleaseReply,
    ReleaseRequest,
)

log = logging.getLogger("cilia.identity")


class IdentitySettings(Settings):
    service: str = "identity"
    gc_interval_seconds: float = Field(default=30.0, gt=0)
    gc_grace_seconds: float = Field(default=300.0, ge=0)
    identity_bucket: str = bus.BUCKET_IDENTITIES


class _Lazy:
    """The allocator exists once the kvstore is connected; HTTP routes reach it through this."""

    def __init__(self) -> None:
        self.allocator: IdentityAllocator | None = None

    def __getattr__(self, name: str) -> object:
        if self.allocator is None:
            raise AllocationError("the kvstore is not connected yet")
        return getattr(self.allocator, name)


def build(settings: IdentitySettings | None = None) -> Service:
    settings = settings or IdentitySettings()
    service = Service("identity", settings, "Label sets to numeric security identities.")
    lazy = _Lazy()
    service.app.include_router(router(service, lazy))  # type: ignore[arg-type]

    @service.on_start
    async def start(svc: Service) -> None:
        assert svc.kv is not None and svc.nc is not None
        allocator = IdentityAllocator(svc.kv, bucket=settings.identity_bucket)
        await allocator.list()  # creates the bucket: agents may only read it
        lazy.allocator = allocator
        nc = svc.nc

        async def on_allocate(req: AllocateRequest) -> IdentityReply:
            ident = await allocator.allocate(req.labels, req.holder)
            if ident.created:
                await bus.publish(
                    nc,
                    bus.IDENTITY_EVENTS,
                    IdentityEvent(type="added", id=ident.id, labels=list(ident.labels)),
                )
            return IdentityReply(id=ident.id, labels=list(ident.labels))

        async def on_release(req: ReleaseRequest) -> ReleaseReply:
            return ReleaseReply(released=await allocator.release(req.id, req.holder))

        async def on_get(req: GetRequest) -> IdentityReply:
            ident = (
                await allocator.get(req.id)
                if req.id is not None
                else await allocator.lookup(req.labels or [])
            )
            if ident is None:
                raise AllocationError("identity not found")
            return IdentityReply(id=ident.id, labels=list(ident.labels))

        await bus.serve(
            nc, bus.IDENTITY_ALLOCATE, AllocateRequest, on_allocate, queue="identity", concurrent=True
        )
        await bus.serve(
            nc, bus.IDENTITY_RELEASE, ReleaseRequest, on_release, queue="identity", concurrent=True
        )
        await bus.serve(nc, bus.IDENTITY_GET, GetRequest, on_get, queue="identity", concurrent=True)

    @service.task
    async def gc(svc: Service) -> None:
        while True:
            await asyncio.sleep(settings.gc_interval_seconds)
            if lazy.allocator is None or svc.nc is None:
                continue
            removed = await lazy.allocator.gc(settings.gc_grace_seconds)
            for num in removed:
                log.info("event=identity-gc id=%d", num)
                await bus.publish(svc.nc, bus.IDENTITY_EVENTS, IdentityEvent(type="removed", id=num))

    return service


def main() -> None:
    build().run()
