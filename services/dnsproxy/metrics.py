"""Prometheus metrics of the DNS proxy (exported on the service's `/metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

# Added latency is sub-millisecond when all is well; the tail buckets catch agent waits and upstreams.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5)


class Metrics:
    """Counters and histograms; thread-safe (the data plane runs on a thread of its own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        self.queries = Counter(
            "cilia_dnsproxy_queries",
            "DNS queries by verdict (allowed, denied, error) and transport",
            ["verdict", "protocol"],
            registry=r,
        )
        self.malformed = Counter(
            "cilia_dnsproxy_malformed_messages",
            "Malformed messages dropped, by reason (truncated, counts, compression, oversized, ...)",
            ["source", "reason"],
            registry=r,
        )
        self.deadline_exceeded = Counter(
            "cilia_dnsproxy_fqdn_deadline_exceeded",
            "Answers released before the datapath acknowledged their IPs (the deadline passed)",
            registry=r,
        )
        self.upstream_errors = Counter(
            "cilia_dnsproxy_upstream_errors",
            "Queries the DNS server did not answer (timeout) or answered badly (answered SERVFAIL)",
            ["reason"],
            registry=r,
        )
        self.latency = Histogram(
            "cilia_dnsproxy_processing_seconds",
            "Time in the proxy per query (both ways), excluding the DNS server's own time",
            ["verdict"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fqdn_wait = Histogram(
            "cilia_dnsproxy_fqdn_ack_seconds",
            "Time the datapath took to acknowledge new FQDN IPs",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fqdn_updates = Counter(
            "cilia_dnsproxy_fqdn_updates",
            "FQDN (IP, name) pairs sent to the datapath, by operation (allow, forget)",
            ["op"],
            registry=r,
        )
        self.flows = Counter(
            "cilia_dnsproxy_flows",
            "Flows by outcome (sent, dropped: agent away or queue full)",
            ["outcome"],
            registry=r,
        )
        self.cache_pairs = Gauge(
            "cilia_dnsproxy_fqdn_cache_pairs", "(IP, name) pairs in the FQDN cache", registry=r
        )
        self.agent_up = Gauge(
            "cilia_dnsproxy_agent_connected", "1 while registered with the agent", registry=r
        )

    def collectors(self) -> list[Collector]:
        """Every metric, to register in the service's registry as well."""
        return [
            self.queries,
            self.malformed,
            self.deadline_exceeded,
            self.upstream_errors,
            self.latency,
            self.fqdn_wait,
            self.fqdn_updates,
            self.flows,
            self.cache_pairs,
            self.agent_up,
        ]
