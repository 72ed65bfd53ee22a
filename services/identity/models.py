"""Request and reply payloads of the identity service (HTTP and NATS share them)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class AllocateRequest(BaseModel):
    labels: list[str] = Field(min_length=1, description="Cilium label strings, e.g. k8s:org=empire")
    holder: str | None = Field(
        default=None, description="who uses the identity (a node); kept as a reference"
    )


class ReleaseRequest(BaseModel):
    id: int
    holder: str


class GetRequest(BaseModel):
    id: int | None = None
    labels: list[str] | None = None


class IdentityReply(BaseModel):
    id: int
    labels: list[str]


class IdentityList(BaseModel):
    items: list[IdentityReply]


class ReleaseReply(BaseModel):
    released: bool


class IdentityEvent(BaseModel):
    type: str  # added, removed
    id: int
    labels: list[str] = Field(default_factory=list)
