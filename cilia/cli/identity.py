"""`cilia identity list|get`: identities as the identity service knows them."""

from __future__ import annotations

import click

from cilia.cli.client import Client
from cilia.cli.output import table, to_json


@click.group()
def identity() -> None:
    """Security identities (label set -> number)."""


@identity.command("list")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def list_cmd(client: Client, output: str) -> None:
    """List identities, like `cilium-dbg identity list`."""
    reply = client.request("identity", "GET", "/v1/identities")
    if output == "json":
        click.echo(to_json(reply))
        return
    rows: list[tuple[object, str]] = []
    for item in reply["items"]:
        labels = item["labels"] or [""]
        rows.append((item["id"], labels[0]))
        rows += [("", lbl) for lbl in labels[1:]]
    click.echo(table(("id", "labels"), rows))


@identity.command("get")
@click.argument("id", type=int)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def get_cmd(client: Client, id: int, output: str) -> None:
    """Show one identity."""
    item = client.request("identity", "GET", f"/v1/identities/{id}")
    if output == "json":
        click.echo(to_json(item))
        return
    labels = item["labels"] or [""]
    rows = [(item["id"], labels[0])] + [("", lbl) for lbl in labels[1:]]
    click.echo(table(("id", "labels"), rows))
