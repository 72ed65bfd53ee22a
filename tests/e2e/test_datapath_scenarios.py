"""Every pure L3/L4 probe of the shared scenarios: the real packet's fate equals `cilia policy matrix`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import VENV_BIN, Internet, Node, eventually

from cilia.scenario import Probe, ProbeResult, Target, evaluate, load_scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def pure_l3l4(r: ProbeResult) -> bool:
    """No L7 in the probe, none on its port (no proxy involved), pods or outside addresses only."""
    p = r.probe
    if p.http is not None or p.dns is not None or p.protocol not in ("TCP", "UDP", "ICMP"):
        return False
    if r.verdict.redirect is not None:
        return False
    for side in (p.from_, p.to):
        if isinstance(side, Target) and (side.fqdn is not None or side.entity is not None):
            return False
    return not isinstance(p.from_, Target)


def target_of(probe: Probe, node: Node) -> str:
    if isinstance(probe.to, str):
        return node.ip(probe.to if "/" in probe.to else f"default/{probe.to}")
    return str(probe.to.ip)


def real_outcome(node: Node, probe: Probe) -> bool:
    src = probe.from_ if "/" in str(probe.from_) else f"default/{probe.from_}"
    dst = target_of(probe, node)
    if probe.protocol == "ICMP":
        done = node.exec(str(src), "ping", "-c1", "-W1", dst)
    else:
        kind = "probe-tcp" if probe.protocol == "TCP" else "probe-udp"
        done = node.exec(
            str(src),
            str(VENV_BIN / "python"),
            "-m",
            "cilia.demo_apps",
            kind,
            "--bind",
            dst,
            "--port",
            str(probe.port),
            "--timeout",
            "1",
        )
    return done.returncode == 0


@pytest.mark.parametrize("scenario", ["starwars.yaml", "bookinfo.yaml"])
def test_real_packets_agree_with_the_matrix(scenario: str, node: Node, internet: Internet) -> None:
    text = (EXAMPLES / scenario).read_text()
    sc = load_scenario(text, scenario)
    expected = evaluate(sc)
    pure = [r for r in expected if pure_l3l4(r)]
    assert pure, "the scenario has pure L3/L4 probes"
    for pod in sc.spec.pods:
        named = {k: v for k, v in pod.ports.items()}
        node.add(
            pod.name, dict(pod.labels), pod.namespace, namedPorts=named, serviceAccount=pod.serviceAccount
        )
    servers = set()
    for r in pure:
        p = r.probe
        if p.protocol == "ICMP":
            continue
        kind = "tcp-echo" if p.protocol == "TCP" else "udp-echo"
        key = (str(p.to), p.protocol, p.port)
        if key in servers:
            continue
        servers.add(key)
        if isinstance(p.to, str):
            ref = p.to if "/" in p.to else f"default/{p.to}"
            node.spawn(ref, str(VENV_BIN / "python"), "-m", "cilia.demo_apps", kind, "--port", str(p.port))
            flag = "-lun" if kind == "udp-echo" else "-ltn"
            eventually(
                lambda ref=ref, flag=flag, port=p.port: (
                    f":{port} " in node.exec(ref, "ss", "-H", flag).stdout
                ),
                what=f"{kind} on {ref}",
            )
        else:
            internet.serve(kind, str(p.to.ip), p.port)
    mismatches = []
    raw = yaml.safe_load(text)
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
        for r in (x for x in pure if x.step_index == i):
            got = real_outcome(node, r.probe)
            if got != r.verdict.allowed:
                mismatches.append(f"step {i + 1} {r.record()}: real packet {'passed' if got else 'dropped'}")
    assert mismatches == []
