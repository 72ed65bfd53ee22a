"""The L7 proxy's flows read exactly like Hubble's (the seed's `hubble observe --protocol http`)."""

from __future__ import annotations

from cilia.flows import Flow, flow_to_dict, format_line, parse_rfc3339, summary
from services.l7proxy.httpflows import (
    Connection,
    Exchange,
    canonical_header,
    protocol_name,
    request_flow,
    response_flow,
    url_of,
)

TIE = {
    "ID": 3,
    "identity": 25698,
    "namespace": "default",
    "pod_name": "tiefighter",
    "labels": ["k8s:org=empire"],
}
STAR = {
    "identity": 6822,
    "namespace": "default",
    "pod_name": "deathstar-b4b8ccfb5-w84sn",
    "labels": ["k8s:org=empire"],
}
URL = "http://deathstar.default.svc.cluster.local"


def flows(
    method: str, path: str, allowed: bool, code: int, latency_ms: int, port: int, at: str
) -> tuple[Flow, Flow]:
    conn = Connection("10.0.1.20", port, "10.0.1.10", 80)
    exchange = Exchange(
        method, url_of("deathstar.default.svc.cluster.local", path, "10.0.1.10", 80), "HTTP/1.1"
    )
    t = parse_rfc3339(at)
    common = {
        "node": "node1",
        "conn": conn,
        "exchange": exchange,
        "source": TIE,
        "destination": STAR,
        "direction": "INGRESS",
    }
    req = request_flow(**common, allowed=allowed, reason="default/rule1 ingress[0] http[0]", time_ns=t)
    resp = response_flow(
        **common, code=code, response_headers=[], latency_ns=latency_ms * 1_000_000 + 123, time_ns=t
    )
    return Flow.model_validate(req), Flow.model_validate(resp)


def test_the_seed_lines_exactly() -> None:
    req, resp = flows("POST", "/v1/request-landing", True, 200, 1, 42746, "2024-04-05T21:03:13.283Z")
    assert format_line(req) == (
        "Apr  5 21:03:13.283: default/tiefighter:42746 (ID:25698) -> default/deathstar-b4b8ccfb5-w84sn:80 "
        f"(ID:6822) http-request FORWARDED (HTTP/1.1 POST {URL}/v1/request-landing)"
    )
    assert format_line(resp) == (
        "Apr  5 21:03:13.283: default/tiefighter:42746 (ID:25698) <- default/deathstar-b4b8ccfb5-w84sn:80 "
        f"(ID:6822) http-response FORWARDED (HTTP/1.1 200 1ms (POST {URL}/v1/request-landing))"
    )
    req, resp = flows("PUT", "/v1/exhaust-port", False, 403, 0, 44396, "2024-04-05T21:03:15.919Z")
    assert format_line(req) == (
        "Apr  5 21:03:15.919: default/tiefighter:44396 (ID:25698) -> default/deathstar-b4b8ccfb5-w84sn:80 "
        f"(ID:6822) http-request DROPPED (HTTP/1.1 PUT {URL}/v1/exhaust-port)"
    )
    assert format_line(resp) == (
        "Apr  5 21:03:15.919: default/tiefighter:44396 (ID:25698) <- default/deathstar-b4b8ccfb5-w84sn:80 "
        f"(ID:6822) http-response FORWARDED (HTTP/1.1 403 0ms (PUT {URL}/v1/exhaust-port))"
    )


def test_the_json_has_hubbles_fields_and_the_response_goes_back_to_the_client() -> None:
    req, resp = flows("POST", "/v1/request-landing", True, 200, 3, 42746, "2024-04-05T21:03:13.283Z")
    assert (req.Type, req.event_type and req.event_type.type, req.is_reply) == ("L7", 129, False)
    assert (
        req.l7 is not None and req.l7.type == "REQUEST" and req.l7.http is not None and req.l7.http.code == 0
    )
    assert (
        req.source is not None and req.source.ID == 3 and req.IP is not None and req.IP.source == "10.0.1.20"
    )
    assert req.policy is not None and (req.policy.namespace, req.policy.name, req.policy.rule) == (
        "default",
        "rule1",
        "ingress[0] http[0]",
    )
    assert resp.is_reply is True and resp.source is not None and resp.source.pod_name.startswith("deathstar")
    assert (
        resp.IP is not None
        and resp.IP.source == "10.0.1.10"
        and resp.l4 is not None
        and resp.l4.TCP is not None
    )
    assert (resp.l4.TCP.source_port, resp.l4.TCP.destination_port) == (80, 42746)
    assert (
        resp.l7 is not None
        and resp.l7.latency_ns == 3_000_123
        and resp.Summary.startswith("HTTP/1.1 200 3ms")
    )


def test_names_urls_and_protocols_as_envoy_and_go_write_them() -> None:
    assert canonical_header("x-request-id") == "X-Request-Id"
    assert canonical_header("USER-agent") == "User-Agent"
    assert canonical_header(":authority") == ":authority"
    assert protocol_name("HTTP/2.0") == "HTTP/2" and protocol_name("HTTP/1.1") == "HTTP/1.1"
    assert url_of("", "/a?b=1", "10.0.1.10", 80) == "http://10.0.1.10/a?b=1"
    assert url_of("", "/", "10.0.1.10", 8080) == "http://10.0.1.10:8080/"
    assert url_of("example.com:8080", "/", "10.0.1.10", 8080) == "http://example.com:8080/"


def test_the_flows_are_exactly_the_json_of_the_shared_flow_model() -> None:
    """Built directly for speed, the dicts must be what `flow_to_dict(Flow(...))` gives: the model
    reads them back and writes the very same JSON, nothing added, nothing missing."""
    conn = Connection("10.0.1.20", 42746, "10.0.1.10", 80)
    exchange = Exchange("GET", "http://x/a?b=1", "HTTP/1.1", (("host", "x"), ("x-empty", ""), ("X-Id", "1")))
    outside = {"identity": 2, "labels": ["reserved:world"]}
    for source, destination, names in ((TIE, STAR, []), (TIE, outside, ["api.example.com"]), ({}, {}, [])):
        for d in (
            request_flow(node="n", conn=conn, exchange=exchange, source=source, destination=destination,
                         destination_names=names, direction="EGRESS", allowed=False, reason="", time_ns=1_700_000_000_123_456_789),
            response_flow(node="n", conn=conn, exchange=exchange, code=503, response_headers=[("server", "nginx")],
                          source=source, destination=destination, destination_names=names, direction="INGRESS",
                          latency_ns=0, time_ns=1_700_000_000_000_000_000, reason="default/r ingress[0] http[1]"),
        ):  # fmt: skip
            assert flow_to_dict(Flow.model_validate(d)) == d
            assert Flow.model_validate(d).Summary == summary(Flow.model_validate({**d, "Summary": ""}))
