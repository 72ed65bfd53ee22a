"""`cilia service ...`: Services as the lbipam service stores them (`get`, like `kubectl get svc`)."""

from __future__ import annotations

from typing import Any

import click

from cilia.cli.client import Client
from cilia.cli.lbipam import age
from cilia.cli.output import table, to_json, to_yaml
from cilia.errors import CiliaError


@click.group()
def service() -> None:
    """Services: ClusterIP and LoadBalancer virtual addresses."""


def external_ip(doc: dict[str, Any]) -> str:
    spec = doc.get("spec", {})
    ingress = ((doc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    ips = [i["ip"] for i in ingress if i.get("ip")] + list(spec.get("externalIPs") or [])
    if ips:
        return ",".join(ips)
    return "<pending>" if spec.get("type") == "LoadBalancer" else "<none>"


def service_row(doc: dict[str, Any]) -> tuple[str, ...]:
    """NAMESPACE, NAME, TYPE, CLUSTER-IP, EXTERNAL-IP, PORT(S), AGE (`kubectl get svc -A`)."""
    meta, spec = doc.get("metadata", {}), doc.get("spec", {})
    ports = ",".join(f"{p['port']}/{p.get('protocol', 'TCP')}" for p in spec.get("ports", []))
    return (
        meta.get("namespace", "default"),
        meta.get("name", ""),
        spec.get("type", "ClusterIP"),
        spec.get("clusterIP", "<none>"),
        external_ip(doc),
        ports,
        age(meta.get("creationTimestamp")),
    )


@service.command("get")
@click.argument("ref", required=False, metavar="[NAMESPACE/]NAME")
@click.option(
    "-n", "--namespace", default=None, help="Only this namespace (default: all, or `default` for NAME)."
)
@click.option(
    "-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True
)
@click.pass_obj
def get_cmd(client: Client, ref: str | None, namespace: str | None, output: str) -> None:
    """Show Services with their ClusterIP, LoadBalancer IP and LB-IPAM status, like `kubectl get svc`.

    With a NAME, the status conditions follow the row (why an address is pending, for example).
    """
    if ref:
        ns, _, name = ref.rpartition("/")
        ns = ns or namespace or "default"
        if not name:
            raise CiliaError(f"{ref!r}: expected NAME or NAMESPACE/NAME")
        docs = [client.request("lbipam", "GET", f"/v1/resources/svc/{name}", params={"namespace": ns})]
    else:
        params = {"namespace": namespace} if namespace else None
        docs = client.request("lbipam", "GET", "/v1/resources/svc", params=params)["items"]
    if output == "json":
        click.echo(to_json(docs[0] if ref else {"apiVersion": "v1", "kind": "List", "items": docs}))
        return
    if output == "yaml":
        click.echo(to_yaml(docs[0] if ref else {"apiVersion": "v1", "kind": "List", "items": docs}), nl=False)
        return
    if not docs:
        click.echo("No resources found")
        return
    headers = ("namespace", "name", "type", "cluster-ip", "external-ip", "port(s)", "age")
    click.echo(table(headers, [service_row(d) for d in docs]))
    if ref:
        conditions = (docs[0].get("status") or {}).get("conditions") or []
        if conditions:
            click.echo("")
            rows = [(c["type"], c["status"], c.get("reason", ""), c.get("message", "")) for c in conditions]
            click.echo(table(("condition", "status", "reason", "message"), rows))


def service_list_rows(items: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """ID, Frontend, Service Type, Backend: one row per backend, as `cilium-dbg service list` prints
    (the first backend on the frontend's row, the others below it)."""
    rows: list[tuple[str, ...]] = []
    for fe in items:
        backends = [
            f"{i} => {b['address']} ({b.get('state', 'active')})" for i, b in enumerate(fe["backends"], 1)
        ] or [""]
        rows.append((str(fe["id"]), fe["frontend"], fe["type"], backends[0]))
        rows.extend(("", "", "", b) for b in backends[1:])
    return rows


@service.command("list")
@click.option("--node", default=None, help="The node whose datapath to ask (default: the local one).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def list_cmd(client: Client, node: str | None, output: str) -> None:
    """The service frontends one node's datapath load-balances, with their backends, like
    `cilium-dbg service list` (what `cilia bpf lb list` shows from the maps themselves)."""
    from cilia.cli.cluster import node_client

    reply = node_client(client, node).request("datapath", "GET", "/v1/services")
    items = reply.get("items") or []
    if output == "json":
        click.echo(to_json(items))
        return
    click.echo(table(("ID", "Frontend", "Service Type", "Backend"), service_list_rows(items), upper=False))
