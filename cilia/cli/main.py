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
def cli() -> None:
    """cilia: Cilium's network security model — identities, CiliumNetworkPolicy, eBPF, flows."""


def register() -> None:
    from cilia.cli import policy

    cli.add_command(policy.policy)


def main() -> None:
    register()
    cli(prog_name="cilia")


if __name__ == "__main__":
    main()
