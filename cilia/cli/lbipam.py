"""`cilia lbipam ...`: LB-IPAM pools, allocations, L2 leases and announcers; kubectl-style output."""

from __future__ import annotations

import calendar
import time
from typing import Any

import click

from cilia.cli.client import Client
from cilia.cli.output import table, to_json, to_yaml

POOL_CONFLICT = "cilium.io/PoolConflict"
IPS_AVAILABLE = "cilium.io/IPsAvailable"


def age(timestamp: str | None, now: float | None = None) -> str:
    """kubectl's AGE of an RFC 3339 timestamp: `12s`, `25m`, `2d20h`."""
    if not timestamp:
        return "<unknown>"
    try:
        base = timestamp.split(".")[0].rstrip("Z")
        then = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return "<unknown>"
    s = max(0, int((time.time() if now is None else now) - then))
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if h < 10 and m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if d < 10 and h else f"{d}d"


def _condition(doc: dict[str, Any], ctype: str) -> dict[str, Any]:
    for c in (doc.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return {}


def pool_row(doc: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """NAME, DISABLED, CONFLICTING, IPS AVAILABLE, AGE (`kubectl get ippools`)."""
    meta = doc.get("metadata", {})
    return (
        meta.get("name", ""),
        "true" if (doc.get("spec") or {}).get("disabled") else "false",
        _condition(doc, POOL_CONFLICT).get("status", ""),
        _condition(doc, IPS_AVAILABLE).get("message", ""),
        age(meta.get("creationTimestamp")),
    )


@click.group()
def lbipam() -> None:
    """LoadBalancer IP address management: pools, allocations, L2 leases."""


def _emit(reply: Any, output: str) -> bool:
    if output == "json":
        click.echo(to_json(reply))
        return True
    if output == "yaml":
        click.echo(to_yaml(reply), nl=False)
        return True
    return False


@lbipam.command("pools")
@click.argument("name", required=False)
@click.option(
    "-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True
)
@click.pass_obj
def pools_cmd(client: Client, name: str | None, output: str) -> None:
    """List CiliumLoadBalancerIPPools like `kubectl get ippools`."""
    if name:
        docs = [client.request("lbipam", "GET", f"/v1/resources/ippools/{name}")]
    else:
        docs = client.request("lbipam", "GET", "/v1/resources/ippools")["items"]
    if _emit(docs[0] if name else {"apiVersion": "v1", "kind": "List", "items": docs}, output):
        return
    if not docs:
        click.echo("No resources found")
        return
    click.echo(
        table(("name", "disabled", "conflicting", "ips available", "age"), [pool_row(d) for d in docs])
    )


@lbipam.command("allocations")
@click.option(
    "-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True
)
@click.pass_obj
def allocations_cmd(client: Client, output: str) -> None:
    """Allocated LoadBalancer addresses: pool, sharing key, services."""
    reply = client.request("lbipam", "GET", "/v1/allocations")
    if _emit(reply, output):
        return
    rows = [
        (a["ip"], a["pool"], a.get("sharingKey") or "", ",".join(sorted(a["members"])))
        for a in reply["items"]
    ]
    click.echo(table(("ip", "pool", "sharing key", "services"), rows) if rows else "No allocations")


@lbipam.command("leases")
@click.option(
    "-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True
)
@click.pass_obj
def leases_cmd(client: Client, output: str) -> None:
    """L2 announcement leases: which node answers ARP for which service (like `kubectl get lease`)."""
    reply = client.request("lbipam", "GET", "/v1/leases")
    if _emit(reply, output):
        return
    rows = [
        (
            f"cilium-l2announce-{i['service'].replace('/', '-')}",
            i.get("holderIdentity", ""),
            age(i.get("acquireTime")),
        )
        for i in reply["l2"]
    ]
    click.echo(table(("name", "holder", "age"), rows) if rows else "No leases")


@lbipam.command("delete")
@click.argument("kind")
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True, help="For Services.")
@click.pass_obj
def delete_cmd(client: Client, kind: str, name: str, namespace: str) -> None:
    """Delete a Service, pool, L2 or BGP policy (KIND: svc, ippool, l2announcement, bgpp or the full kind)."""
    reply = client.request(
        "lbipam", "DELETE", f"/v1/resources/{kind}/{name}", params={"namespace": namespace}
    )
    for c in reply["changes"]:
        click.echo(f"{resource_name(c['kind'])}/{c['name']} deleted")


def resource_name(kind: str) -> str:
    """kubectl's `TYPE.GROUP` for the kinds the lbipam service owns (`service`, `ciliumloadbalancerippool.cilium.io`)."""
    return "service" if kind == "Service" else f"{kind.lower()}.cilium.io"


def apply_lbipam(client: Client, text: str) -> list[str]:
    """Send Services, pools and L2/BGP policies to the lbipam service; kubectl-style lines back."""
    reply = client.request("lbipam", "POST", "/v1/resources", content=text, content_type="application/yaml")
    return [f"{resource_name(c['kind'])}/{c['name']} {c['action']}" for c in reply.get("changes", [])]
