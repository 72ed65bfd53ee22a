"""Cilium's L7 semantics: HTTP rules as Cilium's Envoy filter judges them, DNS rules as the DNS proxy does.

Ground truth: /work/notes/semantics-A.md Q3 (L7 merging, wildcard selectors, what Envoy allows),
Q5 (DNS proxy CheckAllowed), Q8 (HTTP matching), and pkg/policy/l4.go `createL4Filter` /
`ensureWildcard` (cilium/cilium main) for enableDefaultDeny with L7 rules.
"""

from __future__ import annotations

from scenario_helpers import allowed, cnp, pod, ports, probe, run, sel

from cilia.policy.context import PolicyOptions
from cilia.policy.l7 import HeaderMatch, HTTPRequest, HTTPRule, http_rule_matches

PODS = [
    pod("client", "10.0.1.1", {"app": "client"}),
    pod("server", "10.0.1.2", {"app": "server"}),
    pod("other", "10.0.1.3", {"app": "other"}),
    pod("xwing", "10.0.1.4", {"app": "xwing"}),
    pod("coredns", "10.0.0.10", {"k8s-app": "kube-dns"}, namespace="kube-system"),
]
CORE_DNS = {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s:k8s-app": "kube-dns"}}


def req(method: str = "GET", path: str = "/", host: str = "", **headers: str) -> HTTPRequest:
    return HTTPRequest(method, path, host, {k.replace("_", "-"): v for k, v in headers.items()})


def http_ingress(*http: dict, peer: dict | None = None, name: str = "http", **extra: object) -> dict:
    """A CNP on app=server allowing `peer` (default app=client) on 80/TCP with these HTTP rules."""
    rule = {
        "fromEndpoints": [peer or sel(app="client")],
        "toPorts": ports("80/TCP", rules={"http": list(http)}),
    }
    return cnp(name, {"endpointSelector": sel(app="server"), "ingress": [rule], **extra})


def get(src: str, path: str, method: str = "GET", dst: str = "default/server", **more: object) -> dict:
    return probe(src, dst, 80, "TCP", http={"method": method, "path": path, **more})


def dns_egress(*rules: dict, name: str = "dns", **extra: object) -> dict:
    return cnp(name, {"endpointSelector": sel(app="client"), "egress": list(rules), **extra})


def dns_rule(*names_or_patterns: dict, port: str = "53") -> dict:
    return {"toEndpoints": [CORE_DNS], "toPorts": ports(port, rules={"dns": list(names_or_patterns)})}


def query(name: str, src: str = "default/client") -> dict:
    return probe(src, "kube-system/coredns", 53, "UDP", dns={"query": name})


# --- HTTP matching ------------------------------------------------------------------------------


def test_http_path_regex_with_wildcard_allows_subpaths() -> None:
    rule = HTTPRule(path="/v1/.*")
    assert http_rule_matches(rule, req(path="/v1/"))
    assert http_rule_matches(rule, req(path="/v1/ships/42"))
    assert not http_rule_matches(rule, req(path="/v2/ships"))


def test_http_path_is_a_full_match_not_a_prefix() -> None:
    rule = HTTPRule(path="/v1")
    assert http_rule_matches(rule, req(path="/v1"))
    assert not http_rule_matches(rule, req(path="/v1/x"))
    assert not http_rule_matches(rule, req(path="/api/v1"))


def test_http_path_includes_the_query_string() -> None:
    assert not http_rule_matches(HTTPRule(path="/public"), req(path="/public?x=1"))
    assert http_rule_matches(HTTPRule(path="/public.*"), req(path="/public?x=1"))


def test_http_path_alternation_is_anchored_as_a_whole() -> None:
    rule = HTTPRule(path="/a|/b")
    assert http_rule_matches(rule, req(path="/a"))
    assert http_rule_matches(rule, req(path="/b"))
    assert not http_rule_matches(rule, req(path="/a/x"))
    assert not http_rule_matches(rule, req(path="/x/b"))


def test_http_method_is_a_case_sensitive_full_match_regex() -> None:
    assert http_rule_matches(HTTPRule(method="GET|HEAD"), req("HEAD"))
    assert not http_rule_matches(HTTPRule(method="GET"), req("get"))
    assert not http_rule_matches(HTTPRule(method="GE"), req("GET"))


def test_http_host_is_a_full_match_regex() -> None:
    rule = HTTPRule(host="api\\.example\\.com")
    assert http_rule_matches(rule, req(host="api.example.com"))
    assert not http_rule_matches(rule, req(host="www.api.example.com"))
    assert not http_rule_matches(rule, req(host="api.example.com.evil.org"))


def test_all_fields_of_one_http_rule_must_match() -> None:
    rule = HTTPRule(method="POST", path="/v1/request-landing")
    assert http_rule_matches(rule, req("POST", "/v1/request-landing"))
    assert not http_rule_matches(rule, req("GET", "/v1/request-landing"))
    assert not http_rule_matches(rule, req("POST", "/v1/other"))


def test_empty_http_rule_matches_every_request() -> None:
    assert http_rule_matches(HTTPRule(), req("DELETE", "/anything?q=1", "h"))


def test_http_header_by_name_requires_presence() -> None:
    rule = HTTPRule(headers=("X-Token",))
    assert http_rule_matches(rule, req(X_Token="anything"))
    assert http_rule_matches(rule, req(x_token=""))  # header names are case-insensitive
    assert not http_rule_matches(rule, req())


def test_http_header_name_colon_value_requires_exact_value() -> None:
    rule = HTTPRule(headers=("X-Mode: strict",))
    assert http_rule_matches(rule, req(X_Mode="strict"))
    assert not http_rule_matches(rule, req(X_Mode="lax"))
    assert not http_rule_matches(rule, req(X_Mode="strict-ish"))
    assert not http_rule_matches(rule, req())


def test_http_header_without_space_after_colon_is_a_presence_match_on_the_whole_text() -> None:
    # Cilium splits on the first space: "X-Mode:strict" is the name of a header that must be present.
    rule = HTTPRule(headers=("X-Mode:strict",))
    assert not http_rule_matches(rule, req(X_Mode="strict"))


def test_header_matches_without_mismatch_must_match() -> None:
    rule = HTTPRule(header_matches=(HeaderMatch("X-Env", "prod"),))
    assert http_rule_matches(rule, req(X_Env="prod"))
    assert not http_rule_matches(rule, req(X_Env="dev"))
    assert not http_rule_matches(rule, req())


def test_header_matches_without_value_is_a_presence_match() -> None:
    rule = HTTPRule(header_matches=(HeaderMatch("X-Env"),))
    assert http_rule_matches(rule, req(X_Env="anything"))
    assert not http_rule_matches(rule, req())


def test_header_matches_with_mismatch_log_never_denies() -> None:
    rule = HTTPRule(path="/x", header_matches=(HeaderMatch("X-Env", "prod", "LOG"),))
    assert http_rule_matches(rule, req(path="/x", X_Env="dev"))
    assert http_rule_matches(rule, req(path="/x"))
    assert not http_rule_matches(rule, req(path="/y", X_Env="prod"))  # the other conditions still apply


def test_header_matches_in_a_policy() -> None:
    policy = http_ingress(
        {"path": "/strict", "headerMatches": [{"name": "X-Env", "value": "prod"}]},
        {"path": "/logged", "headerMatches": [{"name": "X-Env", "value": "prod", "mismatch": "LOG"}]},
    )
    v = run(
        PODS,
        [policy],
        [
            get("default/client", "/strict", headers={"X-Env": "prod"}),
            get("default/client", "/strict", headers={"X-Env": "dev"}),
            get("default/client", "/logged", headers={"X-Env": "dev"}),
        ],
    )
    assert allowed(v) == [True, False, True]


# --- HTTP rules in policies ----------------------------------------------------------------------


def test_http_rules_restrict_requests_and_say_which_rule_allowed() -> None:
    v = run(
        PODS,
        [http_ingress({"method": "GET", "path": "/public"})],
        [get("default/client", "/public"), get("default/client", "/private")],
    )
    assert allowed(v) == [True, False]
    assert v[0].reason == "default/http ingress[0] http[0]"
    assert v[0].redirect == "http"
    assert v[1].reason.startswith("l7-deny:")
    assert v[1].redirect == "http"


def test_http_rules_of_two_rules_for_the_same_peer_are_ored() -> None:
    a = http_ingress({"path": "/a"}, name="a")
    b = http_ingress({"path": "/b"}, name="b")
    v = run(
        PODS, [a, b], [get("default/client", "/a"), get("default/client", "/b"), get("default/client", "/c")]
    )
    assert allowed(v) == [True, True, False]


def test_http_rules_of_two_selectors_matching_the_peer_are_ored() -> None:
    a = http_ingress({"path": "/a"}, name="a")
    b = http_ingress(
        {"path": "/b"},
        name="b",
        peer={"matchExpressions": [{"key": "app", "operator": "In", "values": ["client", "other"]}]},
    )
    v = run(
        PODS,
        [a, b],
        [
            get("default/client", "/a"),
            get("default/client", "/b"),
            get("default/other", "/a"),
            get("default/other", "/b"),
        ],
    )
    assert allowed(v) == [True, True, False, True]


def test_wildcard_peer_http_rule_applies_to_every_peer() -> None:
    policy = cnp(
        "any",
        {
            "endpointSelector": sel(app="server"),
            "ingress": [{"toPorts": ports("80/TCP", rules={"http": [{"path": "/health"}]})}],
        },
    )
    v = run(
        PODS,
        [policy],
        [get("default/other", "/health"), get("default/other", "/admin"), get("default/xwing", "/health")],
    )
    assert allowed(v) == [True, False, True]


def test_rule_without_l7_for_the_same_peer_and_port_lets_every_request_through_redirected() -> None:
    l7 = http_ingress({"path": "/public"}, name="l7")
    l4 = cnp(
        "l4",
        {
            "endpointSelector": sel(app="server"),
            "ingress": [{"fromEndpoints": [sel(app="client")], "toPorts": ports("80/TCP")}],
        },
    )
    v = run(PODS, [l7, l4], [get("default/client", "/private", "DELETE")])
    assert v[0].allowed is True
    assert v[0].redirect == "http"


def test_l3_only_allow_of_the_same_peer_lets_every_http_request_through() -> None:
    l7 = http_ingress({"path": "/public"}, name="l7")
    l3 = cnp(
        "l3", {"endpointSelector": sel(app="server"), "ingress": [{"fromEndpoints": [sel(app="client")]}]}
    )
    v = run(PODS, [l7, l3], [get("default/client", "/private", "DELETE")])
    assert v[0].allowed is True
    assert v[0].redirect == "http"


def test_l3_only_allow_of_another_peer_does_not_widen_http_rules() -> None:
    l7 = http_ingress({"path": "/public"}, name="l7")
    l3 = cnp(
        "l3", {"endpointSelector": sel(app="server"), "ingress": [{"fromEndpoints": [sel(app="other")]}]}
    )
    v = run(PODS, [l7, l3], [get("default/client", "/private"), get("default/other", "/private")])
    assert allowed(v) == [False, True]
    assert v[1].redirect is None  # other is only allowed at L3: its traffic bypasses the proxy


def test_peer_not_allowed_at_l3_l4_is_denied_whatever_the_request() -> None:
    v = run(
        PODS,
        [http_ingress({"method": "POST", "path": "/v1/request-landing"})],
        [get("default/xwing", "/v1/request-landing", "POST")],
    )
    assert v[0].allowed is False
    assert v[0].reason.startswith("default-deny")


def test_http_rules_apply_only_to_their_port() -> None:
    policy = cnp(
        "two-ports",
        {
            "endpointSelector": sel(app="server"),
            "ingress": [
                {
                    "fromEndpoints": [sel(app="client")],
                    "toPorts": ports("80/TCP", rules={"http": [{"path": "/public"}]}),
                },
                {"fromEndpoints": [sel(app="client")], "toPorts": ports("8080/TCP")},
            ],
        },
    )
    v = run(
        PODS,
        [policy],
        [
            get("default/client", "/private"),
            probe(
                "default/client", "default/server", 8080, "TCP", http={"method": "GET", "path": "/private"}
            ),
        ],
    )
    assert allowed(v) == [False, True]
    assert v[1].redirect is None


def test_host_is_let_through_an_l7_port_that_selects_it() -> None:
    # l4.go attach(): a redirecting selector that selects reserved:host gets the host added with no L7
    # rules when allow-localhost is on, so every request from the host passes.
    policy = cnp(
        "any",
        {
            "endpointSelector": sel(app="server"),
            "ingress": [{"toPorts": ports("80/TCP", rules={"http": [{"path": "/health"}]})}],
        },
    )
    v = run(
        PODS,
        [policy],
        [probe({"entity": "host"}, "default/server", 80, "TCP", http={"method": "GET", "path": "/admin"})],
    )
    assert v[0].allowed is True


def test_egress_http_rules() -> None:
    policy = cnp(
        "egress-http",
        {
            "endpointSelector": sel(app="client"),
            "egress": [
                {
                    "toEndpoints": [sel(app="server")],
                    "toPorts": ports("80/TCP", rules={"http": [{"method": "GET"}]}),
                }
            ],
        },
    )
    v = run(PODS, [policy], [get("default/client", "/x"), get("default/client", "/x", "POST")])
    assert allowed(v) == [True, False]
    assert v[1].egress is not None and v[1].egress.reason.startswith("l7-deny:")


def test_enable_default_deny_false_with_http_rules_lets_every_request_through() -> None:
    policy = http_ingress({"method": "GET", "path": "/public"}, enableDefaultDeny={"ingress": False})
    v = run(
        PODS,
        [policy],
        [
            get("default/client", "/private", "POST"),
            get("default/client", "/public"),
            get("default/xwing", "/private", "POST"),
        ],
    )
    assert allowed(v) == [True, True, True]


def test_enable_default_deny_false_does_not_widen_l7_when_another_rule_enforces() -> None:
    # Cilium: pkg/policy/l4.go createL4Filter adds the L7 wildcard only when
    # `!policyCtx.DefaultDenyIngress()`, and resolve.go sets that from hasIngressDefaultDeny, i.e. from
    # ALL rules selecting the endpoint. Here "strict" enforces default deny, so the HTTP rule of "lax"
    # is not widened and POST /private is denied.
    lax = http_ingress({"method": "GET", "path": "/public"}, name="lax", enableDefaultDeny={"ingress": False})
    strict = cnp(
        "strict", {"endpointSelector": sel(app="server"), "ingress": [{"fromEndpoints": [sel(app="other")]}]}
    )
    v = run(
        PODS, [lax, strict], [get("default/client", "/public"), get("default/client", "/private", "POST")]
    )
    assert allowed(v) == [True, False]


def test_enable_default_deny_false_does_not_widen_l7_under_enforcement_always() -> None:
    # Cilium: with enable-policy=always, computePolicyEnforcementAndRules returns
    # hasIngressDefaultDeny=true, so ensureWildcard is not applied (same source as above).
    lax = http_ingress({"method": "GET", "path": "/public"}, enableDefaultDeny={"ingress": False})
    v = run(
        PODS,
        [lax],
        [get("default/client", "/public"), get("default/client", "/private", "POST")],
        options=PolicyOptions(enforcement="always", host_firewall=False),
    )
    # client's own egress is default-deny under "always"; judge the server's ingress side.
    assert v[0].ingress is not None and v[0].ingress.allowed is True
    assert v[1].ingress is not None and v[1].ingress.allowed is False


# --- DNS rules -----------------------------------------------------------------------------------


def test_dns_match_pattern_star_matches_one_label_of_cluster_local_names() -> None:
    v = run(
        PODS,
        [dns_egress(dns_rule({"matchPattern": "*.svc.cluster.local"}))],
        [
            query("default.svc.cluster.local"),
            query("db.default.svc.cluster.local"),
            query("svc.cluster.local"),
        ],
    )
    assert allowed(v) == [True, False, False]
    assert v[0].redirect == "dns"


def test_dns_refused_name_is_denied_with_dns_deny_reason() -> None:
    v = run(
        PODS,
        [dns_egress(dns_rule({"matchName": "api.github.com"}))],
        [query("api.github.com"), query("evil.com")],
    )
    assert allowed(v) == [True, False]
    assert v[0].reason == "default/dns egress[0] dns[0]"
    assert v[1].reason.startswith("dns-deny:")
    assert v[1].redirect == "dns"


def test_dns_match_name_is_case_insensitive_and_ignores_trailing_dot() -> None:
    v = run(
        PODS,
        [dns_egress(dns_rule({"matchName": "API.GitHub.com"}))],
        [query("api.github.com."), query("Api.GITHUB.com")],
    )
    assert allowed(v) == [True, True]


def test_dns_match_pattern_star_alone_allows_every_name() -> None:
    v = run(
        PODS,
        [dns_egress(dns_rule({"matchPattern": "*"}))],
        [query("anything.example.org"), query("localhost")],
    )
    assert allowed(v) == [True, True]


def test_dns_rules_of_two_rules_are_ored() -> None:
    a = dns_egress(dns_rule({"matchName": "a.example.com"}), name="a")
    b = dns_egress(dns_rule({"matchName": "b.example.com"}), name="b")
    v = run(PODS, [a, b], [query("a.example.com"), query("b.example.com"), query("c.example.com")])
    assert allowed(v) == [True, True, False]


def test_dns_rules_to_a_server_not_selected_do_not_apply() -> None:
    rule = {
        "toEndpoints": [sel(app="server")],
        "toPorts": ports("53", rules={"dns": [{"matchPattern": "*"}]}),
    }
    v = run(PODS, [dns_egress(rule)], [query("api.github.com")])
    assert v[0].allowed is False
    assert v[0].reason.startswith("default-deny")


def test_l3_only_allow_to_the_dns_server_does_not_widen_dns_rules() -> None:
    # semantics-A.md Q5: the DNS proxy of 53/UDP only knows the selectors of that port's own L4
    # filter; an L3-only rule is the 0/ANY filter, so the query stays restricted to the DNS rules.
    policy = dns_egress(dns_rule({"matchName": "api.github.com"}), {"toEndpoints": [CORE_DNS]})
    v = run(
        PODS,
        [policy],
        [
            query("api.github.com"),
            query("evil.com"),
            probe("default/client", "kube-system/coredns", 9153, "TCP"),
        ],
    )
    assert allowed(v) == [True, False, True]
    assert v[1].reason.startswith("dns-deny:")


def test_port_wide_allow_to_the_dns_server_does_not_widen_dns_rules() -> None:
    # 0/UDP is another L4 filter than 53/UDP, like the L3-only case.
    policy = dns_egress(
        dns_rule({"matchName": "api.github.com"}), {"toEndpoints": [CORE_DNS], "toPorts": ports("0/UDP")}
    )
    v = run(PODS, [policy], [query("evil.com")])
    assert v[0].allowed is False


def test_another_rule_allowing_port_53_without_dns_rules_widens_the_dns_rules() -> None:
    policy = dns_egress(
        dns_rule({"matchName": "api.github.com"}), {"toEndpoints": [CORE_DNS], "toPorts": ports("53/UDP")}
    )
    v = run(PODS, [policy], [query("evil.com")])
    assert v[0].allowed is True
    assert v[0].redirect == "dns"


def test_enable_default_deny_false_with_dns_rules_lets_every_query_through() -> None:
    policy = dns_egress(dns_rule({"matchName": "api.github.com"}), enableDefaultDeny={"egress": False})
    v = run(PODS, [policy], [query("evil.com"), probe("default/client", "default/server", 443)])
    assert allowed(v) == [True, True]
