"""`cilium.io/v2` CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy, field for field.

Every field of Cilium's CRDs parses. Fields cilia does not implement are typed `Unsupported`: a
document that sets one is rejected with `not supported by cilia: <path>`. Semantic checks that
Cilium makes in `rule_validation.go` live in `cilia.policy.validate`, not here.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from cilia.models.meta import LabelSelector, ObjectMeta, Strict

NOT_SUPPORTED = "not supported by cilia"


def _reject(value: Any) -> Any:
    if value is None:
        return value
    raise ValueError(NOT_SUPPORTED)


Unsupported = Annotated[Any, AfterValidator(_reject)]


def _no_deny_l7(value: Any) -> Any:
    if value is None:
        return value
    raise ValueError("L7 rules are not allowed in deny rules")


def _no_deny_fqdn(value: Any) -> Any:
    if value is None:
        return value
    raise ValueError("toFQDNs is not allowed in deny rules")


ENTITIES = (
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "init",
    "health",
    "unmanaged",
    "ingress",
    "none",
)
Entity = Literal[
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "init",
    "health",
    "unmanaged",
    "ingress",
    "none",
]

PROTOCOLS = ("TCP", "UDP", "SCTP", "VRRP", "IGMP", "ANY")

# IANA service names (RFC 6335): 1-15 characters of [a-z0-9-], at least one letter, no leading,
# trailing or doubled hyphen. Cilium lower-cases them.
_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9]|-(?=[a-z0-9]))*$")


def is_port_name(text: str) -> bool:
    t = text.lower()
    return 0 < len(t) <= 15 and bool(_SVC_NAME.match(t)) and any(c.isalpha() for c in t)


def _port_text(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    return value


def _check_port(value: str) -> str:
    if value == "":
        return value
    if value.isdigit():
        # strconv.ParseUint(port, 0, 16): a leading 0 means octal ("010" is 8, "080" is invalid).
        try:
            number = int(value, 8) if len(value) > 1 and value.startswith("0") else int(value)
        except ValueError:
            raise ValueError("must be 0-65535 or a port name") from None
        if number > 65535:
            raise ValueError("must be 0-65535 or a port name")
        return str(number)
    if is_port_name(value):
        return value.lower()
    raise ValueError("must be 0-65535 or a port name")


PortText = Annotated[str, BeforeValidator(_port_text), AfterValidator(_check_port)]


def _check_cidr(value: str) -> str:
    """A prefix (`10.0.0.0/8`); host bits may be set, as Go's netip.ParsePrefix allows. Kept as written."""
    value = value.strip()
    try:
        if "/" not in value:
            raise ValueError("a prefix length is required")
        ipaddress.ip_network(value, strict=False)
    except ValueError as err:
        raise ValueError(f"invalid CIDR {value!r}: {err}") from None
    return value


CIDR = Annotated[str, AfterValidator(_check_cidr)]


def _check_cidr_or_ip(value: str) -> str:
    # `fromCIDR`/`toCIDR` accept a bare address too (Go's CIDR.Validate); it means a /32 or /128.
    if "/" not in value:
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"invalid CIDR {value!r}: not an address or prefix") from None
        return f"{addr}/{addr.max_prefixlen}"
    return _check_cidr(value)


CIDROrIP = Annotated[str, AfterValidator(_check_cidr_or_ip)]


class EndpointSelector(LabelSelector):
    """A Cilium endpoint selector: a label selector whose keys may carry a source (`k8s:`)."""


class CIDRRule(Strict):
    cidr: CIDR | None = None
    cidrGroupRef: Unsupported = None
    cidrGroupSelector: Unsupported = None
    except_: list[CIDR] | None = Field(default=None, alias="except")

    @model_validator(mode="after")
    def _one(self) -> CIDRRule:
        if self.cidr is None:
            raise ValueError("one of cidr, cidrGroupRef, or cidrGroupSelector is required")
        return self


class K8sServiceNamespace(Strict):
    serviceName: str | None = None
    namespace: str | None = None


class ServiceSelector(Strict):
    selector: EndpointSelector
    namespace: str | None = None


class Service(Strict):
    k8sService: K8sServiceNamespace | None = None
    k8sServiceSelector: ServiceSelector | None = None

    @model_validator(mode="after")
    def _one(self) -> Service:
        if (self.k8sService is None) == (self.k8sServiceSelector is None):
            raise ValueError("exactly one of k8sService or k8sServiceSelector is required")
        return self


class FQDNSelector(Strict):
    matchName: str | None = None
    matchPattern: str | None = None

    @field_validator("matchName")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 255 or not re.match(r"^([-a-zA-Z0-9_]+[.]?)+$", v)):
            raise ValueError(f"invalid matchName {v!r}: letters, digits, '-', '_' and '.' only")
        return v

    @field_validator("matchPattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 255 or not re.match(r"^([-a-zA-Z0-9_*]+[.]?)+$", v)):
            raise ValueError(f"invalid matchPattern {v!r}: letters, digits, '-', '_', '*' and '.' only")
        return v

    @model_validator(mode="after")
    def _one(self) -> FQDNSelector:
        if (self.matchName is None) == (self.matchPattern is None):
            raise ValueError("exactly one of matchName or matchPattern is required")
        return self


PortRuleDNS = FQDNSelector


class Secret(Strict):
    namespace: str | None = None
    name: str


class HeaderMatch(Strict):
    mismatch: Literal["LOG", "ADD", "DELETE", "REPLACE"] | None = None
    name: str = Field(min_length=1)
    secret: Unsupported = None
    value: str | None = None


class PortRuleHTTP(Strict):
    path: str | None = None
    method: str | None = None
    host: str | None = None
    headers: list[str] | None = None
    headerMatches: list[HeaderMatch] | None = None

    @field_validator("path", "method", "host")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            check_re2(v)
        return v


_NOT_RE2 = re.compile(r"\(\?[=!]|\(\?<[=!]|\(\?P=|\\[1-9]|[*+?}][+]")


def check_re2(regex: str) -> str:
    """Envoy matches with RE2: reject what Python accepts but RE2 does not (look-around, backreferences)."""
    if _NOT_RE2.search(regex):
        raise ValueError(
            f"invalid regular expression {regex!r}: look-around, backreferences and possessive quantifiers are not supported (RE2)"
        )
    try:
        re.compile(regex)
    except re.error as err:
        raise ValueError(f"invalid regular expression {regex!r}: {err}") from None
    return regex


class L7Rules(Strict):
    http: list[PortRuleHTTP] | None = None
    kafka: Unsupported = None
    dns: list[PortRuleDNS] | None = None
    l7proto: Unsupported = None
    l7: Unsupported = None

    def is_empty(self) -> bool:
        return not self.http and not self.dns


class PortProtocol(Strict):
    port: PortText = ""
    endPort: int | None = Field(default=None, ge=0, le=65535)
    protocol: str = "ANY"

    @field_validator("protocol", mode="before")
    @classmethod
    def _proto(cls, v: Any) -> Any:
        if v is None or v == "":
            return "ANY"
        if not isinstance(v, str) or v.upper() not in PROTOCOLS:
            raise ValueError(f'invalid protocol "{v}", must be {{ tcp | udp | sctp | vrrp | igmp | any }}')
        return v.upper()


class TLSContext(Strict):
    secret: Secret | None = None
    trustedCA: str | None = None
    certificate: str | None = None
    privateKey: str | None = None


class EnvoyConfig(Strict):
    kind: str
    name: str


class Listener(Strict):
    envoyConfig: EnvoyConfig
    name: str
    priority: int | None = None


class PortRule(Strict):
    ports: list[PortProtocol] | None = None
    terminatingTLS: Unsupported = None
    originatingTLS: Unsupported = None
    serverNames: Unsupported = None
    listener: Unsupported = None
    rules: L7Rules | None = None


class PortDenyRule(Strict):
    ports: list[PortProtocol] | None = None
    # Not in Cilium's schema; named here so the error says why rather than "unknown field".
    rules: Annotated[Any, AfterValidator(_no_deny_l7)] = None


ICMP_V4_TYPES = {
    "EchoReply": 0,
    "DestinationUnreachable": 3,
    "Redirect": 5,
    "Echo": 8,
    "EchoRequest": 8,
    "RouterAdvertisement": 9,
    "RouterSelection": 10,
    "TimeExceeded": 11,
    "ParameterProblem": 12,
    "Timestamp": 13,
    "TimestampReply": 14,
    "Photuris": 40,
    "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
}
ICMP_V6_TYPES = {
    "DestinationUnreachable": 1,
    "PacketTooBig": 2,
    "TimeExceeded": 3,
    "ParameterProblem": 4,
    "EchoRequest": 128,
    "EchoReply": 129,
    "MulticastListenerQuery": 130,
    "MulticastListenerReport": 131,
    "MulticastListenerDone": 132,
    "RouterSolicitation": 133,
    "RouterAdvertisement": 134,
    "NeighborSolicitation": 135,
    "NeighborAdvertisement": 136,
    "RedirectMessage": 137,
    "RouterRenumbering": 138,
    "ICMPNodeInformationQuery": 139,
    "ICMPNodeInformationResponse": 140,
    "InverseNeighborDiscoverySolicitation": 141,
    "InverseNeighborDiscoveryAdvertisement": 142,
    "HomeAgentAddressDiscoveryRequest": 144,
    "HomeAgentAddressDiscoveryReply": 145,
    "MobilePrefixSolicitation": 146,
    "MobilePrefixAdvertisement": 147,
    "DuplicateAddressRequestCodeSuffix": 157,
    "DuplicateAddressConfirmationCodeSuffix": 158,
    "ExtendedEchoRequest": 160,
    "ExtendedEchoReply": 161,
}


class ICMPField(Strict):
    family: Literal["IPv4", "IPv6"] = "IPv4"
    type: int | str

    @model_validator(mode="after")
    def _type(self) -> ICMPField:
        table = ICMP_V6_TYPES if self.family == "IPv6" else ICMP_V4_TYPES
        if isinstance(self.type, bool):
            raise ValueError("type: must be 0-255 or an ICMP type name")
        if isinstance(self.type, int):
            if not 0 <= self.type <= 255:
                raise ValueError("type: must be 0-255 or an ICMP type name")
        elif self.type.isdigit():
            if int(self.type) > 255:
                raise ValueError("type: must be 0-255 or an ICMP type name")
        elif self.type not in table:
            raise ValueError(f"type: ICMP type {self.type} not found in {self.family}")
        return self

    @property
    def type_number(self) -> int:
        if isinstance(self.type, int):
            return self.type
        if self.type.isdigit():
            return int(self.type)
        table = ICMP_V6_TYPES if self.family == "IPv6" else ICMP_V4_TYPES
        return table[self.type]


class ICMPRule(Strict):
    fields: list[ICMPField] | None = None


class Authentication(Strict):
    mode: Literal["disabled", "required", "test-always-fail"]

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v != "disabled":
            raise ValueError(NOT_SUPPORTED)
        return v


class IngressCommonRule(Strict):
    fromEndpoints: list[EndpointSelector] | None = None
    fromRequires: Unsupported = None
    fromCIDR: list[CIDROrIP] | None = None
    fromCIDRSet: list[CIDRRule] | None = None
    fromEntities: list[Entity] | None = None
    fromGroups: Unsupported = None
    fromNodes: Unsupported = None
    icmps: list[ICMPRule] | None = None


class IngressRule(IngressCommonRule):
    toPorts: list[PortRule] | None = None
    authentication: Authentication | None = None


class IngressDenyRule(IngressCommonRule):
    toPorts: list[PortDenyRule] | None = None


class EgressCommonRule(Strict):
    toEndpoints: list[EndpointSelector] | None = None
    toRequires: Unsupported = None
    toCIDR: list[CIDROrIP] | None = None
    toCIDRSet: list[CIDRRule] | None = None
    toEntities: list[Entity] | None = None
    toServices: list[Service] | None = None
    toGroups: Unsupported = None
    toNodes: Unsupported = None
    icmps: list[ICMPRule] | None = None


class EgressRule(EgressCommonRule):
    toPorts: list[PortRule] | None = None
    toFQDNs: list[FQDNSelector] | None = None
    authentication: Authentication | None = None


class EgressDenyRule(EgressCommonRule):
    toPorts: list[PortDenyRule] | None = None
    toFQDNs: Annotated[Any, AfterValidator(_no_deny_fqdn)] = None


class DefaultDenyConfig(Strict):
    ingress: bool | None = None
    egress: bool | None = None


class LogConfig(Strict):
    value: str | None = Field(default=None, max_length=32)


class RuleLabel(Strict):
    key: str
    value: str = ""
    source: str = "unspec"


class Rule(Strict):
    """One Cilium policy rule (`spec`, or one element of `specs`)."""

    endpointSelector: EndpointSelector | None = None
    nodeSelector: EndpointSelector | None = None
    ingress: list[IngressRule] | None = None
    ingressDeny: list[IngressDenyRule] | None = None
    egress: list[EgressRule] | None = None
    egressDeny: list[EgressDenyRule] | None = None
    labels: list[RuleLabel] | None = None
    enableDefaultDeny: DefaultDenyConfig | None = None
    description: str | None = None
    log: LogConfig | None = None


class CiliumNetworkPolicy(Strict):
    apiVersion: Literal["cilium.io/v2"]
    kind: Literal["CiliumNetworkPolicy"]
    metadata: ObjectMeta
    spec: Rule | None = None
    specs: list[Rule] | None = None
    status: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _has_rules(self) -> CiliumNetworkPolicy:
        if self.spec is None and not self.specs:
            raise ValueError("spec: one of spec or specs is required")
        return self

    def rules(self) -> list[tuple[str, Rule]]:
        """(path, rule) for `spec` and each `specs[i]`."""
        out: list[tuple[str, Rule]] = []
        if self.spec is not None:
            out.append(("spec", self.spec))
        for i, rule in enumerate(self.specs or []):
            out.append((f"specs[{i}]", rule))
        return out


class CiliumClusterwideNetworkPolicy(CiliumNetworkPolicy):
    kind: Literal["CiliumClusterwideNetworkPolicy"]  # type: ignore[assignment]
