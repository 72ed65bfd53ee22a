"""L7 HTTP flows as Hubble prints them (its seven parser over Envoy's access log): the JSON of the
shared `cilia.flows.Flow` model (tests/unit/test_l7proxy_flows.py checks they are identical),
built directly. Pure: everything comes in as arguments.

A request is one flow from the client to the server (`http-request`, FORWARDED or DROPPED); its
response one flow from the server back to the client (`http-response`, a reply), with the latency
since the request. As in Hubble, the URL is `http://<authority><path>`, the protocol `HTTP/1.1`
or `HTTP/2`, header names are Go's canonical ones, sorted.
"""

from __future__ import annotations

import uuid as _uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cilia.flows import MESSAGE_TYPE_ACCESS_LOG, rfc3339_nano


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


@lru_cache(maxsize=4096)
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


def flow_headers(fields: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """Header fields as Hubble lists them: canonical names, sorted by name, values in order."""
    pairs = [(canonical_header(k), v) for k, v in fields]
    return [{"key": k, "value": v} if v else {"key": k} for k, v in sorted(pairs, key=lambda kv: kv[0])]


def compact(value: Any) -> Any:
    """What protojson leaves out: zero numbers, empty strings and lists (as `cilia.flows` does)."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            v = compact(v)
            if v is None or v is False or v == "" or v == [] or v == {} or (type(v) is int and v == 0):
                continue
            out[k] = v
        return out
    if isinstance(value, list):
        return [compact(v) for v in value]
    return value


@lru_cache(maxsize=1024)
def _policy_cached(reason: str) -> tuple[tuple[str, str], ...]:
    return tuple(_policy_doc(reason).items())


def _policy(reason: str) -> dict[str, str]:
    return dict(_policy_cached(reason))


def _policy_doc(reason: str) -> dict[str, str]:
    """cilia's `policy` field: `default/rule1 ingress[0] http[0]` -> name, namespace, rule, reason."""
    first = reason.split("; ")[0]
    ref, _, rule = first.partition(" ")
    if "/" in ref and rule and not ref.startswith(("http:", "denied")):
        ns, _, name = ref.rpartition("/")
        return compact({"name": name, "namespace": ns, "rule": rule, "reason": reason})  # type: ignore[no-any-return]
    return {"reason": reason} if reason else {}


def _http(exchange: Exchange, code: int, headers: Iterable[tuple[str, str]]) -> dict[str, Any]:
    http: dict[str, Any] = {"code": code} if code else {}
    for k, v in (("method", exchange.method), ("url", exchange.url), ("protocol", exchange.protocol)):
        if v:
            http[k] = v
    listed = flow_headers(headers)
    if listed:
        http["headers"] = listed
    return http


def _flow(
    *,
    time_ns: int,
    flow_id: str | None,
    verdict: str,
    src: tuple[str, int],
    dst: tuple[str, int],
    source: Mapping[str, Any],
    destination: Mapping[str, Any],
    node: str,
    source_names: Iterable[str],
    destination_names: Iterable[str],
    l7: dict[str, Any],
    is_reply: bool,
    direction: str,
    reason: str,
    summary: str,
) -> dict[str, Any]:
    """A flow as `cilia.flows.flow_to_dict` would give it, built directly (it is built for every
    request and response: the pydantic round trip costs more than the proxy's own work)."""
    flow: dict[str, Any] = {
        "time": rfc3339_nano(time_ns),
        "uuid": flow_id or str(_uuid.uuid4()),
        "verdict": verdict,
        "IP": {"source": src[0], "destination": dst[0], "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": src[1], "destination_port": dst[1]}},
        "source": dict(source),  # compact already (PortPolicy keeps them so)
        "destination": dict(destination),
        "Type": "L7",
        "node_name": node,
        "source_names": list(source_names),
        "destination_names": list(destination_names),
        "l7": l7,
        "is_reply": is_reply,
        "event_type": {"type": MESSAGE_TYPE_ACCESS_LOG},
        "traffic_direction": "INGRESS" if direction == "INGRESS" else "EGRESS",
        "policy": _policy(reason),
        "Summary": summary,
    }
    return {k: v for k, v in flow.items() if k == "is_reply" or v not in ("", [], {}, None)}


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
    http = _http(exchange, 0, exchange.headers)
    return _flow(
        time_ns=time_ns,
        flow_id=flow_id,
        verdict="FORWARDED" if allowed else "DROPPED",
        src=(conn.src_ip, conn.src_port),
        dst=(conn.dst_ip, conn.dst_port),
        source=source,
        destination=destination,
        node=node,
        source_names=source_names,
        destination_names=destination_names,
        l7={"type": "REQUEST", "http": http},
        is_reply=False,
        direction=direction,
        reason=reason,
        summary=f"{exchange.protocol} {exchange.method} {exchange.url}",
    )


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
    latency = max(0, latency_ns)
    http = _http(exchange, code, response_headers)
    return _flow(
        time_ns=time_ns,
        flow_id=flow_id,
        verdict="FORWARDED",
        src=(conn.dst_ip, conn.dst_port),
        dst=(conn.src_ip, conn.src_port),
        source=destination,
        destination=source,
        node=node,
        source_names=destination_names,
        destination_names=source_names,
        l7={"type": "RESPONSE", "latency_ns": latency, "http": http}
        if latency
        else {"type": "RESPONSE", "http": http},
        is_reply=True,
        direction=direction,
        reason=reason,
        summary=f"{exchange.protocol} {code} {latency // 1_000_000}ms ({exchange.method} {exchange.url})",
    )
