"""``gatewayd``: run the daemon, make a new one, check a config.

Exit codes (docs/exit-codes.md, the same table as ``gw``'s):

== ========================================================================
0  success (the daemon stopped on SIGTERM; the config is valid)
1  the daemon could not start or failed: the port is taken, another gatewayd
   holds the state, TLS files do not load
2  usage error (click's own)
4  the config: missing, unreadable or invalid (every problem is listed)
== ========================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import click

from relay.aio import run
from relay.errors import ConfigError, GatewayError

from . import config as config_mod

EXIT_FAILED, EXIT_CONFIG = 1, 4


class ConfigFailure(click.ClickException):
    """A config that cannot be used: exit 4, after its problems one a line."""

    exit_code = EXIT_CONFIG


def config_failure(path: Path, exc: ConfigError) -> NoReturn:
    """Say every problem of the config at ``path`` (``file:line: key: what``) and exit 4."""
    if not isinstance(exc, config_mod.ConfigProblems):
        hint = ""
        if not path.exists() and path == config_mod.DEFAULT_PATH:
            hint = (
                f" (give --config PATH, set {config_mod.ENV_VAR}, "
                "or run `gatewayd init --dir DIR` first)"
            )
        raise ConfigFailure(f"config error: {exc}{hint}") from exc
    for problem, line in zip(exc.problems, exc.lines, strict=True):
        click.echo(f"{path}:{line}: {problem}" if line else f"{path}: {problem}", err=True)
    count = len(exc.problems)
    plural = "s" if count != 1 else ""
    raise ConfigFailure(f"config error: {count} problem{plural} in {path}") from exc


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gatewayd", prog_name="gatewayd", message="%(prog)s %(version)s")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help=f"Config file (TOML); default ${config_mod.ENV_VAR} or {config_mod.DEFAULT_PATH}. "
    "Runs the daemon when no command is given.",
)
@click.option(
    "--log-level",
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"]),
    show_default=True,
)
@click.option(
    "--log-format",
    default="auto",
    type=click.Choice(["auto", "journal", "json"]),
    show_default=True,
    help="journal: syslog priority prefixes for the systemd journal; json: one object a "
    "line; auto: journal when standard error is the journal (JOURNAL_STREAM).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=int,
    help="Run N processes sharing the port (SO_REUSEPORT), each a node of the cluster "
    "(needs [cluster] with data_listen).",
)
@click.option("--worker", default=0, type=int, hidden=True)  # the supervisor's children
@click.pass_context
def main(
    ctx: click.Context,
    config_path: Path | None,
    log_level: str,
    log_format: str,
    workers: int,
    worker: int,
) -> None:
    """The gateway daemon: `gatewayd [--config PATH]` runs it."""
    ctx.obj = config_path
    if ctx.invoked_subcommand is not None:
        return
    from .logs import setup

    setup(log_level, fmt=log_format)
    path = config_mod.default_path(config_path)
    try:
        cfg = config_mod.load(path)
    except ConfigError as exc:
        config_failure(path, exc)
    from .cluster import workers as workers_mod

    try:
        workers_mod.check(cfg, workers)
        if not 0 <= worker <= workers:
            raise ConfigError("--worker", f"must be between 1 and --workers ({workers})")
    except ConfigError as exc:
        config_failure(path, exc)
    if workers > 1 and not worker:
        passthrough = ["--log-level", log_level, "--log-format", log_format]
        ctx.exit(workers_mod.supervise(path, workers, passthrough))
    if worker:
        cfg = workers_mod.worker_config(cfg, worker)
    from .malloc import return_big_blocks
    from .server import serve

    return_big_blocks()  # password hashes' memory goes back to the system after each
    try:
        run(serve(cfg, worker=worker))
    except GatewayError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("check-config")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help=f"Default ${config_mod.ENV_VAR} or {config_mod.DEFAULT_PATH}.",
)
@click.pass_obj
def check_config(parent: Path | None, config_path: Path | None) -> None:
    """Validate a config file: exit 0, or list every problem (file:line: key: what), exit 4."""
    path = config_mod.default_path(config_path or parent)
    try:
        cfg = config_mod.load(path)
    except ConfigError as exc:
        config_failure(path, exc)
    missing = [
        str(p)
        for p in (
            cfg.tls.cert_file,
            cfg.tls.key_file,
            cfg.tls.ca_file,
            cfg.tls.ca_key_file,
            cfg.store.secrets_key_file,
            *(cfg.cluster.files() if cfg.cluster is not None else ()),
        )
        if not p.exists()
    ]
    if missing:
        raise ConfigFailure(f"config error: files not found: {', '.join(missing)}")
    try:
        unfilled = config_mod.check_factor_files(cfg)  # [auth.smartcard] anchors, CRLs
    except ConfigError as exc:
        raise ConfigFailure(f"config error: {exc}") from exc
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
