"""HTTP routes of the datapath agent."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException

from cilia.service import Service
from services.datapath.agent import Agent, EndpointError, EndpointRecord, EndpointSpec


def router(service: Service, agent_ref: Any) -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["endpoints"])
    read = Depends(service.require_read())
    write = Depends(service.require_write("admin", "agent"))

    def agent() -> Agent:
        a: Agent | None = agent_ref()
        if a is None:
            raise HTTPException(503, detail="the datapath is still starting")
        return a

    @r.post("/endpoints", response_model=EndpointRecord, dependencies=[write])
    async def add(spec: EndpointSpec) -> EndpointRecord:
        """Create an endpoint like a CNI ADD: netns and veth, address, identity, programs, map state."""
        try:
            return await agent().add_endpoint(spec)
        except EndpointError as err:
            raise HTTPException(409 if "already exists" in str(err) else 422, detail=str(err)) from None

    @r.get("/endpoints", dependencies=[read])
    async def list_endpoints() -> dict[str, Any]:
        a = agent()
        return {"node": a.node, "items": [e.model_dump(mode="json") for e in a.endpoints()]}

    @r.get("/endpoints/{namespace}/{name}", dependencies=[read])
    async def get_endpoint(namespace: str, name: str) -> dict[str, Any]:
        a = agent()
        rec = a.get(namespace, name)
        if rec is None:
            raise HTTPException(404, detail=f"endpoint {namespace}/{name} not found on node {a.node}")
        out = rec.model_dump(mode="json")
        policy = a.policy_of(rec)
        if policy is not None:
            out["policy"] = [
                {"key": str(k), "verdict": e.verdict, "reason": e.reason}
                for k, e in sorted(
                    policy.entries.items(),
                    key=lambda kv: (kv[0].direction, kv[0].identity, kv[0].proto, kv[0].port),
                )
            ]
        return out

    @r.delete("/endpoints/{namespace}/{name}", dependencies=[write])
    async def delete_endpoint(namespace: str, name: str) -> dict[str, Any]:
        try:
            rec = await agent().delete_endpoint(namespace, name)
        except EndpointError as err:
            raise HTTPException(404, detail=str(err)) from None
        return {"deleted": rec.key}

    return r
