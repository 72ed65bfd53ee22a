"""HTTP routes of the DNS proxy (people and the CLI; the packet path never comes through here)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException

from cilia.service import Service
from services.dnsproxy.dataplane import DataPlane, DataPlaneError


def router(service: Service, dataplane: DataPlane) -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["dnsproxy"])
    read = Depends(service.require_read())

    @r.get("/fqdn/cache", dependencies=[read])
    async def fqdn_cache(endpoint: str | None = None, name: str | None = None) -> dict[str, Any]:
        """The FQDN cache (`cilia fqdn cache list`): per endpoint, names, IPs, TTLs, expiry, selectors.
        `endpoint` is an endpoint id or `namespace/pod`; `name` a name or a `*` pattern."""
        try:
            items = await dataplane.call(lambda p: p.snapshot(endpoint, name))
        except DataPlaneError as err:
            raise HTTPException(503, detail=str(err)) from None
        return {"node": service.settings.node, "items": items}

    @r.get("/dnsproxy/status", dependencies=[read])
    async def status() -> dict[str, Any]:
        """Registration with the agent, policies cached, cache size, selectors."""
        try:
            return {"node": service.settings.node, **await dataplane.call(lambda p: p.status())}
        except DataPlaneError as err:
            raise HTTPException(503, detail=str(err)) from None

    return r
