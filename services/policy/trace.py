"""`cilium policy trace` for cilia: the engine's verdict for a described connection, no I/O here.

Parties are named by labels (`k8s:org=empire` or `org=empire`, plus a namespace), by an endpoint
known to the cluster (`ns/name`), by an outside address (`ip`, optionally with the `fqdn` it was
resolved from), or by an entity (`host`, `remote-node`, `world`, ...).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cilia.errors import CiliaError
from cilia.labels import POD_NAMESPACE, SOURCE_K8S, Label
from cilia.policy.context import Peer, PolicyContext, PolicyOptions, endpoint_peer, entity_peer, world_peer
from cilia.policy.inventory import Inventory, Workload
from cilia.policy.l7 import DNSQuery, HTTPRequest, L7Request
from cilia.policy.repository import Repository
from cilia.policy.verdict import DirectionVerdict, dns_resolves, verdict


class TraceError(CiliaError):
    """The trace request names something that does not exist."""


class TraceParty(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoint: str | None = Field(default=None, description="ns/name of an endpoint the cluster knows")
    labels: list[str] | None = Field(default=None, description="labels, e.g. k8s:org=empire or org=empire")
    namespace: str = "default"
    ip: str | None = None
    fqdn: str | None = None
    entity: str | None = None

    @model_validator(mode="after")
    def _one(self) -> TraceParty:
        given = [x for x in (self.endpoint, self.labels, self.ip, self.entity) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of endpoint, labels, ip or entity")
        if self.fqdn is not None and self.ip is None:
            raise ValueError("fqdn needs ip")
        return self


class TraceHTTP(BaseModel):
    method: str = "GET"
    path: str = "/"
    host: str = ""
    headers: dict[str, str] = Field(default_factory=dict)


class TraceDNS(BaseModel):
    query: str


class TraceRequest(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: TraceParty = Field(alias="from")
    to: TraceParty
    port: int = Field(ge=0, le=65535)
    protocol: str = "TCP"
    http: TraceHTTP | None = None
    dns: TraceDNS | None = None
    enforcement: str = "default"


class TraceSide(BaseModel):
    subject: str
    allowed: bool
    enforced: bool
    reason: str
    redirect: str | None


class TraceReply(BaseModel):
    allowed: bool
    verdict: str
    reason: str
    egress: TraceSide | None
    ingress: TraceSide | None
    revision: int


def _side(d: DirectionVerdict | None) -> TraceSide | None:
    if d is None:
        return None
    return TraceSide(
        subject=d.subject, allowed=d.allowed, enforced=d.enforced, reason=d.reason, redirect=d.redirect
    )


def _workload(party: TraceParty, name: str) -> Workload:
    labels: dict[str, str] = {}
    namespace = party.namespace
    for text in party.labels or []:
        label = Label.parse(text, default_source=SOURCE_K8S)
        if label.key == POD_NAMESPACE:
            namespace = label.value
        else:
            labels[label.key] = label.value
    return Workload(namespace, name, labels)


def trace(
    repo: Repository, req: TraceRequest, known: Iterable[Workload] = (), revision: int = 0
) -> TraceReply:
    """Judge the connection `req` describes with the engine, as `cilia policy matrix` would."""
    inv = Inventory(known)
    parties: list[Peer] = []
    for role, party in (("from", req.from_), ("to", req.to)):
        if party.endpoint is not None:
            key = party.endpoint if "/" in party.endpoint else f"default/{party.endpoint}"
            if key not in inv.workloads:
                raise TraceError(f"{role}: endpoint {key} is not known")
            parties.append(endpoint_peer(inv, inv.workloads[key]))
        elif party.labels is not None:
            w = _workload(party, f"<{role}>")
            inv.add(w)
            parties.append(endpoint_peer(inv, w))
        elif party.entity is not None:
            try:
                parties.append(entity_peer(inv, party.entity))
            except KeyError:
                raise TraceError(f"{role}: unknown entity {party.entity!r}") from None
        else:
            parties.append(world_peer(ipaddress.ip_address(party.ip or "")))
    ctx = PolicyContext(repo.rules(), inv, PolicyOptions(enforcement=req.enforcement))  # type: ignore[arg-type]
    src, dst = parties
    if req.to.fqdn is not None and req.to.ip is not None and dns_resolves(ctx, src, req.to.fqdn):
        dst = world_peer(ipaddress.ip_address(req.to.ip), (req.to.fqdn,))
    l7: L7Request | None = None
    if req.http is not None:
        l7 = HTTPRequest(req.http.method, req.http.path, req.http.host, req.http.headers)
    elif req.dns is not None:
        l7 = DNSQuery(req.dns.query)
    v = verdict(ctx, src, dst, req.port, req.protocol.upper(), l7)
    return TraceReply(
        allowed=v.allowed,
        verdict="ALLOWED" if v.allowed else "DENIED",
        reason=v.reason,
        egress=_side(v.egress),
        ingress=_side(v.ingress),
        revision=revision,
    )
