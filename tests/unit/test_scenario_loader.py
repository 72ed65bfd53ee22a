"""Scenario files: loading (pods, steps, manifests, probes) and step semantics (cumulative, delete)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cilia.errors import ScenarioError
from cilia.scenario import evaluate, load_scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

PODS = """\
name: t
pods:
  - {name: a, ip: 10.0.0.1, labels: {app: a}}
  - {name: b, ip: 10.0.0.2, labels: {app: b}}
steps:
"""

# Selects b for ingress and allows nothing: a -> b is denied while it is applied.
DENY_B = """
      - apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: deny-b}
        spec:
          endpointSelector: {matchLabels: {app: b}}
          ingress: [{}]
"""

BAD_PORT = """
      - apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: bad}
        spec:
          endpointSelector: {matchLabels: {app: b}}
          ingress:
            - toPorts: [{ports: [{port: "99999"}]}]
"""


def load(text: str):
    return load_scenario(text, "t.yaml")


def load_error(text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        load(text)
    return str(info.value)


def step(name: str, probes: str = "", apply: str = "", extra: str = "") -> str:
    out = f"  - name: {name}\n"
    if extra:
        out += extra
    if apply:
        out += "    apply:" + apply
    if probes:
        out += f"    probes:\n{probes}"
    return out


def probe(text: str) -> str:
    return f"      - {text}\n"


A_TO_B = probe("{from: a, to: b, port: 80}")


def verdicts(text: str) -> list[tuple[str, bool]]:
    return [(r.step, r.verdict.allowed) for r in evaluate(load(text))]


# --- examples -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "steps"), [("starwars", 3), ("bookinfo", 4), ("mediabot-dns", 3)])
def test_example_scenario_loads(name: str, steps: int):
    sc = load_scenario((EXAMPLES / f"{name}.yaml").read_text(), f"{name}.yaml")
    assert sc.name == name
    assert len(sc.spec.steps) == steps
    assert len(sc.manifests) == steps
    assert all(p.allowed is not None for s in sc.spec.steps for p in s.probes)


@pytest.mark.parametrize("name", ["starwars", "bookinfo", "mediabot-dns"])
def test_example_scenario_meets_its_expectations(name: str):
    results = evaluate(load_scenario((EXAMPLES / f"{name}.yaml").read_text(), name))
    assert results
    assert [r.record() for r in results if not r.matches] == []


# --- malformed scenarios ------------------------------------------------------------------------


def test_unknown_pod_in_probe_from_names_its_path():
    text = PODS + step("s1", A_TO_B + probe("{from: c, to: b, port: 80}"))
    assert load_error(text) == "t.yaml: steps[0].probes[1].from: unknown pod 'c'"


def test_unknown_pod_in_probe_to_names_its_path():
    text = PODS + step("s1", A_TO_B) + step("s2", probe("{from: a, to: other/b, port: 80}"))
    assert load_error(text) == "t.yaml: steps[1].probes[0].to: unknown pod 'other/b'"


def test_invalid_manifest_in_step_two_fails_whole_scenario(monkeypatch: pytest.MonkeyPatch):
    import cilia.scenario as scenario_mod

    reached: list[str] = []
    monkeypatch.setattr(scenario_mod, "verdict", lambda *a, **k: reached.append("verdict"))
    text = PODS + step("s1", A_TO_B) + step("s2", A_TO_B, apply=BAD_PORT)
    assert load_error(text) == (
        "t.yaml: steps[1] (s2): CiliumNetworkPolicy default/bad: "
        "spec.ingress[0].toPorts[0].ports[0].port: must be 0-65535 or a port name"
    )
    assert reached == []


def test_invalid_manifest_reports_every_error_count():
    bad2 = BAD_PORT.replace("name: bad}", "name: bad2}")
    text = PODS + step("s1", A_TO_B, apply=BAD_PORT + bad2)
    msg = load_error(text)
    assert msg.startswith("t.yaml: steps[0] (s1): CiliumNetworkPolicy default/bad: ")
    assert msg.endswith("(and 1 more error)")


def test_non_policy_kind_in_apply_rejected():
    text = PODS + step(
        "s1", extra="    apply: [{apiVersion: cilia.io/v1, kind: Endpoint, metadata: {name: x}}]\n"
    )
    assert (
        load_error(text)
        == "t.yaml: steps[0] (s1): Endpoint default/x: kind: kind Endpoint is not accepted here"
    )


def test_duplicate_pod_rejected():
    text = PODS.replace("steps:", "  - {name: a, ip: 10.0.0.3}\nsteps:") + step("s1")
    assert load_error(text) == "t.yaml: pod default/a is listed twice"


def test_same_pod_name_in_other_namespace_is_fine():
    text = PODS.replace("steps:", "  - {name: a, namespace: other, ip: 10.0.0.3}\nsteps:") + step(
        "s1", probe("{from: other/a, to: a, port: 80}")
    )
    assert len(load(text).inventory.workloads) == 3


def test_bad_probe_protocol_rejected():
    text = PODS + step("s1", probe("{from: a, to: b, port: 80, protocol: FOO}"))
    msg = load_error(text)
    assert msg.startswith("t.yaml: steps[0].probes[0].protocol: ")
    assert "'TCP', 'UDP', 'SCTP', 'ICMP' or 'ICMPv6'" in msg


def test_lower_case_probe_protocol_accepted():
    sc = load(PODS + step("s1", probe("{from: a, to: b, port: 53, protocol: udp}")))
    assert sc.spec.steps[0].probes[0].protocol == "UDP"


def test_probe_port_out_of_range_rejected():
    msg = load_error(PODS + step("s1", probe("{from: a, to: b, port: 70000}")))
    assert msg.startswith("t.yaml: steps[0].probes[0].port: ")


def test_fqdn_target_without_ip_rejected():
    # The reason from the model ("fqdn needs ip") is reported, not the union's "valid string" noise.
    msg = load_error(PODS + step("s1", probe("{from: a, to: {fqdn: api.example.com}, port: 443}")))
    assert msg.startswith("t.yaml: steps[0].probes[0].to: ")
    assert "fqdn needs ip" in msg


def test_entity_target_with_ip_rejected():
    # As above: the reason ("entity cannot be combined with ip or fqdn") is what the user sees.
    msg = load_error(PODS + step("s1", probe("{from: a, to: {entity: world, ip: 1.1.1.1}, port: 443}")))
    assert msg.startswith("t.yaml: steps[0].probes[0].to: ")
    assert "entity cannot be combined with ip or fqdn" in msg


def test_fqdn_as_probe_source_rejected():
    msg = load_error(PODS + step("s1", probe("{from: {fqdn: x.example.com, ip: 1.1.1.1}, to: a, port: 80}")))
    assert msg.startswith("t.yaml: steps[0].probes[0]")
    assert "fqdn is only valid in to" in msg


def test_delete_without_kind_rejected():
    text = PODS + step("s1", extra="    delete: [{name: deny-b}]\n")
    assert load_error(text) == "t.yaml: steps[0].delete[0]: needs kind and name"


def test_scenario_without_steps_rejected():
    assert load_error("name: t\npods: []\n") == "t.yaml: steps: Field required"


def test_scenario_not_a_mapping_rejected():
    assert load_error("- a\n- b\n") == "t.yaml: a scenario must be a mapping with name, pods and steps"


def test_scenario_yaml_syntax_error_is_one_line():
    msg = load_error("name: [\n")
    assert msg.startswith("t.yaml: not valid YAML: ")
    assert "\n" not in msg


def test_pod_bad_ip_rejected():
    msg = load_error("name: t\npods: [{name: a, ip: 10.0.0.300}]\nsteps: []\n")
    assert msg.startswith("t.yaml: pods[0].ip: ")
    assert "10.0.0.300" in msg


def test_pod_bad_label_rejected():
    msg = load_error("name: t\npods: [{name: a, labels: {'bad key': x}}]\nsteps: []\n")
    assert msg.startswith("t.yaml: pods[0].labels: invalid label key 'bad key'")


def test_pod_named_port_out_of_range_rejected():
    # A named port must be 1-65535, in scenarios as in the Endpoint resource model.
    msg = load_error("name: t\npods: [{name: a, ports: {http: 99999}}]\nsteps: []\n")
    assert msg.startswith("t.yaml: pod default/a: ports: ")


# --- step semantics -----------------------------------------------------------------------------


def test_delete_of_missing_policy_fails_at_evaluation():
    text = PODS + step("s1", A_TO_B, extra="    delete: [{kind: CiliumNetworkPolicy, name: nope}]\n")
    sc = load(text)  # loading does not know what earlier steps created
    with pytest.raises(ScenarioError) as info:
        evaluate(sc)
    assert str(info.value) == "steps[0] (s1): delete: CiliumNetworkPolicy default/nope not found"


def test_cumulative_false_starts_from_no_policy():
    text = (
        PODS
        + step("apply", A_TO_B, apply=DENY_B)
        + step("cumulative", A_TO_B)
        + step("fresh", A_TO_B, extra="    cumulative: false\n")
    )
    assert verdicts(text) == [("apply", False), ("cumulative", False), ("fresh", True)]


def test_cumulative_false_applies_its_own_policies():
    text = PODS + step("s1", A_TO_B) + step("fresh", A_TO_B, apply=DENY_B, extra="    cumulative: false\n")
    assert verdicts(text) == [("s1", True), ("fresh", False)]


def test_delete_then_probe():
    text = (
        PODS
        + step("apply", A_TO_B, apply=DENY_B)
        + step("delete", A_TO_B, extra="    delete: [{kind: CiliumNetworkPolicy, name: deny-b}]\n")
    )
    assert verdicts(text) == [("apply", False), ("delete", True)]


def test_delete_with_explicit_namespace():
    policy = DENY_B.replace("metadata: {name: deny-b}", "metadata: {name: deny-b, namespace: default}")
    text = (
        PODS
        + step("apply", A_TO_B, apply=policy)
        + step(
            "delete",
            A_TO_B,
            extra="    delete: [{kind: CiliumNetworkPolicy, name: deny-b, namespace: default}]\n",
        )
    )
    assert verdicts(text) == [("apply", False), ("delete", True)]


def test_reapplying_same_policy_replaces_it():
    allow = DENY_B.replace("ingress: [{}]", "ingress: [{fromEndpoints: [{matchLabels: {app: a}}]}]")
    text = PODS + step("deny", A_TO_B, apply=DENY_B) + step("replace", A_TO_B, apply=allow)
    assert verdicts(text) == [("deny", False), ("replace", True)]


def test_probe_to_pod_ip_resolves_to_that_pod():
    text = PODS + step("s1", probe("{from: a, to: {ip: 10.0.0.2}, port: 80}"), apply=DENY_B)
    (r,) = evaluate(load(text))
    assert r.verdict.allowed is False
    assert r.record()["to"] == {"ip": "10.0.0.2"}


def test_probe_result_matches_expectation_flag():
    text = PODS + step("s1", probe("{from: a, to: b, port: 80, allowed: true}"), apply=DENY_B)
    (r,) = evaluate(load(text))
    assert (r.expected, r.verdict.allowed, r.matches) == (True, False, False)
