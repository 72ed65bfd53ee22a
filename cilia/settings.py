"""Configuration: one pydantic-settings class per service, read from `CILIA_*` environment variables.

Defaults follow ARCHITECTURE.md §6: NATS at nats://127.0.0.1:4222, the NATS KV store, each service's
HTTP API on 127.0.0.1 at its own port. `describe()` gives the settings for the start-up log line,
with secrets redacted.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
SERVICE_PORTS: dict[str, int] = {
    "identity": 9101,
    "policy": 9102,
    "datapath": 9103,
    "dnsproxy": 9104,
    "l7proxy": 9105,
    "lbipam": 9106,
    "announcer": 9107,
}
# The role each service authenticates as (ARCHITECTURE.md §10).
SERVICE_ROLES: dict[str, str] = {
    "identity": "service",
    "policy": "service",
    "lbipam": "service",
    "datapath": "agent",
    "dnsproxy": "agent",
    "l7proxy": "agent",
    "announcer": "agent",
}


class Settings(BaseSettings):
    """Settings every service shares."""

    model_config = SettingsConfigDict(env_prefix="CILIA_", extra="ignore")

    service: str = "cilia"
    nats_url: str = DEFAULT_NATS_URL
    kvstore: str = "nats"
    http_addr: str = ""
    token_file: Path | None = None
    anonymous_read: bool = False
    node: str = socket.gethostname()
    # The node's labels, `k=v,k2=v2` (CILIA_NODE_LABELS): what nodeSelectors of L2 and BGP policies
    # match, besides `kubernetes.io/hostname=<node>`. Node agents publish them in the node registry.
    node_labels: str = ""
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    log_level: str = "info"
    state_dir: Path = Path("/var/lib/cilia")

    @field_validator("kvstore")
    @classmethod
    def _kvstore(cls, v: str) -> str:
        if v != "nats" and not v.startswith(("nats://", "etcd://")):
            raise ValueError("must be 'nats', 'nats://host:port' or 'etcd://host:port'")
        return v

    def http_host_port(self) -> tuple[str, int]:
        """Where the HTTP API listens: CILIA_HTTP_ADDR, or 127.0.0.1 and the service's default port."""
        addr = self.http_addr or f"127.0.0.1:{SERVICE_PORTS.get(self.service, 9100)}"
        host, _, port = addr.rpartition(":")
        try:
            return (host or "127.0.0.1", int(port))
        except ValueError:
            raise ValueError(f"CILIA_HTTP_ADDR {addr!r}: expected host:port") from None

    @property
    def role(self) -> str:
        return SERVICE_ROLES.get(self.service, "service")

    def node_label_map(self) -> dict[str, str]:
        """The node's labels: `kubernetes.io/hostname=<node>` (as every Kubernetes node has) and
        CILIA_NODE_LABELS (`k=v,k2=v2`)."""
        out = {"kubernetes.io/hostname": self.node}
        for part in self.node_labels.split(","):
            if part.strip():
                key, _, value = part.strip().partition("=")
                out[key.strip()] = value.strip()
        return out

    def describe(self) -> dict[str, Any]:
        """The settings as key=value pairs for the start-up log, secrets redacted."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(getattr(self, name), SecretStr):
                value = "***" if value else None
            out[name] = value
        return out
