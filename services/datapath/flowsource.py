"""The agent as a flow context: names, labels, rules and time for events, and flow publishing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nats.aio.client import Client as NATS

from cilia import flowstream
from cilia.flows import Flow, FlowPolicy, flow_to_dict
from cilia.identity import RESERVED_NAMES
from services.datapath.agent import Agent
from services.datapath.eventtypes import RawEvent
from services.datapath.flowbuild import EndpointInfo, build_flow, monotonic_offset_ns


class AgentFlowContext:
    """`FlowContext` over the agent's live state."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.offset = monotonic_offset_ns()

    @property
    def node_name(self) -> str:
        return self.agent.node

    def wall_time_ns(self, ts_ns: int) -> int:
        return ts_ns + self.offset

    def _info(self, rec: Any, local: bool) -> EndpointInfo:
        return EndpointInfo(
            namespace=rec.namespace,
            pod_name=rec.name,
            identity=int(rec.identity),
            labels=tuple(rec.identity_labels),
            ip=rec.ip,
            id=int(rec.ep_id) if local else 0,
            interface_name=rec.network.get("host_ifname", "") if local else "",
            interface_index=int(rec.network.get("host_ifindex", 0)) if local else 0,
        )

    def endpoint_by_id(self, ep_id: int) -> EndpointInfo | None:
        for rec in self.agent.state.endpoints.values():
            if rec.ep_id == ep_id:
                return self._info(rec, True)
        return None

    def endpoint_by_ip(self, ip: str) -> EndpointInfo | None:
        for rec in self.agent.state.endpoints.values():
            if rec.ip == ip:
                return self._info(rec, True)
        for w in self.agent.cluster.values():
            if w.ip is not None and str(w.ip) == ip and w.identity is not None:
                labels = tuple(self.agent.identity_labels(w.identity))
                return EndpointInfo(w.namespace, w.name, w.identity, labels, ip)
        return None

    def identity_labels(self, identity: int) -> Sequence[str] | None:
        if identity in RESERVED_NAMES:
            return [f"reserved:{RESERVED_NAMES[identity]}"]
        labels = self.agent.identity_labels(identity)
        return labels or None

    def names_for_ip(self, ip: str) -> Sequence[str]:
        engine = self.agent.engine
        if engine is None:
            return []
        from ipaddress import ip_address

        num = engine.ipcache.lookup(ip_address(ip))
        info = engine.ipcache.identities.get(num)
        if info is None or info.net is None or info.net.prefixlen != info.net.max_prefixlen:
            return []
        return [n.rstrip(".") for n in info.names]

    def rule_for_cookie(self, cookie: int) -> FlowPolicy | None:
        reason = self.agent.reason_for_cookie(cookie)
        if reason is None:
            return None
        text = reason.removeprefix("deny: ")
        ref, _, rule = text.partition(" ")
        ns, _, name = ref.rpartition("/")
        return FlowPolicy(name=name or ref, namespace=ns, rule=rule, reason=reason)

    def interface_name(self, ifindex: int) -> str | None:
        if ifindex and ifindex == self.agent.overlay_ifindex:
            from services.datapath.overlay import DEVICE

            return DEVICE
        for rec in self.agent.state.endpoints.values():
            if int(rec.network.get("host_ifindex", 0)) == ifindex:
                return str(rec.network.get("host_ifname"))
        return None


_contexts: dict[int, AgentFlowContext] = {}


def flow_for(agent: Agent, raw: RawEvent) -> dict[str, Any]:
    ctx = _contexts.get(id(agent))
    if ctx is None:
        ctx = _contexts[id(agent)] = AgentFlowContext(agent)
    return flow_to_dict(build_flow(raw, ctx))


def build(agent: Agent, raw: RawEvent) -> Flow:
    ctx = _contexts.get(id(agent))
    if ctx is None:
        ctx = _contexts[id(agent)] = AgentFlowContext(agent)
    return build_flow(raw, ctx)


async def publish_flow_dict(nc: NATS, node: str, flow: dict[str, Any], stream_ready: bool) -> bool:
    """Publish a flow (creating the bounded stream first if needed); returns whether the stream is ready."""
    from cilia.flows import Flow as FlowModel

    if not stream_ready:
        await flowstream.ensure_flow_stream(nc.jetstream())
    await flowstream.publish_flow(nc, node, FlowModel.model_validate(flow))
    return True
