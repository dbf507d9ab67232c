"""Agent keys checked out of band: ``gw agent fingerprint`` and ``gw known-agents``.

At the machine, the person there reads the agent's end-to-end key fingerprint::

    gw agent fingerprint --state-dir /var/lib/gw-agent
    SHA256:2Xk0...   (OpenSSH's format: base64 of the SHA-256 of the raw key, no padding)

and the client checks it once (``gw connect --agent-key SHA256:...``) or keeps it::

    gw known-agents add reception-pc SHA256:2Xk0... --gateway gw.example.org:8443
    gw known-agents list [--gateway HOST:PORT] [--json]
    gw known-agents forget reception-pc [--gateway gw.example.org:8443]   # like ssh-keygen -R

``cli.main`` adds ``known-agents`` and ``cli.agent`` adds ``agent fingerprint``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from relay.errors import GatewayError

from .common import EXIT_LOCAL, config_home, fail

if TYPE_CHECKING:
    from relay.client import KnownAgents

F = TypeVar("F", bound=Callable[..., Any])

KNOWN_AGENTS_HELP = "The known-agents file (default ~/.config/gw/known_agents.json)."


def fingerprint_arg(value: str, param: str) -> str:
    """A fingerprint (or a raw base64url key) typed by a person, as a fingerprint."""
    from relay import noise
    from relay.client import agent_key_bytes
    from relay.errors import ProtocolError

    try:
        if not value.strip().startswith("SHA256:"):
            return noise.fingerprint(agent_key_bytes(value.strip()))
        return noise.parse_fingerprint(value)
    except (ValueError, ProtocolError) as exc:
        raise click.BadParameter(
            f"{exc}; expected SHA256:... as `gw agent fingerprint` prints it",
            param_hint=param,
        ) from exc


def _known(path: Path | None) -> KnownAgents:
    from relay.client import KnownAgents

    return KnownAgents(path or config_home() / "known_agents.json")


def _gateway_name(value: str) -> str:
    from relay.text import parse_hostport

    try:
        host, port = parse_hostport(value)
    except GatewayError as exc:
        raise click.BadParameter(str(exc), param_hint="--gateway") from exc
    return f"{host}:{port}"


def _known_option(fn: F) -> F:
    return click.option(
        "--known-agents",
        "path",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help=KNOWN_AGENTS_HELP,
    )(fn)


@click.command("fingerprint")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path, file_okay=False))
def agent_fingerprint(state_dir: Path) -> None:
    """Print this agent's end-to-end key fingerprint, to read out to whoever connects.

    It covers the X25519 key and, for an agent with the hybrid handshake, its
    ML-KEM-768 key too: one fingerprint for both.
    """
    from relay import noise
    from relay.client import noise_key, pq_key
    from relay.errors import NoiseError, ProtocolError

    try:
        # The keys the agent really uses; agent.json's copy when they are not readable.
        public = noise.public_key((state_dir / "noise.key").read_bytes())
        try:
            kem = noise.kem_public_key((state_dir / "pq.key").read_bytes())
        except FileNotFoundError:
            kem = None  # enrolled before the hybrid handshake: X25519 alone
        public = noise.hybrid_key(public, kem)
    except PermissionError:
        try:
            info = json.loads((state_dir / "agent.json").read_text())
            kem = pq_key(str(info["pq_key"])) if info.get("pq_key") else None
            public = noise.hybrid_key(noise_key(str(info["noise_key"])), kem)
        except (OSError, ValueError, KeyError, TypeError, ProtocolError, NoiseError) as exc:
            fail(f"{state_dir} holds no readable agent key: {exc}", EXIT_LOCAL)
    except (OSError, NoiseError) as exc:
        fail(f"{state_dir} is not an enrolled agent's state folder: {exc}", EXIT_LOCAL)
    click.echo(noise.fingerprint(public))


@click.group("known-agents")
def known_agents() -> None:
    """The agent keys this client trusts (pinned on first use, or added from a fingerprint)."""


@known_agents.command("add")
@click.argument("agent")
@click.argument("fingerprint")
@click.option("--gateway", required=True, help="Gateway HOST:PORT, as given to gw connect.")
@_known_option
def known_add(agent: str, fingerprint: str, gateway: str, path: Path | None) -> None:
    """Trust FINGERPRINT (from `gw agent fingerprint` at the machine) for AGENT."""
    from relay.client import AgentKeyMismatch

    fp = fingerprint_arg(fingerprint, "FINGERPRINT")
    name = _gateway_name(gateway)
    known = _known(path)
    try:
        added = known.add(name, agent, fp)
    except AgentKeyMismatch as exc:
        fail(str(exc))
    except GatewayError as exc:
        fail(str(exc), EXIT_LOCAL)
    except OSError as exc:
        fail(f"cannot write {known.path}: {exc.strerror or exc}", EXIT_LOCAL)
    click.echo(f"{'added' if added else 'already known'}: {name} {agent} {fp}")


@known_agents.command("list")
@click.option("--gateway", default=None, help="Only this gateway's agents (HOST:PORT).")
@click.option("--json", "as_json", is_flag=True)
@_known_option
def known_list(gateway: str | None, as_json: bool, path: Path | None) -> None:
    """The trusted agent keys, one per line: gateway, agent, fingerprint."""
    known = _known(path)
    only = _gateway_name(gateway) if gateway else None
    try:
        rows = [r for r in known.entries() if only is None or r[0] == only]
    except GatewayError as exc:
        fail(str(exc), EXIT_LOCAL)
    if as_json:
        keys = ("gateway", "agent", "fingerprint")
        click.echo(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=1))
        return
    for row in rows:
        click.echo(" ".join(row))


@known_agents.command("forget")
@click.argument("agent")
@click.option(
    "--gateway",
    default=None,
    help="Only the entry at this gateway (HOST:PORT); default: AGENT at every gateway.",
)
@_known_option
def known_forget(agent: str, gateway: str | None, path: Path | None) -> None:
    """Stop trusting AGENT's key (after a re-enrollment), as ``ssh-keygen -R`` does.

    Each entry dropped is printed with its fingerprint, the file as it was is kept as
    FILE.old; an agent not in the file is said so, and is not an error (exit 0).
    """
    only = _gateway_name(gateway) if gateway else None
    known = _known(path)
    try:
        dropped = known.remove(agent, only)
    except GatewayError as exc:
        fail(str(exc), EXIT_LOCAL)
    except OSError as exc:
        fail(f"cannot write {known.path}: {exc.strerror or exc}", EXIT_LOCAL)
    where = f" at {only}" if only else ""
    if not dropped:
        click.echo(f"agent {agent}{where} not found in {known.path}", err=True)
        return
    for at, fp in dropped:
        click.echo(f"# agent {agent} at {at} found: {fp}")
    click.echo(f"{known.path} updated.", err=True)
    click.echo(f"Original contents retained as {known.path}.old", err=True)
