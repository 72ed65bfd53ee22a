"""The L7 proxy's HTTP API (routes only): its status; `/metrics` and health come from the runner."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from cilia.service import Service
from services.l7proxy.dataplane import DataPlane


def router(service: Service, plane: DataPlane) -> APIRouter:
    r = APIRouter(tags=["l7proxy"])

    @r.get("/v1/l7proxy/status", dependencies=[Depends(service.require_read())])
    async def status() -> dict[str, Any]:
        """Listener, registration with the node's agent, open connections, policy cache."""
        return plane.status()

    return r
