"""The node registry: each datapath agent announces its node in the kvstore under a lease and keeps
it alive with heartbeats; every agent watches the registry to know where other nodes' pods live.

A node that stops heartbeating disappears when its lease runs out, and with it (on every other
node) its endpoints, its pod CIDR route and its ipcache entries.
"""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network

from pydantic import BaseModel, Field


class NodeInfo(BaseModel):
    """What a node announces (key `<nodes bucket>/<name>`)."""

    name: str
    ip: IPv4Address = Field(description="the node's address on the underlay: its tunnel endpoint")
    pod_cidr: IPv4Network
    api: str = Field(default="", description="the node agent's HTTP API")
    endpoints: int = 0
    heartbeat: float = Field(default_factory=time.time, description="unix time of the last heartbeat")
    started: float = Field(default_factory=time.time)
    lease_seconds: int = 0
    labels: dict[str, str] = Field(default_factory=dict, description="the node's labels (nodeSelectors)")

    def routing(self) -> tuple[str, str, str]:
        """What the datapath depends on (heartbeats that change nothing else cost nothing)."""
        return (self.name, str(self.ip), str(self.pod_cidr))

    def health(self, now: float | None = None) -> str:
        age = (now if now is not None else time.time()) - self.heartbeat
        if self.lease_seconds and age > self.lease_seconds:
            return "unreachable"
        return "ok"


def node_key(bucket: str, name: str) -> str:
    return f"{bucket}/{name}"
