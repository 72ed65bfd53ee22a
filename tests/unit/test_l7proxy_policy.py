"""The L7 proxy's verdicts: Cilium's Envoy semantics over the agent's rules, the node-local API's
rule format, and agreement with the engine's own L7 verdict (what `cilia policy matrix` says)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cilia.policy.l4 import PortRange
from cilia.policy.l7 import HeaderMatch, HTTPRequest, HTTPRule
from cilia.policy.mapstate import L7Filter, l7_allowed
from services.datapath.agent import l7_rule_doc
from services.l7proxy.policy import (
    DirectionRules,
    Filter,
    HeaderEdit,
    PolicyAnswerError,
    PortPolicy,
    decide,
    http_rule_from_doc,
    parse_answer,
)

LANDING = HTTPRule(method="POST", path="/v1/request-landing")


def port_policy(*checks: DirectionRules) -> PortPolicy:
    return PortPolicy(revision=1, src_identity=25698, dst_identity=6822, ingress_applied=True, checks=checks)


def ingress(*filters: Filter, enforced: bool = True) -> DirectionRules:
    return DirectionRules(
        "ingress", "default/deathstar-1", "default/rule1 ingress[0]", enforced=enforced, filters=filters
    )


def test_the_star_wars_rule_lets_only_the_landing_request_through() -> None:
    policy = port_policy(ingress(Filter("default/rule1 ingress[0]", (LANDING,))))
    ok = decide(policy, "POST", "/v1/request-landing", "deathstar", [])
    assert (ok.allowed, ok.reason) == (True, "default/rule1 ingress[0] http[0]")
    for method, path in (
        ("PUT", "/v1/exhaust-port"),
        ("POST", "/v1/request-landing/extra"),
        ("GET", "/v1/request-landing"),
    ):
        no = decide(policy, method, path, "deathstar", [])
        assert (no.allowed, no.reason) == (False, "http: no rule matches (default/rule1 ingress[0])")


def test_the_rules_of_every_allow_on_the_port_are_ored_and_an_l3_allow_lets_everything_through() -> None:
    policy = port_policy(
        ingress(
            Filter("default/a ingress[0]", (HTTPRule(method="GET"),)),
            Filter("default/b ingress[0]", (LANDING,)),
        )
    )
    assert decide(policy, "POST", "/v1/request-landing", "", []).reason == "default/b ingress[0] http[0]"
    assert decide(policy, "GET", "/anything", "", []).allowed
    assert not decide(policy, "DELETE", "/", "", []).allowed
    wide = port_policy(ingress(Filter("default/b ingress[0]", (LANDING,)), Filter("default/l3 ingress[0]")))
    assert decide(wide, "DELETE", "/", "", []).reason == "default/l3 ingress[0]"


def test_both_directions_must_allow_and_a_direction_without_default_deny_allows_all() -> None:
    egress = DirectionRules(
        "egress",
        "default/tiefighter",
        "default/e egress[0]",
        filters=(Filter("default/e egress[0]", (HTTPRule(method="POST"),)),),
    )
    both = port_policy(egress, ingress(Filter("default/rule1 ingress[0]", (LANDING,))))
    assert decide(both, "POST", "/v1/request-landing", "", []).allowed
    assert not decide(both, "POST", "/v1/other", "", []).allowed  # ingress says no
    assert not decide(both, "GET", "/v1/request-landing", "", []).allowed  # egress says no
    open_ingress = port_policy(ingress(Filter("x", (LANDING,)), enforced=False))
    assert decide(open_ingress, "PUT", "/v1/exhaust-port", "", []).allowed  # ensureWildcard


def test_a_direction_the_datapath_now_denies_denies_and_non_http_redirects_are_not_inspected() -> None:
    denied = port_policy(
        DirectionRules("ingress", "default/deathstar-1", "deny: default/x ingressDeny[0]", deny=True)
    )
    d = decide(denied, "POST", "/v1/request-landing", "", [])
    assert (d.allowed, d.reason) == (False, "denied at L3/L4: deny: default/x ingressDeny[0]")
    dns = port_policy(DirectionRules("egress", "default/a", "r", parser="dns"))
    assert decide(dns, "GET", "/", "", []).allowed


def test_headers_must_be_present_or_equal_and_names_ignore_case() -> None:
    policy = port_policy(ingress(Filter("r", (HTTPRule(headers=("X-Token: sith", "X-Trace")),))))
    assert decide(policy, "GET", "/", "", [("x-token", "sith"), ("X-TRACE", "1")]).allowed
    assert not decide(policy, "GET", "/", "", [("X-Token", "jedi"), ("X-Trace", "1")]).allowed
    assert not decide(policy, "GET", "/", "", [("X-Token", "sith")]).allowed


def hm_rule(path: str, *matches: HeaderMatch) -> HTTPRule:
    return HTTPRule(method="GET", path=path, header_matches=matches)


@pytest.mark.parametrize(
    ("mismatch", "headers", "edits", "missing", "rejected"),
    [
        ("LOG", [("X-Token", "jedi")], (), (("X-Token", "sith"),), ()),
        ("ADD", [("X-Token", "jedi")], (HeaderEdit("add", "X-Token", "sith"),), (("X-Token", "sith"),), ()),
        ("DELETE", [("X-Token", "jedi")], (HeaderEdit("remove", "X-Token"),), (), (("X-Token", "jedi"),)),
        ("DELETE", [], (), (), ()),  # nothing to delete
        (
            "REPLACE",
            [("X-Token", "jedi")],
            (HeaderEdit("set", "X-Token", "sith"),),
            (("X-Token", "sith"),),
            (("X-Token", "jedi"),),
        ),
        ("REPLACE", [], (HeaderEdit("set", "X-Token", "sith"),), (("X-Token", "sith"),), ()),
    ],
)
def test_a_mismatch_action_lets_the_request_through_and_edits_or_logs_it(
    mismatch: str, headers: list[tuple[str, str]], edits: tuple[HeaderEdit, ...], missing: Any, rejected: Any
) -> None:
    policy = port_policy(ingress(Filter("r", (hm_rule("/a", HeaderMatch("X-Token", "sith", mismatch)),))))
    d = decide(policy, "GET", "/a", "", headers)
    assert (d.allowed, d.edits, d.missing, d.rejected) == (True, edits, missing, rejected)
    matching = decide(policy, "GET", "/a", "", [("X-Token", "sith")])
    assert (matching.allowed, matching.edits, matching.missing) == (True, (), ())


def test_a_header_match_without_action_must_match_and_an_empty_value_means_present() -> None:
    policy = port_policy(
        ingress(
            Filter("r", (hm_rule("/a", HeaderMatch("X-Token", "sith")), hm_rule("/p", HeaderMatch("X-Id"))))
        )
    )
    assert decide(policy, "GET", "/a", "", [("X-Token", "sith")]).allowed
    no = decide(policy, "GET", "/a", "", [("X-Token", "jedi")])
    assert (no.allowed, no.missing) == (False, (("X-Token", "sith"),))
    assert decide(policy, "GET", "/p", "", [("x-id", "")]).allowed
    assert not decide(policy, "GET", "/p", "", []).allowed
    # DELETE of a presence match that failed has nothing to remove
    pres = port_policy(ingress(Filter("r", (hm_rule("/p", HeaderMatch("X-Id", None, "DELETE")),))))
    assert decide(pres, "GET", "/p", "", []).edits == ()


def test_with_header_matches_every_rule_runs_on_the_headers_earlier_actions_left() -> None:
    """As Envoy: once a port has header matches there is no short cut; a rule that fails still
    runs its actions, and a later rule sees their effect."""
    rules = (
        hm_rule("/x", HeaderMatch("A", "1"), HeaderMatch("B", "2", "ADD")),  # fails on A, adds B
        HTTPRule(method="GET", path="/x", headers=("B: 2",)),  # matches only thanks to the ADD
    )
    d = decide(port_policy(ingress(Filter("r", rules))), "GET", "/x", "", [])
    assert (d.allowed, d.reason, d.edits) == (True, "r http[1]", (HeaderEdit("add", "B", "2"),))
    # Two allows of the port: both run their actions.
    two = port_policy(
        ingress(
            Filter("r1", (hm_rule("/x", HeaderMatch("X-One", "1", "ADD")),)),
            Filter("r2", (hm_rule("/x", HeaderMatch("X-Two", "2", "ADD")),)),
        )
    )
    assert [e.name for e in decide(two, "GET", "/x", "", []).edits] == ["X-One", "X-Two"]


def test_several_fields_of_one_header_read_as_one_comma_joined_value() -> None:
    policy = port_policy(ingress(Filter("r", (HTTPRule(headers=("Accept: a,b",)),))))
    assert decide(policy, "GET", "/", "", [("Accept", "a"), ("accept", "b")]).allowed


RULES = [
    HTTPRule(),
    LANDING,
    HTTPRule(method="GET|HEAD", path="/public/.*"),
    HTTPRule(host="(www\\.)?example\\.com", headers=("X-Token: sith",)),
    HTTPRule(path="/v1/[a-z]+", headers=("X-Trace",)),
    HTTPRule(method="PUT", header_matches=(HeaderMatch("X-Token", "sith"),)),
    HTTPRule(method="DELETE", header_matches=(HeaderMatch("X-Id"),)),
]


@pytest.mark.parametrize("rule", RULES)
def test_the_agent_sends_rules_the_proxy_reads_back_unchanged(rule: HTTPRule) -> None:
    assert http_rule_from_doc(l7_rule_doc(rule)) == rule


def test_an_error_answer_or_a_malformed_one_is_an_error() -> None:
    with pytest.raises(PolicyAnswerError, match="no policy snapshot"):
        parse_answer({"ok": False, "error": "the agent has no policy snapshot yet"})
    with pytest.raises(PolicyAnswerError, match="malformed"):
        parse_answer({"ok": True, "checks": []})
    answer = {
        "ok": True,
        "revision": 7,
        "src_identity": 25698,
        "dst_identity": 6822,
        "ingress_applied": True,
        "checks": [
            {
                "direction": "ingress",
                "endpoint": "default/deathstar-1",
                "parser": "http",
                "enforced": True,
                "reason": "default/rule1 ingress[0]",
                "filters": [
                    {"reason": "default/rule1 ingress[0]", "exact": True, "rules": [l7_rule_doc(LANDING)]}
                ],
            }
        ],
        "source": {"ID": 2, "identity": 25698, "pod_name": "tiefighter"},
    }
    policy = parse_answer(answer)
    assert policy.revision == 7 and policy.direction == "INGRESS"
    assert policy.checks[0].filters == (Filter("default/rule1 ingress[0]", (LANDING,)),)


METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"])
PATHS = st.sampled_from(
    ["/", "/public/a", "/public/", "/v1/request-landing", "/v1/abc", "/v1/ABC", "/private"]
)
HOSTS = st.sampled_from(["", "example.com", "www.example.com", "evil.com"])
HEADERS = st.lists(
    st.tuples(
        st.sampled_from(["X-Token", "x-trace", "X-Id", "Accept"]), st.sampled_from(["sith", "jedi", "1"])
    ),
    max_size=3,
)
FILTERS = st.lists(st.lists(st.sampled_from(RULES), max_size=3), min_size=1, max_size=3)


@settings(max_examples=400, deadline=None)
@given(FILTERS, METHODS, PATHS, HOSTS, HEADERS)
def test_without_actions_the_proxy_agrees_with_the_engine_on_every_request(
    filters: list[list[HTTPRule]], method: str, path: str, host: str, headers: list[tuple[str, str]]
) -> None:
    """The proxy and `cilia policy matrix` decide alike (headerMatches without actions included)."""
    named = [(f"default/p{i} ingress[0]", tuple(rules)) for i, rules in enumerate(filters)]
    engine_filters = [
        L7Filter("ingress", None, PortRange(6, 80, 80), True, rules, name) for name, rules in named
    ]
    mapping: dict[str, str] = {}
    for k, _ in headers:
        mapping.setdefault(k.lower(), ",".join(val for key, val in headers if key.lower() == k.lower()))
    engine = l7_allowed(
        engine_filters, "ingress", 25698, 6, 80, "http", HTTPRequest(method, path, host, mapping)
    )
    proxy = decide(port_policy(ingress(*(Filter(n, r) for n, r in named))), method, path, host, headers)
    assert proxy.allowed == engine[0]
    if proxy.allowed:
        assert proxy.reason == engine[1]
