"""``gatewayd``: run the daemon, make a new one, check a config."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import structlog

from relay.aio import run
from relay.errors import ConfigError, GatewayError

from . import config as config_mod


def _setup_logging(level: str) -> None:
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper())
    structlog.configure(
        processors=[
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
    )


@click.group(invoke_without_command=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Config file (TOML). Runs the daemon when no command is given.",
)
@click.option(
    "--log-level",
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"]),
    show_default=True,
)
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, log_level: str) -> None:
    """The gateway daemon: `gatewayd --config PATH` runs it."""
    ctx.obj = config_path
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("give --config PATH (or run `gatewayd init --dir DIR` first)")
    _setup_logging(log_level)
    try:
        cfg = config_mod.load(config_path)
    except ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from exc
    from .malloc import return_big_blocks
    from .server import serve

    return_big_blocks()  # password hashes' memory goes back to the system after each
    try:
        run(serve(cfg))
    except GatewayError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("check-config")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None)
@click.pass_obj
def check_config(parent: Path | None, config_path: Path | None) -> None:
    """Validate a config file: exit 0, or print the key at fault and exit 1."""
    path = config_path or parent
    if path is None:
        raise click.UsageError("give --config PATH")
    try:
        cfg = config_mod.load(path)
    except ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from exc
    missing = [
        str(p)
        for p in (
            cfg.tls.cert_file,
            cfg.tls.key_file,
            cfg.tls.ca_file,
            cfg.tls.ca_key_file,
            cfg.store.secrets_key_file,
        )
        if not p.exists()
    ]
    if missing:
        raise click.ClickException(f"config error: files not found: {', '.join(missing)}")
    try:
        unfilled = config_mod.check_factor_files(cfg)  # [auth.smartcard] anchors, CRLs
    except ConfigError as exc:
        raise click.ClickException(f"config error: {exc}") from exc
    for warning in unfilled:
        click.echo(f"warning: {warning}", err=True)
    _warn_unusable_fido2(cfg)
    click.echo(f"{path}: ok")


def _warn_unusable_fido2(cfg: config_mod.Config) -> None:
    """Modes that take a security key on a host without python-fido2: valid, but say so."""
    from .fido2_registration import modes_accepting

    modes = modes_accepting(cfg)
    if not modes:
        return
    from auth import fido2

    try:
        fido2.FACTOR.verifier()
    except ConfigError as exc:
        click.echo(
            f"warning: modes {', '.join(modes)} accept security keys, but {exc}; "
            "until then users prove that step with the other factor",
            err=True,
        )


@main.command("init")
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path))
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="HOST:PORT")
@click.option(
    "--name", "names", multiple=True, help="Extra DNS name or IP for the server certificate."
)
def init_cmd(directory: Path, listen: str, names: tuple[str, ...]) -> None:
    """Create a config, CA, server certificate and state folder in DIR."""
    from .init import audit_public_key, init

    try:
        addr = config_mod.parse_listen(listen, "--listen")
        config_path, ca_file = init(directory, addr, list(names))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from exc
    except (FileExistsError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"config: {config_path}")
    click.echo(f"ca-file: {ca_file}")
    click.echo(f"audit key (verifies the trail's checkpoints): {audit_public_key(config_path)}")
    click.echo(
        f"homeoffice (smartcard): put the national CA's certificates and CRLs in "
        f"{config_path.parent / 'pki'} and name them in [auth.smartcard] of {config_path.name}"
    )
    click.echo(f"run: gatewayd --config {config_path}")


if __name__ == "__main__":  # pragma: no cover
    main()
