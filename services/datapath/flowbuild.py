"""Turn one decoded datapath event (`RawEvent`) into a Hubble-shaped `Flow`, enriched with names.

`build_flow()` is pure: everything it knows besides the event comes from a `FlowContext` (endpoints,
identities, the FQDN cache, policy cookies, interfaces, the clock), which the datapath agent
implements; `StaticFlowContext` is a plain one backed by dicts. Semantics follow Hubble's L3/L4
parser (pkg/hubble/parser/threefour): drops and denied verdicts do not know whether the packet was
a reply, allowed verdicts are never replies, traces carry their observation point and interface.
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cilia import flows
from cilia.flows import (
    CiliumEventType,
    Endpoint,
    Flow,
    FlowPolicy,
    ICMPHeader,
    IPHeader,
    Layer4,
    NetworkInterface,
    SCTPHeader,
    TCPFlags,
    TCPHeader,
    UDPHeader,
)
from cilia.identity import RESERVED_NAMES
from services.datapath import eventtypes as ev
from services.datapath.eventtypes import RawEvent

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_SCTP = 132

_VERDICTS: dict[int, flows.Verdict] = {
    ev.VERDICT_FORWARDED: "FORWARDED",
    ev.VERDICT_DROPPED: "DROPPED",
    ev.VERDICT_REDIRECTED: "REDIRECTED",
}
_DIRECTIONS: dict[int, flows.TrafficDirection] = {ev.DIR_INGRESS: "INGRESS", ev.DIR_EGRESS: "EGRESS"}
_POLICY_DROPS = (ev.DROP_POLICY, ev.DROP_POLICY_DENY)
DEFAULT_DENY = "default-deny (no rule allows this traffic)"
DEFAULT_ALLOW = "default-allow (no rule enforces this direction)"


@dataclass(frozen=True)
class EndpointInfo:
    """What the agent knows about an endpoint: `id` is its local endpoint id (0 on other nodes)."""

    namespace: str
    pod_name: str
    identity: int
    labels: tuple[str, ...] = ()
    ip: str = ""
    id: int = 0
    interface_name: str = ""
    interface_index: int = 0


class FlowContext(Protocol):
    """Everything besides the event that a flow is built from; the datapath agent implements it."""

    @property
    def node_name(self) -> str: ...

    def wall_time_ns(self, ts_ns: int) -> int:
        """Wall-clock ns since the epoch of a CLOCK_MONOTONIC `bpf_ktime_get_ns()` stamp."""
        ...

    def endpoint_by_id(self, ep_id: int) -> EndpointInfo | None: ...

    def endpoint_by_ip(self, ip: str) -> EndpointInfo | None: ...

    def identity_labels(self, identity: int) -> Sequence[str] | None: ...

    def names_for_ip(self, ip: str) -> Sequence[str]:
        """DNS names the FQDN cache holds for the IP (for `cnn.com:80 (world)`)."""
        ...

    def rule_for_cookie(self, cookie: int) -> FlowPolicy | None:
        """The policy rule a map-state cookie stands for."""
        ...

    def interface_name(self, ifindex: int) -> str | None: ...


def monotonic_offset_ns() -> int:
    """wall clock - CLOCK_MONOTONIC now: add it to a BPF timestamp to get the wall-clock time."""
    return time.time_ns() - time.monotonic_ns()


@dataclass
class StaticFlowContext:
    """A FlowContext over plain tables (the agent may keep these tables up to date itself)."""

    node_name: str
    boot_offset_ns: int = 0
    endpoints: Sequence[EndpointInfo] = ()
    identities: Mapping[int, Sequence[str]] = field(default_factory=dict)
    names: Mapping[str, Sequence[str]] = field(default_factory=dict)
    rules: Mapping[int, FlowPolicy] = field(default_factory=dict)
    interfaces: Mapping[int, str] = field(default_factory=dict)

    def wall_time_ns(self, ts_ns: int) -> int:
        return self.boot_offset_ns + ts_ns

    def endpoint_by_id(self, ep_id: int) -> EndpointInfo | None:
        return next((e for e in self.endpoints if e.id == ep_id), None)

    def endpoint_by_ip(self, ip: str) -> EndpointInfo | None:
        return next((e for e in self.endpoints if e.ip == ip), None)

    def identity_labels(self, identity: int) -> Sequence[str] | None:
        return self.identities.get(identity)

    def names_for_ip(self, ip: str) -> Sequence[str]:
        return self.names.get(ip, ())

    def rule_for_cookie(self, cookie: int) -> FlowPolicy | None:
        return self.rules.get(cookie)

    def interface_name(self, ifindex: int) -> str | None:
        return self.interfaces.get(ifindex)


def _endpoint(ctx: FlowContext, ep_id: int, ip: str, identity: int) -> tuple[Endpoint, bool]:
    """The flow endpoint for one side, and whether it is a known workload (pod)."""
    info = ctx.endpoint_by_id(ep_id) if ep_id else None
    if info is None:
        info = ctx.endpoint_by_ip(ip)
    if info is not None:
        return (
            Endpoint(
                ID=ep_id or info.id,
                identity=identity or info.identity,
                namespace=info.namespace,
                labels=sorted(info.labels),
                pod_name=info.pod_name,
            ),
            bool(info.pod_name),
        )
    labels = ctx.identity_labels(identity) if identity else None
    if labels is None and identity in RESERVED_NAMES:
        labels = [f"reserved:{RESERVED_NAMES[identity]}"]
    return Endpoint(ID=ep_id, identity=identity, labels=sorted(labels or ())), False


def _layer4(raw: RawEvent) -> tuple[Layer4 | None, str]:
    if raw.proto == IPPROTO_TCP:
        f = raw.tcp_flags
        flags = TCPFlags(
            FIN=bool(f & ev.TCP_FIN),
            SYN=bool(f & ev.TCP_SYN),
            RST=bool(f & ev.TCP_RST),
            PSH=bool(f & ev.TCP_PSH),
            ACK=bool(f & ev.TCP_ACK),
            URG=bool(f & ev.TCP_URG),
            ECE=bool(f & ev.TCP_ECE),
            CWR=bool(f & ev.TCP_CWR),
        )
        l4 = Layer4(TCP=TCPHeader(source_port=raw.sport, destination_port=raw.dport, flags=flags))
        return l4, "TCP Flags: " + flows.tcp_flags_text(flags)
    if raw.proto == IPPROTO_UDP:
        return Layer4(UDP=UDPHeader(source_port=raw.sport, destination_port=raw.dport)), "UDP"
    if raw.proto == IPPROTO_SCTP:
        return Layer4(SCTP=SCTPHeader(source_port=raw.sport, destination_port=raw.dport)), "SCTP"
    if raw.proto == IPPROTO_ICMP:
        # the datapath packs ICMP as sport = type << 8 | code, dport = echo id
        type_, code = raw.sport >> 8, raw.sport & 0xFF
        return Layer4(ICMPv4=ICMPHeader(type=type_, code=code)), "ICMPv4 " + flows.icmpv4_text(type_, code)
    return None, "IPv4"


def _policy(ctx: FlowContext, raw: RawEvent, denied: bool) -> FlowPolicy:
    """The rule that decided; without a cookie nothing matched, so a default decided."""
    found = ctx.rule_for_cookie(raw.cookie) if raw.cookie else None
    if found is not None:
        return found
    return FlowPolicy(reason=DEFAULT_DENY if denied else DEFAULT_ALLOW)


def build_flow(raw: RawEvent, ctx: FlowContext, flow_uuid: Callable[[], str] | None = None) -> Flow:
    """The Hubble flow of one datapath event. Raises ValueError for an event type it does not know."""
    if raw.type not in (ev.EVENT_DROP, ev.EVENT_TRACE, ev.EVENT_POLICY_VERDICT):
        raise ValueError(f"unknown datapath event type {raw.type}")
    src, src_is_pod = _endpoint(ctx, raw.src_ep, raw.saddr, raw.src_identity)
    dst, dst_is_pod = _endpoint(ctx, raw.dst_ep, raw.daddr, raw.dst_identity)
    l4, summary = _layer4(raw)
    version: flows.IPVersion = "IPv6" if ipaddress.ip_address(raw.saddr).version == 6 else "IPv4"
    when = flows.rfc3339_nano(ctx.wall_time_ns(raw.ts_ns))
    flow = Flow(
        time=when,
        uuid=flow_uuid() if flow_uuid else str(uuid.uuid4()),
        IP=IPHeader(source=raw.saddr, destination=raw.daddr, ipVersion=version),
        l4=l4,
        source=src,
        destination=dst,
        Type="L3_L4",
        node_name=ctx.node_name,
        source_names=[] if src_is_pod else list(ctx.names_for_ip(raw.saddr)),
        destination_names=[] if dst_is_pod else list(ctx.names_for_ip(raw.daddr)),
        traffic_direction=_DIRECTIONS.get(raw.direction),
        Summary=summary,
    )
    if raw.type == ev.EVENT_DROP:
        flow.verdict = "DROPPED"
        flow.drop_reason = raw.subtype
        flow.drop_reason_desc = flows.DROP_REASON_NAMES.get(raw.subtype)
        flow.event_type = CiliumEventType(type=ev.EVENT_DROP, sub_type=raw.subtype)
        flow.is_reply = None  # a dropped packet may have been a reply: unknown, as in Hubble
        if raw.subtype in _POLICY_DROPS:
            flow.policy = _policy(ctx, raw, denied=True)
    elif raw.type == ev.EVENT_POLICY_VERDICT:
        verdict = _VERDICTS.get(raw.verdict, "VERDICT_UNKNOWN")
        denied = verdict == "DROPPED"
        flow.verdict = verdict
        flow.event_type = CiliumEventType(type=ev.EVENT_POLICY_VERDICT)
        flow.policy_match_type = raw.match_type
        flow.policy = _policy(ctx, raw, denied=denied)
        if denied:
            # Cilium carries the drop reason in the verdict; cilia's datapath may put it in the
            # sub-type, else a rule from a deny list means POLICY_DENY and anything else POLICY_DENIED.
            reason = raw.subtype or (ev.DROP_POLICY_DENY if "Deny[" in flow.policy.rule else ev.DROP_POLICY)
            flow.drop_reason = reason
            flow.drop_reason_desc = flows.DROP_REASON_NAMES.get(reason)
            flow.is_reply = None
        else:
            flow.is_reply = False  # verdicts are emitted for a connection's first packet
    else:
        flow.verdict = "FORWARDED"
        flow.event_type = CiliumEventType(type=ev.EVENT_TRACE, sub_type=raw.subtype)
        point = ev.TRACE_POINTS.get(raw.subtype)
        flow.trace_observation_point = point[1] if point else None
        flow.is_reply = {0: False, 1: True}.get(raw.is_reply)
        if raw.ifindex:
            name = ctx.interface_name(raw.ifindex) or ""
            flow.interface = NetworkInterface(index=raw.ifindex, name=name)
        flow.proxy_port = raw.proxy_port
        if raw.cookie:  # the rule that allowed the connection (to-proxy: the rule with L7 rules)
            flow.policy = ctx.rule_for_cookie(raw.cookie)
    return flow
