"""`cilia observe`: print flows from the flow stream, filtered, as `hubble observe` does.

Reads JetStream (`bus.FLOWS_STREAM`) as the `reader` NATS user of `CILIA_TOKEN_FILE`'s credentials
(or anonymously when no credentials file is set). Without --follow, the last 20 flows are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable

import click
import nats
from nats.aio.client import Client as NATS
from nats.errors import AuthorizationError, NoRespondersError, NoServersError
from nats.errors import TimeoutError as NATSTimeoutError
from nats.js.errors import ServiceUnavailableError

from cilia import auth, flowstream
from cilia.errors import CiliaError
from cilia.flows import (
    DICT_SEPARATOR,
    Flow,
    FlowFilter,
    format_dict,
    format_line,
    parse_time,
    to_json_line,
)
from cilia.settings import DEFAULT_NATS_URL

DEFAULT_LAST = 20
OUTPUTS = ("compact", "dict", "json", "jsonpb")


class ObserveError(CiliaError):
    """NATS or the flow stream cannot be used."""


def _reader_credentials() -> tuple[str | None, str | None]:
    from cilia.cli.client import local_cluster_env

    path = os.environ.get("CILIA_TOKEN_FILE") or local_cluster_env().get("CILIA_TOKEN_FILE")
    if not path:
        return None, None
    creds = auth.load(path)
    if "reader" not in creds.nats_users:
        raise ObserveError(
            f"credentials {path} have no NATS `reader` user (regenerate with `cilia auth init`)"
        )
    return creds.nats_users["reader"]


async def _connect(url: str, closed: asyncio.Event) -> NATS:
    user, password = _reader_credentials()
    errors: list[Exception] = []

    async def on_error(err: Exception) -> None:
        errors.append(err)

    async def on_closed() -> None:
        closed.set()

    try:
        nc: NATS = await nats.connect(
            url,
            name="cilia-observe",
            user=user,
            password=password,
            connect_timeout=2,
            allow_reconnect=True,
            max_reconnect_attempts=3,
            reconnect_time_wait=0.25,
            error_cb=on_error,
            closed_cb=on_closed,
        )
    except (NoServersError, OSError, TimeoutError, nats.errors.Error) as err:
        # The server may reset the socket right after refusing the login: any refusal counts.
        if any(
            isinstance(e, AuthorizationError) or "authorization" in str(e).lower() for e in [*errors, err]
        ):
            raise ObserveError(
                f"NATS at {url} refused the credentials (check CILIA_TOKEN_FILE and its `reader` user)"
            ) from None
        raise ObserveError(
            f"cannot reach NATS at {url} (is it running? set CILIA_NATS_URL or --nats-url)"
        ) from None
    return nc


def _printer(output: str, node_name: bool) -> Callable[[Flow], None]:
    first = True

    def emit(flow: Flow) -> None:
        nonlocal first
        if output in ("json", "jsonpb"):
            click.echo(to_json_line(flow))
        elif output == "dict":
            if not first:
                click.echo(DICT_SEPARATOR)
            click.echo(format_dict(flow, node_name=node_name))
        else:
            click.echo(format_line(flow, node_name=node_name))
        first = False

    return emit


async def _observe(
    url: str,
    flt: FlowFilter,
    last: int | None,
    follow: bool,
    since_ns: int | None,
    emit: Callable[[Flow], None],
) -> None:
    closed = asyncio.Event()
    nc = await _connect(url, closed)
    try:
        js = nc.jetstream(timeout=5)
        try:
            if last is None and since_ns is None:
                # follow only: from the next flow on (hubble's --follow without --last)
                await flowstream.stream_state(js)
                after = None
            else:
                flows, after = await flowstream.history(js, flt, last, since_ns=since_ns)
                for flow in flows:
                    emit(flow)
            if not follow:
                return
            stream = flowstream.follow(js, flt, after_seq=after)

            async def pump() -> None:
                async for flow in stream:
                    emit(flow)

            pumping = asyncio.create_task(pump())
            lost = asyncio.create_task(closed.wait())
            done, _ = await asyncio.wait({pumping, lost}, return_when=asyncio.FIRST_COMPLETED)
            for task in (pumping, lost):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            if pumping in done and pumping.exception() is None:
                return
            if pumping in done:
                raise pumping.exception()  # type: ignore[misc]
            raise ObserveError(f"lost the connection to NATS at {url}")
        except (NoRespondersError, ServiceUnavailableError):
            raise ObserveError(f"NATS at {url} has no JetStream (run nats-server with -js)") from None
        except NATSTimeoutError:
            raise ObserveError(
                f"NATS at {url} did not answer a JetStream request (may the reader user read {flowstream.FLOW_SUBJECTS}?)"
            ) from None
    finally:
        if not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.drain()


@click.command("observe")
@click.option(
    "--last",
    type=click.IntRange(min=0),
    default=None,
    help="Print the last N flows (default 20 without --follow).",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing flows as they arrive.")
@click.option(
    "--since",
    default=None,
    help="Flows since a time: a duration ago (30s, 5m, 1h) or a time (RFC 3339, 2024-04-27T21:36).",
)
@click.option(
    "--until", default=None, help="Flows until a time (same formats as --since); not with --follow."
)
@click.option(
    "--pod",
    multiple=True,
    help="Flows from or to a pod: [namespace/]<name prefix> (namespace default: default).",
)
@click.option("--from-pod", multiple=True, help="Flows from a pod: [namespace/]<name prefix>.")
@click.option("--to-pod", multiple=True, help="Flows to a pod: [namespace/]<name prefix>.")
@click.option("-n", "--namespace", multiple=True, help="Flows from or to pods of a namespace.")
@click.option("--ip", multiple=True, help="Flows from or to an IP address or CIDR.")
@click.option("--from-ip", multiple=True, help="Flows from an IP address or CIDR.")
@click.option("--to-ip", multiple=True, help="Flows to an IP address or CIDR.")
@click.option("--port", multiple=True, help="Flows from or to an L4 port.")
@click.option("--from-port", multiple=True, help="Flows from an L4 port.")
@click.option("--to-port", multiple=True, help="Flows to an L4 port.")
@click.option(
    "--identity", multiple=True, help="Flows from or to a security identity (number, or world, host, ...)."
)
@click.option("--from-identity", multiple=True, help="Flows from a security identity.")
@click.option("--to-identity", multiple=True, help="Flows to a security identity.")
@click.option(
    "--verdict", multiple=True, help="Flows with a verdict: FORWARDED, DROPPED, REDIRECTED, ERROR, AUDIT."
)
@click.option(
    "-t",
    "--type",
    "types",
    multiple=True,
    help="Event type: trace, drop, policy-verdict, l7 (trace:to-endpoint for a point).",
)
@click.option("--protocol", multiple=True, help="L4 or L7 protocol: tcp, udp, icmp, http, dns.")
@click.option(
    "--node-name", "--node", "node_name", multiple=True, help="Flows of a node (glob patterns allowed)."
)
@click.option("--traffic-direction", multiple=True, help="ingress or egress.")
@click.option(
    "-o",
    "--output",
    type=click.Choice(OUTPUTS),
    default="compact",
    show_default=True,
    help="compact: one line per flow, as hubble; json/jsonpb: one JSON envelope per line; dict: one block per flow.",
)
@click.option("--print-node-name", is_flag=True, help="Print the node of each flow.")
@click.option(
    "--nats-url",
    envvar="CILIA_NATS_URL",
    default=None,
    help=f"NATS server (env CILIA_NATS_URL, else the local cluster's, else {DEFAULT_NATS_URL}); "
    "credentials: the reader user of CILIA_TOKEN_FILE.",
)
def observe(
    last: int | None,
    follow: bool,
    since: str | None,
    until: str | None,
    pod: tuple[str, ...],
    from_pod: tuple[str, ...],
    to_pod: tuple[str, ...],
    namespace: tuple[str, ...],
    ip: tuple[str, ...],
    from_ip: tuple[str, ...],
    to_ip: tuple[str, ...],
    port: tuple[str, ...],
    from_port: tuple[str, ...],
    to_port: tuple[str, ...],
    identity: tuple[str, ...],
    from_identity: tuple[str, ...],
    to_identity: tuple[str, ...],
    verdict: tuple[str, ...],
    types: tuple[str, ...],
    protocol: tuple[str, ...],
    node_name: tuple[str, ...],
    traffic_direction: tuple[str, ...],
    output: str,
    print_node_name: bool,
    nats_url: str | None,
) -> None:
    """Observe flows (drops, policy verdicts, traces, L7), like `hubble observe`."""
    if follow and until:
        raise click.UsageError("--until cannot be combined with --follow")
    now = time.time_ns()
    since_ns = parse_time(since, now) if since else None
    until_ns = parse_time(until, now) if until else None
    flt = FlowFilter(
        pod=pod,
        from_pod=from_pod,
        to_pod=to_pod,
        namespace=namespace,
        ip=ip,
        from_ip=from_ip,
        to_ip=to_ip,
        port=port,
        from_port=from_port,
        to_port=to_port,
        identity=identity,
        from_identity=from_identity,
        to_identity=to_identity,
        verdict=verdict,
        type=types,
        protocol=protocol,
        node_name=node_name,
        traffic_direction=traffic_direction,
        since=since_ns,
        until=until_ns,
    )
    if last is None and since_ns is None and not follow:
        last = DEFAULT_LAST
    emit = _printer(output, print_node_name)
    if not nats_url:
        from cilia.cli.client import local_cluster_env

        nats_url = local_cluster_env().get("CILIA_NATS_URL", DEFAULT_NATS_URL)
    try:
        asyncio.run(_observe(nats_url, flt, last, follow, since_ns, emit))
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # the reader (e.g. `| head`) went away: stop quietly, and let the exit flush go nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
