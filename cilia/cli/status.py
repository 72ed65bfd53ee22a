"""`cilia status`: every service's health and version, like `cilium status`."""

from __future__ import annotations

import click

from cilia.cli.client import Client, ClientError
from cilia.cli.output import to_json
from cilia.settings import SERVICE_PORTS


@click.command("status")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--all", "show_all", is_flag=True, help="also list services that are not running")
@click.pass_obj
def status(client: Client, output: str, show_all: bool) -> None:
    """Health, version and readiness of every cilia service. Exits 1 if a running service is not ready."""
    results = {}
    for name in SERVICE_PORTS:
        try:
            results[name] = client.request(name, "GET", "/v1/status")
        except ClientError as err:
            results[name] = {"error": str(err)}
    if output == "json":
        click.echo(to_json(results))
    else:
        width = max(len(n) for n in SERVICE_PORTS) + 2
        for name, r in results.items():
            if "error" in r:
                if show_all or name in ("identity", "policy"):
                    click.echo(f"{(name.capitalize() + ':'):<{width}}  unreachable ({client.url(name)})")
                continue
            checks = r.get("checks", {})
            ok = all(v == "ok" for v in checks.values())
            detail = ", ".join(f"{k} {v}" for k, v in checks.items())
            click.echo(
                f"{(name.capitalize() + ':'):<{width}}  {'OK' if ok else 'NOT READY'}   version {r.get('version')}, "
                f"node {r.get('node')}, up {r.get('uptime_seconds')}s ({detail})"
            )
    bad = [
        n
        for n, r in results.items()
        if "error" not in r and not all(v == "ok" for v in r.get("checks", {}).values())
    ]
    reachable = [n for n, r in results.items() if "error" not in r]
    if bad or not reachable:
        raise SystemExit(1)
