"""`cilia policy ...`: validate policies and evaluate scenarios offline."""

from __future__ import annotations

import sys
from typing import IO

import click

from cilia.cli.client import Client
from cilia.cli.output import table, to_json, to_yaml
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


# --- against the policy service -------------------------------------------------------------


@policy.command("apply")
@click.option("-f", "--filename", required=True, help="YAML or JSON file with policies, or - for stdin.")
@click.pass_obj
def apply_cmd(client: Client, filename: str) -> None:
    """Create or replace policies in the policy service (validated whole: all or nothing)."""
    from cilia.cli.resources import apply_policies

    text, origin = read_input(filename)
    parse_resources(text, origin, kinds=POLICY_KINDS)
    for line in apply_policies(client, text):
        click.echo(line)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


@policy.command("list")
@click.option(
    "-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True
)
@click.pass_obj
def list_cmd(client: Client, output: str) -> None:
    """List policies, kubectl-style."""
    reply = client.request("policy", "GET", "/v1/policies")
    if output == "json":
        click.echo(to_json(reply))
        return
    if output == "yaml":
        click.echo(to_yaml(reply), nl=False)
        return
    rows = [
        (i["kind"], i.get("namespace") or "", i["name"], i["revision"], i.get("description") or "")
        for i in reply["items"]
    ]
    if not rows:
        click.echo(f"No policies (repository revision {reply['revision']}).")
        return
    click.echo(table(("kind", "namespace", "name", "revision", "description"), rows))


@policy.command("get")
@click.argument("name", required=False)
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option(
    "--kind", default="CiliumNetworkPolicy", show_default=True, help="cnp, ccnp, netpol or the full kind."
)
@click.option(
    "-o", "--output", type=click.Choice(["yaml", "json", "table"]), default="yaml", show_default=True
)
@click.pass_obj
def get_cmd(client: Client, name: str | None, namespace: str, kind: str, output: str) -> None:
    """Show one policy as stored (or, without NAME, all of them)."""
    if name is None:
        reply = client.request("policy", "GET", "/v1/policies")
        docs = [
            client.request(
                "policy",
                "GET",
                f"/v1/policies/{i['kind']}/{i['name']}",
                params={"namespace": i.get("namespace")},
            )
            for i in reply["items"]
        ]
    else:
        docs = [
            client.request("policy", "GET", f"/v1/policies/{kind}/{name}", params={"namespace": namespace})
        ]
    if output == "json":
        click.echo(to_json(docs[0] if name else {"apiVersion": "v1", "kind": "List", "items": docs}))
    elif output == "table":
        rows = [(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in docs]
        click.echo(table(("kind", "namespace", "name"), rows))
    else:
        import yaml

        click.echo(yaml.safe_dump_all(docs, sort_keys=False), nl=False)


@policy.command("delete")
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option(
    "--kind", default="CiliumNetworkPolicy", show_default=True, help="cnp, ccnp, netpol or the full kind."
)
@click.pass_obj
def delete_cmd(client: Client, name: str, namespace: str, kind: str) -> None:
    """Delete a policy."""
    reply = client.request("policy", "DELETE", f"/v1/policies/{kind}/{name}", params={"namespace": namespace})
    for c in reply["changes"]:
        click.echo(f"{c['kind'].lower()}/{c['name']} deleted")


def _party(spec: str) -> dict[str, object]:
    """`ns/pod`, `labels:k=v,k2=v2[@ns]`, `ip:A`, `fqdn:NAME=A`, `entity:host`."""
    if spec.startswith("labels:"):
        body, _, ns = spec[len("labels:") :].partition("@")
        return {"labels": [x for x in body.split(",") if x], "namespace": ns or "default"}
    if spec.startswith("ip:"):
        return {"ip": spec[3:]}
    if spec.startswith("fqdn:"):
        name, _, ip = spec[5:].partition("=")
        return {"fqdn": name, "ip": ip}
    if spec.startswith("entity:"):
        return {"entity": spec[7:]}
    return {"endpoint": spec}


@policy.command("trace")
@click.option("--from", "src", required=True, help="ns/pod, labels:k=v,...[@ns], ip:A, entity:host")
@click.option(
    "--to", "dst", required=True, help="ns/pod, labels:k=v,...[@ns], ip:A, fqdn:NAME=A, entity:world"
)
@click.option(
    "--port", type=click.IntRange(0, 65535), required=True, help="destination port (ICMP type for ICMP)"
)
@click.option("--protocol", default="TCP", show_default=True)
@click.option("--http", "http", default=None, help='an HTTP request, "METHOD /path"')
@click.option("--dns", "dns", default=None, help="a DNS query name")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.pass_obj
def trace_cmd(
    client: Client,
    src: str,
    dst: str,
    port: int,
    protocol: str,
    http: str | None,
    dns: str | None,
    output: str,
) -> None:
    """Judge a connection with the stored policies and name the rule that decided, like `cilium policy trace`.

    Example: cilia policy trace --from labels:org=empire,class=tiefighter --to labels:org=empire,class=deathstar --port 80
    """
    body: dict[str, object] = {
        "from": _party(src),
        "to": _party(dst),
        "port": port,
        "protocol": protocol.upper(),
    }
    if http:
        method, _, path = http.partition(" ")
        body["http"] = {"method": method, "path": path or "/"}
    if dns:
        body["dns"] = {"query": dns}
    reply = client.request("policy", "POST", "/v1/policy/trace", json=body)
    if output == "json":
        click.echo(to_json(reply))
        return
    for side in ("egress", "ingress"):
        d = reply.get(side)
        if d:
            state = "enforced" if d["enforced"] else "not enforced"
            proxy = f", via the {d['redirect']} proxy" if d.get("redirect") else ""
            click.echo(
                f"{side} of {d['subject']} ({state}{proxy}): {'ALLOWED' if d['allowed'] else 'DENIED'} by {d['reason']}"
            )
    click.echo(
        f"Final verdict: {reply['verdict']} ({reply['reason']}) at policy revision {reply['revision']}"
    )
