"""Flows: Hubble's flow record (its JSON shape), `hubble observe`'s text formats, and flow filters.

A `Flow` serialises to exactly the JSON Hubble prints (proto field names, zero values left out, as
protojson does), plus cilia's `policy` field naming the rule that decided. `format_line()` prints a
flow as `hubble observe` does (compact), `format_dict()` as `-o dict`; `FlowFilter` mirrors the
filter flags of `hubble observe` and their semantics. Pure: no NATS, no I/O.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cilia.errors import CiliaError
from cilia.identity import MIN_CLUSTER_IDENTITY, RESERVED, RESERVED_NAMES

# --- Cilium's monitor message types (event_type.type) ----------------------------------------
MESSAGE_TYPE_DROP = 1
MESSAGE_TYPE_DEBUG = 2
MESSAGE_TYPE_CAPTURE = 3
MESSAGE_TYPE_TRACE = 4
MESSAGE_TYPE_POLICY_VERDICT = 5
MESSAGE_TYPE_ACCESS_LOG = 129  # L7 flows from the proxies
MESSAGE_TYPE_AGENT = 130
MESSAGE_TYPE_NAMES: dict[str, int] = {
    "drop": MESSAGE_TYPE_DROP,
    "debug": MESSAGE_TYPE_DEBUG,
    "capture": MESSAGE_TYPE_CAPTURE,
    "trace": MESSAGE_TYPE_TRACE,
    "l7": MESSAGE_TYPE_ACCESS_LOG,
    "agent": MESSAGE_TYPE_AGENT,
    "policy-verdict": MESSAGE_TYPE_POLICY_VERDICT,
}

# --- trace observation points: sub-type -> (text, Hubble enum name) ---------------------------
# Cilium's TraceTo*/TraceFrom* numbers; Hubble names sub-type 0 TO_ENDPOINT (enum value 101).
TRACE_POINTS: dict[int, tuple[str, str]] = {
    0: ("to-endpoint", "TO_ENDPOINT"),
    1: ("to-proxy", "TO_PROXY"),
    2: ("to-host", "TO_HOST"),
    3: ("to-stack", "TO_STACK"),
    4: ("to-overlay", "TO_OVERLAY"),
    5: ("from-endpoint", "FROM_ENDPOINT"),
    6: ("from-proxy", "FROM_PROXY"),
    7: ("from-host", "FROM_HOST"),
    8: ("from-stack", "FROM_STACK"),
    9: ("from-overlay", "FROM_OVERLAY"),
    10: ("from-network", "FROM_NETWORK"),
    11: ("to-network", "TO_NETWORK"),
}

# --- policy-verdict match types (policy_match_type), as Cilium's PolicyMatchType prints them ------
POLICY_MATCH_TYPES: dict[int, str] = {
    0: "none",
    1: "L3-Only",
    2: "L3-L4",
    3: "L4-Only",
    4: "all",
    5: "L3-Proto",
    6: "Proto-Only",
}

# --- drop reasons: number -> text (the flow's type column) and Hubble's DropReason enum name -----
# Cilium's texts (pkg/monitor/api/drop.go), except where cilia's datapath gives a number its own
# meaning (services/datapath/eventtypes.py): those entries follow the datapath, which wrote the event.
DROP_REASON_TEXTS: dict[int, str] = {
    130: "Invalid source mac",
    131: "Invalid destination mac",
    132: "Invalid source ip",
    133: "Policy denied",
    134: "Invalid packet",
    135: "CT: Truncated or invalid header",
    136: "CT: Missing TCP ACK flag",
    137: "CT: Unknown L4 protocol",
    138: "CT: Can't create entry from packet",
    139: "Unsupported L3 protocol",
    140: "Missed tail call",
    141: "Error writing to packet",
    142: "Unknown L4 protocol",
    143: "Unknown ICMPv4 code",
    144: "Unknown ICMPv4 type",
    145: "Unknown ICMPv6 code",
    146: "Unknown ICMPv6 type",
    147: "Error retrieving tunnel key",
    148: "Error retrieving tunnel options",
    149: "Invalid Geneve option",
    150: "Unknown L3 target address",
    151: "Stale or unroutable IP",
    152: "No matching local container found",
    153: "Error while correcting L3 checksum",
    154: "Error while correcting L4 checksum",
    155: "CT: Map insertion failed",
    156: "Invalid IPv6 extension header",
    157: "Fragmented packet not supported",  # cilia (Cilium: "IP fragmentation not supported")
    158: "Service backend not found",
    160: "No tunnel/encapsulation endpoint (datapath BUG!)",
    161: "NAT 46/64 not enabled",
    162: "Reached EDT rate-limiting drop horizon",
    163: "Unknown connection tracking state",
    164: "Local host is unreachable",
    165: "No configuration available to perform policy decision",
    166: "Unsupported L2 protocol",
    167: "No mapping for NAT masquerade",
    168: "Unsupported protocol for NAT masquerade",
    169: "FIB lookup failed",
    170: "Encapsulation traffic is prohibited",
    171: "Invalid identity",
    172: "Unknown sender",
    173: "NAT not needed",
    174: "Is a ClusterIP",
    175: "First logical datagram fragment not found",
    176: "Forbidden ICMPv6 message",
    177: "Denied by LB src range check",
    178: "Proxy redirection failed: no proxy listening",  # Cilium: "Socket lookup failed"
    179: "Socket assign failed",
    180: "Proxy redirection not supported for protocol",
    181: "Policy denied by denylist",
    182: "VLAN traffic disallowed by VLAN filter",
    183: "Incorrect VNI from VTEP",
    184: "Failed to update or lookup TC buffer",
    185: "No SID was found for the IP address",
    186: "SRv6 state was removed during tail call",
    187: "L3 translation from IPv4 to IPv6 failed (NAT46)",
    188: "L3 translation from IPv6 to IPv4 failed (NAT64)",
    189: "Authentication required",
    190: "No conntrack map found",
    191: "No nat map found",
    192: "Invalid ClusterID",
    193: "Unsupported packet protocol for DSR encapsulation",
    194: "No egress gateway found",
    196: "TTL exceeded",
    197: "No node ID found",
}
DROP_REASON_NAMES: dict[int, str] = {
    130: "INVALID_SOURCE_MAC",
    131: "INVALID_DESTINATION_MAC",
    132: "INVALID_SOURCE_IP",
    133: "POLICY_DENIED",
    134: "INVALID_PACKET_DROPPED",
    135: "CT_TRUNCATED_OR_INVALID_HEADER",
    136: "CT_MISSING_TCP_ACK_FLAG",
    137: "CT_UNKNOWN_L4_PROTOCOL",
    138: "CT_CANNOT_CREATE_ENTRY_FROM_PACKET",
    139: "UNSUPPORTED_L3_PROTOCOL",
    140: "MISSED_TAIL_CALL",
    141: "ERROR_WRITING_TO_PACKET",
    142: "UNKNOWN_L4_PROTOCOL",
    143: "UNKNOWN_ICMPV4_CODE",
    144: "UNKNOWN_ICMPV4_TYPE",
    145: "UNKNOWN_ICMPV6_CODE",
    146: "UNKNOWN_ICMPV6_TYPE",
    147: "ERROR_RETRIEVING_TUNNEL_KEY",
    148: "ERROR_RETRIEVING_TUNNEL_OPTIONS",
    149: "INVALID_GENEVE_OPTION",
    150: "UNKNOWN_L3_TARGET_ADDRESS",
    151: "STALE_OR_UNROUTABLE_IP",
    152: "NO_MATCHING_LOCAL_CONTAINER_FOUND",
    153: "ERROR_WHILE_CORRECTING_L3_CHECKSUM",
    154: "ERROR_WHILE_CORRECTING_L4_CHECKSUM",
    155: "CT_MAP_INSERTION_FAILED",
    156: "INVALID_IPV6_EXTENSION_HEADER",
    157: "IP_FRAGMENTATION_NOT_SUPPORTED",
    158: "SERVICE_BACKEND_NOT_FOUND",
    160: "NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT",
    161: "FAILED_TO_INSERT_INTO_PROXYMAP",
    162: "REACHED_EDT_RATE_LIMITING_DROP_HORIZON",
    163: "UNKNOWN_CONNECTION_TRACKING_STATE",
    164: "LOCAL_HOST_IS_UNREACHABLE",
    165: "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
    166: "UNSUPPORTED_L2_PROTOCOL",
    167: "NO_MAPPING_FOR_NAT_MASQUERADE",
    168: "UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE",
    169: "FIB_LOOKUP_FAILED",
    170: "ENCAPSULATION_TRAFFIC_IS_PROHIBITED",
    171: "INVALID_IDENTITY",
    172: "UNKNOWN_SENDER",
    173: "NAT_NOT_NEEDED",
    174: "IS_A_CLUSTERIP",
    175: "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND",
    176: "FORBIDDEN_ICMPV6_MESSAGE",
    177: "DENIED_BY_LB_SRC_RANGE_CHECK",
    178: "SOCKET_LOOKUP_FAILED",
    179: "SOCKET_ASSIGN_FAILED",
    180: "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL",
    181: "POLICY_DENY",
    182: "VLAN_FILTERED",
    183: "INVALID_VNI",
    184: "INVALID_TC_BUFFER",
    185: "NO_SID",
    186: "MISSING_SRV6_STATE",
    187: "NAT46",
    188: "NAT64",
    189: "AUTH_REQUIRED",
    190: "CT_NO_MAP_FOUND",
    191: "SNAT_NO_MAP_FOUND",
    192: "INVALID_CLUSTER_ID",
    193: "UNSUPPORTED_PROTOCOL_FOR_DSR_ENCAP",
    194: "NO_EGRESS_GATEWAY",
    196: "TTL_EXCEEDED",
    197: "NO_NODE_ID",
}

VERDICTS = ("VERDICT_UNKNOWN", "FORWARDED", "DROPPED", "ERROR", "AUDIT", "REDIRECTED", "TRACED", "TRANSLATED")
Verdict = Literal[
    "VERDICT_UNKNOWN", "FORWARDED", "DROPPED", "ERROR", "AUDIT", "REDIRECTED", "TRACED", "TRANSLATED"
]
TrafficDirection = Literal["TRAFFIC_DIRECTION_UNKNOWN", "INGRESS", "EGRESS"]
FlowType = Literal["UNKNOWN_TYPE", "L3_L4", "L7", "SOCK"]
L7FlowType = Literal["UNKNOWN_L7_TYPE", "REQUEST", "RESPONSE", "SAMPLE"]
IPVersion = Literal["IP_NOT_USED", "IPv4", "IPv6"]

# Enum zero values: protojson leaves them out, and so do we.
_ENUM_ZEROS = frozenset(
    {
        "VERDICT_UNKNOWN",
        "DROP_REASON_UNKNOWN",
        "TRAFFIC_DIRECTION_UNKNOWN",
        "UNKNOWN_POINT",
        "UNKNOWN_TYPE",
        "IP_NOT_USED",
        "UNKNOWN_L7_TYPE",
    }
)

# --- ICMP and DNS names, as gopacket prints them (Hubble's summaries use gopacket) ---------------
_ICMPV4: dict[int, tuple[str, dict[int, str] | None]] = {
    0: ("EchoReply", None),
    3: (
        "DestinationUnreachable",
        {
            0: "Net",
            1: "Host",
            2: "Protocol",
            3: "Port",
            4: "FragmentationNeeded",
            5: "SourceRoutingFailed",
            6: "NetUnknown",
            7: "HostUnknown",
            8: "SourceIsolated",
            9: "NetAdminProhibited",
            10: "HostAdminProhibited",
            11: "NetTOS",
            12: "HostTOS",
            13: "CommAdminProhibited",
            14: "HostPrecedence",
            15: "PrecedenceCutoff",
        },
    ),
    4: ("SourceQuench", None),
    5: ("Redirect", {0: "Net", 1: "Host", 2: "TOS+Net", 3: "TOS+Host"}),
    8: ("EchoRequest", None),
    9: ("RouterAdvertisement", None),
    10: ("RouterSolicitation", None),
    11: ("TimeExceeded", {0: "TTLExceeded", 1: "FragmentReassemblyTimeExceeded"}),
    12: ("ParameterProblem", {0: "PointerIndicatesError", 1: "MissingOption", 2: "BadLength"}),
    13: ("TimestampRequest", None),
    14: ("TimestampReply", None),
    15: ("InfoRequest", None),
    16: ("InfoReply", None),
    17: ("AddressMaskRequest", None),
    18: ("AddressMaskReply", None),
}
DNS_TYPES: dict[int, str] = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    41: "OPT",
    65: "HTTPS",
}
DNS_RCODES: dict[int, str] = {
    0: "No Error",
    1: "Format Error",
    2: "Server Failure",
    3: "Non-Existent Domain",
    4: "Not Implemented",
    5: "Query Refused",
    6: "Name Exists when it should not",
    7: "RR Set Exists when it should not",
    8: "RR Set that should exist does not",
    9: "Server Not Authoritative for zone",
    10: "Name not contained in zone",
}

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class FlowError(CiliaError):
    """A flow record or a flow filter is malformed."""


# --- the flow record (Hubble's flow.proto, JSON names) -------------------------------------------


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class Ethernet(_Msg):
    source: str = ""
    destination: str = ""


class IPHeader(_Msg):
    source: str = ""
    destination: str = ""
    ipVersion: IPVersion | None = None
    encrypted: bool = False


class TCPFlags(_Msg):
    FIN: bool = False
    SYN: bool = False
    RST: bool = False
    PSH: bool = False
    ACK: bool = False
    URG: bool = False
    ECE: bool = False
    CWR: bool = False
    NS: bool = False


class TCPHeader(_Msg):
    source_port: int = 0
    destination_port: int = 0
    flags: TCPFlags | None = None


class UDPHeader(_Msg):
    source_port: int = 0
    destination_port: int = 0


class SCTPHeader(_Msg):
    source_port: int = 0
    destination_port: int = 0


class ICMPHeader(_Msg):
    type: int = 0
    code: int = 0


class Layer4(_Msg):
    """One of TCP, UDP, ICMPv4, ICMPv6, SCTP (a protobuf oneof)."""

    TCP: TCPHeader | None = None
    UDP: UDPHeader | None = None
    ICMPv4: ICMPHeader | None = None
    ICMPv6: ICMPHeader | None = None
    SCTP: SCTPHeader | None = None


class Workload(_Msg):
    name: str = ""
    kind: str = ""


class Endpoint(_Msg):
    """A flow's source or destination: `ID` is the local endpoint id (absent for other nodes' pods)."""

    ID: int = 0
    identity: int = 0
    cluster_name: str = ""
    namespace: str = ""
    labels: list[str] = Field(default_factory=list)
    pod_name: str = ""
    workloads: list[Workload] = Field(default_factory=list)


class CiliumEventType(_Msg):
    type: int = 0
    sub_type: int = 0


class NetworkInterface(_Msg):
    index: int = 0
    name: str = ""


class HTTPHeader(_Msg):
    key: str = ""
    value: str = ""


class HTTP(_Msg):
    code: int = 0
    method: str = ""
    url: str = ""
    protocol: str = ""
    headers: list[HTTPHeader] = Field(default_factory=list)


class DNS(_Msg):
    query: str = ""
    ips: list[str] = Field(default_factory=list)
    ttl: int = 0
    cnames: list[str] = Field(default_factory=list)
    observation_source: str = ""  # "proxy" for cilia's DNS proxy
    rcode: int = 0
    qtypes: list[str] = Field(default_factory=list)
    rrtypes: list[str] = Field(default_factory=list)


class Layer7(_Msg):
    type: L7FlowType | None = None
    latency_ns: int = 0
    dns: DNS | None = None
    http: HTTP | None = None


class FlowPolicy(_Msg):
    """cilia's extension: the policy and rule that decided (`default/rule1`, `ingress[0]`), and why."""

    name: str = ""
    namespace: str = ""
    kind: str = ""
    rule: str = ""
    reason: str = ""


class Flow(_Msg):
    """One flow in Hubble's JSON shape (field order as flow.proto declares it)."""

    time: str = ""  # RFC 3339, UTC, up to nanoseconds
    uuid: str = ""
    verdict: Verdict | None = None
    drop_reason: int = 0
    ethernet: Ethernet | None = None
    IP: IPHeader | None = None
    l4: Layer4 | None = None
    source: Endpoint | None = None
    destination: Endpoint | None = None
    Type: FlowType | None = None
    node_name: str = ""
    source_names: list[str] = Field(default_factory=list)
    destination_names: list[str] = Field(default_factory=list)
    l7: Layer7 | None = None
    reply: bool = False  # deprecated by Hubble in favour of is_reply; still printed when true
    event_type: CiliumEventType | None = None
    traffic_direction: TrafficDirection | None = None
    policy_match_type: int = 0
    trace_observation_point: str | None = None
    drop_reason_desc: str | None = None
    is_reply: bool | None = None  # a BoolValue: absent means unknown
    interface: NetworkInterface | None = None
    proxy_port: int = 0
    policy: FlowPolicy | None = None
    Summary: str = ""


class FlowEnvelope(_Msg):
    """What `hubble observe -o json` prints per line: `{"flow": ..., "node_name": ..., "time": ...}`."""

    flow: Flow
    node_name: str = ""
    time: str = ""

    @classmethod
    def wrap(cls, flow: Flow) -> FlowEnvelope:
        return cls(flow=flow, node_name=flow.node_name, time=flow.time)


def _prune(value: Any) -> Any:
    """Leave out what protojson leaves out: zero scalars, empty lists, enum zero values."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if v is None:
                continue
            if k == "is_reply":  # a wrapper: false is a value, not an absence
                out[k] = v
                continue
            if (
                v is False
                or v == ""
                or v == []
                or (isinstance(v, int) and not isinstance(v, bool) and v == 0)
            ):
                continue
            if isinstance(v, str) and v in _ENUM_ZEROS:
                continue
            out[k] = _prune(v)
        return out
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def flow_to_dict(flow: Flow) -> dict[str, Any]:
    """The flow as Hubble's JSON object (what goes under `"flow"`)."""
    pruned: dict[str, Any] = _prune(flow.model_dump(mode="json"))
    return pruned


def envelope_to_dict(flow: Flow) -> dict[str, Any]:
    """The `-o json` envelope of a flow."""
    return {"flow": flow_to_dict(flow), "node_name": flow.node_name, "time": flow.time}


def to_json_line(flow: Flow) -> str:
    """One compact JSON line, as `hubble observe -o json` prints it."""
    return json.dumps(envelope_to_dict(flow), separators=(",", ":"), ensure_ascii=False)


def parse_json(data: bytes | str) -> Flow:
    """A flow from an envelope (`{"flow": ...}`) or a bare flow object; FlowError if malformed."""
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise FlowError(f"not JSON: {err}") from None
    if isinstance(doc, dict) and isinstance(doc.get("flow"), dict):
        doc = doc["flow"]
    try:
        return Flow.model_validate(doc)
    except ValidationError as err:
        e = err.errors()[0]
        raise FlowError(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}") from None


# --- time ---------------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9})\d*)?([Zz]|[+-]\d{2}:\d{2})$"
)


def rfc3339_nano(ns: int) -> str:
    """Nanoseconds since the epoch as protojson writes a Timestamp (UTC, 0/3/6/9 fraction digits)."""
    secs, nanos = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if nanos == 0:
        return base + "Z"
    if nanos % 1_000_000 == 0:
        return f"{base}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{base}.{nanos // 1_000:06d}Z"
    return f"{base}.{nanos:09d}Z"


def parse_rfc3339(text: str) -> int:
    """An RFC 3339 time (nanosecond precision kept) as nanoseconds since the epoch."""
    m = _RFC3339.match(text.strip())
    if not m:
        raise FlowError(f"invalid time {text!r} (expected RFC 3339, e.g. 2024-04-27T21:36:04.373Z)")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    offset = timedelta(0)
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        offset = sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=UTC) - offset
    except ValueError as err:
        raise FlowError(f"invalid time {text!r}: {err}") from None
    nanos = int((frac or "").ljust(9, "0") or 0)
    return int(dt.timestamp()) * 1_000_000_000 + nanos


def flow_time_ns(flow: Flow) -> int | None:
    """The flow's time in nanoseconds since the epoch, or None if it has none (or a bad one)."""
    if not flow.time:
        return None
    try:
        return parse_rfc3339(flow.time)
    except FlowError:
        return None


def format_stamp_milli(ns: int) -> str:
    """Go's time.StampMilli in UTC (`Apr  5 21:03:18.803`), hubble's default time format."""
    secs, nanos = divmod(ns, 1_000_000_000)
    dt = datetime.fromtimestamp(secs, UTC)
    return f"{_MONTHS[dt.month - 1]} {dt.day:>2} {dt:%H:%M:%S}.{nanos // 1_000_000:03d}"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_DURATIONS = re.compile(r"(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h|d))+")
_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
    "d": 86_400_000_000_000,
}


def parse_time(value: str, now_ns: int) -> int:
    """A `--since`/`--until` value in ns since the epoch: a duration ago (`5m`, `1h30m`, Go syntax
    plus `d`) or an absolute time (RFC 3339, `2006-01-02`, `2006-01-02T15:04[:05]`, taken as UTC)."""
    text = value.strip()
    if _DURATIONS.fullmatch(text):
        total = sum(float(n) * _UNIT_NS[u] for n, u in _DURATION.findall(text))
        return now_ns - int(total)
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            dt = datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        return int(dt.timestamp()) * 1_000_000_000
    try:
        return parse_rfc3339(text)
    except FlowError:
        raise FlowError(
            f"invalid time {value!r}: use a duration ago (30s, 5m, 1h) or a time "
            "(2024-04-27T21:36:04Z, 2024-04-27, 2024-04-27T21:36)"
        ) from None


# --- summaries (Hubble's parsers compute them; others call these for L7 flows) ------------------


def tcp_flags_text(flags: TCPFlags | None) -> str:
    """`SYN, ACK`: the set flags in Hubble's order."""
    if flags is None:
        return ""
    order = ("SYN", "ACK", "RST", "FIN", "PSH", "URG", "ECE", "CWR", "NS")
    return ", ".join(name for name in order if getattr(flags, name))


def icmpv4_text(type_: int, code: int) -> str:
    """gopacket's ICMPv4TypeCode.String(): `EchoRequest`, `DestinationUnreachable(Port)`."""
    info = _ICMPV4.get(type_)
    if info is None:
        return f"{type_}({code})"
    name, codes = info
    if codes is None:
        return name if code == 0 else f"{name}(Code: {code})"
    return f"{name}({codes[code]})" if code in codes else f"{name}(Code: {code})"


def l4_summary(l4: Layer4 | None, ip_version: str = "IPv4") -> str:
    """The summary of an L3/L4 flow: `TCP Flags: SYN`, `UDP`, `ICMPv4 EchoRequest`."""
    if l4 is None:
        return ip_version
    if l4.TCP is not None:
        return "TCP Flags: " + tcp_flags_text(l4.TCP.flags)
    if l4.UDP is not None:
        return "UDP"
    if l4.SCTP is not None:
        return "SCTP"
    if l4.ICMPv4 is not None:
        return "ICMPv4 " + icmpv4_text(l4.ICMPv4.type, l4.ICMPv4.code)
    if l4.ICMPv6 is not None:
        return f"ICMPv6 {l4.ICMPv6.type}({l4.ICMPv6.code})"
    return ip_version


def dns_type_name(qtype: int) -> str:
    return DNS_TYPES.get(qtype, "Unknown")


def dns_rcode_name(rcode: int) -> str:
    return DNS_RCODES.get(rcode, "Unknown response code")


def l7_summary(l7: Layer7) -> str:
    """Hubble's L7 summary: `HTTP/1.1 POST http://...`, `HTTP/1.1 200 1ms (GET http://...)`,
    `DNS Query api.github.com. A`, `DNS Answer "1.2.3.4" TTL: 30 (Proxy api.github.com. A)`."""
    if l7.http is not None:
        h = l7.http
        request = f"{h.method} {h.url}"
        if l7.type == "RESPONSE":
            return f"{h.protocol} {h.code} {l7.latency_ns // 1_000_000}ms ({request})"
        return f"{h.protocol} {request}"
    if l7.dns is not None:
        d = l7.dns
        qtypes = ",".join(d.qtypes)
        if l7.type == "RESPONSE":
            if d.rcode != 0:
                answer = f"RCode: {dns_rcode_name(d.rcode)}"
            else:
                parts = []
                if d.ips:
                    parts.append(json.dumps(",".join(d.ips), ensure_ascii=False))
                if d.cnames:
                    parts.append("CNAMEs: " + json.dumps(",".join(d.cnames), ensure_ascii=False))
                answer = " ".join(parts)
            source = "Proxy" if d.observation_source == "proxy" else "Query"
            return f"DNS Answer {answer} TTL: {d.ttl} ({source} {d.query} {qtypes})"
        return f"DNS Query {d.query} {qtypes}"
    return ""


def summary(flow: Flow) -> str:
    """The flow's `Summary`, computed from its layers when the producer left it empty."""
    if flow.Summary:
        return flow.Summary
    if flow.l7 is not None:
        return l7_summary(flow.l7)
    return l4_summary(flow.l4, (flow.IP.ipVersion if flow.IP and flow.IP.ipVersion else "IPv4"))


# --- the text formats of `hubble observe` --------------------------------------------------------


def identity_text(identity: int) -> str:
    """`(ID:6822)`, or `(world)` / `(host)` for reserved identities, as hubble prints them."""
    if 0 < identity < MIN_CLUSTER_IDENTITY:
        return f"({RESERVED_NAMES.get(identity, str(identity))})"
    return f"(ID:{identity})"


def _ports(flow: Flow) -> tuple[str, str]:
    l4 = flow.l4
    if l4 is None:
        return "", ""
    for proto in (l4.TCP, l4.UDP, l4.SCTP):
        if proto is not None:
            return str(proto.source_port), str(proto.destination_port)
    return "", ""


def _hostname(ip: str, port: str, ep: Endpoint | None, names: Sequence[str]) -> str:
    host = ip
    if ep is not None and ep.pod_name:
        host = f"{ep.namespace}/{ep.pod_name}" if ep.namespace else ep.pod_name
    elif names:
        host = ",".join(names)
    if port and port != "0":
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host


def hostnames(flow: Flow) -> tuple[str, str]:
    """Source and destination as hubble prints them: `ns/pod:port`, `name:port` or `ip:port`."""
    if flow.IP is None:
        if flow.ethernet is not None:
            return flow.ethernet.source, flow.ethernet.destination
        return "", ""
    sport, dport = _ports(flow)
    return (
        _hostname(flow.IP.source, sport, flow.source, flow.source_names),
        _hostname(flow.IP.destination, dport, flow.destination, flow.destination_names),
    )


def flow_type_text(flow: Flow) -> str:
    """hubble's TYPE column: `to-endpoint`, `Policy denied`, `policy-verdict:none INGRESS`, `http-request`."""
    if flow.l7 is not None:
        l7type = (flow.l7.type or "UNKNOWN_L7_TYPE").lower()
        if flow.l7.http is not None:
            return f"http-{l7type}"
        if flow.l7.dns is not None:
            return f"dns-{l7type} {flow.l7.dns.observation_source}"
        return f"l7-{l7type}"
    et = flow.event_type
    if et is None:
        return "UNKNOWN"
    if et.type == MESSAGE_TYPE_TRACE:
        point = TRACE_POINTS.get(et.sub_type)
        return point[0] if point else str(et.sub_type)
    if et.type == MESSAGE_TYPE_DROP:
        return DROP_REASON_TEXTS.get(et.sub_type, str(et.sub_type))
    if et.type == MESSAGE_TYPE_POLICY_VERDICT:
        match = POLICY_MATCH_TYPES.get(flow.policy_match_type, "unknown")
        return f"policy-verdict:{match} {flow.traffic_direction or 'TRAFFIC_DIRECTION_UNKNOWN'}"
    return "UNKNOWN"


def verdict_text(flow: Flow) -> str:
    """The VERDICT column; policy-verdict events say ALLOWED / DENIED / AUDITED."""
    verdict = flow.verdict or "VERDICT_UNKNOWN"
    if flow.event_type is not None and flow.event_type.type == MESSAGE_TYPE_POLICY_VERDICT:
        if verdict in ("FORWARDED", "REDIRECTED"):
            return "ALLOWED"
        if verdict in ("DROPPED", "ERROR"):
            return "DENIED"
        if verdict == "AUDIT":
            return "AUDITED"
    return verdict


def _stamp(flow: Flow) -> str:
    ns = flow_time_ns(flow)
    return "N/A" if ns is None else format_stamp_milli(ns)


def format_line(flow: Flow, *, node_name: bool = False) -> str:
    """One line exactly as `hubble observe` prints it (compact output), without the newline."""
    src, dst = hostnames(flow)
    src_id = identity_text(flow.source.identity if flow.source else 0)
    dst_id = identity_text(flow.destination.identity if flow.destination else 0)
    arrow = "->"
    if flow.is_reply is None:
        arrow = "<>"
    elif flow.is_reply:
        src, dst, src_id, dst_id, arrow = dst, src, dst_id, src_id, "<-"
    node = f" [{flow.node_name}]" if node_name else ""
    return (
        f"{_stamp(flow)}{node}: {src} {src_id} {arrow} {dst} {dst_id} "
        f"{flow_type_text(flow)} {verdict_text(flow)} ({summary(flow)})"
    )


DICT_SEPARATOR = "------------"


def format_dict(flow: Flow, *, node_name: bool = False) -> str:
    """One record as `hubble observe -o dict` prints it (records are separated by DICT_SEPARATOR)."""
    src, dst = hostnames(flow)
    lines = [f"  TIMESTAMP: {_stamp(flow)}"]
    if node_name:
        lines.append(f"       NODE: {flow.node_name}")
    lines += [
        f"     SOURCE: {src}",
        f"DESTINATION: {dst}",
        f"       TYPE: {flow_type_text(flow)}",
        f"    VERDICT: {verdict_text(flow)}",
        f"    SUMMARY: {summary(flow)}",
    ]
    return "\n".join(lines)


# --- filters (hubble observe's flags and semantics) ---------------------------------------------

PROTOCOLS = ("tcp", "udp", "sctp", "icmp", "icmpv4", "icmpv6", "http", "dns", "kafka")
TRAFFIC_DIRECTIONS = ("ingress", "egress")

# Flags that cannot be combined (hubble's conflict groups, for the flags cilia has).
_CONFLICTS: tuple[tuple[str, ...], ...] = (
    ("from_ip", "ip", "namespace"),
    ("from_ip", "ip", "from_pod", "pod"),
    ("to_ip", "ip", "namespace"),
    ("to_ip", "ip", "to_pod", "pod"),
    ("to_pod", "namespace"),
    ("from_pod", "namespace"),
    ("port", "to_port"),
    ("port", "from_port"),
    ("identity", "to_identity"),
    ("identity", "from_identity"),
)


def parse_identity(value: str) -> int:
    """A security identity given as a number or a reserved name (`world`, `host`, ...)."""
    text = value.strip()
    if text in RESERVED:
        return RESERVED[text]
    if text.isdigit():
        return int(text)
    names = ", ".join(RESERVED)
    raise FlowError(f"invalid security identity {value!r}: expected one of {names} or a number")


def parse_event_type(value: str) -> tuple[int, int | None]:
    """A `--type` value: `trace`, `trace:to-endpoint`, `drop`, `policy-verdict`, `l7`, or numbers."""
    name, _, sub = value.partition(":")
    if name in MESSAGE_TYPE_NAMES:
        type_ = MESSAGE_TYPE_NAMES[name]
    elif name.isdigit():
        type_ = int(name)
    else:
        raise FlowError(
            f"invalid --type {value!r}: expected one of {', '.join(MESSAGE_TYPE_NAMES)} or a number"
        )
    if not sub:
        return type_, None
    if type_ == MESSAGE_TYPE_TRACE:
        for code, (text, _enum) in TRACE_POINTS.items():
            if sub == text:
                return type_, code
    if sub.isdigit():
        return type_, int(sub)
    raise FlowError(f"invalid --type {value!r}: unknown sub-type {sub!r}")


def _namespaced(name: str) -> tuple[str, str]:
    """hubble's ParseNamespaceName: `ns/prefix`, or `prefix` in the namespace `default`."""
    ns, sep, rest = name.partition("/")
    if sep:
        return ns, rest
    return ("", "") if not ns else ("default", ns)


@dataclass
class _Rule:
    """One of hubble's FlowFilter messages: every non-empty field must match (values are OR-ed)."""

    source_pod: list[str] = field(default_factory=list)
    destination_pod: list[str] = field(default_factory=list)
    source_ip: list[str] = field(default_factory=list)
    destination_ip: list[str] = field(default_factory=list)
    source_port: list[str] = field(default_factory=list)
    destination_port: list[str] = field(default_factory=list)
    source_identity: list[int] = field(default_factory=list)
    destination_identity: list[int] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)
    event_type: list[tuple[int, int | None]] = field(default_factory=list)
    protocol: list[str] = field(default_factory=list)
    node_name: list[str] = field(default_factory=list)
    traffic_direction: list[str] = field(default_factory=list)

    def matches(self, flow: Flow) -> bool:
        ip = flow.IP
        sport, dport = _ports(flow)
        src_id = flow.source.identity if flow.source else 0
        dst_id = flow.destination.identity if flow.destination else 0
        if self.source_pod and not _pod_matches(self.source_pod, flow.source):
            return False
        if self.destination_pod and not _pod_matches(self.destination_pod, flow.destination):
            return False
        if self.source_ip and (ip is None or not _ip_matches(self.source_ip, ip.source)):
            return False
        if self.destination_ip and (ip is None or not _ip_matches(self.destination_ip, ip.destination)):
            return False
        if self.source_port and sport not in self.source_port:
            return False
        if self.destination_port and dport not in self.destination_port:
            return False
        if self.source_identity and src_id not in self.source_identity:
            return False
        if self.destination_identity and dst_id not in self.destination_identity:
            return False
        if self.verdict and (flow.verdict or "VERDICT_UNKNOWN") not in self.verdict:
            return False
        if self.event_type and not _event_type_matches(self.event_type, flow.event_type):
            return False
        if self.protocol and not _protocol_matches(self.protocol, flow):
            return False
        if self.node_name and not any(fnmatch.fnmatchcase(flow.node_name, p) for p in self.node_name):
            return False
        return not self.traffic_direction or (flow.traffic_direction or "").lower() in self.traffic_direction


def _pod_matches(names: list[str], ep: Endpoint | None) -> bool:
    ns, pod = (ep.namespace, ep.pod_name) if ep is not None else ("", "")
    if not ns and not pod:
        return False
    for name in names:
        f_ns, prefix = _namespaced(name)
        if f_ns == ns and (not prefix or pod.startswith(prefix)):
            return True
    return False


def _ip_matches(patterns: list[str], ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    for p in patterns:
        if "/" in p:
            if addr in ipaddress.ip_network(p, strict=False):
                return True
        elif addr == ipaddress.ip_address(p):
            return True
    return False


def _event_type_matches(types: list[tuple[int, int | None]], et: CiliumEventType | None) -> bool:
    t, st = (et.type, et.sub_type) if et is not None else (0, 0)
    return any(t == want and (sub is None or st == sub) for want, sub in types)


def _protocol_matches(protocols: list[str], flow: Flow) -> bool:
    l4, l7 = flow.l4, flow.l7
    for p in protocols:
        if l4 is not None and (
            (p == "tcp" and l4.TCP is not None)
            or (p == "udp" and l4.UDP is not None)
            or (p == "sctp" and l4.SCTP is not None)
            or (p == "icmp" and (l4.ICMPv4 is not None or l4.ICMPv6 is not None))
            or (p == "icmpv4" and l4.ICMPv4 is not None)
            or (p == "icmpv6" and l4.ICMPv6 is not None)
        ):
            return True
        if l7 is not None and ((p == "http" and l7.http is not None) or (p == "dns" and l7.dns is not None)):
            return True
    return False


def _with_namespaces(names: list[str], namespaces: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if "/" in name:
            out.append(name)
        else:
            out += [f"{ns}/{name}" for ns in namespaces]
    return out


@dataclass(frozen=True)
class FlowFilter:
    """The filters of `hubble observe`, with hubble's semantics.

    `pod`, `ip`, `port`, `identity` match either side (a flow matches the source-side filter OR the
    destination-side one); `from_*` / `to_*` one side. Pods are `[namespace/]name-prefix` (namespace
    `default` when omitted; `ns/` for every pod of ns). `namespace` applies to the pod filters (or
    alone: flows from or to that namespace). Values of one flag are OR-ed, different flags AND-ed.
    `since` / `until` are nanoseconds since the epoch. Invalid values raise FlowError.
    """

    pod: tuple[str, ...] = ()
    from_pod: tuple[str, ...] = ()
    to_pod: tuple[str, ...] = ()
    namespace: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()
    from_ip: tuple[str, ...] = ()
    to_ip: tuple[str, ...] = ()
    port: tuple[str, ...] = ()
    from_port: tuple[str, ...] = ()
    to_port: tuple[str, ...] = ()
    identity: tuple[str, ...] = ()
    from_identity: tuple[str, ...] = ()
    to_identity: tuple[str, ...] = ()
    verdict: tuple[str, ...] = ()
    type: tuple[str, ...] = ()
    protocol: tuple[str, ...] = ()
    node_name: tuple[str, ...] = ()
    traffic_direction: tuple[str, ...] = ()
    since: int | None = None
    until: int | None = None

    def __post_init__(self) -> None:
        used = {name for name in _FLAG_FIELDS if getattr(self, name)}
        for group in _CONFLICTS:
            hit = [g for g in group if g in used]
            if len(hit) > 1:
                a, b = (h.replace("_", "-") for h in hit[:2])
                raise FlowError(f"filters --{a} and --{b} cannot be combined")
        for name in (*self.pod, *self.from_pod, *self.to_pod):
            if _namespaced(name) == ("", ""):
                raise FlowError(f"invalid pod filter {name!r}: must be [namespace/][<name>]")
            ns = name.split("/", 1)[0] if "/" in name else ""
            for want in self.namespace:
                if ns and ns != want:
                    raise FlowError(f'namespace conflict: "{want}" does not contain "{name}"')
        for p in (*self.ip, *self.from_ip, *self.to_ip):
            try:
                ipaddress.ip_network(p, strict=False) if "/" in p else ipaddress.ip_address(p)
            except ValueError:
                raise FlowError(f"invalid IP filter {p!r}: expected an address or a CIDR") from None
        for p in (*self.port, *self.from_port, *self.to_port):
            if not p.isdigit() or int(p) > 65535:
                raise FlowError(f"invalid port {p!r}: expected 0-65535")
        for v in self.verdict:
            if v.upper() not in VERDICTS:
                raise FlowError(f"invalid --verdict value: {v} (one of {', '.join(VERDICTS[1:])})")
        for p in self.protocol:
            if p.lower() not in PROTOCOLS:
                raise FlowError(f"unknown protocol: {p!r} (one of {', '.join(PROTOCOLS)})")
        for d in self.traffic_direction:
            if d.lower() not in TRAFFIC_DIRECTIONS:
                raise FlowError(f"{d}: invalid traffic direction, expected ingress or egress")
        self.rules  # noqa: B018 - parse identities and types now, so errors surface at construction

    @cached_property
    def rules(self) -> list[_Rule]:
        """The filter as hubble's list of FlowFilter messages (a flow matches if any matches)."""
        if not any(getattr(self, name) for name in _FLAG_FIELDS):
            return []
        left, right = _Rule(), _Rule()
        both = (left, right)
        left.source_pod += self.pod
        right.destination_pod += self.pod
        left.source_ip += self.ip
        right.destination_ip += self.ip
        left.source_port += self.port
        right.destination_port += self.port
        left.source_identity += [parse_identity(i) for i in self.identity]
        right.destination_identity += [parse_identity(i) for i in self.identity]
        for r in both:
            r.source_pod += self.from_pod
            r.destination_pod += self.to_pod
            r.source_ip += self.from_ip
            r.destination_ip += self.to_ip
            r.source_port += self.from_port
            r.destination_port += self.to_port
            r.source_identity += [parse_identity(i) for i in self.from_identity]
            r.destination_identity += [parse_identity(i) for i in self.to_identity]
            r.verdict += [v.upper() for v in self.verdict]
            r.event_type += [parse_event_type(t) for t in self.type]
            r.protocol += [p.lower() for p in self.protocol]
            r.node_name += self.node_name
            r.traffic_direction += [d.lower() for d in self.traffic_direction]
        if self.namespace:
            # hubble applies --namespace to the source pods of one filter and the destination pods
            # of the other: "from or to that namespace".
            left.source_pod = _with_namespaces(left.source_pod or [""], self.namespace)
            right.destination_pod = _with_namespaces(right.destination_pod or [""], self.namespace)
        return [left] if left == right else [left, right]

    def matches(self, flow: Flow) -> bool:
        """True if the flow passes the filter."""
        if self.since is not None or self.until is not None:
            t = flow_time_ns(flow)
            if t is None:
                return False
            if self.since is not None and t < self.since:
                return False
            if self.until is not None and t > self.until:
                return False
        rules = self.rules
        return not rules or any(r.matches(flow) for r in rules)

    @property
    def selects_by_content(self) -> bool:
        """True if some flag besides the time window narrows the flows."""
        return bool(self.rules)


_FLAG_FIELDS = (
    "pod",
    "from_pod",
    "to_pod",
    "namespace",
    "ip",
    "from_ip",
    "to_ip",
    "port",
    "from_port",
    "to_port",
    "identity",
    "from_identity",
    "to_identity",
    "verdict",
    "type",
    "protocol",
    "node_name",
    "traffic_direction",
)


def select(flows: Iterable[Flow], flt: FlowFilter) -> list[Flow]:
    """The flows that pass `flt`, in order."""
    return [f for f in flows if flt.matches(f)]
