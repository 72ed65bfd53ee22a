"""Scenarios (ARCHITECTURE.md §8): pods, policies applied step by step, and probes with expectations.

`evaluate()` computes every probe's verdict with the engine, without reading the expectation;
`ProbeResult.matches` compares the two afterwards.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cilia.errors import PolicyError, ResourceError, ScenarioError
from cilia.models.loader import format_path, parse_documents
from cilia.models.meta import check_label_key, check_label_value
from cilia.policy.context import (
    ENTITY_TARGETS,
    Peer,
    PolicyContext,
    PolicyOptions,
    endpoint_peer,
    entity_peer,
    world_peer,
)
from cilia.policy.inventory import Inventory, ServiceInfo, Workload, parse_named_ports
from cilia.policy.l4 import PROTO_NUMBERS
from cilia.policy.l7 import DNSQuery, HTTPRequest, L7Request
from cilia.policy.repository import PolicyKey, Repository
from cilia.policy.translate import PolicyResource
from cilia.policy.verdict import Verdict, dns_resolves, verdict


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PodSpec(_Model):
    name: str
    namespace: str = "default"
    ip: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    ports: dict[str, int | str] = Field(default_factory=dict)
    serviceAccount: str = "default"
    node: str | None = None

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        if isinstance(v, dict):
            v = {k: ("true" if x is True else "false" if x is False else str(x)) for k, x in v.items()}
            for k, x in v.items():
                check_label_key(k)
                check_label_value(x)
        return v

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        return None if v is None else str(ipaddress.ip_address(v))


class ServiceSpec(_Model):
    name: str
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    selector: dict[str, str] | None = None


class Target(_Model):
    ip: str | None = None
    fqdn: str | None = None
    entity: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Target:
        if self.entity is not None:
            if self.ip is not None or self.fqdn is not None:
                raise ValueError("entity cannot be combined with ip or fqdn")
            if self.entity not in ENTITY_TARGETS:
                raise ValueError(f"unknown entity {self.entity!r} (one of {', '.join(ENTITY_TARGETS)})")
        elif self.ip is None:
            raise ValueError("one of ip or entity is required (fqdn needs ip)")
        if self.ip is not None:
            ipaddress.ip_address(self.ip)
        return self


class HTTPProbe(_Model):
    method: str = "GET"
    path: str = "/"
    host: str = ""
    headers: dict[str, str] = Field(default_factory=dict)


class DNSProbe(_Model):
    query: str
    type: str = "A"


class Probe(_Model):
    from_: str | Target = Field(alias="from")
    to: str | Target
    port: int = Field(ge=0, le=65535)
    protocol: Literal["TCP", "UDP", "SCTP", "ICMP", "ICMPv6"] = "TCP"
    allowed: bool | None = None
    http: HTTPProbe | None = None
    dns: DNSProbe | None = None

    @field_validator("protocol", mode="before")
    @classmethod
    def _proto(cls, v: Any) -> Any:
        if isinstance(v, str):
            up = v.upper()
            return "ICMPv6" if up == "ICMPV6" else up
        return v

    @model_validator(mode="after")
    def _from(self) -> Probe:
        if isinstance(self.from_, Target) and self.from_.fqdn is not None:
            raise ValueError("from: fqdn is only valid in to")
        if isinstance(self.from_, Target) and self.from_.entity not in (None, "host", "remote-node", "world"):
            raise ValueError("from: entity must be host, remote-node or world")
        return self


class Step(_Model):
    name: str
    cumulative: bool = True
    apply: list[dict[str, Any]] = Field(default_factory=list)
    delete: list[dict[str, Any]] = Field(default_factory=list)
    probes: list[Probe] = Field(default_factory=list)


class ScenarioSpec(_Model):
    name: str
    description: str | None = None
    pods: list[PodSpec] = Field(default_factory=list)
    namespaces: dict[str, dict[str, str]] = Field(default_factory=dict)
    services: list[ServiceSpec] = Field(default_factory=list)
    steps: list[Step]


@dataclass(frozen=True)
class ProbeResult:
    step: str
    step_index: int
    probe: Probe
    src: Peer
    dst: Peer
    verdict: Verdict

    @property
    def expected(self) -> bool | None:
        return self.probe.allowed

    @property
    def matches(self) -> bool:
        return self.expected is None or self.expected == self.verdict.allowed

    def record(self) -> dict[str, Any]:
        """The JSON record of ARCHITECTURE.md §8."""
        return {
            "step": self.step,
            "from": _endpoint_text(self.probe.from_),
            "to": _endpoint_text(self.probe.to),
            "port": self.probe.port,
            "protocol": self.probe.protocol,
            "allowed": self.verdict.allowed,
            "reason": self.verdict.reason,
        }


def _endpoint_text(p: str | Target) -> str | dict[str, str]:
    if isinstance(p, str):
        return p
    return p.model_dump(exclude_none=True)


def probe_label(p: str | Target) -> str:
    if isinstance(p, str):
        return p
    if p.entity:
        return p.entity
    if p.fqdn:
        return f"{p.fqdn} ({p.ip})"
    return str(p.ip)


@dataclass
class Scenario:
    spec: ScenarioSpec
    manifests: list[list[PolicyResource]]  # per step, parsed and validated
    inventory: Inventory

    @property
    def name(self) -> str:
        return self.spec.name


def load_scenario(text: str, origin: str = "<scenario>") -> Scenario:
    """Parse and validate a scenario whole: any invalid manifest or probe fails before evaluation."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ScenarioError(f"{origin}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{origin}: a scenario must be a mapping with name, pods and steps")
    try:
        spec = ScenarioSpec.model_validate(raw)
    except ValidationError as err:
        # A `str | Target` field reports one error per union member; the value error says why.
        errors = sorted(err.errors(), key=lambda x: (x.get("type") != "value_error", -len(x.get("loc", ()))))
        e = errors[0]
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        paths = {format_path(x.get("loc", ())) for x in errors}
        more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
        raise ScenarioError(f"{origin}: {format_path(e.get('loc', ()))}: {msg}{more}") from None
    manifests: list[list[PolicyResource]] = []
    for i, step in enumerate(spec.steps):
        try:
            objs = parse_documents(
                step.apply, kinds=("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy")
            )
        except ResourceError as err:
            raise ScenarioError(f"{origin}: steps[{i}] ({step.name}): {err}") from None
        manifests.append(objs)  # type: ignore[arg-type]
        for j, d in enumerate(step.delete):
            if not isinstance(d, dict) or "kind" not in d or "name" not in d:
                raise ScenarioError(f"{origin}: steps[{i}].delete[{j}]: needs kind and name")
    keys = set()
    workloads = []
    for pod in spec.pods:
        key = f"{pod.namespace}/{pod.name}"
        if key in keys:
            raise ScenarioError(f"{origin}: pod {key} is listed twice")
        keys.add(key)
        try:
            ports = parse_named_ports(pod.ports)
        except (ValueError, KeyError) as err:
            raise ScenarioError(f"{origin}: pod {key}: ports: {err}") from None
        ip = ipaddress.ip_address(pod.ip) if pod.ip else None
        workloads.append(
            Workload(pod.namespace, pod.name, dict(pod.labels), ip, ports, pod.serviceAccount, pod.node)
        )
    services = [ServiceInfo(s.namespace, s.name, s.labels, s.selector) for s in spec.services]
    inventory = Inventory(workloads, spec.namespaces, services)
    for i, step in enumerate(spec.steps):
        for j, probe in enumerate(step.probes):
            for side, value in (("from", probe.from_), ("to", probe.to)):
                if isinstance(value, str) and _pod_key(value) not in inventory.workloads:
                    raise ScenarioError(f"{origin}: steps[{i}].probes[{j}].{side}: unknown pod {value!r}")
    return Scenario(spec, manifests, inventory)


def _pod_key(text: str) -> str:
    return text if "/" in text else f"default/{text}"


def _delete_key(d: dict[str, Any]) -> PolicyKey:
    kind = str(d["kind"])
    ns = "" if kind == "CiliumClusterwideNetworkPolicy" else str(d.get("namespace") or "default")
    return (kind, ns, str(d["name"]))


def evaluate(scenario: Scenario, options: PolicyOptions | None = None) -> list[ProbeResult]:
    """Run every step: apply (and delete) its policies, then judge each probe."""
    options = options or PolicyOptions()
    inv = scenario.inventory
    repo = Repository()
    results: list[ProbeResult] = []
    for i, (step, objs) in enumerate(zip(scenario.spec.steps, scenario.manifests, strict=True)):
        if not step.cumulative:
            repo = Repository()
        for d in step.delete:
            key = _delete_key(d)
            if repo.delete(key) is None:
                raise ScenarioError(
                    f"steps[{i}] ({step.name}): delete: {key[0]} {'/'.join(k for k in key[1:] if k)} not found"
                )
        repo.apply(objs)
        ctx = PolicyContext(repo.rules(), inv, options)
        for probe in step.probes:
            src = resolve_peer(ctx, probe.from_, None, probe)
            dst = resolve_peer(ctx, probe.to, src, probe)
            l7: L7Request | None = None
            if probe.http is not None:
                h = probe.http
                l7 = HTTPRequest(h.method, h.path, h.host, dict(h.headers))
            elif probe.dns is not None:
                l7 = DNSQuery(probe.dns.query, probe.dns.type)
            port = probe.port
            v = verdict(ctx, src, dst, port, probe.protocol, l7)
            results.append(ProbeResult(step.name, i, probe, src, dst, v))
    return results


def resolve_peer(ctx: PolicyContext, value: str | Target, src: Peer | None, probe: Probe) -> Peer:
    """A probe's `from`/`to` as a policy peer. An address of a pod is that pod, as the ipcache says."""
    inv = ctx.inventory
    if isinstance(value, str):
        return endpoint_peer(inv, inv.workloads[_pod_key(value)])
    if value.entity is not None:
        return entity_peer(inv, value.entity)
    ip = ipaddress.ip_address(value.ip or "")
    if ip in inv.by_ip:
        return endpoint_peer(inv, inv.by_ip[ip])
    names: tuple[str, ...] = ()
    if value.fqdn is not None and src is not None and dns_resolves(ctx, src, value.fqdn):
        names = (value.fqdn,)
    return world_peer(ip, names)


def probe_port_text(probe: Probe) -> str:
    return f"{probe.port}/{probe.protocol}"


__all__ = ["PROTO_NUMBERS", "PolicyError", "ProbeResult", "Scenario", "evaluate", "load_scenario"]
