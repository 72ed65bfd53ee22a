"""The `cilia` command line: help, `policy validate`, `policy matrix`; errors are one line, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from cilia.cli.main import cli, register

register()

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CILIA = Path(sys.executable).parent / "cilia"
RECORD_KEYS = {"step", "from", "to", "port", "protocol", "allowed", "reason"}

VALID_POLICIES = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress: [{}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cw}
spec:
  endpointSelector: {}
  egress: [{toEntities: [cluster]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np1, namespace: web}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"""

INVALID_POLICIES = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress:
    - fromEndpoint: [{}]
      toPorts: [{ports: [{port: "99999"}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule2}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingress: [{}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule3, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress: [{toFQDNs: [{matchName: a.example.com}], toEndpoints: [{}]}]
"""

INVALID_ERRORS = [
    "error: CiliumNetworkPolicy default/rule1: unknown field: spec.ingress[0].fromEndpoint",
    "error: CiliumNetworkPolicy default/rule1: spec.ingress[0].toPorts[0].ports[0].port: must be 0-65535 or a port name",
    "error: CiliumNetworkPolicy prod/rule3: spec.egress[0]: combining toEndpoints and toFQDNs is not supported yet",
]


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, prog_name="cilia")


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def starwars_with_wrong_expectation(tmp_path: Path) -> str:
    text = (EXAMPLES / "starwars.yaml").read_text()
    wrong = "{from: default/xwing,      to: default/deathstar-1, port: 80,  protocol: TCP, allowed: false}"
    assert text.count(wrong) == 1
    return write(
        tmp_path, "wrong.yaml", text.replace(wrong, wrong.replace("allowed: false", "allowed: true"))
    )


# --- help ---------------------------------------------------------------------------------------


def test_cilia_help():
    result = run("--help")
    assert result.exit_code == 0
    assert result.output.startswith("Usage: cilia [OPTIONS] COMMAND [ARGS]...")
    assert "policy" in result.output


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
    return out


COMMANDS = _commands(cli)


def test_command_list_includes_policy_commands():
    assert {("policy",), ("policy", "validate"), ("policy", "matrix")} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command: tuple[str, ...]):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cilia {' '.join(command)} ")
    assert "-h, --help" in result.output


def test_help_via_installed_entry_point():
    assert CILIA.exists(), "the cilia entry point is not installed next to the interpreter (make bootstrap)"
    proc = subprocess.run([str(CILIA), "policy", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "validate" in proc.stdout and "matrix" in proc.stdout


# --- policy validate ----------------------------------------------------------------------------


def test_validate_valid_file_prints_one_line_per_document(tmp_path: Path):
    result = run("policy", "validate", "-f", write(tmp_path, "ok.yaml", VALID_POLICIES))
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "CiliumNetworkPolicy default/rule1: valid",
        "CiliumClusterwideNetworkPolicy cw: valid",
        "NetworkPolicy web/np1: valid",
    ]
    assert result.stderr == ""


def test_validate_invalid_file_prints_one_error_line_per_error(tmp_path: Path):
    result = run("policy", "validate", "-f", write(tmp_path, "bad.yaml", INVALID_POLICIES))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == INVALID_ERRORS
    assert "valid" not in result.stdout  # nothing of the batch is reported valid
    no_traceback(result)


def test_validate_invalid_file_via_subprocess(tmp_path: Path):
    assert CILIA.exists(), "the cilia entry point is not installed next to the interpreter (make bootstrap)"
    path = write(tmp_path, "bad.yaml", INVALID_POLICIES)
    proc = subprocess.run(
        [str(CILIA), "policy", "validate", "-f", path], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == INVALID_ERRORS
    assert "Traceback" not in proc.stderr


def test_validate_missing_file_is_one_line(tmp_path: Path):
    missing = str(tmp_path / "nope.yaml")
    result = run("policy", "validate", "-f", missing)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"error: No such file or directory: {missing}"]
    no_traceback(result)


def test_validate_directory_is_one_line(tmp_path: Path):
    result = run("policy", "validate", "-f", str(tmp_path))
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: ")
    no_traceback(result)


def test_validate_non_utf8_file_is_a_one_line_input_error(tmp_path: Path):
    # A file that is not UTF-8 is bad input: one line and exit 1, not exit 2 (reserved for bugs).
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"\xff\xfe metadata: caf\xe9\n")
    result = run("policy", "validate", "-f", str(path))
    assert len(result.stderr.splitlines()) == 1
    assert "internal error" not in result.stderr
    assert result.exit_code == 1


def test_validate_stdin():
    result = run("policy", "validate", "-f", "-", input=VALID_POLICIES)
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == "CiliumNetworkPolicy default/rule1: valid"
    assert len(result.stdout.splitlines()) == 3


def test_validate_stdin_yaml_error_names_stdin():
    result = run("policy", "validate", "-f", "-", input="kind: [\n")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: cannot parse <stdin>: ")
    no_traceback(result)


def test_validate_json_input(tmp_path: Path):
    doc = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "j"},
        "spec": {"endpointSelector": {}, "egress": [{}]},
    }
    result = run("policy", "validate", "-f", write(tmp_path, "p.json", json.dumps([doc])))
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["CiliumNetworkPolicy default/j: valid"]


def test_validate_empty_input_fails():
    result = run("policy", "validate", "-f", "-", input="")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["error: <stdin>: no documents"]


def test_validate_rejects_non_policy_kind():
    result = run(
        "policy",
        "validate",
        "-f",
        "-",
        input="apiVersion: cilia.io/v1\nkind: Endpoint\nmetadata: {name: e}\n",
    )
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: Endpoint default/e: kind: kind Endpoint is not accepted here"
    ]


def test_validate_requires_filename():
    result = run("policy", "validate")
    assert result.exit_code == 2
    assert "Missing option '-f' / '--filename'" in result.stderr


# --- policy matrix ------------------------------------------------------------------------------


def test_matrix_starwars_check_passes():
    result = run("policy", "matrix", str(EXAMPLES / "starwars.yaml"), "--check")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("SCENARIO: starwars\n")
    assert "STEP 1/3: no policy, every ship lands" in result.stdout
    assert result.stdout.rstrip().endswith("all 11 probes match their expectations")
    assert "MISMATCH" not in result.stdout


def test_matrix_json_records_have_exact_keys():
    result = run("policy", "matrix", str(EXAMPLES / "starwars.yaml"), "-o", "json")
    assert result.exit_code == 0
    records = json.loads(result.stdout)
    assert isinstance(records, list)
    assert len(records) == 11
    assert all(set(r) == RECORD_KEYS for r in records)
    first = records[0]
    assert first["step"] == "no policy, every ship lands"
    assert (first["from"], first["to"], first["port"], first["protocol"]) == (
        "default/xwing",
        "default/deathstar-1",
        80,
        "TCP",
    )
    assert first["allowed"] is True
    assert first["reason"].startswith("default-allow")


def test_matrix_json_target_is_an_object():
    result = run("policy", "matrix", str(EXAMPLES / "mediabot-dns.yaml"), "-o", "json")
    records = json.loads(result.stdout)
    assert records[0]["to"] == {"ip": "198.51.100.10", "fqdn": "api.github.com"}


def test_matrix_json_with_check_stays_pure_json():
    result = run("policy", "matrix", str(EXAMPLES / "starwars.yaml"), "-o", "json", "--check")
    assert result.exit_code == 0
    assert len(json.loads(result.stdout)) == 11


def test_matrix_check_lists_the_wrong_probe(tmp_path: Path):
    result = run("policy", "matrix", starwars_with_wrong_expectation(tmp_path), "--check")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "1 probe(s) differ from their expectation:"
    assert len(lines) == 2
    assert lines[1].startswith(
        "  step 2 (L3/L4 policy, only empire ships reach the deathstar on 80/TCP): "
        "default/xwing -> default/deathstar-1 80/TCP: expected allowed, got denied ("
    )
    assert "allowed MISMATCH" in result.stdout
    no_traceback(result)


def test_matrix_without_check_ignores_wrong_expectation(tmp_path: Path):
    result = run("policy", "matrix", starwars_with_wrong_expectation(tmp_path))
    assert result.exit_code == 0
    assert "allowed MISMATCH" in result.stdout


def test_matrix_enforcement_always_changes_a_verdict():
    path = str(EXAMPLES / "starwars.yaml")
    default = json.loads(run("policy", "matrix", path, "-o", "json").stdout)
    always = json.loads(run("policy", "matrix", path, "-o", "json", "--enforcement", "always").stdout)
    assert default[0]["allowed"] is True
    assert always[0]["allowed"] is False
    assert always[0]["reason"].startswith("default-deny")


def test_matrix_enforcement_never_allows_everything():
    records = json.loads(
        run(
            "policy", "matrix", str(EXAMPLES / "starwars.yaml"), "-o", "json", "--enforcement", "never"
        ).stdout
    )
    assert all(r["allowed"] for r in records)


def test_matrix_enforcement_always_fails_check():
    result = run("policy", "matrix", str(EXAMPLES / "starwars.yaml"), "--check", "--enforcement", "always")
    assert result.exit_code == 1
    assert "expected allowed, got denied" in result.stderr


@pytest.mark.parametrize("name", ["starwars", "bookinfo", "mediabot-dns"])
def test_every_example_passes_check(name: str):
    result = run("policy", "matrix", str(EXAMPLES / f"{name}.yaml"), "--check")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""


def test_matrix_invalid_manifest_never_evaluates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import cilia.cli.policy as policy_cli

    calls: list[object] = []
    monkeypatch.setattr(policy_cli, "evaluate", lambda *a, **k: calls.append(a) or [])
    text = (
        (EXAMPLES / "starwars.yaml")
        .read_text()
        .replace('{port: "80", protocol: TCP}', '{port: "80", protocol: TCPX}', 1)
    )
    result = run("policy", "matrix", write(tmp_path, "bad.yaml", text), "--check")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ")
    assert "steps[1] (L3/L4 policy, only empire ships reach the deathstar on 80/TCP)" in line
    assert "CiliumNetworkPolicy default/rule1: spec.ingress[0].toPorts[0].ports[0].protocol: " in line
    assert 'invalid protocol "TCPX"' in line
    assert calls == []
    assert result.stdout == ""


def test_matrix_unknown_pod_is_one_line(tmp_path: Path):
    text = (EXAMPLES / "starwars.yaml").read_text().replace("from: default/xwing,", "from: default/ywing,", 1)
    path = write(tmp_path, "s.yaml", text)
    result = run("policy", "matrix", path)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {path}: steps[0].probes[0].from: unknown pod 'default/ywing'"
    ]
    no_traceback(result)


def test_matrix_missing_file_is_one_line(tmp_path: Path):
    missing = str(tmp_path / "nope.yaml")
    result = run("policy", "matrix", missing)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"error: No such file or directory: {missing}"]


def test_matrix_from_stdin():
    result = run("policy", "matrix", "-", "-o", "json", input=(EXAMPLES / "starwars.yaml").read_text())
    assert result.exit_code == 0
    assert len(json.loads(result.stdout)) == 11


def test_matrix_delete_of_missing_policy_is_one_line(tmp_path: Path):
    text = "name: t\npods: [{name: a}]\nsteps:\n  - name: s\n    delete: [{kind: CiliumNetworkPolicy, name: x}]\n"
    result = run("policy", "matrix", write(tmp_path, "d.yaml", text))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: steps[0] (s): delete: CiliumNetworkPolicy default/x not found"
    ]


def test_matrix_rejects_unknown_output_format():
    result = run("policy", "matrix", str(EXAMPLES / "starwars.yaml"), "-o", "yaml")
    assert result.exit_code == 2
    assert "Invalid value for '-o' / '--output'" in result.stderr


def test_internal_errors_are_one_line_unless_debug(monkeypatch: pytest.MonkeyPatch):
    import cilia.cli.policy as policy_cli

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(policy_cli, "parse_resources", boom)
    monkeypatch.delenv("CILIA_DEBUG", raising=False)
    result = run("policy", "validate", "-f", "-", input="x: 1\n")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: internal error: RuntimeError: kaboom (set CILIA_DEBUG=1 for details)"
    ]
    monkeypatch.setenv("CILIA_DEBUG", "1")
    assert isinstance(run("policy", "validate", "-f", "-", input="x: 1\n").exception, RuntimeError)
