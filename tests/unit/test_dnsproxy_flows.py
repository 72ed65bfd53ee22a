"""The DNS proxy's flows are Hubble's: the canonical JSON of `cilia.flows`, and the seed's text lines."""

from __future__ import annotations

from datetime import UTC, datetime

from cilia.flows import Flow, flow_to_dict, format_line
from services.dnsproxy.flowlog import request_flow, response_flow
from services.dnsproxy.policy import Peer

CLIENT = Peer("10.244.2.172", 23217, ("k8s:app=internal-client",), "default", "internal-client", 1834)
COREDNS = Peer("10.244.0.10", 17513, ("k8s:k8s-app=kube-dns",), "kube-system", "coredns-76f75df574-rw29s")
PEERS = "default/internal-client:60700 (ID:23217) {} kube-system/coredns-76f75df574-rw29s:53 (ID:17513)"


def at(ms: int) -> int:
    return int(datetime(2024, 4, 28, 1, 3, 39, tzinfo=UTC).timestamp()) * 10**9 + ms * 10**6


def common(ms: int) -> dict:
    return {"node": "node1", "src": CLIENT, "src_port": 60700, "dst": COREDNS, "dst_port": 53, "proto": "UDP"}


def answer(ms: int, **kw: object) -> dict:
    base = {
        "now_ns": at(ms),
        "latency_ns": 2_000_000,
        "qname": "ifconfig.me.",
        "qtype": "A",
        "rcode": 0,
        "ips": (),
        "ttl": 30,
        "cnames": (),
        "rrtypes": (),
    }
    return response_flow(**{**common(ms), **base, **kw})  # type: ignore[arg-type]


def test_flows_print_as_the_seed_shows() -> None:
    flows = [
        request_flow(
            now_ns=at(378), qname="ifconfig.me.", qtype="A", allowed=True, reason="r", **common(378)
        ),
        answer(424, ips=("34.117.118.44",), rrtypes=("A",)),
        answer(607, qname="cnn.com.default.svc.cluster.local.", qtype="AAAA", rcode=3, ttl=4294967295),
        answer(652, qname="cnn.com.", ips=("151.101.3.5", "151.101.131.5"), rrtypes=("A", "A")),
        answer(342, qname="details.default.svc.cluster.local.", qtype="AAAA", ttl=4294967295),
        request_flow(now_ns=at(700), qname="cnn.com.", qtype="A", allowed=False, reason="r", **common(700)),
    ]
    lines = [format_line(Flow.model_validate(f)) for f in flows]
    assert lines == [
        f"Apr 28 01:03:39.378: {PEERS.format('->')} dns-request proxy FORWARDED (DNS Query ifconfig.me. A)",
        f'Apr 28 01:03:39.424: {PEERS.format("<-")} dns-response proxy FORWARDED (DNS Answer "34.117.118.44" TTL: 30 (Proxy ifconfig.me. A))',
        f"Apr 28 01:03:39.607: {PEERS.format('<-')} dns-response proxy FORWARDED (DNS Answer RCode: Non-Existent Domain TTL: 4294967295 (Proxy cnn.com.default.svc.cluster.local. AAAA))",
        f'Apr 28 01:03:39.652: {PEERS.format("<-")} dns-response proxy FORWARDED (DNS Answer "151.101.3.5,151.101.131.5" TTL: 30 (Proxy cnn.com. A))',
        f"Apr 28 01:03:39.342: {PEERS.format('<-')} dns-response proxy FORWARDED (DNS Answer  TTL: 4294967295 (Proxy details.default.svc.cluster.local. AAAA))",
        f"Apr 28 01:03:39.700: {PEERS.format('->')} dns-request proxy DROPPED (DNS Query cnn.com. A)",
    ]
    for f in flows:  # already the canonical (pruned) JSON: nothing for the model to drop or add
        assert flow_to_dict(Flow.model_validate(f)) == f


def test_the_summary_is_computed_the_same_way_as_hubbles() -> None:
    from cilia.flows import l7_summary

    f = answer(1, ips=("198.51.100.10",), cnames=("api.github.com.",), rrtypes=("CNAME", "A"))
    flow = Flow.model_validate(f)
    assert flow.l7 is not None and flow.Summary == l7_summary(flow.l7)
    assert (
        flow.Summary == 'DNS Answer "198.51.100.10" CNAMEs: "api.github.com." TTL: 30 (Proxy ifconfig.me. A)'
    )
