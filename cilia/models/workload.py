"""cilia's own resources: `Endpoint` (a workload on a node) and `Identity` (labels -> number)."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import Field, field_validator

from cilia.models.cilium import _check_port
from cilia.models.meta import ObjectMeta, Strict

API_VERSION = "cilia.io/v1"


class EndpointSpec(Strict):
    node: str | None = None
    ips: list[str] = Field(default_factory=list)
    interface: str | None = None
    netns: str | None = None
    namedPorts: dict[str, int] = Field(default_factory=dict)
    serviceAccount: str | None = None

    @field_validator("ips")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        return [str(ipaddress.ip_address(ip)) for ip in v]

    @field_validator("namedPorts")
    @classmethod
    def _ports(cls, v: dict[str, int]) -> dict[str, int]:
        for name, port in v.items():
            if _check_port(name) != name.lower() or name.isdigit():
                raise ValueError(f"invalid port name {name!r}")
            if not 1 <= port <= 65535:
                raise ValueError(f"port {name}: must be 1-65535")
        return {k.lower(): p for k, p in v.items()}


class EndpointStatus(Strict):
    id: int | None = None
    identity: int | None = None
    state: str | None = None


class Endpoint(Strict):
    apiVersion: Literal["cilia.io/v1"] = "cilia.io/v1"
    kind: Literal["Endpoint"] = "Endpoint"
    metadata: ObjectMeta
    spec: EndpointSpec = Field(default_factory=EndpointSpec)
    status: EndpointStatus | None = None


class Identity(Strict):
    apiVersion: Literal["cilia.io/v1"] = "cilia.io/v1"
    kind: Literal["Identity"] = "Identity"
    id: int = Field(ge=1)
    labels: list[str]
    extra: dict[str, Any] | None = None
