"""The proxy's Prometheus metrics, registered on the service's registry (scraped on `/metrics`).

They are updated from the data-plane thread and read from the API thread; prometheus_client's
metrics are thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Request latency through the proxy (request headers in -> response headers out), in seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class ProxyMetrics:
    requests: Counter
    responses: Counter
    duration: Histogram
    lookups: Counter
    connections: Gauge
    closed: Counter
    flows_dropped: Counter
    registered: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ProxyMetrics:
        return cls(
            requests=Counter(
                "cilia_l7proxy_requests",
                "HTTP requests judged by the proxy, by verdict (forwarded or denied)",
                ["verdict"],
                registry=registry,
            ),
            responses=Counter(
                "cilia_l7proxy_responses",
                "HTTP responses sent to clients, by status code (403: denied by policy)",
                ["code"],
                registry=registry,
            ),
            duration=Histogram(
                "cilia_l7proxy_request_duration_seconds",
                "From a request's headers to its response's headers, through the proxy",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            lookups=Counter(
                "cilia_l7proxy_policy_lookups",
                "Policy lookups per request: hit (cached at the current policy revision) or miss (asked the agent)",
                ["result"],
                registry=registry,
            ),
            connections=Gauge(
                "cilia_l7proxy_connections", "Redirected client connections open now", registry=registry
            ),
            closed=Counter(
                "cilia_l7proxy_connections_closed",
                "Client connections the proxy closed itself, by reason",
                ["reason"],
                registry=registry,
            ),
            flows_dropped=Counter(
                "cilia_l7proxy_flows_dropped",
                "Flows not delivered to the datapath agent (it was unreachable or too slow)",
                registry=registry,
            ),
            registered=Gauge(
                "cilia_l7proxy_registered",
                "1 while the proxy is registered with the node's datapath agent",
                registry=registry,
            ),
        )
