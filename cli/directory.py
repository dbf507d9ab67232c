"""``gw admin`` life-cycle commands: show, disable, enable, remove; agreements; networks.

Added to the noun groups by :mod:`cli.admin`. Disabling anything a live
session depends on ends that session within a second (the gateway re-checks every
live session after each change).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .common import admin_request, cell


def _show(socket: Path, kind: str, ident: str, as_json: bool) -> None:
    row: dict[str, Any] = admin_request(socket, "show", kind=kind, id=ident)
    if as_json:
        click.echo(json.dumps(row, indent=1))
        return
    width = max(len(k) for k in row)
    for key, value in row.items():
        click.echo(f"{key.ljust(width)}  {cell(value)}")


def _ended(result: dict[str, Any]) -> str:
    n = result.get("sessions_ended", 0)
    return f"; {n} live session{'s' if n != 1 else ''} ended" if n else ""


def add_lifecycle(group: click.Group, kind: str, *, removable: bool = True) -> None:
    """show / disable / enable (/ remove) for one noun."""

    @group.command("show", help=f"Show one {kind}.")
    @click.argument("ident", metavar=kind.upper())
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    def show(socket: Path, ident: str, as_json: bool) -> None:
        _show(socket, kind, ident, as_json)

    @group.command("disable", help=f"Disable a {kind}; its live sessions end.")
    @click.argument("ident", metavar=kind.upper())
    @click.pass_obj
    def disable(socket: Path, ident: str) -> None:
        result = admin_request(socket, "disable", kind=kind, id=ident)
        click.echo(f"{kind} {ident} disabled{_ended(result)}")

    @group.command("enable", help=f"Enable a disabled {kind}.")
    @click.argument("ident", metavar=kind.upper())
    @click.pass_obj
    def enable(socket: Path, ident: str) -> None:
        admin_request(socket, "enable", kind=kind, id=ident)
        click.echo(f"{kind} {ident} enabled")

    if removable:

        @group.command("remove", help=f"Remove a {kind} (refused while others refer to it).")
        @click.argument("ident", metavar=kind.upper())
        @click.pass_obj
        def remove(socket: Path, ident: str) -> None:
            result = admin_request(socket, "remove", kind=kind, id=ident)
            click.echo(f"{kind} {ident} removed{_ended(result)}")


@click.command("networks")
@click.argument("vendor")
@click.argument("cidrs", nargs=-1)
@click.pass_obj
def vendor_networks(socket: Path, vendor: str, cidrs: tuple[str, ...]) -> None:
    """Allow VENDOR's users to log in only from CIDRS (none: from anywhere)."""
    result = admin_request(socket, "vendor.networks", vendor=vendor, networks=list(cidrs))
    shown = ", ".join(result["networks"]) or "anywhere"
    click.echo(f"vendor {vendor} may log in from {shown}{_ended(result)}")


@click.command("accept")
@click.argument("agreement")
@click.option(
    "--side",
    required=True,
    type=click.Choice(["vendor", "org"]),
    help="Which party accepted the terms of use.",
)
@click.pass_obj
def agreement_accept(socket: Path, agreement: str, side: str) -> None:
    """Record that one side accepted the terms of use (both must, before any use)."""
    admin_request(socket, "agreement.accept", agreement=agreement, side=side)
    click.echo(f"agreement {agreement}: accepted by the {side}")


@click.command("suspend")
@click.argument("agreement")
@click.pass_obj
def agreement_suspend(socket: Path, agreement: str) -> None:
    """Suspend an agreement; sessions under it end."""
    result = admin_request(socket, "agreement.state", agreement=agreement, state="suspended")
    click.echo(f"agreement {agreement} suspended{_ended(result)}")


@click.command("resume")
@click.argument("agreement")
@click.pass_obj
def agreement_resume(socket: Path, agreement: str) -> None:
    """Make a suspended agreement active again."""
    admin_request(socket, "agreement.state", agreement=agreement, state="active")
    click.echo(f"agreement {agreement} active")


@click.command("show")
@click.argument("agreement")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def agreement_show(socket: Path, agreement: str, as_json: bool) -> None:
    """Show one agreement."""
    _show(socket, "agreement", agreement, as_json)


@click.command("remove")
@click.argument("agreement")
@click.pass_obj
def agreement_remove(socket: Path, agreement: str) -> None:
    """Remove an agreement; sessions under it end."""
    result = admin_request(socket, "remove", kind="agreement", id=agreement)
    click.echo(f"agreement {agreement} removed{_ended(result)}")
