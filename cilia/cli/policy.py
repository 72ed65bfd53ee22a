"""`cilia policy ...`: validate policies and evaluate scenarios offline."""

from __future__ import annotations

import sys
from typing import IO

import click

from cilia.cli.output import table, to_json
from cilia.errors import CiliaError, ResourceError
from cilia.models.loader import POLICY_KINDS, parse_resources
from cilia.policy.context import PolicyOptions
from cilia.scenario import ProbeResult, evaluate, load_scenario, probe_label


def read_input(path: str) -> tuple[str, str]:
    """The text of FILE, or of standard input for `-`; returns (text, name for messages)."""
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8"), "<stdin>"
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8"), path
    except UnicodeDecodeError as err:
        raise CiliaError(f"{'<stdin>' if path == '-' else path}: not UTF-8 text (byte {err.start})") from None


@click.group()
def policy() -> None:
    """Validate, evaluate and manage network policies."""


@policy.command("validate")
@click.option(
    "-f", "--filename", "filename", required=True, help="YAML or JSON file with policies, or - for stdin."
)
def validate_cmd(filename: str) -> None:
    """Check policies the way the policy service would, without applying them.

    Exits 1 and prints one line per error (document, field path, problem) when anything is invalid.
    """
    text, origin = read_input(filename)
    try:
        objs = parse_resources(text, origin, kinds=POLICY_KINDS)
    except ResourceError as err:
        for e in err.errors:
            click.echo(f"error: {e.line()}", err=True)
        sys.exit(1)
    if not objs:
        click.echo(f"error: {origin}: no documents", err=True)
        sys.exit(1)
    for obj in objs:
        meta = obj.metadata  # type: ignore[attr-defined]
        ns = "" if obj.kind == "CiliumClusterwideNetworkPolicy" else f"{meta.namespace or 'default'}/"  # type: ignore[attr-defined]
        click.echo(f"{obj.kind} {ns}{meta.name}: valid")  # type: ignore[attr-defined]


def _l7_text(r: ProbeResult) -> str:
    if r.probe.http is not None:
        return f"{r.probe.http.method} {r.probe.http.path}"
    if r.probe.dns is not None:
        return f"DNS {r.probe.dns.query}"
    return ""


def _expected_text(r: ProbeResult) -> str:
    if r.expected is None:
        return "-"
    want = "allowed" if r.expected else "denied"
    return want if r.matches else f"{want} MISMATCH"


def print_tables(results: list[ProbeResult], steps: list[str], out: IO[str]) -> None:
    for i, name in enumerate(steps):
        rows = [r for r in results if r.step_index == i]
        click.echo(f"STEP {i + 1}/{len(steps)}: {name}", file=out)
        if not rows:
            click.echo("(no probes)\n", file=out)
            continue
        body = [
            (
                probe_label(r.probe.from_),
                probe_label(r.probe.to),
                f"{r.probe.port}/{r.probe.protocol}",
                _l7_text(r),
                "ALLOWED" if r.verdict.allowed else "DENIED",
                _expected_text(r),
                r.verdict.reason,
            )
            for r in rows
        ]
        click.echo(table(("from", "to", "port", "l7", "verdict", "expected", "reason"), body), file=out)
        click.echo("", file=out)


@policy.command("matrix")
@click.argument("scenario", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option(
    "--check", is_flag=True, help="Exit 1, listing each probe whose verdict differs from its `allowed`."
)
@click.option(
    "--enforcement",
    type=click.Choice(["default", "always", "never"]),
    default="default",
    show_default=True,
    help="Policy enforcement mode, as Cilium's --enable-policy.",
)
def matrix_cmd(scenario: str, output: str, check: bool, enforcement: str) -> None:
    """Evaluate a scenario offline: every probe of every step, its verdict and the rule that decided.

    SCENARIO is a YAML file (pods, namespaces, steps with policies to apply and probes); see
    examples/starwars.yaml.
    """
    text, origin = read_input(scenario)
    sc = load_scenario(text, origin)
    results = evaluate(sc, PolicyOptions(enforcement=enforcement))  # type: ignore[arg-type]
    if output == "json":
        click.echo(to_json([r.record() for r in results]))
    else:
        click.echo(f"SCENARIO: {sc.name}\n")
        print_tables(results, [s.name for s in sc.spec.steps], sys.stdout)
    if check:
        bad = [r for r in results if not r.matches]
        if bad:
            click.echo(f"{len(bad)} probe(s) differ from their expectation:", err=True)
            for r in bad:
                want = "allowed" if r.expected else "denied"
                got = "allowed" if r.verdict.allowed else "denied"
                click.echo(
                    f"  step {r.step_index + 1} ({r.step}): {probe_label(r.probe.from_)} -> {probe_label(r.probe.to)} "
                    f"{r.probe.port}/{r.probe.protocol}{' ' + _l7_text(r) if _l7_text(r) else ''}: "
                    f"expected {want}, got {got} ({r.verdict.reason})",
                    err=True,
                )
            sys.exit(1)
        if output == "table":
            click.echo(f"all {len(results)} probes match their expectations")
