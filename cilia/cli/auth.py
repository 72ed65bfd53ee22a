"""`cilia auth init`: generate credentials (tokens per role, NATS users) and a nats-server config."""

from __future__ import annotations

from pathlib import Path

import click

from cilia import auth as authmod


@click.group()
def auth() -> None:
    """Credentials for the services (ARCHITECTURE.md §10)."""


@auth.command("init")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="where to write credentials.yaml and nats.conf",
)
@click.option("--nats-host", default="127.0.0.1", show_default=True)
@click.option("--nats-port", type=int, default=4222, show_default=True)
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="JetStream store (default: DIR/jetstream)",
)
@click.option(
    "--monitor-port", type=int, default=None, help="also serve nats-server monitoring (/healthz) on this port"
)
@click.option("--force", is_flag=True, help="replace existing credentials")
def init_cmd(
    directory: Path,
    nats_host: str,
    nats_port: int,
    store_dir: Path | None,
    monitor_port: int | None,
    force: bool,
) -> None:
    """Generate fresh random credentials, once: an existing credentials.yaml is kept unless --force."""
    creds_path = directory / "credentials.yaml"
    if creds_path.exists() and not force:
        creds = authmod.load(creds_path)
        click.echo(f"keeping existing {creds_path}")
    else:
        creds = authmod.generate()
        authmod.write(creds, creds_path)
        click.echo(f"wrote {creds_path} (mode 0600)")
    conf = directory / "nats.conf"
    store = store_dir or directory / "jetstream"
    conf.write_text(authmod.nats_config(creds, nats_host, nats_port, store, monitor_port))
    conf.chmod(0o600)
    click.echo(f"wrote {conf}")
    click.echo(f"export CILIA_TOKEN_FILE={creds_path.resolve()}")
