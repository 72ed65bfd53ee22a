"""Cilium's rule validation (pkg/policy/api/rule_validation.go): one test per check, exact messages.

Every error is checked as the whole line a user sees: document, field path and message.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from cilia.errors import PolicyError, ResourceError
from cilia.models import parse_resources

SEL = {"matchLabels": {"app": "a"}}
DOC = "CiliumNetworkPolicy default/rule1"
CCNP_DOC = "CiliumClusterwideNetworkPolicy host"


def cnp_text(spec: dict[str, Any], kind: str = "CiliumNetworkPolicy", name: str = "rule1") -> str:
    return yaml.safe_dump(
        {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": {"name": name}, "spec": spec}
    )


def error_of(spec: dict[str, Any], kind: str = "CiliumNetworkPolicy", name: str = "rule1") -> PolicyError:
    """The single error of a policy with `spec`."""
    with pytest.raises(ResourceError) as info:
        parse_resources(cnp_text(spec, kind, name))
    assert len(info.value.errors) == 1, [e.line() for e in info.value.errors]
    return info.value.errors[0]


def line_of(spec: dict[str, Any], kind: str = "CiliumNetworkPolicy", name: str = "rule1") -> str:
    return error_of(spec, kind, name).line()


def valid(spec: dict[str, Any], kind: str = "CiliumNetworkPolicy") -> Any:
    (obj,) = parse_resources(cnp_text(spec, kind, "ok"))
    return obj


def ing(**rule: Any) -> dict[str, Any]:
    return {"endpointSelector": SEL, "ingress": [rule]}


def eg(**rule: Any) -> dict[str, Any]:
    return {"endpointSelector": SEL, "egress": [rule]}


def ports(*pp: dict[str, Any], rules: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    pr: dict[str, Any] = {"ports": list(pp)}
    if rules is not None:
        pr["rules"] = rules
    return [pr]


HTTP = {"http": [{"method": "GET", "path": "/"}]}
DNS = {"dns": [{"matchPattern": "*"}]}


# --- Rule ---------------------------------------------------------------------------------------


def test_rule_without_any_section_rejected():
    assert (
        line_of({"endpointSelector": SEL})
        == f"{DOC}: spec: rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny"
    )


def test_rule_with_only_empty_section_lists_rejected():
    # Cilium checks len(r.Ingress) == 0 && ... (Rule.Validate), so `ingress: []` (and any mix of
    # empty lists) is rejected exactly like a rule without sections (Cilium marks it Valid=False).
    assert (
        line_of({"endpointSelector": SEL, "ingress": [], "egress": []})
        == f"{DOC}: spec: rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny"
    )


def test_rule_in_specs_is_validated_with_its_path():
    doc = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "rule1"},
        "specs": [{"endpointSelector": SEL, "ingress": [{}]}, {"endpointSelector": SEL}],
    }
    with pytest.raises(ResourceError) as info:
        parse_resources(yaml.safe_dump(doc))
    assert [e.line() for e in info.value.errors] == [
        f"{DOC}: specs[1]: rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny"
    ]


def test_rule_without_selector_rejected():
    assert (
        line_of({"ingress": [{}]}) == f"{DOC}: spec: rule must have one of EndpointSelector or NodeSelector"
    )


def test_rule_with_both_selectors_rejected():
    spec = {"endpointSelector": SEL, "nodeSelector": SEL, "ingress": [{}]}
    assert (
        line_of(spec, "CiliumClusterwideNetworkPolicy", "host")
        == f"{CCNP_DOC}: spec: rule cannot have both EndpointSelector and NodeSelector"
    )


def test_node_selector_only_in_clusterwide_policy():
    assert (
        line_of({"nodeSelector": SEL, "ingress": [{}]})
        == f"{DOC}: spec.nodeSelector: nodeSelector is only allowed in a CiliumClusterwideNetworkPolicy"
    )
    assert valid({"nodeSelector": SEL, "ingress": [{}]}, "CiliumClusterwideNetworkPolicy").spec.nodeSelector


# --- L3 peers -----------------------------------------------------------------------------------


def test_combining_from_endpoints_and_from_cidr_rejected():
    assert (
        line_of(ing(fromEndpoints=[SEL], fromCIDR=["10.0.0.0/8"]))
        == f"{DOC}: spec.ingress[0]: combining fromEndpoints and fromCIDR is not supported yet"
    )


def test_combining_to_fqdns_and_to_endpoints_rejected():
    err = error_of(eg(toFQDNs=[{"matchName": "a.example.com"}], toEndpoints=[SEL]))
    assert err.path == "spec.egress[0]"
    # Cilium names the pair in map-iteration order; either order is the same error.
    assert err.message in (
        "combining toEndpoints and toFQDNs is not supported yet",
        "combining toFQDNs and toEndpoints is not supported yet",
    )


def test_combining_peers_in_deny_rule_rejected():
    spec = {
        "endpointSelector": SEL,
        "egressDeny": [{"toEntities": ["world"], "toCIDRSet": [{"cidr": "10.0.0.0/8"}]}],
    }
    assert (
        line_of(spec) == f"{DOC}: spec.egressDeny[0]: combining toCIDRSet and toEntities is not supported yet"
    )


def test_same_peer_kind_repeated_is_fine():
    obj = valid(ing(fromEndpoints=[SEL, {"matchLabels": {"app": "b"}}]))
    assert len(obj.spec.ingress[0].fromEndpoints) == 2


def test_unsupported_entity_rejected():
    assert (
        line_of(ing(fromEntities=["wrld"]))
        == f"{DOC}: spec.ingress[0].fromEntities[0]: unsupported entity: wrld"
    )


def test_unsupported_entity_in_egress_rejected():
    assert (
        line_of(eg(toEntities=["world", "everything"]))
        == f"{DOC}: spec.egress[0].toEntities[1]: unsupported entity: everything"
    )


def test_world_ipv4_and_ipv6_entities_accepted():
    assert valid(eg(toEntities=["world-ipv4", "world-ipv6"])).spec.egress[0].toEntities == [
        "world-ipv4",
        "world-ipv6",
    ]


def test_bad_cidr_rejected():
    err = error_of(ing(fromCIDR=["10.0.0.300/8"]))
    assert err.path == "spec.ingress[0].fromCIDR[0]"
    assert err.message.startswith("invalid CIDR '10.0.0.300/8'")


def test_cidr_set_requires_prefix_length():
    # CIDRRule.Validate: "Only allow notation <IP address>/<prefix>" (unlike fromCIDR).
    err = error_of(ing(fromCIDRSet=[{"cidr": "10.0.0.1"}]))
    assert err.path == "spec.ingress[0].fromCIDRSet[0].cidr"
    assert err.message == "invalid CIDR '10.0.0.1': a prefix length is required"


def test_cidr_set_without_cidr_rejected():
    assert (
        line_of(ing(fromCIDRSet=[{"except": ["10.0.0.0/16"]}]))
        == f"{DOC}: spec.ingress[0].fromCIDRSet[0]: one of cidr, cidrGroupRef, or cidrGroupSelector is required"
    )


def test_except_outside_cidr_rejected():
    assert (
        line_of(ing(fromCIDRSet=[{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "11.0.0.0/16"]}]))
        == f"{DOC}: spec.ingress[0].fromCIDRSet[0].except[1]: allow CIDR prefix 10.0.0.0/8 does not contain "
        "exclude CIDR prefix 11.0.0.0/16"
    )


def test_except_wider_than_cidr_rejected():
    # Newest Cilium also compares prefix lengths (prefix.Bits() > except.Bits()).
    err = error_of(eg(toCIDRSet=[{"cidr": "10.0.0.0/16", "except": ["10.0.0.0/8"]}]))
    assert err.path == "spec.egress[0].toCIDRSet[0].except[0]"
    assert err.message == "allow CIDR prefix 10.0.0.0/16 does not contain exclude CIDR prefix 10.0.0.0/8"


def test_except_of_other_family_rejected():
    err = error_of(ing(fromCIDRSet=[{"cidr": "10.0.0.0/8", "except": ["2001:db8::/64"]}]))
    assert err.message == "allow CIDR prefix 10.0.0.0/8 does not contain exclude CIDR prefix 2001:db8::/64"


def test_except_message_quotes_prefixes_as_written():
    # Cilium formats this error with the user's strings (c.Cidr, p), so a non-canonical except
    # such as 10.0.0.0/4 is quoted as written, not masked to an address the policy never mentions.
    err = error_of(ing(fromCIDRSet=[{"cidr": "10.0.0.0/8", "except": ["10.0.0.0/4"]}]))
    assert err.message == "allow CIDR prefix 10.0.0.0/8 does not contain exclude CIDR prefix 10.0.0.0/4"


# --- ports and protocols ------------------------------------------------------------------------


def test_invalid_protocol_rejected():
    assert (
        line_of(ing(toPorts=ports({"port": "80", "protocol": "FOO"})))
        == f'{DOC}: spec.ingress[0].toPorts[0].ports[0].protocol: invalid protocol "FOO", '
        "must be { tcp | udp | sctp | vrrp | igmp | any }"
    )


def test_icmp_is_not_a_toports_protocol():
    err = error_of(ing(toPorts=ports({"port": "8", "protocol": "ICMP"})))
    assert err.path == "spec.ingress[0].toPorts[0].ports[0].protocol"
    assert err.message.startswith('invalid protocol "ICMP"')


def test_lower_case_protocol_accepted_and_upper_cased():
    obj = valid(ing(toPorts=ports({"port": "80", "protocol": "tcp"}, {"port": "53", "protocol": "udp"})))
    assert [p.protocol for p in obj.spec.ingress[0].toPorts[0].ports] == ["TCP", "UDP"]


def test_omitted_protocol_is_any():
    assert valid(ing(toPorts=ports({"port": "80"}))).spec.ingress[0].toPorts[0].ports[0].protocol == "ANY"


def test_invalid_port_name_rejected():
    assert (
        line_of(ing(toPorts=ports({"port": "http_alt!"})))
        == f"{DOC}: spec.ingress[0].toPorts[0].ports[0].port: must be 0-65535 or a port name"
    )


def test_port_above_65535_rejected():
    assert (
        line_of(ing(toPorts=ports({"port": "65536"})))
        == f"{DOC}: spec.ingress[0].toPorts[0].ports[0].port: must be 0-65535 or a port name"
    )


def test_port_name_too_long_rejected():
    err = error_of(ing(toPorts=ports({"port": "a-very-long-port-name"})))
    assert err.path == "spec.ingress[0].toPorts[0].ports[0].port"
    assert err.message == "must be 0-65535 or a port name"


def test_port_name_accepted_and_lower_cased():
    assert valid(ing(toPorts=ports({"port": "HTTP"}))).spec.ingress[0].toPorts[0].ports[0].port == "http"


def test_port_zero_is_valid():
    obj = valid(ing(toPorts=ports({"port": "0", "protocol": "TCP"})))
    assert obj.spec.ingress[0].toPorts[0].ports[0].port == "0"


def test_port_as_yaml_int_accepted():
    obj = valid(ing(toPorts=ports({"port": 8080, "protocol": "TCP"})))
    assert obj.spec.ingress[0].toPorts[0].ports[0].port == "8080"


def test_port_missing_rejected():
    assert (
        line_of(ing(toPorts=ports({"protocol": "TCP"})))
        == f"{DOC}: spec.ingress[0].toPorts[0].ports[0].port: port must be specified"
    )


def test_vrrp_with_port_rejected():
    assert (
        line_of(ing(toPorts=ports({"port": "80", "protocol": "VRRP"})))
        == f"{DOC}: spec.ingress[0].toPorts[0].ports[0].port: port must be empty or 0"
    )


def test_too_many_ports_rejected():
    many = [{"port": str(1000 + i), "protocol": "TCP"} for i in range(41)]
    assert (
        line_of(ing(toPorts=ports(*many)))
        == f"{DOC}: spec.ingress[0].toPorts[0].ports: too many ports, the max is 40"
    )


def test_forty_ports_accepted():
    many = [{"port": str(1000 + i), "protocol": "TCP"} for i in range(40)]
    assert len(valid(ing(toPorts=ports(*many))).spec.ingress[0].toPorts[0].ports) == 40


def test_too_many_ports_in_deny_rule_rejected():
    many = [{"port": str(1000 + i)} for i in range(41)]
    spec = {"endpointSelector": SEL, "egressDeny": [{"toPorts": ports(*many)}]}
    assert line_of(spec) == f"{DOC}: spec.egressDeny[0].toPorts[0].ports: too many ports, the max is 40"


# --- ICMP ---------------------------------------------------------------------------------------


def test_icmps_with_to_ports_rejected():
    spec = ing(icmps=[{"fields": [{"type": 8}]}], toPorts=ports({"port": "80"}))
    assert (
        line_of(spec)
        == f"{DOC}: spec.ingress[0]: the ICMPs block may only be present without ToPorts. Define a separate rule "
        "to use ToPorts"
    )


def test_too_many_icmp_fields_rejected():
    fields = [{"type": i} for i in range(41)]
    assert (
        line_of(eg(icmps=[{"fields": fields}]))
        == f"{DOC}: spec.egress[0].icmps[0].fields: too many types, the max is 40"
    )


def test_icmp_type_name_unknown_for_ipv4():
    assert (
        line_of(ing(icmps=[{"fields": [{"family": "IPv4", "type": "PacketTooBig"}]}]))
        == f"{DOC}: spec.ingress[0].icmps[0].fields[0].type: ICMP type PacketTooBig not found in IPv4"
    )


def test_icmp_type_name_unknown_for_ipv6():
    assert (
        line_of(ing(icmps=[{"fields": [{"family": "IPv6", "type": "Echo"}]}]))
        == f"{DOC}: spec.ingress[0].icmps[0].fields[0].type: ICMP type Echo not found in IPv6"
    )


def test_icmp_type_above_255_rejected():
    err = error_of(ing(icmps=[{"fields": [{"type": 256}]}]))
    assert err.path == "spec.ingress[0].icmps[0].fields[0].type"
    assert err.message == "must be 0-255 or an ICMP type name"


# --- L7 -----------------------------------------------------------------------------------------


def test_dns_rules_on_ingress_rejected():
    spec = ing(toPorts=ports({"port": "53", "protocol": "UDP"}, rules=DNS))
    assert line_of(spec) == f"{DOC}: spec.ingress[0]: L7 protocol DNS is not supported on ingress yet"


def test_http_rules_on_udp_port_rejected():
    spec = ing(toPorts=ports({"port": "80", "protocol": "UDP"}, rules=HTTP))
    assert (
        line_of(spec)
        == f"{DOC}: spec.ingress[0].toPorts[0].ports[0]: L7 rules can only apply to TCP (not UDP) except for DNS rules"
    )


def test_http_rules_on_protocol_any_rejected():
    spec = eg(toPorts=ports({"port": "80", "protocol": "ANY"}, rules=HTTP))
    assert (
        line_of(spec)
        == f"{DOC}: spec.egress[0].toPorts[0].ports[0]: L7 rules can only apply to TCP (not ANY) except for DNS rules"
    )


def test_http_rules_on_omitted_protocol_rejected():
    err = error_of(ing(toPorts=ports({"port": "80"}, rules=HTTP)))
    assert err.path == "spec.ingress[0].toPorts[0].ports[0]"
    # Older Cilium says "(not ANY)", newest "(not )": either way the omitted protocol is refused.
    assert err.message in (
        "L7 rules can only apply to TCP (not ANY) except for DNS rules",
        "L7 rules can only apply to TCP (not ) except for DNS rules",
    )


def test_dns_rules_on_udp_and_any_accepted():
    spec = eg(
        toEndpoints=[SEL],
        toPorts=ports({"port": "53", "protocol": "UDP"}, {"port": "53", "protocol": "ANY"}, rules=DNS),
    )
    assert valid(spec).spec.egress[0].toPorts[0].rules.dns[0].matchPattern == "*"


def test_l7_rules_on_port_zero_rejected():
    spec = ing(toPorts=ports({"port": "0", "protocol": "TCP"}, rules=HTTP))
    assert line_of(spec) == f"{DOC}: spec.ingress[0].toPorts[0]: L7 rules can not be used when a port is 0"


def test_dns_rules_with_port_range_rejected():
    spec = eg(toPorts=ports({"port": "53", "endPort": 60, "protocol": "UDP"}, rules=DNS))
    assert line_of(spec) == f"{DOC}: spec.egress[0].toPorts[0].ports[0]: DNS rules do not support port ranges"


def test_dns_rules_without_ports_rejected():
    spec = eg(toPorts=[{"rules": DNS}])
    assert (
        line_of(spec)
        == f"{DOC}: spec.egress[0].toPorts[0].rules.dns: port 53 must be specified for DNS rules"
    )


def test_http_and_dns_in_one_port_rule_rejected():
    spec = eg(toPorts=ports({"port": "53", "protocol": "TCP"}, rules={**HTTP, **DNS}))
    assert (
        line_of(spec)
        == f"{DOC}: spec.egress[0].toPorts[0].rules: multiple L7 protocol rule types specified in single rule"
    )


def test_l7_rules_in_deny_rule_rejected():
    spec = {
        "endpointSelector": SEL,
        "ingressDeny": [{"toPorts": ports({"port": "80", "protocol": "TCP"}, rules=HTTP)}],
    }
    assert (
        line_of(spec)
        == f"{DOC}: spec.ingressDeny[0].toPorts[0].rules: L7 rules are not allowed in deny rules"
    )


def test_to_fqdns_in_egress_deny_rejected():
    spec = {"endpointSelector": SEL, "egressDeny": [{"toFQDNs": [{"matchName": "a.example.com"}]}]}
    assert line_of(spec) == f"{DOC}: spec.egressDeny[0].toFQDNs: toFQDNs is not allowed in deny rules"


def test_host_policy_with_l7_ingress_rejected():
    spec = {
        "nodeSelector": SEL,
        "ingress": [{"toPorts": ports({"port": "80", "protocol": "TCP"}, rules=HTTP)}],
    }
    assert (
        line_of(spec, "CiliumClusterwideNetworkPolicy", "host")
        == f"{CCNP_DOC}: spec.ingress[0]: L7 policy is not supported on host ingress yet"
    )


def test_host_policy_with_http_egress_rejected():
    spec = {
        "nodeSelector": SEL,
        "egress": [{"toPorts": ports({"port": "80", "protocol": "TCP"}, rules=HTTP)}],
    }
    assert (
        line_of(spec, "CiliumClusterwideNetworkPolicy", "host")
        == f"{CCNP_DOC}: spec.egress[0]: L7 protocol HTTP is not supported on host egress yet"
    )


def test_host_policy_with_dns_egress_accepted():
    spec = {"nodeSelector": SEL, "egress": [{"toPorts": ports({"port": "53", "protocol": "UDP"}, rules=DNS)}]}
    assert valid(spec, "CiliumClusterwideNetworkPolicy").spec.egress[0].toPorts[0].rules.dns


def test_invalid_regex_in_http_path_rejected():
    err = error_of(
        ing(toPorts=ports({"port": "80", "protocol": "TCP"}, rules={"http": [{"path": "/api/(v1"}]}))
    )
    assert err.document == DOC
    assert err.path == "spec.ingress[0].toPorts[0].rules.http[0].path"
    assert err.message.startswith("invalid regular expression '/api/(v1'")


def test_invalid_regex_in_http_method_rejected():
    err = error_of(
        ing(toPorts=ports({"port": "80", "protocol": "TCP"}, rules={"http": [{"method": "GE[T"}]}))
    )
    assert err.path == "spec.ingress[0].toPorts[0].rules.http[0].method"
    assert err.message.startswith("invalid regular expression 'GE[T'")


def test_perl_only_regex_in_http_path_rejected():
    # Cilium compiles path/method with Go's regexp (RE2), which has no look-around; Envoy's
    # RE2 would refuse it too, so a Python-only regex must be rejected.
    err = error_of(
        ing(toPorts=ports({"port": "80", "protocol": "TCP"}, rules={"http": [{"path": "/api/(?!admin).*"}]}))
    )
    assert err.path == "spec.ingress[0].toPorts[0].rules.http[0].path"
    assert err.message.startswith("invalid regular expression")


def test_header_match_without_name_rejected():
    rules = {"http": [{"headerMatches": [{"value": "x"}]}]}
    err = error_of(ing(toPorts=ports({"port": "80", "protocol": "TCP"}, rules=rules)))
    assert err.path == "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].name"
    assert err.message == "required field is missing"


def test_header_match_bad_mismatch_action_rejected():
    rules = {"http": [{"headerMatches": [{"name": "X-A", "mismatch": "DROP"}]}]}
    err = error_of(ing(toPorts=ports({"port": "80", "protocol": "TCP"}, rules=rules)))
    assert err.path == "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].mismatch"
    assert err.message == "unsupported value 'DROP', must be one of 'LOG', 'ADD', 'DELETE' or 'REPLACE'"


# --- FQDN ---------------------------------------------------------------------------------------


def test_fqdn_match_name_invalid_characters_rejected():
    assert (
        line_of(eg(toFQDNs=[{"matchName": "api github.com"}]))
        == f"{DOC}: spec.egress[0].toFQDNs[0].matchName: invalid matchName 'api github.com': letters, digits, "
        "'-', '_' and '.' only"
    )


def test_fqdn_match_name_wildcard_rejected():
    err = error_of(eg(toFQDNs=[{"matchName": "*.github.com"}]))
    assert err.path == "spec.egress[0].toFQDNs[0].matchName"


def test_fqdn_match_pattern_invalid_characters_rejected():
    err = error_of(eg(toFQDNs=[{"matchPattern": "*.git?hub.com"}]))
    assert err.path == "spec.egress[0].toFQDNs[0].matchPattern"
    assert err.message.startswith("invalid matchPattern '*.git?hub.com'")


def test_fqdn_both_match_name_and_pattern_rejected():
    assert (
        line_of(eg(toFQDNs=[{"matchName": "a.example.com", "matchPattern": "*.example.com"}]))
        == f"{DOC}: spec.egress[0].toFQDNs[0]: exactly one of matchName or matchPattern is required"
    )


def test_fqdn_neither_match_name_nor_pattern_rejected():
    assert (
        line_of(eg(toFQDNs=[{}]))
        == f"{DOC}: spec.egress[0].toFQDNs[0]: exactly one of matchName or matchPattern is required"
    )


def test_dns_rule_selector_validated_like_fqdn():
    spec = eg(toPorts=ports({"port": "53", "protocol": "UDP"}, rules={"dns": [{"matchName": "a b"}]}))
    err = error_of(spec)
    assert err.path == "spec.egress[0].toPorts[0].rules.dns[0].matchName"


# --- toServices ---------------------------------------------------------------------------------


def test_to_services_needs_exactly_one_form():
    svc = {"k8sService": {"serviceName": "db"}, "k8sServiceSelector": {"selector": SEL}}
    assert (
        line_of(eg(toServices=[svc]))
        == f"{DOC}: spec.egress[0].toServices[0]: exactly one of k8sService or k8sServiceSelector is required"
    )
