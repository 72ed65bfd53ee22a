"""`cilia bpf ...`: read a node's pinned BPF maps directly (works with the agent down), like `cilium-dbg bpf`."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import click

from cilia.cli.output import table, to_json
from cilia.errors import CiliaError
from cilia.identity import RESERVED_NAMES
from cilia.policy.l4 import proto_name


def _maps(node: str | None) -> Any:
    from services.datapath import maps

    name = node or os.environ.get("CILIA_NODE") or socket.gethostname()
    try:
        return maps.DatapathMaps.open(maps.pin_root(name))
    except OSError as err:
        raise CiliaError(
            f"cannot open the BPF maps of node {name}: {err.strerror or err} (run as root; is the datapath set up?)"
        ) from None


def _identity_text(identity: int) -> str:
    if identity == 0:
        return "ANY"
    name = RESERVED_NAMES.get(identity)
    return f"{identity} (reserved:{name})" if name else str(identity)


node_option = click.option(
    "--node", default=None, help="the node whose maps to read (default: CILIA_NODE or the hostname)"
)
output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True
)


@click.group()
def bpf() -> None:
    """Inspect the datapath's pinned BPF maps."""


@bpf.group("policy")
def policy_group() -> None:
    """The policy map."""


def _resolve_endpoint(node: str | None, ref: str, m: Any) -> int:
    if ref.isdigit():
        return int(ref)
    for ip, info in m.endpoint_items():
        if ip == ref:
            return int(info.ep_id)
    # ns/name: the agent's state file names endpoints
    name = node or os.environ.get("CILIA_NODE") or socket.gethostname()
    state = Path(os.environ.get("CILIA_STATE_DIR", "/var/lib/cilia")) / name / "endpoints.json"
    if state.exists() and "/" in ref:
        for rec in json.loads(state.read_text()).get("endpoints", []):
            if f"{rec['namespace']}/{rec['name']}" == ref:
                return int(rec["ep_id"])
    raise CiliaError(f"endpoint {ref!r} not found (give its id, its IP, or namespace/name)")


@policy_group.command("get")
@click.argument("endpoint")
@node_option
@output_option
def policy_get(endpoint: str, node: str | None, output: str) -> None:
    """The policy entries of one endpoint (its id, IP or namespace/name)."""
    m = _maps(node)
    try:
        ep_id = _resolve_endpoint(node, endpoint, m)
        entries = sorted(
            m.policy_entries(ep_id).items(),
            key=lambda kv: (kv[0][1].direction, kv[0][1].identity, kv[0][1].proto, kv[0][1].port),
        )
    finally:
        m.close()
    rows = []
    for (_, key), e in entries:
        verdict = "Deny" if e.deny else ("Redirect" if e.proxy_port else "Allow")
        if key.plen == 0:
            l4 = "ANY"
        elif key.plen == 8:
            l4 = proto_name(key.proto)
        else:
            size = 1 << (24 - key.plen)
            l4 = (
                f"{key.port}/{proto_name(key.proto)}"
                if size == 1
                else f"{key.port}-{key.port + size - 1}/{proto_name(key.proto)}"
            )
        rows.append(
            (
                verdict,
                key.direction.capitalize(),
                _identity_text(key.identity),
                l4,
                e.proxy_port or "NONE",
                key.plen,
                f"{e.cookie:08x}",
            )
        )
    if output == "json":
        click.echo(
            to_json(
                [
                    dict(
                        zip(
                            (
                                "policy",
                                "direction",
                                "identity",
                                "port/proto",
                                "proxy port",
                                "prefix",
                                "cookie",
                            ),
                            r,
                            strict=True,
                        )
                    )
                    for r in rows
                ]
            )
        )
        return
    click.echo(
        table(("policy", "direction", "identity", "port/proto", "proxy port", "prefix", "cookie"), rows)
    )


@bpf.group("ipcache")
def ipcache_group() -> None:
    """The ipcache map (prefix -> identity)."""


@ipcache_group.command("list")
@node_option
@output_option
def ipcache_list(node: str | None, output: str) -> None:
    m = _maps(node)
    try:
        items = m.ipcache_items()
    finally:
        m.close()
    if output == "json":
        click.echo(to_json([{"prefix": p, "identity": i, "tunnel_endpoint": t} for p, i, t in items]))
        return
    click.echo(
        table(
            ("ip prefix/address", "identity", "tunnel endpoint"),
            [(p, _identity_text(i), t or "0.0.0.0") for p, i, t in items],
        )
    )


@bpf.group("ct")
def ct_group() -> None:
    """The connection-tracking map."""


@ct_group.command("list")
@node_option
@output_option
def ct_list(node: str | None, output: str) -> None:
    from services.datapath import maps

    m = _maps(node)
    try:
        items = m.ct_items()
    finally:
        m.close()
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    rows = []
    for k, v in items:
        src, dst, sport, dport, proto = maps.ct_tuple(k)
        flags = [
            n
            for bit, n in (
                (maps.CT_F_REPLY_SEEN, "reply-seen"),
                (maps.CT_F_CLOSING, "closing"),
                (maps.CT_F_PROXIED, "proxied"),
            )
            if v.flags & bit
        ]
        rows.append(
            (
                proto_name(proto),
                f"{src}:{sport}",
                f"{dst}:{dport}",
                f"{(now - v.created) / 1e9:.0f}s",
                f"{max(0, now - v.last_seen) / 1e9:.0f}s",
                v.src_identity,
                v.dst_identity,
                ",".join(flags) or "-",
            )
        )
    if output == "json":
        keys = (
            "proto",
            "source",
            "destination",
            "age",
            "idle",
            "src_identity",
            "dst_identity",
            "flags",
        )
        click.echo(to_json([dict(zip(keys, r, strict=True)) for r in rows]))
        return
    click.echo(
        table(
            (
                "proto",
                "source",
                "destination",
                "age",
                "idle",
                "src identity",
                "dst identity",
                "flags",
            ),
            rows,
        )
    )


@bpf.group("metrics")
def metrics_group() -> None:
    """The datapath's counters."""


@metrics_group.command("list")
@node_option
@output_option
def metrics_list(node: str | None, output: str) -> None:
    from services.datapath.eventtypes import DROP_REASONS

    m = _maps(node)
    try:
        totals = m.metrics_totals()
    finally:
        m.close()
    rows = []
    for (reason, direction), (packets, nbytes) in sorted(totals.items()):
        text = "Forwarded" if reason == 0 else DROP_REASONS.get(reason, f"drop {reason}")
        rows.append((text, {1: "INGRESS", 2: "EGRESS"}.get(direction, "UNKNOWN"), packets, nbytes))
    if output == "json":
        click.echo(to_json([{"reason": r, "direction": d, "packets": p, "bytes": b} for r, d, p, b in rows]))
        return
    click.echo(table(("reason", "direction", "packets", "bytes"), rows))


@bpf.group("endpoint")
def endpoint_group() -> None:
    """The local endpoints map."""


@endpoint_group.command("list")
@node_option
@output_option
def endpoint_list(node: str | None, output: str) -> None:
    from services.datapath import maps

    m = _maps(node)
    try:
        items = m.endpoint_items()
    finally:
        m.close()
    rows = []
    for ip, info in items:
        flags = []
        if info.flags & maps.EP_F_INGRESS_ENFORCED:
            flags.append("ingress-enforced")
        if info.flags & maps.EP_F_EGRESS_ENFORCED:
            flags.append("egress-enforced")
        rows.append((ip, info.ep_id, info.identity, info.ifindex, ",".join(flags) or "-"))
    if output == "json":
        click.echo(
            to_json(
                [dict(zip(("ip", "endpoint", "identity", "ifindex", "flags"), r, strict=True)) for r in rows]
            )
        )
        return
    click.echo(table(("ip", "endpoint", "identity", "ifindex", "flags"), rows))


@bpf.group("lb")
def lb_group() -> None:
    """The service load-balancing maps."""


@lb_group.command("list")
@node_option
@output_option
def lb_list(node: str | None, output: str) -> None:
    """Frontends, their slots and backends, like `cilium-dbg bpf lb list`."""
    from services.datapath import maps
    from services.datapath.lb import PROTO_NAMES

    m = _maps(node)
    try:
        services = m.lb_service_items()
        backends = m.lb_backend_items()
    finally:
        m.close()
    grouped: dict[tuple[str, int, int], dict[int, Any]] = {}
    for (addr, port, proto, slot), v in services.items():
        grouped.setdefault((addr, port, proto), {})[slot] = v
    rows: list[tuple[object, ...]] = []
    items = []
    for (addr, port, proto), slots in sorted(grouped.items()):
        master = slots.get(0)
        rev = int(master.rev_nat_id) if master is not None else 0
        frontend = f"{addr}:{port}/{PROTO_NAMES.get(proto, proto)} ({rev})"
        kinds = []
        if master is not None:
            kinds.append("LoadBalancer" if master.flags & maps.SVC_F_EXTERNAL else "ClusterIP")
            if master.flags & maps.SVC_F_AFFINITY:
                kinds.append("sessionAffinity")
            if master.flags & maps.SVC_F_LOCAL_ONLY:
                kinds.append("Local")
        lines = [f"0.0.0.0:0 ({rev}) (0) [{', '.join(kinds)}]"]
        entry: dict[str, Any] = {"frontend": frontend, "type": kinds, "backends": []}
        for slot in sorted(s for s in slots if s):
            bid = int(slots[slot].backend_id)
            b = backends.get(bid)
            text = f"{b[0]}:{b[1]}/{PROTO_NAMES.get(b[2], b[2])}" if b else f"backend {bid} (missing)"
            lines.append(f"{text} ({rev}) ({slot})")
            entry["backends"].append({"slot": slot, "id": bid, "address": text})
        items.append(entry)
        rows.append((frontend, lines[0]))
        rows += [("", line) for line in lines[1:]]
    if output == "json":
        click.echo(to_json(items))
        return
    click.echo(table(("SERVICE ADDRESS", "BACKEND ADDRESS (REVNAT_ID) (SLOT)"), rows, upper=False))
