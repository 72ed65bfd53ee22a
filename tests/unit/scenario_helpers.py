"""Small builders for the semantic tests: pods, policies and probes as scenario data, and a runner.

Every helper returns plain dicts shaped like the scenario YAML (ARCHITECTURE.md §8), so a test reads
like the manifest a user would write. `run()` dumps them to YAML, loads them through
`load_scenario` (the user-facing path, validation included) and returns one `Verdict` per probe.
"""

from __future__ import annotations

from typing import Any

import yaml

from cilia.policy.context import PolicyOptions
from cilia.policy.verdict import Verdict
from cilia.scenario import evaluate, load_scenario


def pod(
    name: str,
    ip: str,
    labels: dict[str, str] | None = None,
    namespace: str = "default",
    ports: dict[str, int | str] | None = None,
    service_account: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "namespace": namespace, "ip": ip, "labels": dict(labels or {})}
    if ports:
        out["ports"] = dict(ports)
    if service_account:
        out["serviceAccount"] = service_account
    return out


def cnp(name: str, spec: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def ccnp(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def knp(name: str, spec: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def probe(
    src: str | dict[str, str], dst: str | dict[str, str], port: int = 80, protocol: str = "TCP", **extra: Any
) -> dict[str, Any]:
    return {"from": src, "to": dst, "port": port, "protocol": protocol, **extra}


def sel(**labels: str) -> dict[str, Any]:
    """`{matchLabels: {...}}`"""
    return {"matchLabels": dict(labels)}


def ports(*specs: str | int, rules: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`toPorts` with one port rule: `ports("80/TCP", "53")`; a missing protocol means ANY."""
    out = []
    for s in specs:
        port, _, proto = str(s).partition("/")
        pp: dict[str, Any] = {"port": port}
        if proto:
            pp["protocol"] = proto
        out.append(pp)
    rule: dict[str, Any] = {"ports": out}
    if rules is not None:
        rule["rules"] = rules
    return [rule]


def run(
    pods: list[dict[str, Any]],
    apply: list[dict[str, Any]],
    probes: list[dict[str, Any]],
    namespaces: dict[str, dict[str, str]] | None = None,
    options: PolicyOptions | None = None,
) -> list[Verdict]:
    """Evaluate one step applying `apply`, and return the verdict of each probe, in order."""
    doc: dict[str, Any] = {
        "name": "semantics",
        "pods": pods,
        "steps": [{"name": "step", "apply": apply, "probes": probes}],
    }
    if namespaces:
        doc["namespaces"] = namespaces
    scenario = load_scenario(yaml.safe_dump(doc, sort_keys=False))
    return [r.verdict for r in evaluate(scenario, options)]


def allowed(verdicts: list[Verdict]) -> list[bool]:
    return [v.allowed for v in verdicts]
