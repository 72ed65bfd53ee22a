"""Hubble flows for the DNS proxy: one per query (`dns-request`) and one per answer (`dns-response`).

They print as the seeds show (`cilia observe` = `hubble observe`):
  default/mediabot:40000 (ID:1234) -> kube-system/coredns:53 (ID:5678) dns-request proxy FORWARDED (DNS Query api.github.com. A)
  default/mediabot:40000 (ID:1234) <- kube-system/coredns:53 (ID:5678) dns-response proxy FORWARDED (DNS Answer "198.51.100.10" TTL: 30 (Proxy api.github.com. A))
A refused query is a `dns-request` with verdict DROPPED. The dicts are built directly in Hubble's
pruned JSON shape (what `cilia.flows.flow_to_dict` gives for the same `Flow`; the unit tests hold
them to that), because they are built for every query.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from cilia.flows import MESSAGE_TYPE_ACCESS_LOG, dns_rcode_name
from services.dnsproxy.policy import Peer

_second: list[Any] = [-1, ""]


def rfc3339_nano(ns: int) -> str:
    """`cilia.flows.rfc3339_nano`, with the seconds part formatted once per second (hot path)."""
    secs, nanos = divmod(ns, 1_000_000_000)
    if secs != _second[0]:
        _second[0], _second[1] = secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    base = _second[1]
    if nanos == 0:
        return base + "Z"
    if nanos % 1_000_000 == 0:
        return f"{base}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{base}.{nanos // 1_000:06d}Z"
    return f"{base}.{nanos:09d}Z"


def flow_uuid() -> str:
    """A random (version 4) UUID, without the cost of uuid.uuid4()'s object and syscall."""
    r = random.getrandbits(128)
    r = (r & ~(0xF000 << 64) | (0x4000 << 64)) & ~(0xC000 << 48) | (0x8000 << 48)
    h = f"{r:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _endpoint(peer: Peer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if peer.id:
        out["ID"] = peer.id
    if peer.identity:
        out["identity"] = peer.identity
    if peer.namespace:
        out["namespace"] = peer.namespace
    if peer.labels:
        out["labels"] = list(peer.labels)
    if peer.pod_name:
        out["pod_name"] = peer.pod_name
    return out


def _l4(proto: str, sport: int, dport: int) -> dict[str, Any]:
    ports: dict[str, Any] = {}
    if sport:
        ports["source_port"] = sport
    if dport:
        ports["destination_port"] = dport
    return {proto: ports}


def request_flow(
    *,
    now_ns: int,
    node: str,
    src: Peer,
    src_port: int,
    dst: Peer,
    dst_port: int,
    proto: str,
    qname: str,
    qtype: str,
    allowed: bool,
    reason: str,
) -> dict[str, Any]:
    """The flow of a query: FORWARDED when the DNS rules let it through, DROPPED when refused."""
    dns: dict[str, Any] = {"query": qname, "observation_source": "proxy", "qtypes": [qtype]}
    flow: dict[str, Any] = {
        "time": rfc3339_nano(now_ns),
        "uuid": flow_uuid(),
        "verdict": "FORWARDED" if allowed else "DROPPED",
        "IP": {"source": src.ip, "destination": dst.ip, "ipVersion": "IPv4"},
        "l4": _l4(proto, src_port, dst_port),
        "source": _endpoint(src),
        "destination": _endpoint(dst),
        "Type": "L7",
        "node_name": node,
        "l7": {"type": "REQUEST", "dns": dns},
        "event_type": {"type": MESSAGE_TYPE_ACCESS_LOG},
        "traffic_direction": "EGRESS",
        "is_reply": False,
        "policy": {"reason": reason},
        "Summary": f"DNS Query {qname} {qtype}",
    }
    if dst.names:
        flow["destination_names"] = list(dst.names)
    return flow


def response_flow(
    *,
    now_ns: int,
    latency_ns: int,
    node: str,
    src: Peer,
    src_port: int,
    dst: Peer,
    dst_port: int,
    proto: str,
    qname: str,
    qtype: str,
    rcode: int,
    ips: tuple[str, ...],
    ttl: int,
    cnames: tuple[str, ...],
    rrtypes: tuple[str, ...],
) -> dict[str, Any]:
    """The flow of an answer relayed to the pod: from the server (`dst`) back to the pod (`src`)."""
    dns: dict[str, Any] = {"query": qname}
    if ips:
        dns["ips"] = list(ips)
    if ttl:
        dns["ttl"] = ttl
    if cnames:
        dns["cnames"] = list(cnames)
    dns["observation_source"] = "proxy"
    if rcode:
        dns["rcode"] = rcode
    dns["qtypes"] = [qtype]
    if rrtypes:
        dns["rrtypes"] = list(rrtypes)
    if rcode:
        answer = f"RCode: {dns_rcode_name(rcode)}"
    else:
        parts = []
        if ips:
            parts.append(json.dumps(",".join(ips), ensure_ascii=False))
        if cnames:
            parts.append("CNAMEs: " + json.dumps(",".join(cnames), ensure_ascii=False))
        answer = " ".join(parts)
    l7: dict[str, Any] = {"type": "RESPONSE"}
    if latency_ns:
        l7["latency_ns"] = latency_ns
    l7["dns"] = dns
    flow: dict[str, Any] = {
        "time": rfc3339_nano(now_ns),
        "uuid": flow_uuid(),
        "verdict": "FORWARDED",
        "IP": {"source": dst.ip, "destination": src.ip, "ipVersion": "IPv4"},
        "l4": _l4(proto, dst_port, src_port),
        "source": _endpoint(dst),
        "destination": _endpoint(src),
        "Type": "L7",
        "node_name": node,
    }
    if dst.names:
        flow["source_names"] = list(dst.names)
    flow.update(
        {
            "l7": l7,
            "event_type": {"type": MESSAGE_TYPE_ACCESS_LOG},
            "traffic_direction": "EGRESS",
            "is_reply": True,
            "Summary": f"DNS Answer {answer} TTL: {ttl} (Proxy {qname} {qtype})",
        }
    )
    return flow
