"""The `cilia` CLI against running identity and policy services (real processes, real NATS)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import VENV_BIN, ServerProcess, ServiceFactory

from cilia import auth

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def cluster(
    start_service: ServiceFactory, nats_server: ServerProcess, bucket: str, tmp_path: Path
) -> dict[str, str]:
    creds_file = auth.write(auth.generate(), tmp_path / "credentials.yaml")
    common = {"CILIA_NATS_URL": nats_server.url, "CILIA_TOKEN_FILE": str(creds_file)}
    identity = start_service("identity", CILIA_IDENTITY_BUCKET=f"{bucket}i", **common)
    policy = start_service("policy", CILIA_POLICY_BUCKET=f"{bucket}p", **common)
    return {
        "CILIA_IDENTITY_URL": identity.url,
        "CILIA_POLICY_URL": policy.url,
        "CILIA_TOKEN_FILE": str(creds_file),
        "CILIA_CONFIG": str(tmp_path / "no-config.yaml"),
        # Nothing else runs: point the other services at a closed port.
        **{f"CILIA_{s}_URL": "http://127.0.0.1:9" for s in ("DATAPATH", "DNSPROXY", "L7PROXY", "LBIPAM")},
    }


def cilia(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "cilia"), *args],
        capture_output=True,
        text=True,
        input=stdin,
        env={**os.environ, **env},
        timeout=60,
    )


def starwars_policies(step: int) -> str:
    doc = yaml.safe_load((EXAMPLES / "starwars.yaml").read_text())
    return yaml.safe_dump_all(doc["steps"][step]["apply"], sort_keys=False)


def test_apply_list_trace_and_delete_the_starwars_policy(cluster: dict[str, str]) -> None:
    out = cilia(cluster, "apply", "-f", "-", stdin=starwars_policies(1))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ciliumnetworkpolicy.cilium.io/rule1 created"
    listing = cilia(cluster, "policy", "list")
    assert listing.stdout.splitlines()[0].split() == ["KIND", "NAMESPACE", "NAME", "REVISION", "DESCRIPTION"]
    assert "rule1" in listing.stdout
    trace = cilia(
        cluster,
        "policy",
        "trace",
        "--from",
        "labels:org=alliance,class=xwing",
        "--to",
        "labels:org=empire,class=deathstar",
        "--port",
        "80",
    )
    assert trace.returncode == 0, trace.stderr
    assert "Final verdict: DENIED" in trace.stdout
    got = cilia(cluster, "policy", "get", "rule1", "-o", "json")
    assert json.loads(got.stdout)["metadata"]["name"] == "rule1"
    deleted = cilia(cluster, "policy", "delete", "rule1")
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    again = cilia(cluster, "policy", "delete", "rule1")
    assert again.returncode == 1
    assert again.stderr.startswith("error: ") and len(again.stderr.splitlines()) == 1


def test_apply_rejects_an_unknown_kind_naming_the_document_and_applies_nothing(
    cluster: dict[str, str],
) -> None:
    text = starwars_policies(1) + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
    out = cilia(cluster, "apply", "-f", "-", stdin=text)
    assert out.returncode == 1
    assert "ConfigMap default/x" in out.stderr and "Traceback" not in out.stderr
    assert "No policies" in cilia(cluster, "policy", "list").stdout


def test_apply_without_a_token_says_how_to_give_one(cluster: dict[str, str]) -> None:
    env = {k: v for k, v in cluster.items() if k != "CILIA_TOKEN_FILE"}
    out = cilia({**env, "CILIA_TOKEN_FILE": ""}, "apply", "-f", "-", stdin=starwars_policies(1))
    assert out.returncode == 1
    assert "token" in out.stderr.lower()


def test_identity_list_and_status(cluster: dict[str, str]) -> None:
    import urllib.request

    creds = auth.load(cluster["CILIA_TOKEN_FILE"])
    req = urllib.request.Request(
        f"{cluster['CILIA_IDENTITY_URL']}/v1/identities",
        data=json.dumps({"labels": ["k8s:org=empire", "k8s:class=deathstar"]}).encode(),
        method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {creds.tokens['admin']}"},
    )
    ident = json.loads(urllib.request.urlopen(req, timeout=5).read())["id"]
    listing = cilia(cluster, "identity", "list")
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0].split() == ["ID", "LABELS"]
    assert str(ident) in listing.stdout and "k8s:class=deathstar" in listing.stdout
    one = cilia(cluster, "identity", "get", str(ident), "-o", "json")
    assert json.loads(one.stdout)["id"] == ident
    status = cilia(cluster, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "Identity:" in status.stdout and "Policy:" in status.stdout and "OK" in status.stdout
