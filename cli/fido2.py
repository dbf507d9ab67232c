"""``gw fido2 register`` and ``gw admin fido2``: security keys (YubiKey) for users.

The person registers their key with the one-time code an administrator made::

    gw admin --config /etc/gatewayd/gatewayd.toml fido2 invite alice     # prints the code
    gw fido2 register --gateway gw.example.org:8443 --ca-file ca.pem --user alice --code CODE

and from then on logs in with ``gw connect ... --fido2``. :func:`register_key` is what
the command runs; tests call it with a software authenticator as ``device``.
``cli.main`` adds ``fido2`` and ``cli.admin`` adds ``admin_fido2``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from auth.base import Prompt
from relay.errors import RemoteError

from . import common as cli
from .options import login_options

if TYPE_CHECKING:
    from relay.client import Gateway

METHOD = "fido2"


async def register_key(
    gateway: Gateway,
    *,
    user: str,
    code: str,
    prompt: Prompt,
    notify: Callable[[str], None] | None = None,
    name: str | None = None,
    device: Any = None,
    pin: str | None = None,
    device_name: str | None = None,
    choose: Callable[[list[str]], int] | None = None,
) -> dict[str, Any]:
    """Register a security key for ``user`` with a one-time ``code``; what the gateway stored.

    ``device`` is a :class:`fido2.ctap.CtapDevice`; None finds the key (USB or PC/SC:
    ``device_name`` or ``choose`` picks one of several) *before* the gateway is
    contacted, so that a missing key or a missing python-fido2 is a
    :class:`relay.errors.DeviceError` that costs no attempt.
    """
    from auth import fido2 as f2
    from relay.registration import register_credential

    owned = None
    if device is None and device_name is None and f2.windows_webauthn():
        pass  # Windows' WebAuthn API finds the key itself (and shows its own dialog)
    elif device is None:
        owned = device = await asyncio.to_thread(f2.open_device, device_name, choose)
    key = device

    async def answer(payload: dict[str, Any], binding: bytes) -> dict[str, Any]:
        return await f2.register(key, payload, binding, prompt, notify=notify, name=name, pin=pin)

    try:
        return await register_credential(
            gateway, user=user, method=METHOD, code=code, answer=answer
        )
    finally:
        if owned is not None:
            owned.close()


def choose_key(names: list[str]) -> int:
    """Ask the person at the terminal which security key to use; -1 without a terminal."""
    if not sys.stdin.isatty() and not os.environ.get("GW_FORCE_PROMPT"):
        return -1
    cli.info("gw: several security keys are there:")
    for i, name in enumerate(names, 1):
        cli.info(f"  {i}. {name}")
    answer = cli.prompt(f"Security key to use (1-{len(names)}): ", False)
    return int(answer) - 1 if answer.isdigit() else -1


# -- gw fido2 -------------------------------------------------------------------------


@click.group("fido2")
def fido2() -> None:
    """Your security key (FIDO2, YubiKey)."""


@fido2.command("register")
@login_options
@click.option("--code", default=None, help="One-time registration code (else asked).")
@click.option("--name", default=None, help="A label for this key, e.g. 'blue YubiKey'.")
@click.option(
    "--fido2-device",
    "device_name",
    metavar="NAME",
    default=None,
    help="The key to use when several are there (a part of its name: USB product or reader).",
)
def register(
    gateway: str,
    ca_file: Path,
    user: str,
    code: str | None,
    name: str | None,
    device_name: str | None,
) -> None:
    """Register the security key plugged in, with the code your administrator gave you."""
    gw = cli.gateway_client(gateway, ca_file)
    code = code or os.environ.get("GW_FIDO2_CODE") or cli.prompt("Registration code: ", False)

    async def run() -> dict[str, Any]:
        try:
            return await register_key(
                gw,
                user=user,
                code=code,
                prompt=cli.prompt,
                notify=cli.info,
                name=name,
                device_name=device_name,
                choose=choose_key,
            )
        except RemoteError as exc:
            if exc.code in ("auth_failed", "denied", "unavailable") and exc.message:
                cli.fail(f"registration refused: {exc.message}")
            raise

    key = cli.execute(run())
    click.echo(f"security key {key.get('name', '')!r} registered for {user} (id {key['id']})")


# -- gw admin fido2 ---------------------------------------------------------------------


@click.group("fido2")
def admin_fido2() -> None:
    """Users' security keys: registration codes, list, remove."""


@admin_fido2.command("invite")
@click.argument("user")
@click.option("--ttl", type=float, default=None, help="Code lifetime in seconds (default 24 h).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def invite(socket: Path, user: str, ttl: float | None, as_json: bool) -> None:
    """Print a one-time code with which USER registers a security key."""
    result = cli.admin_request(socket, "fido2.invite", user=user, ttl=ttl)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(result["code"])
    expires = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(result["expires"]))
    cli.info(
        f"one-time registration code for {user}, valid until {expires}; with the key plugged "
        f"in, they run:\n  gw fido2 register --gateway HOST:PORT --ca-file CA --user {user} "
        "--code CODE"
    )
    if not result["modes"]:
        cli.info("warning: no mode accepts fido2 yet: add it to a [modes.*] factors step")


@admin_fido2.command("list")
@click.argument("user")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def list_keys(socket: Path, user: str, as_json: bool) -> None:
    """USER's registered security keys."""
    rows = cli.admin_request(socket, "fido2.list", user=user)
    cli.print_rows(rows, as_json, ["id", "name", "added", "last_used", "sign_count", "aaguid"])


# Key ids are base64url, so one in 64 starts with "-": not an option here.
@admin_fido2.command("remove", context_settings={"ignore_unknown_options": True})
@click.argument("user")
@click.argument("key_id")
@click.pass_obj
def remove(socket: Path, user: str, key_id: str) -> None:
    """Remove USER's key KEY_ID (its id from `list`, or 8 or more leading characters)."""
    result = cli.admin_request(socket, "fido2.remove", user=user, key=key_id)
    click.echo(
        f"security key {result['name']!r} ({result['id']}) removed from {user}; "
        f"{result['left']} left"
    )
