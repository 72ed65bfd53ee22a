"""Wiring of the lbipam service: the store on the kvstore, HTTP routes, and the reconciler, run after
every change of a Service or pool (on any replica) and every `reconcile_interval_seconds`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pydantic import Field

from cilia import bus
from cilia.service import Service
from cilia.settings import Settings
from services.lbipam.app import router
from services.lbipam.store import LBIPAMStore

log = logging.getLogger("cilia.lbipam")


class LBIPAMSettings(Settings):
    service: str = "lbipam"
    service_cidr: str = "10.96.0.0/16"  # ClusterIPs, as kube-apiserver's --service-cluster-ip-range
    reconcile_interval_seconds: float = Field(default=10.0, gt=0)
    allocation_grace_seconds: float = Field(default=30.0, gt=0)
    services_bucket: str = bus.BUCKET_SERVICES
    lbipam_bucket: str = bus.BUCKET_LBIPAM
    leases_bucket: str = bus.BUCKET_LEASES


def build(settings: LBIPAMSettings | None = None) -> Service:
    settings = settings or LBIPAMSettings()
    service = Service("lbipam", settings, "Services, ClusterIPs, LB-IPAM pools, L2 and BGP policies.")
    holder: dict[str, LBIPAMStore] = {}
    service.app.include_router(router(service, lambda: holder.get("store")))
    wake = asyncio.Event()

    @service.on_start
    async def start(svc: Service) -> None:
        assert svc.kv is not None
        store = LBIPAMStore(
            svc.kv,
            settings.service_cidr,
            settings.services_bucket,
            settings.lbipam_bucket,
            settings.leases_bucket,
            grace=settings.allocation_grace_seconds,
        )
        await store.ensure_buckets()
        holder["store"] = store

    async def watch(svc: Service, prefix: str) -> None:
        assert svc.kv is not None
        async with svc.kv.watch(prefix) as events:
            async for _event in events:
                wake.set()

    @service.task
    async def watch_services(svc: Service) -> None:
        await watch(svc, f"{settings.services_bucket}/")

    @service.task
    async def watch_pools(svc: Service) -> None:
        await watch(svc, f"{settings.lbipam_bucket}/pools/")

    @service.task
    async def reconciler(svc: Service) -> None:
        """Reconcile when woken (changes, batched for 50 ms) or every reconcile interval."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=settings.reconcile_interval_seconds)
            await asyncio.sleep(0.05)
            wake.clear()
            store = holder.get("store")
            if store is None:
                continue
            try:
                await store.reconcile()
            except Exception as err:
                log.warning("event=reconcile-failed error=%r", str(err))

    return service


def main() -> None:
    build().run()
