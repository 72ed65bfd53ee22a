"""`cilia`: the command line. Every command has --help and fails with one readable line."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from cilia import __version__
from cilia.errors import CiliaError


class CiliaGroup(click.Group):
    """A click group that turns cilia's errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CiliaError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        except OSError as err:
            click.echo(f"error: {err.strerror or err}{f': {err.filename}' if err.filename else ''}", err=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as err:  # a bug, not bad input: still one line unless asked for more
            if os.environ.get("CILIA_DEBUG"):
                raise
            click.echo(
                f"error: internal error: {type(err).__name__}: {err} (set CILIA_DEBUG=1 for details)",
                err=True,
            )
            sys.exit(2)


@click.group(cls=CiliaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cilia")
@click.option(
    "--token",
    envvar="CILIA_TOKEN",
    default=None,
    help="Bearer token (default: CILIA_TOKEN, or the admin token of CILIA_TOKEN_FILE).",
)
@click.option(
    "--identity-url",
    default=None,
    help="Identity service URL (default: CILIA_IDENTITY_URL or http://127.0.0.1:9101).",
)
@click.option(
    "--policy-url",
    default=None,
    help="Policy service URL (default: CILIA_POLICY_URL or http://127.0.0.1:9102).",
)
@click.option(
    "--datapath-url",
    default=None,
    help="Datapath agent URL (default: CILIA_DATAPATH_URL or http://127.0.0.1:9103).",
)
@click.option(
    "--dnsproxy-url",
    default=None,
    help="DNS proxy URL (default: CILIA_DNSPROXY_URL or http://127.0.0.1:9104).",
)
@click.option(
    "--l7proxy-url", default=None, help="L7 proxy URL (default: CILIA_L7PROXY_URL or http://127.0.0.1:9105)."
)
@click.option(
    "--lbipam-url",
    default=None,
    help="LB-IPAM service URL (default: CILIA_LBIPAM_URL or http://127.0.0.1:9106).",
)
@click.pass_context
def cli(ctx: click.Context, /, token: str | None, **urls: str | None) -> None:
    """cilia: Cilium's network security model — identities, CiliumNetworkPolicy, eBPF, flows."""
    from cilia.cli.client import Client

    ctx.obj = Client({k.removesuffix("_url"): v for k, v in urls.items() if v}, token)


def register() -> None:
    from cilia.cli import (
        auth,
        bpf,
        cluster,
        endpoint,
        fqdn,
        identity,
        lbipam,
        observe,
        policy,
        resources,
        service,
        status,
    )

    cli.add_command(policy.policy)
    cli.add_command(resources.apply)
    cli.add_command(identity.identity)
    cli.add_command(status.status)
    cli.add_command(auth.auth)
    cli.add_command(observe.observe)
    cli.add_command(endpoint.endpoint)
    cli.add_command(bpf.bpf)
    cli.add_command(cluster.cluster)
    cli.add_command(cluster.node)
    cli.add_command(fqdn.fqdn)
    cli.add_command(lbipam.lbipam)
    cli.add_command(service.service)


def main() -> None:
    register()
    cli(prog_name="cilia")


if __name__ == "__main__":
    main()
