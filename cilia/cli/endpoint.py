"""`cilia endpoint ...`: endpoints on a node's datapath agent (add, list, get, delete, exec)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from typing import Any

import click

from cilia.cli.client import Client, ClientError
from cilia.cli.cluster import node_client
from cilia.cli.output import table, to_json, to_yaml
from cilia.errors import CiliaError


def _split_ref(ref: str) -> tuple[str, str]:
    ns, sep, name = ref.partition("/")
    return (ns, name) if sep else ("default", ref)


def _labels(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not k:
            raise CiliaError(f"--labels: {part!r} is not key=value")
        out[k] = v
    return out


def find_endpoint(client: Client, ns: str, name: str, node: str | None) -> dict[str, Any]:
    """The endpoint on `node`, or on the default agent, or on any node of the registry."""
    if node:
        rec: dict[str, Any] = node_client(client, node).request(
            "datapath", "GET", f"/v1/endpoints/{ns}/{name}"
        )
        return rec
    try:
        rec = client.request("datapath", "GET", f"/v1/endpoints/{ns}/{name}")
        return rec
    except ClientError as err:
        if "not found" not in str(err):
            raise
        first = err
    for n in client.request("datapath", "GET", "/v1/nodes")["items"]:
        if n.get("self") or not n.get("api"):
            continue
        with contextlib.suppress(ClientError):
            rec = node_client(client, n["name"]).request("datapath", "GET", f"/v1/endpoints/{ns}/{name}")
            return rec
    raise first


@click.group()
def endpoint() -> None:
    """Workloads on a node: each one a network namespace with a veth, an identity and policy."""


@endpoint.command("add")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--name", required=True, help="the endpoint's name (like a pod name)")
@click.option("--labels", default="", help="k=v,k2=v2 (Kubernetes labels)")
@click.option("--ip", default=None, help="an address from the node's pod CIDR (default: allocated)")
@click.option(
    "--netns", default=None, help="adopt this existing network namespace (a path) instead of creating one"
)
@click.option("--port", "ports", multiple=True, help="a named port, name=80 or name=53/UDP (repeatable)")
@click.option("--service-account", default="default", show_default=True)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--node", default=None, help="The node whose agent to ask (default: CILIA_DATAPATH_URL's).")
@click.pass_obj
def add_cmd(
    client: Client,
    namespace: str,
    name: str,
    labels: str,
    ip: str | None,
    netns: str | None,
    ports: tuple[str, ...],
    service_account: str,
    output: str,
    node: str | None,
) -> None:
    """Create an endpoint, like a CNI ADD: namespace, veth, address, identity, programs, map state."""
    named: dict[str, str] = {}
    for p in ports:
        k, sep, v = p.partition("=")
        if not sep:
            raise CiliaError(f"--port: {p!r} is not name=port")
        named[k] = v
    body = {
        "namespace": namespace,
        "name": name,
        "labels": _labels(labels),
        "ip": ip,
        "netns": netns,
        "namedPorts": {k: (int(v) if v.isdigit() else v) for k, v in named.items()},
        "serviceAccount": service_account,
    }
    rec = node_client(client, node).request("datapath", "POST", "/v1/endpoints", json=body)
    if output == "json":
        click.echo(to_json(rec))
    else:
        click.echo(
            f"endpoint {rec['namespace']}/{rec['name']} created: id {rec['ep_id']}, identity {rec['identity']}, ip {rec['ip']}"
        )


def _enforcement(on: bool) -> str:
    return "Enabled" if on else "Disabled"


@endpoint.command("list")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--node", default=None, help="The node whose agent to ask (default: CILIA_DATAPATH_URL's).")
@click.pass_obj
def list_cmd(client: Client, output: str, node: str | None) -> None:
    """The node's endpoints, with the columns of `cilium-dbg endpoint list`."""
    reply = node_client(client, node).request("datapath", "GET", "/v1/endpoints")
    if output == "json":
        click.echo(to_json(reply))
        return
    rows: list[tuple[object, ...]] = [
        ("", "ENFORCEMENT", "ENFORCEMENT", "", "", "", ""),
        ("", "", "", "", "", "", ""),
    ]
    for e in reply["items"]:
        labels = sorted(e["identity_labels"]) or [""]
        rows.append(
            (
                e["ep_id"],
                _enforcement(e["ingress_enforced"]),
                _enforcement(e["egress_enforced"]),
                e["identity"],
                labels[0],
                e["ip"],
                e["state"],
            )
        )
        rows += [("", "", "", "", lbl, "", "") for lbl in labels[1:]]
    click.echo(
        table(
            (
                "ENDPOINT",
                "POLICY (ingress)",
                "POLICY (egress)",
                "IDENTITY",
                "LABELS (source:key[=value])",
                "IPv4",
                "STATUS",
            ),
            rows,
            upper=False,
        )
    )


@endpoint.command("get")
@click.argument("ref")
@click.option("-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@click.option("--node", default=None, help="The node whose agent to ask (default: CILIA_DATAPATH_URL's).")
@click.pass_obj
def get_cmd(client: Client, ref: str, output: str, node: str | None) -> None:
    """One endpoint (NAMESPACE/NAME) with its map state."""
    ns, name = _split_ref(ref)
    rec = node_client(client, node).request("datapath", "GET", f"/v1/endpoints/{ns}/{name}")
    click.echo(to_json(rec) if output == "json" else to_yaml(rec), nl=output == "json")


@endpoint.command("delete")
@click.argument("ref")
@click.option("--node", default=None, help="The node whose agent to ask (default: CILIA_DATAPATH_URL's).")
@click.pass_obj
def delete_cmd(client: Client, ref: str, node: str | None) -> None:
    """Delete an endpoint and everything made for it."""
    ns, name = _split_ref(ref)
    node_client(client, node).request("datapath", "DELETE", f"/v1/endpoints/{ns}/{name}")
    click.echo(f"endpoint {ns}/{name} deleted")


@endpoint.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("ref")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--node", default=None, help="The node whose agent to ask (default: CILIA_DATAPATH_URL's).")
@click.pass_obj
def exec_cmd(client: Client, ref: str, command: tuple[str, ...], node: str | None) -> None:
    """Run COMMAND inside the endpoint's network namespace, like `kubectl exec`:

    cilia endpoint exec default/xwing -- curl -s -XPOST http://10.200.0.10/v1/request-landing
    """
    ns, name = _split_ref(ref)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CiliaError("give the command to run after --")
    rec = find_endpoint(client, ns, name, node)
    path = rec["network"]["netns_path"]
    nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
    argv = [nsenter, f"--net={path}", "--", *command]
    if os.geteuid() != 0:
        raise CiliaError("cilia endpoint exec needs root (it enters the endpoint's network namespace)")
    sys.exit(subprocess.call(argv))
