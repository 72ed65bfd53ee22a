"""Every L7 (HTTP) probe of the shared scenarios: a real request's fate through the datapath and
the node's L7 proxy equals `cilia policy matrix`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import VENV_BIN, Internet, L7Proxy, Node, eventually

from cilia.scenario import Probe, ProbeResult, Target, evaluate, load_scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def http_probes(results: list[ProbeResult]) -> list[ProbeResult]:
    """HTTP probes from a pod to a pod or an outside address (what a real curl can send)."""
    out = []
    for r in results:
        p = r.probe
        if p.http is None or p.protocol != "TCP" or isinstance(p.from_, Target):
            continue
        if isinstance(p.to, Target) and (p.to.ip is None or p.to.entity is not None):
            continue
        out.append(r)
    return out


def _with_http_probes() -> list[str]:
    names = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        if http_probes(evaluate(load_scenario(path.read_text(), path.name))):
            names.append(path.name)
    return names


SCENARIOS = _with_http_probes()
assert "starwars.yaml" in SCENARIOS, "the Star Wars scenario has HTTP probes"


def ref(name: str) -> str:
    return name if "/" in name else f"default/{name}"


def real_outcome(node: Node, probe: Probe) -> tuple[bool, str]:
    """(allowed, what happened): allowed when the request reached the server (its answer, whatever
    the status), denied on the proxy's 403 or when the connection never opened."""
    assert probe.http is not None
    dst = node.ip(ref(probe.to)) if isinstance(probe.to, str) else str(probe.to.ip)
    args = ["curl", "-s", "-m", "2", "-X", probe.http.method, "-w", "|%{http_code}"]
    if probe.http.host:
        args += ["-H", f"Host: {probe.http.host}"]
    for k, v in probe.http.headers.items():
        args += ["-H", f"{k}: {v}"]
    done = subprocess.run(
        node.argv(ref(str(probe.from_)), *args, f"http://{dst}:{probe.port}{probe.http.path}"),
        capture_output=True,
        timeout=15,
    )
    body, _, status = done.stdout.rpartition(b"|")
    if done.returncode != 0:
        return False, f"curl exit {done.returncode}"
    if status == b"403" and body == b"Access denied\r\n":
        return False, "403 Access denied"
    return True, f"{status.decode()} from the server"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_http_probes_on_real_packets_agree_with_the_matrix(
    scenario: str, node: Node, l7proxy: L7Proxy, internet: Internet
) -> None:
    text = (EXAMPLES / scenario).read_text()
    sc = load_scenario(text, scenario)
    probes = http_probes(evaluate(sc))
    for pod in sc.spec.pods:
        node.add(
            pod.name,
            dict(pod.labels),
            pod.namespace,
            namedPorts=dict(pod.ports),
            serviceAccount=pod.serviceAccount,
        )
    served: set[tuple[str, int]] = set()
    for r in probes:
        p = r.probe
        key = (str(p.to), p.port)
        if key in served:
            continue
        served.add(key)
        if isinstance(p.to, str):
            pod = ref(p.to)
            node.spawn(pod, str(VENV_BIN / "python"), "-m", "cilia.demo_apps", "http", "--port", str(p.port))
            eventually(
                lambda pod=pod, port=p.port: f":{port} " in node.exec(pod, "ss", "-ltnH").stdout,
                what=f"http on {p.to}:{p.port}",
            )
        else:
            internet.serve("http", str(p.to.ip), p.port)
    raw = yaml.safe_load(text)
    mismatches = []
    checked = 0
    for i, step in enumerate(sc.spec.steps):
        if not step.cumulative:
            for name in list(node.status().get("policies", {})):
                kind, _, rest = name.partition("/")
                ns, _, pname = rest.rpartition("/")
                node.delete_policy(pname, kind, ns or "default")
        for d in step.delete:
            node.delete_policy(str(d["name"]), str(d["kind"]), str(d.get("namespace") or "default"))
        if raw["steps"][i].get("apply"):
            node.apply(yaml.safe_dump_all(raw["steps"][i]["apply"], sort_keys=False))
        for r in (x for x in probes if x.step_index == i):
            allowed, what = real_outcome(node, r.probe)
            checked += 1
            if allowed != r.verdict.allowed:
                mismatches.append(f"step {i + 1} {r.record()}: real request: {what}")
    assert checked == len(probes) and mismatches == []
