"""`cilia observe`: help and argument errors, which are found before NATS is contacted.

Reading flows from a real stream is tested in tests/integration/test_flows_stream.py.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cilia.cli.main import cli, register

register()

# Nothing listens on port 9: a test that got past argument checking would fail with "cannot reach".
UNREACHABLE = {"CILIA_NATS_URL": "nats://127.0.0.1:9", "CILIA_TOKEN_FILE": ""}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["observe", *args], env=UNREACHABLE)
    return result.exit_code, result.stdout, result.stderr


def test_help_lists_hubbles_flags() -> None:
    code, out, _ = run("--help")
    assert code == 0
    for flag in (
        "--last",
        "--follow",
        "--since",
        "--pod",
        "--from-pod",
        "--to-pod",
        "--namespace",
        "--identity",
        "--from-identity",
        "--to-identity",
        "--verdict",
        "--protocol",
        "--type",
        "--node-name",
        "--output",
        "--nats-url",
    ):
        assert flag in out
    assert "compact|dict|json|jsonpb" in out


def test_observe_is_listed_in_the_main_help() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert "observe" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--verdict", "MAYBE"], "error: invalid --verdict value: MAYBE"),
        (["--protocol", "quic"], "error: unknown protocol: 'quic'"),
        (["--type", "warp"], "error: invalid --type 'warp'"),
        (["--identity", "galaxy"], "error: invalid security identity 'galaxy'"),
        (
            ["--pod", "xwing", "--from-pod", "deathstar"],
            "error: filters --from-pod and --pod cannot be combined",
        ),
        (["-n", "kube-system", "--pod", "default/xwing"], "error: namespace conflict"),
        (["--since", "last tuesday"], "error: invalid time 'last tuesday'"),
        (["--to-ip", "10.0.0.300"], "error: invalid IP filter '10.0.0.300'"),
    ],
)
def test_bad_filter_values_fail_with_one_line(args: list[str], message: str) -> None:
    code, out, err = run(*args)
    assert code == 1
    assert out == ""
    assert err.startswith(message)
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--follow", "--until", "5m"], "--until cannot be combined with --follow"),
        (["--last", "-1"], "Invalid value for '--last'"),
        (["--last", "many"], "Invalid value for '--last'"),
        (["-o", "yaml"], "Invalid value for '-o' / '--output'"),
        (["--no-such-flag"], "No such option '--no-such-flag'"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    code, _, err = run(*args)
    assert code == 2
    assert message in err
