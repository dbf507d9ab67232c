"""``gw agent``: enroll and run the agent on a reachable machine; answer its approvals."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from relay.errors import GatewayError
from relay.text import parse_hostport, printable

from .common import (
    execute,
    print_rows,
)
from .known_agents import agent_fingerprint
from .options import gateway_options


@click.group()
def agent() -> None:
    """Run the agent on a reachable machine."""


def _agent_config(config_path: Path | None) -> Any:
    """The agent's config file: ``--config``, else the default one if it exists, else an
    empty one (flags alone). A bad file is one line and exit status 4."""
    from relay.agent_config import AgentConfig, AgentConfigError, default_path, load

    from .common import EXIT_LOCAL, fail

    path = config_path or default_path()
    if config_path is None and not path.exists():
        return AgentConfig(path)
    try:
        return load(path)
    except AgentConfigError as exc:
        fail(str(exc), EXIT_LOCAL)


def _state_dir(state_dir: Path | None, config_path: Path | None) -> Path:
    """``--state-dir``, else the config file's ``state_dir``."""
    if state_dir is not None:
        return state_dir
    cfg = _agent_config(config_path)
    if cfg.state_dir is None:
        raise click.UsageError(f"give --state-dir, or state_dir in {cfg.path}")
    found: Path = cfg.state_dir
    return found


def _state_options(fn: Any) -> Any:
    """--state-dir, or --config (the agent's config file) that names it."""
    fn = click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="The agent's config file, for its state_dir (default as gw agent run).",
    )(fn)
    return click.option(
        "--state-dir", type=click.Path(path_type=Path, file_okay=False), default=None
    )(fn)


@agent.command("enroll")
@gateway_options
@click.option("--token", required=True, help="One-time token from `gw admin agent add`.")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path, file_okay=False))
def agent_enroll(gateway: str, ca_file: Path, token: str, state_dir: Path) -> None:
    """Enroll this machine's agent with its one-time token."""
    from relay.agent import enroll

    agent_id = execute(enroll(gateway, ca_file, token, state_dir))
    click.echo(f"enrolled as agent {agent_id}; state in {state_dir}")


@agent.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The agent's config file (TOML). Default: $GW_AGENT_CONFIG, else "
    "/etc/gw-agent/agent.toml if it exists. Flags win over the file.",
)
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), default=None)
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="NAME=HOST:PORT",
    help="A local service to expose under NAME (repeatable; replaces the file's targets).",
)
@click.option(
    "--gateway",
    "gateways",
    multiple=True,
    metavar="HOST:PORT",
    help="A gateway node to connect to (repeatable; replaces the file's gateways). "
    "Default: the address the agent enrolled with.",
)
@click.option(
    "--approval-command",
    default=None,
    metavar="CMD",
    help="Run CMD (a desktop prompt) for each approval; exit 0 approves. "
    "Also run for unattended sessions' start and end (GW_EVENT).",
)
@click.option(
    "--no-prompt", is_flag=True, help="Never ask on this terminal (answer with `gw agent approve`)."
)
def agent_run(
    config_path: Path | None,
    state_dir: Path | None,
    targets: tuple[str, ...],
    gateways: tuple[str, ...],
    approval_command: str | None,
    no_prompt: bool,
) -> None:
    """Connect to the gateway and serve dial requests for the named targets.

    Approval requests are asked on this terminal (when there is one), through
    `gw agent approve/deny`, and through --approval-command; the first answer counts.
    With several gateway nodes the agent moves to another one when its node fails.
    """
    from relay.agent import Agent, AgentState, Backoff
    from relay.approval import Approvals

    cfg = _agent_config(config_path)
    path = cfg.path
    state_dir = state_dir or cfg.state_dir
    if state_dir is None:
        raise click.UsageError(f"give --state-dir, or state_dir in {path}")
    parsed: dict[str, tuple[str, int]] = {}
    for spec in targets:
        name, sep, address = spec.partition("=")
        try:
            if not sep or not name:
                raise GatewayError("expected NAME=HOST:PORT")
            parsed[name] = parse_hostport(address)
        except GatewayError as exc:
            raise click.BadParameter(f"{spec!r}: {exc}", param_hint="--target") from exc
    if not targets:
        parsed = {name: (host, port) for name, host, port in cfg.targets}
    if not parsed:
        raise click.UsageError(f"give --target NAME=HOST:PORT, or a [targets] table in {path}")
    for entry in gateways:
        try:
            parse_hostport(entry)
        except GatewayError as exc:
            raise click.BadParameter(str(exc), param_hint="--gateway") from exc
    command = approval_command or cfg.approval_command
    prompt = cfg.prompt and not no_prompt

    def log(event: str, **fields: Any) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # Values come from the gateway and the vendor: no escape sequences on this terminal.
        extra = " ".join(f"{k}={printable(str(v))}" for k, v in fields.items())
        click.echo(f"{stamp} gw-agent: {printable(event)} {extra}".rstrip(), err=True)

    async def main_() -> None:
        assert state_dir is not None
        state = AgentState.load(state_dir)
        approvals = Approvals(
            state_dir / "approval.sock",
            command=command,
            terminal=None if prompt else False,
            log=log,
        )
        a = Agent(
            state,
            parsed,
            gateways=gateways or cfg.gateways,
            log=log,
            approvals=approvals,
            backoff=Backoff(cfg.backoff_first, cfg.backoff_max),
        )
        log("starting", agent=state.agent, gateways=",".join(a.gateways))
        await a.run()

    execute(main_())


@agent.command("approvals")
@_state_options
@click.option("--json", "as_json", is_flag=True)
def agent_approvals(state_dir: Path | None, config_path: Path | None, as_json: bool) -> None:
    """Pending approval requests at this machine."""
    from relay.approval import request

    folder = _state_dir(state_dir, config_path)
    rows = execute(request(folder / "approval.sock", "list"))
    if not rows and not as_json:
        click.echo("no pending requests")
        return
    cols = ["id", "user", "vendor_name", "mode", "target", "reason", "sas", "seconds_left"]
    print_rows(rows, as_json, cols)


@agent.command("approve")
@click.argument("request_id")
@_state_options
def agent_approve(request_id: str, state_dir: Path | None, config_path: Path | None) -> None:
    """Approve a pending request (recorded with your user name)."""
    from relay.approval import request

    folder = _state_dir(state_dir, config_path)
    result = execute(request(folder / "approval.sock", "approve", id=request_id))
    click.echo(f"approved {request_id} as {result['by']}")


@agent.command("deny")
@click.argument("request_id")
@_state_options
@click.option("--reason", default="", help="Told to the requester and kept in the audit trail.")
def agent_deny(
    request_id: str, state_dir: Path | None, config_path: Path | None, reason: str
) -> None:
    """Deny a pending request."""
    from relay.approval import request

    folder = _state_dir(state_dir, config_path)
    result = execute(request(folder / "approval.sock", "deny", id=request_id, reason=reason))
    click.echo(f"denied {request_id} as {result['by']}")


# -- admin ----------------------------------------------------------------------------


agent.add_command(agent_fingerprint)
