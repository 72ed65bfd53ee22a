"""Cilium's L3/L4 semantics: CIDR, FQDN, ports, ICMP, deny precedence, enforcement, NetworkPolicy.

Ground truth: /work/notes/semantics-A.md (datapath lookup, matchPattern, toFQDNs, allow-localhost)
and /work/notes/semantics-B.md (CIDR selection, ports/endPort/ANY, named ports, ICMP, enforcement
modes, NetworkPolicy translation), with the Cilium sources cited there.
"""

from __future__ import annotations

import pytest
from scenario_helpers import allowed, ccnp, cnp, knp, pod, ports, probe, run, sel

from cilia.policy.context import PolicyOptions
from cilia.policy.fqdn import match_name, match_pattern

PODS = [
    pod("client", "10.0.1.1", {"app": "client"}),
    pod("server", "10.0.1.2", {"app": "server"}, ports={"http": 8080}),
    pod("other", "10.0.1.3", {"app": "other"}),
    pod("client", "10.0.2.1", {"app": "client"}, namespace="prod"),
    pod("server", "10.0.2.2", {"app": "server"}, namespace="prod", ports={"http": 9090}),
    pod("coredns", "10.0.0.10", {"k8s-app": "kube-dns"}, namespace="kube-system", ports={"dns": "53/UDP"}),
]
NAMESPACES = {"default": {"team": "core"}, "prod": {"team": "payments"}}
CORE_DNS = {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s:k8s-app": "kube-dns"}}


def to_server(*rules: dict, name: str = "allow", **extra: object) -> dict:
    return cnp(name, {"endpointSelector": sel(app="server"), "ingress": list(rules), **extra})


def from_client(*rules: dict, name: str = "allow", **extra: object) -> dict:
    return cnp(name, {"endpointSelector": sel(app="client"), "egress": list(rules), **extra})


def client_to(*targets: str | dict, port: int = 80, protocol: str = "TCP") -> list[dict]:
    return [probe("default/client", t, port, protocol) for t in targets]


# --- CIDR ----------------------------------------------------------------------------------------


def test_to_cidr_selects_outside_addresses_in_range_only() -> None:
    v = run(
        PODS,
        [from_client({"toCIDR": ["198.51.100.0/24"]})],
        client_to({"ip": "198.51.100.20"}, {"ip": "198.51.101.20"}),
    )
    assert allowed(v) == [True, False]
    assert v[0].reason == "default/allow egress[0]"


def test_to_cidr_never_selects_a_pod_even_if_its_ip_is_in_range() -> None:
    # {ip: <pod ip>} resolves to the pod's identity, which carries no cidr:/world label.
    v = run(
        PODS,
        [from_client({"toCIDR": ["10.0.0.0/8"]})],
        client_to({"ip": "10.0.1.2"}, "default/server", {"ip": "10.9.9.9"}),
    )
    assert allowed(v) == [False, False, True]


def test_to_cidr_does_not_select_host_or_remote_node() -> None:
    v = run(
        PODS,
        [from_client({"toCIDR": ["0.0.0.0/0"]})],
        client_to({"entity": "host"}, {"entity": "remote-node"}),
    )
    assert allowed(v) == [False, False]


def test_to_cidr_set_except_carves_out_a_subrange() -> None:
    rule = {"toCIDRSet": [{"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]}]}
    v = run(
        PODS,
        [from_client(rule)],
        client_to({"ip": "198.51.100.1"}, {"ip": "198.51.100.200"}, {"ip": "198.51.100.127"}),
    )
    assert allowed(v) == [True, False, True]


def test_to_cidr_all_ipv4_selects_world() -> None:
    v = run(
        PODS,
        [from_client({"toCIDR": ["0.0.0.0/0"]})],
        client_to({"entity": "world"}, {"ip": "8.8.8.8"}, "default/server"),
    )
    assert allowed(v) == [True, True, False]


def test_from_cidr_allows_ingress_from_outside_addresses_in_range() -> None:
    v = run(
        PODS,
        [to_server({"fromCIDR": ["203.0.113.0/24"]})],
        [
            probe({"ip": "203.0.113.9"}, "default/server"),
            probe({"ip": "192.0.2.9"}, "default/server"),
            probe("default/client", "default/server"),
        ],
    )
    assert allowed(v) == [True, False, False]


def test_from_cidr_set_except_in_ingress() -> None:
    rule = {"fromCIDRSet": [{"cidr": "203.0.113.0/24", "except": ["203.0.113.0/28"]}]}
    v = run(
        PODS,
        [to_server(rule)],
        [probe({"ip": "203.0.113.5"}, "default/server"), probe({"ip": "203.0.113.50"}, "default/server")],
    )
    assert allowed(v) == [False, True]


def test_networkpolicy_ip_block_with_except() -> None:
    spec = {
        "podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}}]}],
    }
    v = run(
        PODS,
        [knp("ipblock", spec)],
        [
            probe({"ip": "203.0.113.10"}, "default/server"),
            probe({"ip": "203.0.113.200"}, "default/server"),
            probe("default/client", "default/server"),
        ],
    )
    assert allowed(v) == [True, False, False]


# --- FQDN: matchName / matchPattern --------------------------------------------------------------


def test_match_pattern_star_matches_exactly_one_label() -> None:
    assert match_pattern("*.github.com", "api.github.com")
    assert not match_pattern("*.github.com", "a.b.github.com")


def test_match_pattern_star_does_not_match_apex() -> None:
    assert not match_pattern("*.github.com", "github.com")


def test_match_pattern_star_inside_a_label_does_not_cross_dots() -> None:
    assert match_pattern("*github.com", "github.com")
    assert match_pattern("*github.com", "xgithub.com")
    assert not match_pattern("*github.com", "api.github.com")


def test_match_pattern_double_star_matches_any_depth_but_not_apex() -> None:
    assert match_pattern("**.github.com", "api.github.com")
    assert match_pattern("**.github.com", "a.b.c.github.com")
    assert not match_pattern("**.github.com", "github.com")


def test_match_pattern_star_alone_matches_every_name() -> None:
    assert match_pattern("*", "github.com")
    assert match_pattern("*", "a.b.c.example.org.")
    assert match_pattern("*", "localhost")


def test_fqdn_matching_is_case_insensitive_and_ignores_trailing_dot() -> None:
    assert match_name("API.GitHub.com", "api.github.com.")
    assert match_name("api.github.com.", "Api.Github.Com")
    assert match_pattern("*.GitHub.COM", "API.github.com.")
    assert not match_name("api.github.com", "github.com")


DNS_ALL = {"toEndpoints": [CORE_DNS], "toPorts": ports("53", rules={"dns": [{"matchPattern": "*"}]})}


def test_to_fqdns_match_name_allows_resolved_address() -> None:
    v = run(
        PODS,
        [from_client({"toFQDNs": [{"matchName": "api.github.com"}]}, DNS_ALL)],
        client_to(
            {"fqdn": "api.github.com", "ip": "198.51.100.10"},
            {"fqdn": "www.github.com", "ip": "198.51.100.11"},
            port=443,
        ),
    )
    assert allowed(v) == [True, False]


def test_to_fqdns_match_pattern_in_scenario() -> None:
    v = run(
        PODS,
        [from_client({"toFQDNs": [{"matchPattern": "*.github.com"}]}, DNS_ALL)],
        client_to(
            {"fqdn": "api.github.com", "ip": "198.51.100.10"},
            {"fqdn": "github.com", "ip": "198.51.100.12"},
            {"fqdn": "a.b.github.com", "ip": "198.51.100.13"},
            port=443,
        ),
    )
    assert allowed(v) == [True, False, False]


def test_fqdn_target_not_resolved_through_dns_proxy_is_judged_as_plain_ip() -> None:
    # No DNS rule: the DNS proxy never sees the lookup, so toFQDNs never learns the address.
    v = run(
        PODS,
        [
            from_client(
                {"toFQDNs": [{"matchName": "api.github.com"}]},
                {"toEndpoints": [CORE_DNS], "toPorts": ports("53")},
            )
        ],
        client_to({"fqdn": "api.github.com", "ip": "198.51.100.10"}, port=443),
    )
    assert v[0].allowed is False


def test_unresolved_fqdn_target_is_still_allowed_by_cidr() -> None:
    v = run(
        PODS,
        [from_client({"toFQDNs": [{"matchName": "api.github.com"}]}, {"toCIDR": ["198.51.100.0/24"]})],
        client_to({"fqdn": "api.github.com", "ip": "198.51.100.10"}, port=443),
    )
    assert v[0].allowed is True
    assert v[0].reason == "default/allow egress[1]"


def test_dns_rule_refusing_the_name_means_to_fqdns_does_not_open_it() -> None:
    dns_only_api = {
        "toEndpoints": [CORE_DNS],
        "toPorts": ports("53", rules={"dns": [{"matchName": "api.github.com"}]}),
    }
    v = run(
        PODS,
        [from_client({"toFQDNs": [{"matchPattern": "*.github.com"}]}, dns_only_api)],
        client_to(
            {"fqdn": "api.github.com", "ip": "198.51.100.10"},
            {"fqdn": "www.github.com", "ip": "198.51.100.11"},
            port=443,
        ),
    )
    assert allowed(v) == [True, False]


def test_fqdn_learned_when_another_rule_allows_port_53_without_dns_rules() -> None:
    # Cilium: semantics-A.md Q5: the DNS proxy of port 53 knows every selector of that port's
    # L4 filter; a selector allowed on 53 without DNS rules gets the match-all pattern, so the query
    # for www.github.com is answered and the NameManager labels its IPs for toFQDNs (Q7).
    dns_only_api = {
        "toEndpoints": [CORE_DNS],
        "toPorts": ports("53/UDP", rules={"dns": [{"matchName": "api.github.com"}]}),
    }
    port53 = {"toEndpoints": [CORE_DNS], "toPorts": ports("53/UDP")}
    v = run(
        PODS,
        [from_client({"toFQDNs": [{"matchPattern": "*.github.com"}]}, dns_only_api, port53)],
        [
            probe("default/client", "kube-system/coredns", 53, "UDP", dns={"query": "www.github.com"}),
            *client_to({"fqdn": "www.github.com", "ip": "198.51.100.11"}, port=443),
        ],
    )
    assert v[0].allowed is True  # the proxy answers the query
    assert v[1].allowed is True  # so toFQDNs learned the address


def test_fqdn_not_learned_when_egress_deny_blocks_the_dns_server() -> None:
    # Cilium: a deny covering 53 to the DNS server wins in the datapath (semantics-A.md Q1/Q2:
    # deny entries carry no proxy port), so the query never reaches the DNS proxy and toFQDNs never
    # learns the answer.
    deny_dns = cnp(
        "deny-dns",
        {
            "endpointSelector": sel(app="client"),
            "egressDeny": [{"toEndpoints": [CORE_DNS], "toPorts": ports("53")}],
        },
    )
    v = run(
        PODS,
        [from_client({"toFQDNs": [{"matchName": "api.github.com"}]}, DNS_ALL), deny_dns],
        [
            probe("default/client", "kube-system/coredns", 53, "UDP", dns={"query": "api.github.com"}),
            *client_to({"fqdn": "api.github.com", "ip": "198.51.100.10"}, port=443),
        ],
    )
    assert v[0].allowed is False
    assert v[1].allowed is False


# --- ports ----------------------------------------------------------------------------------------


def test_port_number_allows_only_that_port_and_protocol() -> None:
    v = run(
        PODS,
        [to_server({"fromEndpoints": [sel(app="client")], "toPorts": ports("80/TCP")})],
        [
            probe("default/client", "default/server", 80, "TCP"),
            probe("default/client", "default/server", 81, "TCP"),
            probe("default/client", "default/server", 80, "UDP"),
        ],
    )
    assert allowed(v) == [True, False, False]


def test_end_port_range_is_inclusive() -> None:
    rule = {
        "fromEndpoints": [sel(app="client")],
        "toPorts": [{"ports": [{"port": "8000", "endPort": 8100, "protocol": "TCP"}]}],
    }
    v = run(
        PODS,
        [to_server(rule)],
        [probe("default/client", "default/server", p) for p in (7999, 8000, 8050, 8100, 8101)],
    )
    assert allowed(v) == [False, True, True, True, False]


def test_end_port_below_port_means_the_single_port() -> None:
    rule = {
        "fromEndpoints": [sel(app="client")],
        "toPorts": [{"ports": [{"port": "8000", "endPort": 10, "protocol": "TCP"}]}],
    }
    v = run(PODS, [to_server(rule)], [probe("default/client", "default/server", p) for p in (10, 8000, 8001)])
    assert allowed(v) == [False, True, False]


def test_port_zero_means_every_port_of_the_protocol() -> None:
    rule = {"fromEndpoints": [sel(app="client")], "toPorts": ports("0/TCP")}
    v = run(
        PODS,
        [to_server(rule)],
        [
            probe("default/client", "default/server", 1, "TCP"),
            probe("default/client", "default/server", 65535, "TCP"),
            probe("default/client", "default/server", 53, "UDP"),
            probe("default/client", "default/server", 8, "ICMP"),
        ],
    )
    assert allowed(v) == [True, True, False, False]


def test_protocol_any_covers_tcp_udp_and_sctp() -> None:
    rule = {"fromEndpoints": [sel(app="client")], "toPorts": ports("5000/ANY")}
    v = run(
        PODS,
        [to_server(rule)],
        [probe("default/client", "default/server", 5000, p) for p in ("TCP", "UDP", "SCTP")],
    )
    assert allowed(v) == [True, True, True]


def test_omitted_protocol_is_any() -> None:
    rule = {"fromEndpoints": [sel(app="client")], "toPorts": ports("5000")}
    v = run(
        PODS,
        [to_server(rule)],
        [probe("default/client", "default/server", 5000, p) for p in ("TCP", "UDP", "SCTP")],
    )
    assert allowed(v) == [True, True, True]


def test_protocol_any_does_not_cover_icmp() -> None:
    rule = {"fromEndpoints": [sel(app="client")], "toPorts": ports("0/ANY")}
    v = run(
        PODS,
        [to_server(rule)],
        [
            probe("default/client", "default/server", 8, "ICMP"),
            probe("default/client", "default/server", 9, "UDP"),
        ],
    )
    assert allowed(v) == [False, True]


def test_l3_only_rule_covers_every_protocol_including_icmp() -> None:
    v = run(
        PODS,
        [to_server({"fromEndpoints": [sel(app="client")]})],
        [
            probe("default/client", "default/server", 8, "ICMP"),
            probe("default/client", "default/server", 12345, "UDP"),
            probe("default/client", "default/server", 7, "SCTP"),
        ],
    )
    assert allowed(v) == [True, True, True]


def test_to_ports_without_peers_is_an_l3_wildcard() -> None:
    v = run(
        PODS,
        [to_server({"toPorts": ports("80/TCP")})],
        [
            probe("default/other", "default/server"),
            probe("prod/client", "default/server"),
            probe({"ip": "192.0.2.1"}, "default/server"),
            probe({"entity": "remote-node"}, "default/server"),
            probe("default/other", "default/server", 81),
        ],
    )
    assert allowed(v) == [True, True, True, True, False]


def test_empty_from_endpoints_list_selects_nothing_even_with_ports() -> None:
    v = run(
        PODS,
        [to_server({"fromEndpoints": [], "toPorts": ports("80/TCP")})],
        [probe("default/client", "default/server")],
    )
    assert v[0].allowed is False


def test_named_port_on_ingress_resolves_against_the_destination_pod() -> None:
    # default/server names http 8080, prod/server names it 9090; a CCNP allows "http" to both.
    policy = ccnp(
        "http", {"endpointSelector": sel(app="server"), "ingress": [{"toPorts": ports("http/TCP")}]}
    )
    v = run(
        PODS,
        [policy],
        [
            probe("default/client", "default/server", 8080),
            probe("default/client", "default/server", 9090),
            probe("default/client", "prod/server", 9090),
            probe("default/client", "prod/server", 8080),
        ],
    )
    assert allowed(v) == [True, False, True, False]


def test_named_port_protocol_must_match_the_container_port() -> None:
    # coredns names dns 53/UDP: a TCP rule on "dns" resolves to nothing.
    policy = ccnp(
        "dns",
        {
            "endpointSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            "ingress": [
                {"toPorts": ports("dns/TCP")},
                {"fromEndpoints": [sel(app="other")], "toPorts": ports("dns")},
            ],
        },
    )
    v = run(
        PODS,
        [policy],
        [
            probe("default/client", "kube-system/coredns", 53, "TCP"),
            probe("default/client", "kube-system/coredns", 53, "UDP"),
            probe("default/other", "kube-system/coredns", 53, "UDP"),
        ],
    )
    assert allowed(v) == [False, False, True]


def test_named_port_on_egress_resolves_cluster_wide() -> None:
    pods = [
        pod("client", "10.0.1.1", {"app": "client"}),
        pod("db", "10.0.1.5", {"app": "db"}, ports={"pg": 5432}),
    ]
    v = run(
        pods,
        [from_client({"toEndpoints": [sel(app="db")], "toPorts": ports("pg/TCP")})],
        [probe("default/client", "default/db", 5432), probe("default/client", "default/db", 5433)],
    )
    assert allowed(v) == [True, False]


def test_ambiguous_egress_named_port_allows_nothing() -> None:
    # "http" is 8080 on default/server and 9090 on prod/server: egress resolution fails (<= 1.18).
    v = run(
        PODS,
        [from_client({"toEndpoints": [sel(app="server")], "toPorts": ports("http/TCP")})],
        [probe("default/client", "default/server", 8080), probe("default/client", "default/server", 9090)],
    )
    assert allowed(v) == [False, False]


def test_icmp_rule_by_type_number() -> None:
    rule = {"fromEndpoints": [sel(app="client")], "icmps": [{"fields": [{"type": 8}]}]}
    v = run(
        PODS,
        [to_server(rule)],
        [
            probe("default/client", "default/server", 8, "ICMP"),
            probe("default/client", "default/server", 0, "ICMP"),
            probe("default/client", "default/server", 8, "TCP"),
        ],
    )
    assert allowed(v) == [True, False, False]


def test_icmp_rule_by_type_name_echo_request_is_type_8() -> None:
    rule = {
        "fromEndpoints": [sel(app="client")],
        "icmps": [{"fields": [{"family": "IPv4", "type": "EchoRequest"}]}],
    }
    v = run(
        PODS,
        [to_server(rule)],
        [
            probe("default/client", "default/server", 8, "ICMP"),
            probe("default/client", "default/server", 0, "ICMP"),
        ],
    )
    assert allowed(v) == [True, False]


def test_icmpv6_rule_does_not_allow_icmpv4_of_the_same_type() -> None:
    rule = {
        "fromEndpoints": [sel(app="client")],
        "icmps": [{"fields": [{"family": "IPv6", "type": "EchoRequest"}]}],
    }
    v = run(
        PODS,
        [to_server(rule)],
        [
            probe("default/client", "default/server", 128, "ICMPv6"),
            probe("default/client", "default/server", 128, "ICMP"),
        ],
    )
    assert allowed(v) == [True, False]


# --- deny ------------------------------------------------------------------------------------------


def test_ingress_deny_beats_allow_from_another_cnp() -> None:
    allow = to_server({"fromEndpoints": [sel(app="client")]})
    deny = cnp(
        "deny",
        {"endpointSelector": sel(app="server"), "ingressDeny": [{"fromEndpoints": [sel(app="client")]}]},
    )
    v = run(PODS, [allow, deny], [probe("default/client", "default/server")])
    assert v[0].allowed is False
    assert v[0].reason == "deny: default/deny ingressDeny[0]"


def test_ccnp_ingress_deny_beats_cnp_allow() -> None:
    allow = to_server({"fromEndpoints": [sel(app="client")]})
    deny = ccnp("deny", {"endpointSelector": {}, "ingressDeny": [{"fromEndpoints": [sel(app="client")]}]})
    v = run(PODS, [allow, deny], [probe("default/client", "default/server")])
    assert v[0].allowed is False
    assert v[0].reason.startswith("deny: deny ingressDeny[0]")


def test_cnp_ingress_deny_beats_networkpolicy_allow() -> None:
    allow = knp("allow-all", {"podSelector": {}, "ingress": [{}]})
    deny = cnp(
        "deny",
        {
            "endpointSelector": sel(app="server"),
            "ingressDeny": [{"fromEndpoints": [sel(app="client")], "toPorts": ports("80/TCP")}],
        },
    )
    v = run(
        PODS,
        [allow, deny],
        [probe("default/client", "default/server", 80), probe("default/client", "default/server", 443)],
    )
    assert allowed(v) == [False, True]
    assert v[0].reason.startswith("deny:")


def test_port_specific_deny_beats_l3_only_allow_on_that_port_only() -> None:
    allow = to_server({"fromEndpoints": [sel(app="client")]})
    deny = cnp(
        "deny",
        {
            "endpointSelector": sel(app="server"),
            "ingressDeny": [{"fromEndpoints": [sel(app="client")], "toPorts": ports("22/TCP")}],
        },
    )
    v = run(
        PODS,
        [allow, deny],
        [probe("default/client", "default/server", 22), probe("default/client", "default/server", 23)],
    )
    assert allowed(v) == [False, True]


def test_deny_only_policy_enforces_its_direction() -> None:
    deny = cnp(
        "deny",
        {"endpointSelector": sel(app="server"), "ingressDeny": [{"fromEndpoints": [sel(app="client")]}]},
    )
    v = run(
        PODS, [deny], [probe("default/client", "default/server"), probe("default/other", "default/server")]
    )
    assert allowed(v) == [False, False]
    assert v[0].reason.startswith("deny:")
    assert v[1].reason.startswith("default-deny")


def test_egress_deny_on_a_port_range() -> None:
    allow = from_client({"toEndpoints": [sel(app="server")]})
    deny = cnp(
        "deny",
        {
            "endpointSelector": sel(app="client"),
            "egressDeny": [
                {
                    "toEndpoints": [sel(app="server")],
                    "toPorts": [{"ports": [{"port": "8000", "endPort": 8999, "protocol": "TCP"}]}],
                }
            ],
        },
    )
    v = run(
        PODS,
        [allow, deny],
        [probe("default/client", "default/server", p) for p in (7999, 8000, 8500, 8999, 9000)],
    )
    assert allowed(v) == [True, False, False, False, True]


def test_egress_deny_to_cidr_beats_to_entities_world() -> None:
    allow = from_client({"toEntities": ["world"]})
    deny = cnp(
        "deny", {"endpointSelector": sel(app="client"), "egressDeny": [{"toCIDR": ["198.51.100.0/24"]}]}
    )
    v = run(PODS, [allow, deny], client_to({"ip": "198.51.100.1"}, {"ip": "192.0.2.1"}))
    assert allowed(v) == [False, True]


# --- enforcement ---------------------------------------------------------------------------------


def test_empty_ingress_list_does_not_enforce_ingress() -> None:
    policy = cnp(
        "empty", {"endpointSelector": sel(app="server"), "ingress": [], "egress": [{"toEntities": ["world"]}]}
    )
    v = run(PODS, [policy], [probe("default/client", "default/server")])
    assert v[0].allowed is True
    assert v[0].reason.startswith("default-allow")


def test_egress_with_one_empty_rule_denies_all_egress() -> None:
    v = run(PODS, [from_client({})], client_to("default/server", {"ip": "8.8.8.8"}, {"entity": "host"}))
    assert allowed(v) == [False, False, False]
    assert all(x.reason.startswith("default-deny") for x in v)


def test_cnp_ingress_with_one_empty_rule_denies_all_ingress() -> None:
    v = run(
        PODS,
        [to_server({})],
        [probe("default/client", "default/server"), probe({"ip": "8.8.8.8"}, "default/server")],
    )
    assert allowed(v) == [False, False]


def test_egress_only_policy_leaves_ingress_open() -> None:
    v = run(
        PODS,
        [from_client({"toEndpoints": [sel(app="server")]})],
        [probe("default/other", "default/client"), probe("default/client", "default/other")],
    )
    assert allowed(v) == [True, False]


def test_enforcement_always_denies_endpoints_no_policy_selects() -> None:
    v = run(
        PODS, [], [probe("default/client", "default/server")], options=PolicyOptions(enforcement="always")
    )
    assert v[0].allowed is False
    assert v[0].reason.startswith("default-deny")


def test_enforcement_always_still_lets_the_host_in() -> None:
    # Cilium's default: no host firewall, so the host endpoint itself is never enforced.
    v = run(
        PODS,
        [],
        [
            probe({"entity": "host"}, "default/server"),
            probe({"entity": "remote-node"}, "default/server"),
            probe("default/server", {"entity": "host"}),
        ],
        options=PolicyOptions(enforcement="always", host_firewall=False),
    )
    assert allowed(v) == [True, False, False]
    assert v[0].reason.startswith("allow-localhost")


def test_enforcement_always_with_host_firewall_enforces_the_hosts_own_egress() -> None:
    # computePolicyEnforcementAndRules: only `host && !EnableHostFirewall` escapes; with the host
    # firewall on, `always` puts the host endpoint in default deny too (allow-localhost is ingress only).
    v = run(
        PODS,
        [],
        [probe({"entity": "host"}, "default/server")],
        options=PolicyOptions(enforcement="always", host_firewall=True),
    )
    assert v[0].allowed is False
    assert v[0].egress is not None and v[0].egress.allowed is False
    assert v[0].ingress is not None and v[0].ingress.reason.startswith("allow-localhost")


def test_enforcement_always_allows_what_rules_allow() -> None:
    policy = to_server({"fromEndpoints": [sel(app="client")]}, name="ingress")
    egress = from_client({"toEndpoints": [sel(app="server")]}, name="egress")
    v = run(
        PODS,
        [policy, egress],
        [probe("default/client", "default/server")],
        options=PolicyOptions(enforcement="always"),
    )
    assert v[0].allowed is True


def test_enforcement_always_ignores_enable_default_deny_false() -> None:
    policy = to_server({"fromEndpoints": [sel(app="client")]}, enableDefaultDeny={"ingress": False})
    v = run(
        PODS,
        [policy],
        [probe({"ip": "8.8.8.8"}, "default/server")],
        options=PolicyOptions(enforcement="always"),
    )
    assert v[0].allowed is False


def test_enforcement_never_allows_even_denied_traffic() -> None:
    deny = cnp(
        "deny",
        {"endpointSelector": sel(app="server"), "ingressDeny": [{"fromEndpoints": [sel(app="client")]}]},
    )
    v = run(
        PODS,
        [deny, from_client({})],
        [probe("default/client", "default/server")],
        options=PolicyOptions(enforcement="never"),
    )
    assert v[0].allowed is True


def test_enable_default_deny_false_with_deny_drops_only_denied_traffic() -> None:
    policy = cnp(
        "deny-client",
        {
            "endpointSelector": sel(app="server"),
            "enableDefaultDeny": {"ingress": False},
            "ingressDeny": [{"fromEndpoints": [sel(app="client")]}],
        },
    )
    v = run(
        PODS,
        [policy],
        [
            probe("default/client", "default/server"),
            probe("default/other", "default/server"),
            probe({"ip": "8.8.8.8"}, "default/server"),
        ],
    )
    assert allowed(v) == [False, True, True]


def test_enable_default_deny_false_is_moot_when_another_rule_enforces() -> None:
    lax = to_server({"fromEndpoints": [sel(app="client")]}, name="lax", enableDefaultDeny={"ingress": False})
    strict = to_server({"fromEndpoints": [sel(app="other")]}, name="strict")
    v = run(
        PODS,
        [lax, strict],
        [
            probe("default/client", "default/server"),
            probe("default/other", "default/server"),
            probe("prod/client", "prod/server"),
            probe({"ip": "8.8.8.8"}, "default/server"),
        ],
    )
    assert allowed(v) == [True, True, True, False]


def test_allow_localhost_lets_host_in_under_an_ingress_policy() -> None:
    v = run(
        PODS,
        [to_server({"fromEndpoints": [sel(app="client")]})],
        [probe({"entity": "host"}, "default/server"), probe({"entity": "remote-node"}, "default/server")],
    )
    assert allowed(v) == [True, False]
    assert v[0].reason.startswith("allow-localhost")


def test_allow_localhost_off_host_is_judged_by_policy() -> None:
    v = run(
        PODS,
        [to_server({"fromEndpoints": [sel(app="client")]})],
        [probe({"entity": "host"}, "default/server")],
        options=PolicyOptions(allow_localhost=False),
    )
    assert v[0].allowed is False


def test_ingress_deny_from_host_beats_allow_localhost() -> None:
    deny = cnp(
        "deny-host", {"endpointSelector": sel(app="server"), "ingressDeny": [{"fromEntities": ["host"]}]}
    )
    v = run(PODS, [deny], [probe({"entity": "host"}, "default/server")])
    assert v[0].allowed is False
    assert v[0].reason == "deny: default/deny-host ingressDeny[0]"


def test_allow_localhost_is_ingress_only() -> None:
    v = run(PODS, [from_client({"toEndpoints": [sel(app="server")]})], client_to({"entity": "host"}))
    assert v[0].allowed is False


# --- Kubernetes NetworkPolicy ------------------------------------------------------------------


def test_networkpolicy_empty_pod_selector_selects_every_pod_of_its_namespace_only() -> None:
    v = run(
        PODS,
        [knp("deny-all", {"podSelector": {}}, namespace="prod")],
        [
            probe("default/client", "prod/server"),
            probe("default/client", "prod/client"),
            probe("prod/client", "default/server"),
        ],
    )
    assert allowed(v) == [False, False, True]


def test_networkpolicy_default_policy_types_enforce_ingress_only() -> None:
    v = run(
        PODS,
        [knp("deny-ingress", {"podSelector": {"matchLabels": {"app": "server"}}})],
        [probe("default/client", "default/server"), probe("default/server", {"ip": "8.8.8.8"})],
    )
    assert allowed(v) == [False, True]


def test_networkpolicy_egress_rules_enforce_egress_without_policy_types() -> None:
    spec = {
        "podSelector": {"matchLabels": {"app": "client"}},
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "server"}}}]}],
    }
    v = run(
        PODS,
        [knp("egress", spec)],
        [*client_to("default/server", "default/other"), probe("default/other", "default/client")],
    )
    # Ingress is enforced too (policyTypes default to Ingress): nothing allows other -> client.
    assert allowed(v) == [True, False, False]


def test_networkpolicy_policy_types_egress_only_leaves_ingress_open() -> None:
    spec = {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"]}
    v = run(
        PODS,
        [knp("egress", spec)],
        [probe("default/other", "default/client"), probe("default/client", "default/other")],
    )
    assert allowed(v) == [True, False]


def test_networkpolicy_policy_types_both_without_rules_denies_both_ways() -> None:
    spec = {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Ingress", "Egress"]}
    v = run(
        PODS,
        [knp("iso", spec)],
        [probe("default/other", "default/client"), probe("default/client", "default/other")],
    )
    assert allowed(v) == [False, False]


def test_networkpolicy_ingress_with_one_empty_rule_allows_everything() -> None:
    v = run(
        PODS,
        [knp("allow-all", {"podSelector": {}, "ingress": [{}]})],
        [
            probe("prod/client", "default/server"),
            probe({"ip": "8.8.8.8"}, "default/server", 9999, "UDP"),
            probe("default/client", "default/server", 0, "ICMP"),
        ],
    )
    assert allowed(v) == [True, True, True]


def test_networkpolicy_peers_are_ored() -> None:
    spec = {
        "podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [
            {
                "from": [
                    {"podSelector": {"matchLabels": {"app": "client"}}},
                    {"namespaceSelector": {"matchLabels": {"team": "payments"}}},
                ]
            }
        ],
    }
    v = run(
        PODS,
        [knp("or", spec)],
        [
            probe("default/client", "default/server"),
            probe("prod/server", "default/server"),
            probe("default/other", "default/server"),
        ],
        namespaces=NAMESPACES,
    )
    assert allowed(v) == [True, True, False]


def test_networkpolicy_namespace_and_pod_selector_in_one_peer_are_anded() -> None:
    spec = {
        "podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [
            {
                "from": [
                    {
                        "namespaceSelector": {"matchLabels": {"team": "payments"}},
                        "podSelector": {"matchLabels": {"app": "client"}},
                    }
                ]
            }
        ],
    }
    v = run(
        PODS,
        [knp("and", spec)],
        [
            probe("prod/client", "default/server"),
            probe("prod/server", "default/server"),
            probe("default/client", "default/server"),
        ],
        namespaces=NAMESPACES,
    )
    assert allowed(v) == [True, False, False]


def test_networkpolicy_pod_selector_peer_stays_in_policy_namespace() -> None:
    spec = {
        "podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}],
    }
    v = run(
        PODS,
        [knp("same-ns", spec)],
        [probe("default/client", "default/server"), probe("prod/client", "default/server")],
    )
    assert allowed(v) == [True, False]


def test_networkpolicy_empty_namespace_selector_means_all_namespaces() -> None:
    spec = {
        "podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [{"from": [{"namespaceSelector": {}}]}],
    }
    v = run(
        PODS,
        [knp("all-ns", spec)],
        [
            probe("prod/client", "default/server"),
            probe("kube-system/coredns", "default/server"),
            probe({"ip": "8.8.8.8"}, "default/server"),
        ],
    )
    assert allowed(v) == [True, True, False]


def test_networkpolicy_port_protocol_defaults_to_tcp() -> None:
    spec = {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"ports": [{"port": 53}]}]}
    v = run(
        PODS,
        [knp("tcp", spec)],
        [
            probe("default/client", "default/server", 53, "TCP"),
            probe("default/client", "default/server", 53, "UDP"),
        ],
    )
    assert allowed(v) == [True, False]


def test_networkpolicy_port_without_number_means_all_ports_of_protocol() -> None:
    spec = {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"ports": [{"protocol": "UDP"}]}]}
    v = run(
        PODS,
        [knp("udp", spec)],
        [
            probe("default/client", "default/server", 9999, "UDP"),
            probe("default/client", "default/server", 80, "TCP"),
        ],
    )
    assert allowed(v) == [True, False]


def test_networkpolicy_end_port() -> None:
    spec = {
        "podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [{"ports": [{"port": 32000, "endPort": 32768}]}],
    }
    v = run(
        PODS,
        [knp("range", spec)],
        [probe("default/client", "default/server", p) for p in (31999, 32000, 32768, 32769)],
    )
    assert allowed(v) == [False, True, True, False]


def test_networkpolicy_named_port() -> None:
    spec = {"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}
    v = run(
        PODS,
        [knp("named", spec)],
        [probe("default/client", "default/server", 8080), probe("default/client", "default/server", 80)],
    )
    assert allowed(v) == [True, False]


@pytest.mark.parametrize("kind", ["CiliumNetworkPolicy", "NetworkPolicy"])
def test_policies_of_both_kinds_are_additive(kind: str) -> None:
    first = to_server({"fromEndpoints": [sel(app="client")]}, name="first")
    if kind == "NetworkPolicy":
        second = knp(
            "second",
            {
                "podSelector": {"matchLabels": {"app": "server"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "other"}}}]}],
            },
        )
    else:
        second = to_server({"fromEndpoints": [sel(app="other")]}, name="second")
    v = run(
        PODS,
        [first, second],
        [
            probe("default/client", "default/server"),
            probe("default/other", "default/server"),
            probe("prod/client", "default/server"),
        ],
    )
    assert allowed(v) == [True, True, False]
