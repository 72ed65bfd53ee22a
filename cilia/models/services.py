"""`v1` Service and Cilium's `cilium.io/v2alpha1` LB-IPAM, L2 announcement and BGP peering resources.

Field for field as Kubernetes and Cilium define them. Fields cilia does not implement are typed
`Unsupported` (a document that sets one is rejected with `not supported by cilia: <path>`); values
cilia does not implement (a `NodePort` service, `SCTP`, dual stack) are rejected the same way. The
checks Kubernetes makes in its API server (`ValidateService`) and Cilium in its CRD schemas and
`Validate()` methods are made here, so a bad document is refused at apply time with its field path.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from cilia.models.cilium import NOT_SUPPORTED, Unsupported, is_port_name
from cilia.models.meta import (
    LabelSelector,
    ObjectMeta,
    Strict,
    _scalar_text,
    check_label_key,
    check_label_value,
    selector_matches,
)

ALPHA = "cilium.io/v2alpha1"

# Selector keys LB-IPAM and the L2 announcer match against a service's metadata (Cilium's svcLabels).
SERVICE_NAME_LABEL = "io.kubernetes.service.name"
SERVICE_NAMESPACE_LABEL = "io.kubernetes.service.namespace"
# Annotations, each with the older name Cilium still reads.
ANN_IPS = ("lbipam.cilium.io/ips", "io.cilium/lb-ipam-ips")
ANN_SHARING_KEY = ("lbipam.cilium.io/sharing-key", "io.cilium/lb-ipam-sharing-key")
ANN_SHARING_CROSS_NAMESPACE = (
    "lbipam.cilium.io/sharing-cross-namespace",
    "io.cilium/lb-ipam-sharing-cross-namespace",
)
LB_CLASS_BGP = "io.cilium/bgp-control-plane"
LB_CLASS_L2 = "io.cilium/l2-announcer"
# The load balancer classes LB-IPAM allocates for (no class at all included).
LBIPAM_CLASSES = (LB_CLASS_BGP, LB_CLASS_L2)

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _annotation(annotations: dict[str, str], names: tuple[str, ...]) -> str:
    for name in names:
        if annotations.get(name):
            return annotations[name]
    return ""


def _ipv4(value: str) -> str:
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IP address") from None
    if addr.version != 4:
        raise ValueError(NOT_SUPPORTED + " (IPv6 services)")
    return str(addr)


IPv4Text = Annotated[str, AfterValidator(_ipv4)]


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IP address") from None


IPText = Annotated[str, AfterValidator(_ip)]


class Condition(Strict):
    """A `metav1.Condition`, as LB-IPAM writes them into statuses."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: str | None = None
    observedGeneration: int | None = None


# --- v1 Service ---------------------------------------------------------------------------------


def _target_port(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a port number or a port name")
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise ValueError("must be between 1 and 65535, inclusive")
        return value
    if isinstance(value, str):
        if value.isdigit():
            return _target_port(int(value))
        if not is_port_name(value) or value != value.lower():
            raise ValueError(
                f"{value!r} is not a port name (1-15 lower-case letters, digits and '-', with a letter)"
            )
        return value
    raise ValueError("must be a port number or a port name")


class ServicePort(Strict):
    name: str | None = None
    protocol: str = "TCP"
    port: int = Field(ge=1, le=65535)
    targetPort: Annotated[int | str | None, BeforeValidator(_target_port)] = None
    nodePort: int | None = Field(default=None, ge=0, le=65535)  # accepted and ignored: no NodePort
    appProtocol: str | None = None

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, v: str) -> str:
        if v == "SCTP":
            raise ValueError(NOT_SUPPORTED)
        if v not in ("TCP", "UDP"):
            raise ValueError(f"unsupported value {v!r}, must be one of 'TCP', 'UDP' or 'SCTP'")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and v != "" and not _DNS1035.match(v):
            raise ValueError("must be a DNS label (a-z, 0-9, '-', starting with a letter)")
        return v or None

    @property
    def target(self) -> int | str:
        """The backend port: a number, or a named port of the backends; the service port by default."""
        return self.port if self.targetPort is None else self.targetPort


class ClientIPConfig(Strict):
    timeoutSeconds: int = Field(default=10800, ge=1, le=86400)


class SessionAffinityConfig(Strict):
    clientIP: ClientIPConfig | None = None


def _selector(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scalar_text(x) for k, x in value.items()}
    return value


class ServiceSpec(Strict):
    type: str = "ClusterIP"
    selector: Annotated[dict[str, str] | None, BeforeValidator(_selector)] = None
    ports: list[ServicePort] = Field(default_factory=list)
    clusterIP: str | None = None
    clusterIPs: list[str] | None = None
    loadBalancerIP: IPText | None = None
    loadBalancerClass: str | None = None
    sessionAffinity: Literal["None", "ClientIP"] = "None"
    sessionAffinityConfig: SessionAffinityConfig | None = None
    externalTrafficPolicy: Literal["Cluster", "Local"] | None = None
    internalTrafficPolicy: str | None = None
    externalIPs: list[IPv4Text] | None = None
    ipFamilies: list[str] | None = None
    ipFamilyPolicy: str | None = None
    healthCheckNodePort: Unsupported = None
    loadBalancerSourceRanges: Unsupported = None
    publishNotReadyAddresses: Unsupported = None
    allocateLoadBalancerNodePorts: bool | None = None  # only about NodePorts, which cilia has none of
    externalName: Unsupported = None
    trafficDistribution: Unsupported = None

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v in ("NodePort", "ExternalName"):
            raise ValueError(NOT_SUPPORTED)
        if v not in ("ClusterIP", "LoadBalancer"):
            raise ValueError(
                f"unsupported value {v!r}, must be one of 'ClusterIP', 'LoadBalancer', 'NodePort' or 'ExternalName'"
            )
        return v

    @field_validator("selector")
    @classmethod
    def _selector_labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for key, value in (v or {}).items():
            check_label_key(key)
            check_label_value(value)
        return v

    @field_validator("clusterIP")
    @classmethod
    def _cluster_ip(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        assert v is not None
        if v == "None":
            raise ValueError(NOT_SUPPORTED + " (headless services)")
        return _ipv4(v)

    @field_validator("internalTrafficPolicy")
    @classmethod
    def _itp(cls, v: str | None) -> str | None:
        if v == "Local":
            raise ValueError(NOT_SUPPORTED)
        if v not in (None, "Cluster"):
            raise ValueError(f"unsupported value {v!r}, must be one of 'Cluster' or 'Local'")
        return v

    @field_validator("ipFamilies")
    @classmethod
    def _families(cls, v: list[str] | None) -> list[str] | None:
        for fam in v or []:
            if fam == "IPv6":
                raise ValueError(NOT_SUPPORTED + " (IPv6 services)")
            if fam != "IPv4":
                raise ValueError(f"unsupported value {fam!r}, must be one of 'IPv4' or 'IPv6'")
        if v is not None and len(v) != len(set(v)):
            raise ValueError("duplicate family")
        return v

    @field_validator("ipFamilyPolicy")
    @classmethod
    def _family_policy(cls, v: str | None) -> str | None:
        if v in ("PreferDualStack", "RequireDualStack"):
            raise ValueError(NOT_SUPPORTED + " (dual stack)")
        if v not in (None, "SingleStack"):
            raise ValueError(
                f"unsupported value {v!r}, must be one of 'SingleStack', 'PreferDualStack' or 'RequireDualStack'"
            )
        return v

    @model_validator(mode="after")
    def _kubernetes_rules(self) -> ServiceSpec:
        # The checks of Kubernetes' ValidateService that apply to the fields cilia implements.
        if not self.ports:
            raise ValueError("ports: Required value")
        seen_names: set[str] = set()
        seen_ports: set[tuple[int, str]] = set()
        for i, p in enumerate(self.ports):
            if len(self.ports) > 1 and not p.name:
                raise ValueError(
                    f"ports[{i}].name: Required value (every port needs a name when there are several)"
                )
            if p.name:
                if p.name in seen_names:
                    raise ValueError(f"ports[{i}].name: Duplicate value: {p.name!r}")
                seen_names.add(p.name)
            if (p.port, p.protocol) in seen_ports:
                raise ValueError(f"ports[{i}]: Duplicate value: {p.port}/{p.protocol}")
            seen_ports.add((p.port, p.protocol))
        if self.sessionAffinityConfig is not None and self.sessionAffinity != "ClientIP":
            raise ValueError("sessionAffinityConfig: must not be set when sessionAffinity is None")
        if self.loadBalancerIP is not None and self.type != "LoadBalancer":
            raise ValueError("loadBalancerIP: may only be used when `type` is 'LoadBalancer'")
        if self.loadBalancerClass is not None and self.type != "LoadBalancer":
            raise ValueError("loadBalancerClass: may only be used when `type` is 'LoadBalancer'")
        if self.externalTrafficPolicy is not None and self.type != "LoadBalancer" and not self.externalIPs:
            raise ValueError("externalTrafficPolicy: may only be set for externally-accessible services")
        if self.clusterIPs:
            if len(self.clusterIPs) > 1:
                raise ValueError(NOT_SUPPORTED + " (dual stack): clusterIPs")
            first = _ipv4(self.clusterIPs[0]) if self.clusterIPs[0] != "None" else "None"
            if self.clusterIP is not None and first != self.clusterIP:
                raise ValueError("clusterIPs[0]: must match `clusterIP`")
        return self

    def affinity_timeout(self) -> int | None:
        """Seconds of ClientIP session affinity, or None without affinity."""
        if self.sessionAffinity != "ClientIP":
            return None
        cfg = self.sessionAffinityConfig
        return cfg.clientIP.timeoutSeconds if cfg and cfg.clientIP else ClientIPConfig().timeoutSeconds


class LoadBalancerIngress(Strict):
    ip: str | None = None
    hostname: str | None = None
    ipMode: str | None = None
    ports: list[dict[str, Any]] | None = None


class LoadBalancerStatus(Strict):
    ingress: list[LoadBalancerIngress] | None = None


class ServiceStatus(Strict):
    loadBalancer: LoadBalancerStatus | None = None
    conditions: list[Condition] | None = None


class Service(Strict):
    """A Kubernetes `v1` Service (ClusterIP or LoadBalancer)."""

    apiVersion: Literal["v1"]
    kind: Literal["Service"]
    metadata: ObjectMeta
    spec: ServiceSpec
    status: ServiceStatus | None = None

    @model_validator(mode="after")
    def _meta(self) -> Service:
        name = self.metadata.name
        if not name:
            raise ValueError("metadata.name: Required value")
        if len(name) > 63 or not _DNS1035.match(name):
            raise ValueError(
                "metadata.name: a Service name must be a DNS label (a-z, 0-9, '-', starting with a letter)"
            )
        ann = self.metadata.annotations
        for key in ANN_IPS:
            for part in (ann.get(key) or "").split(","):
                if part.strip():
                    try:
                        ipaddress.ip_address(part.strip())
                    except ValueError:
                        raise ValueError(
                            f"metadata.annotations.{key}: {part.strip()!r} is not a valid IP address"
                        ) from None
        return self

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    @property
    def name(self) -> str:
        return self.metadata.name or ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selection_labels(self) -> dict[str, str]:
        """The labels pools, L2 and BGP policies select on: the service's own plus name and namespace."""
        return {
            **self.metadata.labels,
            SERVICE_NAME_LABEL: self.name,
            SERVICE_NAMESPACE_LABEL: self.namespace,
        }

    def requested_ips(self) -> list[str]:
        """`spec.loadBalancerIP` and the `lbipam.cilium.io/ips` annotation, without duplicates."""
        out: list[str] = []
        if self.spec.loadBalancerIP:
            out.append(self.spec.loadBalancerIP)
        for part in _annotation(self.metadata.annotations, ANN_IPS).split(","):
            if part.strip():
                ip = str(ipaddress.ip_address(part.strip()))
                if ip not in out:
                    out.append(ip)
        return out

    def sharing_key(self) -> str:
        return _annotation(self.metadata.annotations, ANN_SHARING_KEY)

    def sharing_cross_namespace(self) -> list[str]:
        text = _annotation(self.metadata.annotations, ANN_SHARING_CROSS_NAMESPACE)
        return [part.strip() for part in text.split(",") if part.strip()]

    def wants_lbipam(self) -> bool:
        """LB-IPAM allocates for LoadBalancer services without a class or with one of Cilium's."""
        cls = self.spec.loadBalancerClass
        return self.spec.type == "LoadBalancer" and (cls is None or cls in LBIPAM_CLASSES)

    def lb_ips(self) -> list[str]:
        """The allocated load-balancer addresses (`status.loadBalancer.ingress[].ip`)."""
        lb = self.status.loadBalancer if self.status else None
        return [i.ip for i in (lb.ingress or []) if i.ip] if lb else []

    def selects_backend(self, namespace: str, labels: dict[str, str]) -> bool:
        """Whether a pod (endpoint) in `namespace` with `labels` is a backend of this service."""
        if not self.spec.selector or namespace != self.namespace:
            return False
        return all(labels.get(k) == v for k, v in self.spec.selector.items())


# --- CiliumLoadBalancerIPPool ----------------------------------------------------------------------


class IPBlock(Strict):
    """One block of a pool: a `cidr`, or a `start` (and optional `stop`) range."""

    cidr: str | None = None
    start: str | None = None
    stop: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> IPBlock:
        if self.cidr is not None:
            if self.start is not None or self.stop is not None:
                raise ValueError("a block is either a cidr or a start/stop range, not both")
            try:
                if "/" not in self.cidr:
                    raise ValueError("a prefix length is required")
                ipaddress.ip_network(self.cidr, strict=False)
            except ValueError as err:
                raise ValueError(f"cidr: invalid CIDR {self.cidr!r}: {err}") from None
            return self
        if self.start is None:
            if self.stop is not None:
                raise ValueError("start: Required value (stop without start)")
            raise ValueError("a block needs a cidr or a start (and optional stop)")
        try:
            start = ipaddress.ip_address(self.start)
        except ValueError:
            raise ValueError(f"start: {self.start!r} is not a valid IP address") from None
        if self.stop is not None:
            try:
                stop = ipaddress.ip_address(self.stop)
            except ValueError:
                raise ValueError(f"stop: {self.stop!r} is not a valid IP address") from None
            if stop.version != start.version:
                raise ValueError("stop: must be of the same IP family as start")
            if int(stop) < int(start):
                raise ValueError("stop: must not be lower than start")
        return self

    def bounds(self) -> tuple[int, int, int, bool]:
        """(version, first, last, from_cidr) as integers; a CIDR is masked (Go's prefix.Masked())."""
        if self.cidr is not None:
            net = ipaddress.ip_network(self.cidr, strict=False)
            return net.version, int(net.network_address), int(net.broadcast_address), True
        assert self.start is not None
        start = ipaddress.ip_address(self.start)
        stop = ipaddress.ip_address(self.stop) if self.stop else start
        return start.version, int(start), int(stop), False

    def text(self) -> str:
        return self.cidr if self.cidr is not None else f"{self.start}-{self.stop or self.start}"


class PoolSpec(Strict):
    blocks: list[IPBlock] | None = None
    cidrs: list[IPBlock] | None = None  # the field's name before Cilium 1.15; same meaning
    serviceSelector: LabelSelector | None = None
    disabled: bool = False
    allowFirstLastIPs: Literal["Yes", "No"] | None = None

    @model_validator(mode="after")
    def _blocks(self) -> PoolSpec:
        if self.blocks is not None and self.cidrs is not None:
            raise ValueError("cidrs: may not be used together with blocks (cidrs is the old name of blocks)")
        if not (self.blocks or self.cidrs):
            raise ValueError("blocks: Required value (at least one block)")
        return self

    def all_blocks(self) -> list[IPBlock]:
        return list(self.blocks or self.cidrs or [])


class CiliumLoadBalancerIPPool(Strict):
    apiVersion: Literal["cilium.io/v2alpha1"]
    kind: Literal["CiliumLoadBalancerIPPool"]
    metadata: ObjectMeta
    spec: PoolSpec
    status: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _named(self) -> CiliumLoadBalancerIPPool:
        if not self.metadata.name:
            raise ValueError("metadata.name: Required value")
        return self


# --- CiliumL2AnnouncementPolicy --------------------------------------------------------------------


def _regexes(value: list[str] | None) -> list[str] | None:
    for i, expr in enumerate(value or []):
        try:
            re.compile(expr)
        except re.error as err:
            raise ValueError(f"[{i}]: invalid regular expression {expr!r}: {err}") from None
    return value


class L2AnnouncementPolicySpec(Strict):
    nodeSelector: LabelSelector | None = None
    serviceSelector: LabelSelector | None = None
    interfaces: Annotated[list[str] | None, AfterValidator(_regexes)] = None
    externalIPs: bool = False
    loadBalancerIPs: bool = False

    def selects_interface(self, name: str) -> bool:
        """Any of the regular expressions matches somewhere in the name (Go's MatchString); none: all."""
        if not self.interfaces:
            return True
        return any(re.search(expr, name) for expr in self.interfaces)


class CiliumL2AnnouncementPolicy(Strict):
    apiVersion: Literal["cilium.io/v2alpha1"]
    kind: Literal["CiliumL2AnnouncementPolicy"]
    metadata: ObjectMeta
    spec: L2AnnouncementPolicySpec = Field(default_factory=L2AnnouncementPolicySpec)
    status: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _named(self) -> CiliumL2AnnouncementPolicy:
        if not self.metadata.name:
            raise ValueError("metadata.name: Required value")
        return self

    def selects_service(self, svc: Service) -> bool:
        cls = svc.spec.loadBalancerClass
        if cls is not None and cls != LB_CLASS_L2:
            return False
        return selector_matches(self.spec.serviceSelector, svc.selection_labels())

    def selects_node(self, labels: dict[str, str]) -> bool:
        return selector_matches(self.spec.nodeSelector, labels)

    def addresses(self, svc: Service) -> list[str]:
        """The IPv4 addresses of `svc` this policy announces (ARP has no IPv6)."""
        out: list[str] = []
        if self.spec.loadBalancerIPs:
            out += svc.lb_ips()
        if self.spec.externalIPs:
            out += svc.spec.externalIPs or []
        return [ip for ip in dict.fromkeys(out) if ipaddress.ip_address(ip).version == 4]


# --- CiliumBGPPeeringPolicy ------------------------------------------------------------------------

WELL_KNOWN_COMMUNITIES = {
    "internet": "0:0",
    "planned-shut": "65535:0",
    "accept-own": "65535:1",
    "route-filter-translated-v4": "65535:2",
    "route-filter-v4": "65535:3",
    "route-filter-translated-v6": "65535:4",
    "route-filter-v6": "65535:5",
    "llgr-stale": "65535:6",
    "no-llgr": "65535:7",
    "blackhole": "65535:666",
    "no-export": "65535:65281",
    "no-advertise": "65535:65282",
    "no-export-subconfed": "65535:65283",
    "no-peer": "65535:65284",
}


def _standard_community(value: str) -> str:
    if re.fullmatch(r"\d+", value):
        if int(value) > 0xFFFFFFFF:
            raise ValueError(f"{value!r}: a standard community is at most 4294967295")
        return value
    m = re.fullmatch(r"(\d+):(\d+)", value)
    if not m or int(m.group(1)) > 65535 or int(m.group(2)) > 65535:
        raise ValueError(f"{value!r} is not a standard community (<0-4294967295> or <0-65535>:<0-65535>)")
    return value


def _large_community(value: str) -> str:
    m = re.fullmatch(r"(\d+):(\d+):(\d+)", value)
    if not m or any(int(g) > 0xFFFFFFFF for g in m.groups()):
        raise ValueError(f"{value!r} is not a large community (three 0-4294967295 numbers joined by ':')")
    return value


def _well_known(value: str) -> str:
    if value not in WELL_KNOWN_COMMUNITIES:
        raise ValueError(f"unsupported value {value!r}, must be one of {', '.join(WELL_KNOWN_COMMUNITIES)}")
    return value


def community_pair(value: str) -> str:
    """A standard or well-known community as `high:low` (what BGP speakers and bird print)."""
    if value in WELL_KNOWN_COMMUNITIES:
        return WELL_KNOWN_COMMUNITIES[value]
    if ":" in value:
        return value
    number = int(value)
    return f"{number >> 16}:{number & 0xFFFF}"


class BGPCommunities(Strict):
    standard: list[Annotated[str, AfterValidator(_standard_community)]] | None = None
    wellKnown: list[Annotated[str, AfterValidator(_well_known)]] | None = None
    large: list[Annotated[str, AfterValidator(_large_community)]] | None = None


class BGPPathAttributes(Strict):
    selectorType: Literal["PodCIDR", "CiliumLoadBalancerIPPool", "CiliumPodIPPool"]
    selector: LabelSelector | None = None
    communities: BGPCommunities | None = None
    localPreference: int | None = Field(default=None, ge=0, le=4294967295)

    @field_validator("selectorType")
    @classmethod
    def _type(cls, v: str) -> str:
        if v == "CiliumPodIPPool":
            raise ValueError(NOT_SUPPORTED + " (multi-pool IPAM)")
        return v


class BGPGracefulRestart(Strict):
    enabled: bool
    restartTimeSeconds: int | None = Field(default=None, ge=1, le=4095)


class BGPFamily(Strict):
    afi: str
    safi: str

    @model_validator(mode="after")
    def _supported(self) -> BGPFamily:
        if self.afi not in ("ipv4", "ipv6", "l2vpn", "ls", "opaque"):
            raise ValueError(f"afi: unsupported value {self.afi!r}")
        if self.afi not in ("ipv4", "ipv6") or self.safi != "unicast":
            raise ValueError(f"{NOT_SUPPORTED}: families ({self.afi}/{self.safi}; only ipv4/ipv6 unicast)")
        return self


class BGPNeighbor(Strict):
    peerAddress: str
    peerPort: int = Field(default=179, ge=1, le=65535)
    peerASN: int = Field(ge=0, le=4294967295)
    authSecretRef: Unsupported = None
    eBGPMultihopTTL: int = Field(default=1, ge=1, le=255)
    connectRetryTimeSeconds: int = Field(default=120, ge=1, le=2147483647)
    holdTimeSeconds: int = Field(default=90, ge=3, le=65535)
    keepAliveTimeSeconds: int = Field(default=30, ge=1, le=65535)
    gracefulRestart: BGPGracefulRestart | None = None
    families: list[BGPFamily] | None = None
    advertisedPathAttributes: list[BGPPathAttributes] | None = None

    @field_validator("peerAddress")
    @classmethod
    def _cidr(cls, v: str) -> str:
        # The CRD's `format: cidr`: a bare address is refused; the peer is the prefix's address.
        try:
            if "/" not in v:
                raise ValueError("must be in CIDR notation, e.g. 10.0.0.1/32")
            ipaddress.ip_interface(v)
        except ValueError as err:
            raise ValueError(f"invalid CIDR {v!r}: {err}") from None
        return v

    @model_validator(mode="after")
    def _timers(self) -> BGPNeighbor:
        if self.keepAliveTimeSeconds > self.holdTimeSeconds:
            raise ValueError(
                f"KeepAliveTimeSeconds larger than HoldTimeSeconds for peer ASN:{self.peerASN} IP:{self.peerAddress}"
            )
        return self

    @property
    def address(self) -> str:
        return str(ipaddress.ip_interface(self.peerAddress).ip)


class BGPVirtualRouter(Strict):
    localASN: int = Field(ge=0, le=4294967295)
    exportPodCIDR: bool = False
    podIPPoolSelector: Unsupported = None
    serviceSelector: LabelSelector | None = None
    serviceAdvertisements: list[Literal["LoadBalancerIP", "ClusterIP", "ExternalIP"]] | None = None
    neighbors: list[BGPNeighbor] = Field(min_length=1)

    def advertisements(self) -> list[str]:
        return (
            list(self.serviceAdvertisements) if self.serviceAdvertisements is not None else ["LoadBalancerIP"]
        )

    def selects_service(self, svc: Service) -> bool:
        """Cilium: no serviceSelector announces no service; a class other than BGP's is never announced."""
        cls = svc.spec.loadBalancerClass
        if cls is not None and cls != LB_CLASS_BGP:
            return False
        return selector_matches(self.serviceSelector, svc.selection_labels(), nil=False)


class BGPPeeringPolicySpec(Strict):
    nodeSelector: LabelSelector | None = None
    virtualRouters: list[BGPVirtualRouter] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> BGPPeeringPolicySpec:
        seen: set[int] = set()
        for i, vr in enumerate(self.virtualRouters):
            if vr.localASN in seen:
                raise ValueError(f"virtualRouters[{i}].localASN: Duplicate value: {vr.localASN}")
            seen.add(vr.localASN)
            addresses: set[str] = set()
            for j, n in enumerate(vr.neighbors):
                if n.address in addresses:
                    raise ValueError(f"virtualRouters[{i}].neighbors[{j}].peerAddress: Duplicate value")
                addresses.add(n.address)
        return self


class CiliumBGPPeeringPolicy(Strict):
    apiVersion: Literal["cilium.io/v2alpha1"]
    kind: Literal["CiliumBGPPeeringPolicy"]
    metadata: ObjectMeta
    spec: BGPPeeringPolicySpec
    status: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _named(self) -> CiliumBGPPeeringPolicy:
        if not self.metadata.name:
            raise ValueError("metadata.name: Required value")
        return self

    def selects_node(self, labels: dict[str, str]) -> bool:
        return selector_matches(self.spec.nodeSelector, labels)


LBIPAM_KINDS = {
    "Service",
    "CiliumLoadBalancerIPPool",
    "CiliumL2AnnouncementPolicy",
    "CiliumBGPPeeringPolicy",
}
