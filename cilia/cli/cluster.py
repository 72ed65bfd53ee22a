"""`cilia cluster up|status|down|env` (a whole cluster on this machine, like `kind create cluster`)
and `cilia node list|add|delete`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from cilia.cli.client import Client
from cilia.cli.output import table, to_json
from cilia.cluster import DEFAULT_POD_CIDRS, DEFAULT_STATE_DIR, DEFAULT_UNDERLAY, LocalCluster
from cilia.errors import CiliaError

STATE_DIR_HELP = "Where the cluster keeps its state, pids and logs (default: $CILIA_CLUSTER_DIR or /var/lib/cilia/cluster)."


def _cluster(state_dir: str | None) -> LocalCluster:
    return LocalCluster(Path(state_dir or os.environ.get("CILIA_CLUSTER_DIR") or DEFAULT_STATE_DIR))


def _exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={v}" for k, v in env.items())


@click.group()
def cluster() -> None:
    """A cilia cluster on this machine: nodes as network namespaces joined by a VXLAN overlay."""


@cluster.command("up")
@click.option("--nodes", "count", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--kvstore", type=click.Choice(["nats", "etcd"]), default="nats", show_default=True)
@click.option("--state-dir", default=None, help=STATE_DIR_HELP)
@click.option(
    "--name", default="cilia", show_default=True, help="Prefix of the links and namespaces it makes."
)
@click.option("--underlay", default=str(DEFAULT_UNDERLAY), show_default=True, help="The nodes' network.")
@click.option(
    "--pod-cidrs", default=str(DEFAULT_POD_CIDRS), show_default=True, help="Split into a /24 per node."
)
@click.option("--lease", "lease_seconds", type=click.IntRange(1, 3600), default=15, show_default=True,
              help="Seconds a node stays in the registry after its last heartbeat.")  # fmt: skip
def up_cmd(
    count: int,
    kvstore: str,
    state_dir: str | None,
    name: str,
    underlay: str,
    pod_cidrs: str,
    lease_seconds: int,
) -> None:
    """Build the cluster in the background (NATS, identity and policy services, N nodes with their
    agents), wait until every part is ready, and print the settings to use."""
    lc = _cluster(state_dir)
    started = time.monotonic()
    click.echo(f"Creating cluster {name!r} with {count} node(s) in {lc.dir} ...", err=True)
    state = lc.up(
        count, name=name, kvstore=kvstore, underlay=underlay, pod_cidrs=pod_cidrs, lease_seconds=lease_seconds
    )
    for n in state.nodes.values():
        click.echo(f" ✓ node {n.name}: {n.ip}, pods {n.pod_cidr}, netns {n.netns}", err=True)
    click.echo(
        f"Cluster ready in {time.monotonic() - started:.1f}s. The cilia CLI finds it by itself; other clients:",
        err=True,
    )
    click.echo(_exports(state.env()))


@cluster.command("status")
@click.option("--state-dir", default=None, help=STATE_DIR_HELP)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def status_cmd(state_dir: str | None, output: str) -> None:
    """Every process of the cluster: pid, alive, ready. Exits 1 if any part is not ready."""
    st = _cluster(state_dir).status()
    if output == "json":
        click.echo(to_json(st))
    else:
        rows = [
            (
                c["node"] or "-",
                c["component"],
                c["pid"],
                "yes" if c["alive"] else "no",
                "yes" if c["ready"] else "no",
            )
            for c in st["components"]
        ]
        click.echo(table(("NODE", "COMPONENT", "PID", "ALIVE", "READY"), rows))
    if not all(c["ready"] for c in st["components"]):
        raise SystemExit(1)


@cluster.command("env")
@click.option("--state-dir", default=None, help=STATE_DIR_HELP)
def env_cmd(state_dir: str | None) -> None:
    """The CILIA_* settings of the cluster, as shell exports."""
    click.echo(_exports(_cluster(state_dir).state().env()))


@cluster.command("down")
@click.option("--state-dir", default=None, help=STATE_DIR_HELP)
def down_cmd(state_dir: str | None) -> None:
    """Remove every namespace, link, pinned map and process the cluster made."""
    lc = _cluster(state_dir)
    if not lc.exists:
        click.echo(f"no cluster in {lc.dir}")
        return
    lc.down()
    click.echo(f"cluster in {lc.dir} removed")


@click.group()
def node() -> None:
    """The nodes of the cluster (the registry every datapath agent keeps alive in the kvstore)."""


def node_rows(reply: dict[str, Any]) -> list[tuple[object, ...]]:
    now = time.time()
    return [
        (
            n["name"] + (" (this node)" if n.get("self") else ""),
            n["ip"],
            n["pod_cidr"],
            n["health"],
            n["endpoints"],
            f"{max(0.0, now - float(n['heartbeat'])):.0f}s ago",
        )
        for n in reply["items"]
    ]


@node.command("list")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def node_list(client: Client, output: str) -> None:
    """Name, underlay IP, pod CIDR, health, endpoints and last heartbeat of every node."""
    reply = client.request("datapath", "GET", "/v1/nodes")
    if output == "json":
        click.echo(to_json(reply))
        return
    click.echo(table(("NAME", "IP", "POD CIDR", "HEALTH", "ENDPOINTS", "LAST HEARTBEAT"), node_rows(reply)))


@node.command("add")
@click.argument("name")
@click.option("--state-dir", default=None, help=STATE_DIR_HELP)
def node_add(name: str, state_dir: str | None) -> None:
    """Add a node to the local cluster (a namespace, its uplink and its agents)."""
    n = _cluster(state_dir).add_node(name)
    click.echo(f"node {n.name} added: {n.ip}, pods {n.pod_cidr}")


@node.command("delete")
@click.argument("name")
@click.option("--state-dir", default=None, help=STATE_DIR_HELP)
def node_delete(name: str, state_dir: str | None) -> None:
    """Stop a node's agents and remove its endpoints, namespace and maps from the local cluster."""
    _cluster(state_dir).delete_node(name)
    click.echo(f"node {name} deleted")


def node_client(client: Client, node_name: str | None) -> Client:
    """A client whose datapath URL is `node_name`'s agent (found in the node registry)."""
    if not node_name:
        return client
    reply = client.request("datapath", "GET", "/v1/nodes")
    found = [n for n in reply["items"] if n["name"] == node_name] or [
        n for n in reply["items"] if n["name"].endswith(f"-{node_name}")
    ]
    for n in found[:1] if len(found) == 1 else []:
        if not n.get("api"):
            raise CiliaError(f"node {node_name} does not announce its API address")
        return Client({**client.urls, "datapath": n["api"]}, client.token, client.timeout)
    known = ", ".join(n["name"] for n in reply["items"]) or "none"
    what = "names several nodes" if len(found) > 1 else "is not in the registry"
    raise CiliaError(f"node {node_name!r} {what} (known: {known})")
