"""L7 HTTP flows as Hubble prints them (its seven parser over Envoy's access log), built with the
shared `cilia.flows` models. Pure: everything comes in as arguments.

A request is one flow from the client to the server (`http-request`, FORWARDED or DROPPED); its
response one flow from the server back to the client (`http-response`, a reply), with the latency
since the request. As in Hubble, the URL is `http://<authority><path>`, the protocol `HTTP/1.1`
or `HTTP/2`, header names are Go's canonical ones, sorted.
"""

from __future__ import annotations

import uuid as _uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cilia.flows import (
    HTTP,
    MESSAGE_TYPE_ACCESS_LOG,
    CiliumEventType,
    Endpoint,
    Flow,
    FlowPolicy,
    HTTPHeader,
    IPHeader,
    Layer4,
    Layer7,
    TCPHeader,
    Verdict,
    flow_to_dict,
    l7_summary,
    rfc3339_nano,
)


@dataclass(frozen=True)
class Connection:
    """The client's side of a redirected connection and its original destination."""

    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int


@dataclass(frozen=True)
class Exchange:
    """What a flow says about one request (and its response)."""

    method: str
    url: str
    protocol: str
    headers: tuple[tuple[str, str], ...] = ()


def canonical_header(name: str) -> str:
    """Go's textproto.CanonicalMIMEHeaderKey: `x-request-id` -> `X-Request-Id`."""
    if not name or name.startswith(":") or any(c in name for c in " \t"):
        return name
    return "-".join(p[:1].upper() + p[1:].lower() for p in name.split("-"))


def protocol_name(http_version: str) -> str:
    """Envoy's protocol strings: HTTP/1.0, HTTP/1.1, HTTP/2, HTTP/3."""
    return {"HTTP/2.0": "HTTP/2", "HTTP/3.0": "HTTP/3", "HTTP/3": "HTTP/3"}.get(http_version, http_version)


def url_of(authority: str, path: str, dst_ip: str, dst_port: int) -> str:
    """`http://<authority><path>`; without an authority, the original destination stands in."""
    host = authority or (dst_ip if dst_port == 80 else f"{dst_ip}:{dst_port}")
    return f"http://{host}{path}"


def flow_headers(fields: Iterable[tuple[str, str]]) -> list[HTTPHeader]:
    """Header fields as Hubble lists them: canonical names, sorted by name, values in order."""
    pairs = [(canonical_header(k), v) for k, v in fields]
    return [HTTPHeader(key=k, value=v) for k, v in sorted(pairs, key=lambda kv: kv[0])]


def _endpoint(doc: Mapping[str, Any]) -> Endpoint:
    return Endpoint.model_validate(doc)


def _policy(reason: str) -> FlowPolicy:
    """cilia's `policy` field: `default/rule1 ingress[0] http[0]` -> name, namespace, rule."""
    first = reason.split("; ")[0]
    ref, _, rule = first.partition(" ")
    if "/" in ref and rule and not ref.startswith(("http:", "denied")):
        ns, _, name = ref.rpartition("/")
        return FlowPolicy(name=name, namespace=ns, rule=rule, reason=reason)
    return FlowPolicy(reason=reason)


def request_flow(
    *,
    node: str,
    conn: Connection,
    exchange: Exchange,
    source: Mapping[str, Any],
    destination: Mapping[str, Any],
    source_names: Iterable[str] = (),
    destination_names: Iterable[str] = (),
    direction: str,
    allowed: bool,
    reason: str,
    time_ns: int,
    flow_id: str | None = None,
) -> dict[str, Any]:
    """The `http-request` flow: FORWARDED when the request went on, DROPPED when it got a 403."""
    verdict: Verdict = "FORWARDED" if allowed else "DROPPED"
    l7 = Layer7(
        type="REQUEST",
        http=HTTP(
            method=exchange.method,
            url=exchange.url,
            protocol=exchange.protocol,
            headers=flow_headers(exchange.headers),
        ),
    )
    flow = Flow(
        time=rfc3339_nano(time_ns),
        uuid=flow_id or str(_uuid.uuid4()),
        verdict=verdict,
        IP=IPHeader(source=conn.src_ip, destination=conn.dst_ip, ipVersion="IPv4"),
        l4=Layer4(TCP=TCPHeader(source_port=conn.src_port, destination_port=conn.dst_port)),
        source=_endpoint(source),
        destination=_endpoint(destination),
        Type="L7",
        node_name=node,
        source_names=list(source_names),
        destination_names=list(destination_names),
        l7=l7,
        is_reply=False,
        event_type=CiliumEventType(type=MESSAGE_TYPE_ACCESS_LOG),
        traffic_direction="INGRESS" if direction == "INGRESS" else "EGRESS",
        policy=_policy(reason),
    )
    flow.Summary = l7_summary(l7)
    return flow_to_dict(flow)


def response_flow(
    *,
    node: str,
    conn: Connection,
    exchange: Exchange,
    code: int,
    response_headers: Iterable[tuple[str, str]],
    source: Mapping[str, Any],
    destination: Mapping[str, Any],
    source_names: Iterable[str] = (),
    destination_names: Iterable[str] = (),
    direction: str,
    latency_ns: int,
    time_ns: int,
    reason: str = "",
    flow_id: str | None = None,
) -> dict[str, Any]:
    """The `http-response` flow, from the server back to the client (a reply); always FORWARDED,
    a 403 the proxy made included, as Hubble shows Envoy's."""
    l7 = Layer7(
        type="RESPONSE",
        latency_ns=max(0, latency_ns),
        http=HTTP(
            code=code,
            method=exchange.method,
            url=exchange.url,
            protocol=exchange.protocol,
            headers=flow_headers(response_headers),
        ),
    )
    flow = Flow(
        time=rfc3339_nano(time_ns),
        uuid=flow_id or str(_uuid.uuid4()),
        verdict="FORWARDED",
        IP=IPHeader(source=conn.dst_ip, destination=conn.src_ip, ipVersion="IPv4"),
        l4=Layer4(TCP=TCPHeader(source_port=conn.dst_port, destination_port=conn.src_port)),
        source=_endpoint(destination),
        destination=_endpoint(source),
        Type="L7",
        node_name=node,
        source_names=list(destination_names),
        destination_names=list(source_names),
        l7=l7,
        is_reply=True,
        event_type=CiliumEventType(type=MESSAGE_TYPE_ACCESS_LOG),
        traffic_direction="INGRESS" if direction == "INGRESS" else "EGRESS",
        policy=_policy(reason) if reason else None,
    )
    flow.Summary = l7_summary(l7)
    return flow_to_dict(flow)
