"""Endpoints and the CLI against a running datapath agent: add/list/get/exec/delete, restore after a
restart without re-creating interfaces, the bpf inspection commands, and `cilia observe`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import VENV_BIN, Node, eventually

from services.datapath import maps

RULE1 = (Path(__file__).resolve().parents[2] / "examples" / "policies" / "starwars-l3-l4.yaml").read_text()


def cilia(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CILIA_DATAPATH_URL": node.agent.url,
        "CILIA_POLICY_URL": node.policy.url,
        "CILIA_IDENTITY_URL": node.cp.identity.url,
        "CILIA_TOKEN_FILE": str(node.cp.creds_file),
        "CILIA_NATS_URL": node.cp.nats.url,
        "CILIA_NODE": node.name,
        "CILIA_STATE_DIR": str(node.state_dir),
        "CILIA_CONFIG": "/nonexistent",
    }
    return subprocess.run(
        [str(VENV_BIN / "cilia"), *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_endpoint_add_list_exec_and_delete_with_the_cli(node: Node) -> None:
    out = cilia(
        node,
        "endpoint",
        "add",
        "--name",
        "xwing",
        "--labels",
        "org=alliance,class=xwing,pod-template-hash=abc",
        "--ip",
        "10.201.0.77",
    )
    assert out.returncode == 0, out.stderr
    assert "endpoint default/xwing created" in out.stdout and "ip 10.201.0.77" in out.stdout
    listing = cilia(node, "endpoint", "list")
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:4] == ["ENDPOINT", "POLICY", "(ingress)", "POLICY"]
    assert "k8s:class=xwing" in listing.stdout and "10.201.0.77" in listing.stdout
    assert "pod-template-hash" not in listing.stdout  # not a security label
    exec_out = cilia(
        node, "endpoint", "exec", "default/xwing", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0"
    )
    assert exec_out.returncode == 0 and "10.201.0.77/32" in exec_out.stdout
    rec = json.loads(cilia(node, "endpoint", "get", "default/xwing", "-o", "json").stdout)
    netns = rec["network"]["netns_name"]
    assert Path(f"/run/netns/{netns}").exists()
    dup = cilia(node, "endpoint", "add", "--name", "xwing", "--labels", "org=alliance")
    assert dup.returncode == 1 and "already exists" in dup.stderr
    deleted = cilia(node, "endpoint", "delete", "default/xwing")
    assert deleted.returncode == 0, deleted.stderr
    assert not Path(f"/run/netns/{netns}").exists()
    m = node.maps()
    try:
        assert "10.201.0.77" not in [ip for ip, _ in m.endpoint_items()]
        assert not m.policy_entries(rec["ep_id"])
    finally:
        m.close()
    node.records.pop("default/xwing", None)


def test_endpoints_survive_an_agent_restart_without_new_interfaces(node: Node) -> None:
    rec = node.add("deathstar-1", {"org": "empire", "class": "deathstar"})
    node.apply(RULE1)
    node.agent.stop()
    node.agent.start(timeout=60)
    eventually(lambda: node.status().get("policies_synced"), what="the restarted agent synced")
    again = node.endpoint("default/deathstar-1")
    assert again["network"]["host_ifindex"] == rec["network"]["host_ifindex"]
    assert again["ep_id"] == rec["ep_id"] and again["identity"] == rec["identity"]
    assert again["ingress_enforced"] is True


def test_bpf_commands_read_the_pinned_maps(node: Node) -> None:
    deathstar = node.add("deathstar-1", {"org": "empire", "class": "deathstar"})
    tie = node.add("tiefighter", {"org": "empire", "class": "tiefighter"})
    node.apply(RULE1)
    node.serve("default/deathstar-1", "tcp-echo", 80)
    assert (
        node.exec(
            "default/tiefighter",
            str(VENV_BIN / "python"),
            "-m",
            "cilia.demo_apps",
            "probe-tcp",
            "--bind",
            deathstar["ip"],
            "--port",
            "80",
        ).returncode
        == 0
    )
    policy = cilia(node, "bpf", "policy", "get", "default/deathstar-1", "-o", "json")
    assert policy.returncode == 0, policy.stderr
    entries = json.loads(policy.stdout)
    assert {
        "policy": "Allow",
        "direction": "Ingress",
        "identity": str(tie["identity"]),
        "port/proto": "80/TCP",
    }.items() <= next(e for e in entries if e["identity"] == str(tie["identity"])).items()
    ipcache = json.loads(cilia(node, "bpf", "ipcache", "list", "-o", "json").stdout)
    assert {
        "prefix": f"{deathstar['ip']}/32",
        "identity": deathstar["identity"],
        "tunnel_endpoint": None,
    } in ipcache
    ct = json.loads(cilia(node, "bpf", "ct", "list", "-o", "json").stdout)
    assert any(
        c["destination"] == f"{deathstar['ip']}:80" and c["src_identity"] == tie["identity"] for c in ct
    )
    metrics_out = json.loads(cilia(node, "bpf", "metrics", "list", "-o", "json").stdout)
    assert any(m["reason"] == "Forwarded" and m["packets"] > 0 for m in metrics_out)
    table = cilia(node, "bpf", "policy", "get", str(deathstar["ep_id"]))
    assert table.stdout.splitlines()[0].split()[:3] == ["POLICY", "DIRECTION", "IDENTITY"]


def test_bpf_commands_fail_with_one_line_when_the_maps_are_missing(node: Node) -> None:
    out = subprocess.run(
        [str(VENV_BIN / "cilia"), "bpf", "ipcache", "list", "--node", "no-such-node"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert len(out.stderr.splitlines()) == 1 and "no-such-node" in out.stderr


def test_observe_prints_the_drop_like_hubble(node: Node) -> None:
    deathstar = node.add("deathstar-1", {"org": "empire", "class": "deathstar"})
    node.add("xwing", {"org": "alliance", "class": "xwing"})
    node.apply(RULE1)
    node.serve("default/deathstar-1", "tcp-echo", 80)
    node.exec(
        "default/xwing",
        str(VENV_BIN / "python"),
        "-m",
        "cilia.demo_apps",
        "probe-tcp",
        "--bind",
        deathstar["ip"],
        "--port",
        "80",
        "--timeout",
        "0.5",
    )

    def lines() -> list[str]:
        out = cilia(node, "observe", "--last", "200", "--pod", "default/xwing", "--verdict", "DROPPED")
        return [line for line in out.stdout.splitlines() if "Policy denied DROPPED" in line]

    drop = eventually(lines, 15, "the drop in cilia observe")[0]
    assert "default/xwing:" in drop and "-> " not in drop and "<> default/deathstar-1:80" in drop
    assert f"(ID:{deathstar['identity']})" in drop and "(TCP Flags: SYN)" in drop
    verdicts = cilia(node, "observe", "--last", "200", "--pod", "default/xwing", "--type", "policy-verdict")
    assert "policy-verdict:none INGRESS DENIED (TCP Flags: SYN)" in verdicts.stdout
    as_json = cilia(node, "observe", "--last", "1", "--pod", "default/xwing", "-o", "json")
    envelope = json.loads(as_json.stdout.splitlines()[-1])
    assert set(envelope) == {"flow", "node_name", "time"} and envelope["node_name"] == node.name
    assert maps.pin_root(node.name).exists()
