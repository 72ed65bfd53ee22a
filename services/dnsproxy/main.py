"""Wiring of the DNS proxy: settings, the data plane (started first), the HTTP API and metrics.

The data plane is started before the service runner even imports FastAPI, and never waits for
NATS: after a restart, the redirect is back as soon as the sockets are bound and the agent has the
registration. The HTTP API (`/v1/fqdn/cache`, `/v1/dnsproxy/status`, `/metrics`) reads the data
plane's state on the data plane's own loop.
"""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from cilia.settings import Settings

if TYPE_CHECKING:
    from services.dnsproxy.proxy import ProxyConfig

log = logging.getLogger("cilia.dnsproxy")


class DNSProxySettings(Settings):
    """`CILIA_*` settings; the `tofqdns_*` ones are Cilium's agent flags of the same names."""

    service: str = "dnsproxy"
    node_netns: str | None = None
    tofqdns_proxy_port: int = Field(default=10053, gt=0, lt=65535)
    tofqdns_min_ttl: int = Field(default=0, ge=0)
    tofqdns_endpoint_max_ip_per_hostname: int = Field(default=1000, gt=0)
    tofqdns_proxy_response_max_delay: float = Field(default=0.1, gt=0, description="seconds")
    tofqdns_dns_reject_response_code: Literal["refused", "nameError"] = "refused"
    dnsproxy_upstream_timeout: float = Field(default=2.0, gt=0)
    dnsproxy_gc_interval: float = Field(default=1.0, gt=0)

    def cache_file(self) -> Path:
        """Node-local, beside the agent's state (CILIA_STATE_DIR/<node>/), never the kvstore."""
        return self.state_dir / self.node / "dnsproxy-cache.json"


def proxy_config(settings: DNSProxySettings) -> ProxyConfig:
    from services.datapath.localapi import socket_path
    from services.dnsproxy import wire
    from services.dnsproxy.proxy import ProxyConfig

    return ProxyConfig(
        node=settings.node,
        port=settings.tofqdns_proxy_port,
        reject_rcode=wire.REJECT_CODES[settings.tofqdns_dns_reject_response_code.lower()],
        response_max_delay=settings.tofqdns_proxy_response_max_delay,
        upstream_timeout=settings.dnsproxy_upstream_timeout,
        min_ttl=settings.tofqdns_min_ttl,
        max_ips_per_host=settings.tofqdns_endpoint_max_ip_per_hostname,
        gc_interval=settings.dnsproxy_gc_interval,
        state_file=settings.cache_file(),
        socket_path=socket_path(settings.node),
    )


def main() -> None:
    from services.dnsproxy.dataplane import DataPlane
    from services.dnsproxy.metrics import Metrics

    settings = DNSProxySettings()
    metrics = Metrics()
    dataplane = DataPlane(proxy_config(settings), metrics, settings.node_netns)
    dataplane.start()

    from cilia.service import Service, setup_logging
    from services.dnsproxy.app import router

    setup_logging(settings.log_level)
    service = Service(
        "dnsproxy",
        settings,
        "The node's transparent DNS proxy: DNS rules, the FQDN cache, toFQDNs.",
        write_roles=("admin", "agent"),
    )
    for collector in metrics.collectors():
        service.registry.register(collector)
    service.app.include_router(router(service, dataplane))
    # Latency: the API thread must not hold the GIL for the default 5 ms while a query waits, and
    # the start-up's objects need no more cyclic garbage collection.
    sys.setswitchinterval(0.0005)
    gc.freeze()

    @service.on_stop
    async def stop(_svc: Service) -> None:
        dataplane.stop()

    try:
        service.run()
    finally:
        dataplane.stop()
