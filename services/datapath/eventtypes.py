"""The datapath's event record (drop, policy verdict, trace), mirrored from bpf/lib/events.h.

The layout is declared once in C and once here; `tests/unit/test_datapath_layout.py` checks that the
two agree. Numbers follow Cilium's monitor API where Cilium has one, so flows read the same.
"""

from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass

# event types (Cilium's monitor message types)
EVENT_DROP = 1
EVENT_TRACE = 4
EVENT_POLICY_VERDICT = 5

# traffic direction
DIR_UNKNOWN = 0
DIR_INGRESS = 1
DIR_EGRESS = 2

# verdicts
VERDICT_FORWARDED = 1
VERDICT_DROPPED = 2
VERDICT_REDIRECTED = 3

# trace observation points (Cilium's TraceTo*/TraceFrom*); the trace event's sub-type
TRACE_TO_LXC = 0  # "to-endpoint"
TRACE_TO_PROXY = 1
TRACE_TO_HOST = 2
TRACE_TO_STACK = 3
TRACE_TO_OVERLAY = 4
TRACE_FROM_LXC = 5  # "from-endpoint"
TRACE_FROM_PROXY = 6
TRACE_FROM_HOST = 7
TRACE_FROM_STACK = 8
TRACE_FROM_OVERLAY = 9
TRACE_FROM_NETWORK = 10
TRACE_TO_NETWORK = 11

TRACE_POINTS: dict[int, tuple[str, str]] = {  # code -> (text in flows, Hubble enum name)
    TRACE_TO_LXC: ("to-endpoint", "TO_ENDPOINT"),
    TRACE_TO_PROXY: ("to-proxy", "TO_PROXY"),
    TRACE_TO_HOST: ("to-host", "TO_HOST"),
    TRACE_TO_STACK: ("to-stack", "TO_STACK"),
    TRACE_TO_OVERLAY: ("to-overlay", "TO_OVERLAY"),
    TRACE_FROM_LXC: ("from-endpoint", "FROM_ENDPOINT"),
    TRACE_FROM_PROXY: ("from-proxy", "FROM_PROXY"),
    TRACE_FROM_HOST: ("from-host", "FROM_HOST"),
    TRACE_FROM_STACK: ("from-stack", "FROM_STACK"),
    TRACE_FROM_OVERLAY: ("from-overlay", "FROM_OVERLAY"),
    TRACE_FROM_NETWORK: ("from-network", "FROM_NETWORK"),
    TRACE_TO_NETWORK: ("to-network", "TO_NETWORK"),
}

# drop reasons (Cilium's numbers and texts where Cilium has them); the drop event's sub-type
DROP_INVALID_SOURCE_IP = 132
DROP_POLICY = 133
DROP_INVALID_PACKET = 134
DROP_CT_INVALID_HDR = 135
DROP_UNSUPPORTED_L3 = 139
DROP_UNKNOWN_L4 = 142
DROP_FRAG_NOT_SUPPORTED = 157
DROP_NO_TUNNEL_ENDPOINT = 160
DROP_PROXY_NOT_BOUND = 178
DROP_POLICY_DENY = 181

DROP_REASONS: dict[int, str] = {
    DROP_INVALID_SOURCE_IP: "Invalid source ip",
    DROP_POLICY: "Policy denied",
    DROP_INVALID_PACKET: "Invalid packet",
    DROP_CT_INVALID_HDR: "CT: Truncated or invalid header",
    DROP_UNSUPPORTED_L3: "Unsupported L3 protocol",
    DROP_UNKNOWN_L4: "Unknown L4 protocol",
    DROP_FRAG_NOT_SUPPORTED: "Fragmented packet not supported",
    DROP_NO_TUNNEL_ENDPOINT: "No tunnel/encapsulation endpoint (datapath BUG!)",
    DROP_PROXY_NOT_BOUND: "Proxy redirection failed: no proxy listening",
    DROP_POLICY_DENY: "Policy denied by denylist",
}

# policy match types (Cilium's policy-verdict match type bits), as hubble prints them
MATCH_NONE = 0
MATCH_L3_ONLY = 1
MATCH_L3_L4 = 2
MATCH_L4_ONLY = 3
MATCH_ALL = 4
MATCH_L3_PROTO = 5
MATCH_PROTO_ONLY = 6
MATCH_TYPES: dict[int, str] = {
    MATCH_NONE: "none",
    MATCH_L3_ONLY: "L3-Only",
    MATCH_L3_L4: "L3-L4",
    MATCH_L4_ONLY: "L4-Only",
    MATCH_ALL: "all",
    MATCH_L3_PROTO: "L3-Proto",
    MATCH_PROTO_ONLY: "Proto-Only",
}

# TCP flag bits as in the TCP header
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = (1, 2, 4, 8, 16, 32, 64, 128)


class FlowEventC(ctypes.Structure):
    """`struct flow_event` of bpf/lib/events.h (64 bytes, little endian, addresses in network order)."""

    _pack_ = 1
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),  # bpf_ktime_get_ns (CLOCK_MONOTONIC)
        ("type", ctypes.c_uint8),  # EVENT_*
        ("subtype", ctypes.c_uint8),  # drop reason / trace point / (verdict events: 0)
        ("direction", ctypes.c_uint8),  # DIR_*
        ("verdict", ctypes.c_uint8),  # VERDICT_*
        ("proto", ctypes.c_uint8),  # IPPROTO_*
        ("tcp_flags", ctypes.c_uint8),
        ("match_type", ctypes.c_uint8),  # MATCH_* (policy verdict events)
        ("is_reply", ctypes.c_uint8),  # 0 no, 1 yes, 2 unknown
        ("ifindex", ctypes.c_uint32),
        ("src_ep", ctypes.c_uint32),  # local endpoint ids (0: not a local endpoint)
        ("dst_ep", ctypes.c_uint32),
        ("src_identity", ctypes.c_uint32),
        ("dst_identity", ctypes.c_uint32),
        ("saddr", ctypes.c_uint32),  # network byte order
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),  # host byte order; ICMP: type << 8 | code in sport, id in dport
        ("dport", ctypes.c_uint16),
        ("cookie", ctypes.c_uint32),  # policy rule cookie (0: none); the agent maps it to the rule
        ("proxy_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("pkt_len", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class RawEvent:
    """One decoded datapath event, before enrichment with names and labels."""

    ts_ns: int
    type: int
    subtype: int
    direction: int
    verdict: int
    proto: int
    tcp_flags: int
    match_type: int
    is_reply: int
    ifindex: int
    src_ep: int
    dst_ep: int
    src_identity: int
    dst_identity: int
    saddr: str
    daddr: str
    sport: int
    dport: int
    cookie: int
    proxy_port: int
    pkt_len: int

    @classmethod
    def decode(cls, data: bytes) -> RawEvent:
        if len(data) < ctypes.sizeof(FlowEventC):
            raise ValueError(f"short event: {len(data)} bytes")
        c = FlowEventC.from_buffer_copy(data[: ctypes.sizeof(FlowEventC)])
        return cls(
            c.ts_ns,
            c.type,
            c.subtype,
            c.direction,
            c.verdict,
            c.proto,
            c.tcp_flags,
            c.match_type,
            c.is_reply,
            c.ifindex,
            c.src_ep,
            c.dst_ep,
            c.src_identity,
            c.dst_identity,
            str(ipaddress.IPv4Address(c.saddr.to_bytes(4, "little"))),
            str(ipaddress.IPv4Address(c.daddr.to_bytes(4, "little"))),
            c.sport,
            c.dport,
            c.cookie,
            c.proxy_port,
            c.pkt_len,
        )
