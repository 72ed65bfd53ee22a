"""Cilium's rule validation (`pkg/policy/api/rule_validation.go`), on parsed models.

Each check raises `PolicyError(path, message)` with Cilium's message; the loader adds the
document name. Structural checks (types, enums, unknown fields) are the models' job.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from cilia.errors import PolicyError
from cilia.models.cilium import (
    CiliumClusterwideNetworkPolicy,
    CiliumNetworkPolicy,
    EgressDenyRule,
    EgressRule,
    ICMPRule,
    IngressDenyRule,
    IngressRule,
    PortDenyRule,
    PortProtocol,
    PortRule,
    Rule,
)

MAX_PORTS = 40
MAX_ICMP_FIELDS = 40

_INGRESS_PEERS = ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities")
_EGRESS_PEERS = ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toServices", "toFQDNs")


def validate_resource(obj: BaseModel) -> None:
    """Validate every rule of a CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy."""
    if not isinstance(obj, CiliumNetworkPolicy):
        return
    clusterwide = isinstance(obj, CiliumClusterwideNetworkPolicy)
    for path, rule in obj.rules():
        validate_rule(rule, path, clusterwide)


def validate_rule(rule: Rule, path: str, clusterwide: bool) -> None:
    if not rule.ingress and not rule.ingressDeny and not rule.egress and not rule.egressDeny:
        raise PolicyError(path, "rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny")
    if rule.endpointSelector is None and rule.nodeSelector is None:
        raise PolicyError(path, "rule must have one of EndpointSelector or NodeSelector")
    if rule.endpointSelector is not None and rule.nodeSelector is not None:
        raise PolicyError(path, "rule cannot have both EndpointSelector and NodeSelector")
    if rule.nodeSelector is not None and not clusterwide:
        raise PolicyError(
            f"{path}.nodeSelector", "nodeSelector is only allowed in a CiliumClusterwideNetworkPolicy"
        )
    host = rule.nodeSelector is not None
    for i, ing in enumerate(rule.ingress or []):
        _ingress(ing, f"{path}.ingress[{i}]", host)
    for i, ingd in enumerate(rule.ingressDeny or []):
        _ingress_deny(ingd, f"{path}.ingressDeny[{i}]")
    for i, eg in enumerate(rule.egress or []):
        _egress(eg, f"{path}.egress[{i}]", host)
    for i, egd in enumerate(rule.egressDeny or []):
        _egress_deny(egd, f"{path}.egressDeny[{i}]")


def _peer_kinds(rule: BaseModel, names: Sequence[str], path: str) -> None:
    present = [n for n in names if getattr(rule, n, None)]
    if len(present) > 1:
        raise PolicyError(path, f"combining {present[0]} and {present[1]} is not supported yet")


def _icmps(icmps: list[ICMPRule] | None, has_ports: bool, path: str) -> None:
    if icmps and has_ports:
        raise PolicyError(
            path, "the ICMPs block may only be present without ToPorts. Define a separate rule to use ToPorts"
        )
    for i, icmp in enumerate(icmps or []):
        if len(icmp.fields or []) > MAX_ICMP_FIELDS:
            raise PolicyError(f"{path}.icmps[{i}].fields", f"too many types, the max is {MAX_ICMP_FIELDS}")


def _cidr_sets(rule: BaseModel, name: str, path: str) -> None:
    import ipaddress

    for i, cr in enumerate(getattr(rule, name, None) or []):
        if cr.cidr is None:
            continue
        net = ipaddress.ip_network(cr.cidr, strict=False)
        for j, exc in enumerate(cr.except_ or []):
            enet = ipaddress.ip_network(exc, strict=False)
            if enet.version != net.version or not enet.subnet_of(net):  # type: ignore[arg-type]
                raise PolicyError(
                    f"{path}.{name}[{i}].except[{j}]",
                    f"allow CIDR prefix {cr.cidr} does not contain exclude CIDR prefix {exc}",
                )


def _ingress(rule: IngressRule, path: str, host: bool) -> None:
    _peer_kinds(rule, _INGRESS_PEERS, path)
    _cidr_sets(rule, "fromCIDRSet", path)
    l7 = _l7_members(rule.toPorts)
    if "DNS" in l7:
        raise PolicyError(path, "L7 protocol DNS is not supported on ingress yet")
    if host and l7:
        raise PolicyError(path, "L7 policy is not supported on host ingress yet")
    _icmps(rule.icmps, bool(rule.toPorts), path)
    for i, pr in enumerate(rule.toPorts or []):
        _port_rule(pr, f"{path}.toPorts[{i}]", ingress=True)


def _ingress_deny(rule: IngressDenyRule, path: str) -> None:
    _peer_kinds(rule, _INGRESS_PEERS, path)
    _cidr_sets(rule, "fromCIDRSet", path)
    _icmps(rule.icmps, bool(rule.toPorts), path)
    for i, pr in enumerate(rule.toPorts or []):
        _port_deny_rule(pr, f"{path}.toPorts[{i}]")


def _egress(rule: EgressRule, path: str, host: bool) -> None:
    _peer_kinds(rule, _EGRESS_PEERS, path)
    _cidr_sets(rule, "toCIDRSet", path)
    l7 = _l7_members(rule.toPorts)
    if host and "HTTP" in l7:
        raise PolicyError(path, "L7 protocol HTTP is not supported on host egress yet")
    _icmps(rule.icmps, bool(rule.toPorts), path)
    for i, pr in enumerate(rule.toPorts or []):
        _port_rule(pr, f"{path}.toPorts[{i}]", ingress=False)


def _egress_deny(rule: EgressDenyRule, path: str) -> None:
    _peer_kinds(rule, _EGRESS_PEERS, path)
    _cidr_sets(rule, "toCIDRSet", path)
    _icmps(rule.icmps, bool(rule.toPorts), path)
    for i, pr in enumerate(rule.toPorts or []):
        _port_deny_rule(pr, f"{path}.toPorts[{i}]")


def _l7_members(port_rules: list[PortRule] | None) -> list[str]:
    out: list[str] = []
    for pr in port_rules or []:
        if pr.rules is None or pr.rules.is_empty():
            continue
        if pr.rules.dns:
            out.append("DNS")
        if pr.rules.http:
            out.append("HTTP")
    return out


def _port_protocol(pp: PortProtocol, path: str, has_dns: bool) -> bool:
    """Validate one port; returns True when it is port 0 (every port)."""
    if pp.protocol in ("VRRP", "IGMP"):
        if pp.port not in ("", "0"):
            raise PolicyError(f"{path}.port", "port must be empty or 0")
        return True
    if pp.port == "":
        raise PolicyError(f"{path}.port", "port must be specified")
    if pp.port.isdigit():
        port = int(pp.port)
        if has_dns and pp.endPort is not None and pp.endPort > port:
            raise PolicyError(path, "DNS rules do not support port ranges")
        return port == 0
    return False


def _port_deny_rule(pr: PortDenyRule, path: str) -> None:
    if len(pr.ports or []) > MAX_PORTS:
        raise PolicyError(f"{path}.ports", f"too many ports, the max is {MAX_PORTS}")
    for i, pp in enumerate(pr.ports or []):
        _port_protocol(pp, f"{path}.ports[{i}]", has_dns=False)


def _port_rule(pr: PortRule, path: str, ingress: bool) -> None:
    rules = pr.rules
    has_dns = bool(rules is not None and rules.dns)
    if ingress and has_dns:
        raise PolicyError(f"{path}.rules.dns", "DNS rules are not allowed on ingress")
    ports = pr.ports or []
    if len(ports) > MAX_PORTS:
        raise PolicyError(f"{path}.ports", f"too many ports, the max is {MAX_PORTS}")
    has_l7 = rules is not None and not rules.is_empty()
    any_zero = False
    for i, pp in enumerate(ports):
        ppath = f"{path}.ports[{i}]"
        any_zero |= _port_protocol(pp, ppath, has_dns)
        if has_l7 and not has_dns and pp.protocol != "TCP":
            raise PolicyError(
                ppath, f"L7 rules can only apply to TCP (not {pp.protocol}) except for DNS rules"
            )
    if has_l7 and rules is not None:
        if any_zero:
            raise PolicyError(path, "L7 rules can not be used when a port is 0")
        if rules.http and rules.dns:
            raise PolicyError(f"{path}.rules", "multiple L7 protocol rule types specified in single rule")
        if rules.dns and not ports:
            raise PolicyError(f"{path}.rules.dns", "port 53 must be specified for DNS rules")
