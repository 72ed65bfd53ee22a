"""Wiring of the node's L7 proxy: settings, the data plane (mitmproxy on its own thread, in the
node's network namespace), and the API (status, metrics) in the process's namespace.

The data plane needs nothing from the control plane: it talks only to the node's datapath agent
over the node-local socket, so it starts before, and keeps serving without, NATS.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field

from cilia.service import Service, setup_logging
from cilia.settings import Settings
from services.l7proxy.dataplane import DataPlane, DataPlaneConfig
from services.l7proxy.layers import Limits
from services.l7proxy.metrics import ProxyMetrics

log = logging.getLogger("cilia.l7proxy")


class L7ProxySettings(Settings):
    """`CILIA_*` settings of the L7 proxy (CILIA_NODE names the node whose agent it registers with)."""

    service: str = "l7proxy"
    node_netns: str | None = None
    proxy_port: int = Field(default=15001, gt=0, lt=65535)
    listen_address: str = "0.0.0.0"
    max_header_bytes: int = Field(default=60 * 1024, ge=1024)
    headers_timeout: float = Field(default=10.0, gt=0)
    idle_timeout: float = Field(default=60.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=10000, gt=0)
    stream_bodies_over: str = "64k"
    rule_cache: bool = True
    flow_queue: int = Field(default=10000, gt=0)
    profile: Path | None = Field(
        default=None, description="cProfile stats of the data plane, written at exit"
    )

    def dataplane(self) -> DataPlaneConfig:
        return DataPlaneConfig(
            node=self.node,
            port=self.proxy_port,
            listen_address=self.listen_address,
            netns=self.node_netns,
            limits=Limits(self.max_header_bytes, self.headers_timeout, self.idle_timeout),
            connect_timeout=self.connect_timeout,
            max_connections=self.max_connections,
            stream_bodies_over=self.stream_bodies_over,
            rule_cache=self.rule_cache,
            flow_queue=self.flow_queue,
            profile=self.profile,
        )


def build(settings: L7ProxySettings | None = None) -> tuple[Service, DataPlane]:
    settings = settings or L7ProxySettings()
    service = Service(
        "l7proxy",
        settings,
        "The node's transparent HTTP proxy: Cilium's HTTP rules per identity, L7 flows.",
        write_roles=("admin", "agent"),
    )
    plane = DataPlane(settings.dataplane(), ProxyMetrics.create(service.registry))

    from services.l7proxy.app import router

    service.app.include_router(router(service, plane))

    @service.on_stop
    async def stop(_: Service) -> None:
        plane.stop()

    return service, plane


def main() -> None:
    settings = L7ProxySettings()
    setup_logging(settings.log_level)
    for noisy in ("mitmproxy", "hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    service, plane = build(settings)
    plane.start()
    try:
        service.run()
    finally:
        plane.stop()
