"""`cilia fqdn cache list`: the DNS proxy's FQDN cache, as `cilium-dbg fqdn cache list` shows it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from cilia.cli.client import Client
from cilia.cli.output import table, to_json, to_yaml

HEADERS = ("Endpoint", "Pod", "Source", "FQDN", "TTL", "ExpirationTime", "IPs", "Selectors")
NO_EXPIRY = "0001-01-01T00:00:00.000Z"  # what cilium-dbg prints for entries kept by a connection


def cache_table(items: Sequence[dict[str, Any]]) -> str:
    """One row per endpoint, source, name and lookup; IPs and selectors comma-separated."""
    rows = [
        (
            item.get("endpoint", ""),
            item.get("endpointName", ""),
            item.get("source", ""),
            item.get("fqdn", ""),
            item.get("ttl", 0),
            item.get("expirationTime") or NO_EXPIRY,
            ",".join(item.get("ips") or []),
            ",".join(item.get("selectors") or []),
        )
        for item in items
    ]
    return table(HEADERS, rows, upper=False)


@click.group()
def fqdn() -> None:
    """The DNS proxy's view of names (toFQDNs): what resolved to what, for whom, until when."""


@fqdn.group("cache")
def cache() -> None:
    """The FQDN cache of a node's DNS proxy."""


@cache.command("list")
@click.option("-e", "--endpoint", default=None, help="an endpoint id or namespace/pod")
@click.option(
    "-n", "--name", "-p", "--matchpattern", default=None, help="a name, or a pattern such as *.github.com"
)
@click.option(
    "-s",
    "--source",
    type=click.Choice(["lookup", "connection"]),
    default=None,
    help="only entries of this source",
)
@click.option(
    "-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True
)
@click.pass_obj
def list_cmd(client: Client, endpoint: str | None, name: str | None, source: str | None, output: str) -> None:
    """List names, IPs, TTLs and the toFQDNs selectors they match, like `cilium-dbg fqdn cache list`.

    `lookup` entries come from DNS answers and expire with their TTL; `connection` entries are
    expired names whose IPs an open connection still uses (kept until it ends)."""
    params = {k: v for k, v in (("endpoint", endpoint), ("name", name)) if v}
    reply = client.request("dnsproxy", "GET", "/v1/fqdn/cache", params=params)
    items = [i for i in reply.get("items", []) if source is None or i.get("source") == source]
    if output == "json":
        click.echo(to_json(items))
    elif output == "yaml":
        click.echo(to_yaml(items), nl=False)
    else:
        click.echo(cache_table(items))
