"""PKI smartcards in ``gw``: watching the card during a session; enrolling it (admin).

``gw connect --smartcard``: the session lasts as long as the card stays in its reader.

The smartcard prover remembers the reader its login used (``prover.reader``). If the
gateway's ``session`` message says so (``watch_card``, the mode's
``end_on_card_removal``), :func:`run_watched` runs the session's work next to
:func:`auth.smartcard.wait_for_removal`; when the card leaves the reader (pulled out,
swapped, the reader unplugged, PC/SC gone), it tells the gateway why with ``bye``
(audited as ``session.end``, reason ``client: card removed``), stops every tunnel and
raises :class:`CardRemoved`, which ``gw`` prints as one line and exits 1 for.

While the card is seen in its reader, the session's control connection carries a
``card_present`` message every ``card_heartbeat`` seconds (when the gateway asks for
it): the gateway ends the session by itself when they stop, so the rule holds even
for a client that does not keep it.

A card used through a PKCS#11 module (``--pkcs11-module``) is watched the same way by
its prover's own ``wait_for_removal`` (:mod:`auth.pkcs11`: token-present polling), which
feeds the same heartbeat.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from relay.errors import GatewayError

from .common import EXIT_LOCAL, admin_request, fail

if TYPE_CHECKING:
    from relay.client import ClientSession

#: The reason the gateway's audit record gets (prefixed ``client:``).
REASON = "card removed"


class CardRemoved(GatewayError):
    """The smartcard that proved the login left its reader; the session was ended."""


def watched_reader(session: ClientSession, prover: object | None) -> str | None:
    """The reader to watch, or None when no card proved this login or the mode says not to."""
    reader = getattr(prover, "reader", None)
    if not isinstance(reader, str) or not session.opened.watch_card:
        return None
    return reader


async def run_watched(
    session: ClientSession, prover: object | None, work: Coroutine[Any, Any, None]
) -> None:
    """Run ``work`` (serving tunnels) until it ends, or until the card is pulled."""
    reader = watched_reader(session, prover)
    if reader is None:
        await work
        return
    from auth.smartcard import wait_for_removal

    interval = session.opened.card_heartbeat
    last_sent = -interval

    def present() -> None:
        nonlocal last_sent
        now = time.monotonic()
        if interval and now - last_sent >= interval:
            last_sent = now
            session.card_present()

    main = asyncio.ensure_future(work)
    own = getattr(prover, "wait_for_removal", None)  # a PKCS#11 token watches itself
    watch = (
        own(on_present=present) if callable(own) else wait_for_removal(reader, on_present=present)
    )
    watcher = asyncio.ensure_future(watch)
    try:
        await asyncio.wait({main, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if main.done():
            main.result()  # the session ended first: its own outcome
            return
        # The card is gone (or cannot be watched any more: fail closed).
        session.end(REASON)
        raise CardRemoved(f"the smartcard was removed from {reader!r}: session ended")
    finally:
        for task in (main, watcher):
            task.cancel()
        await asyncio.gather(main, watcher, return_exceptions=True)


# -- gw admin user add / set-cert --------------------------------------------------------


def cert_args(cert_serial: str | None, cert_file: Path | None) -> dict[str, str]:
    """The admin request's smartcard arguments from ``--cert-serial`` / ``--cert-file``.

    A DER file is sent as PEM; the gateway reads the subject field its config names.
    """
    if cert_serial is not None and cert_file is not None:
        raise click.UsageError("give either --cert-serial or --cert-file, not both")
    if cert_file is None:
        return {} if cert_serial is None else {"cert_serial": cert_serial}
    try:
        data = cert_file.read_bytes()
    except OSError as exc:
        fail(f"cannot read {cert_file}: {exc.strerror or exc}", EXIT_LOCAL)
    if b"-----BEGIN" not in data:  # DER
        body = base64.encodebytes(data).decode("ascii")
        return {"certificate": f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"}
    try:
        return {"certificate": data.decode("ascii")}
    except UnicodeDecodeError:
        fail(f"{cert_file} is not a PEM or DER certificate", EXIT_LOCAL)


def describe_card(result: dict[str, Any]) -> str:
    """``smartcard UN:NO-... (issuer ...)`` from an admin result, or ""."""
    serial = result.get("cert_serial")
    if not serial:
        return ""
    issuer = result.get("issuer")
    return f"smartcard {serial}" + (f" (issuer {issuer})" if issuer else "")


# -- gw admin grant ----------------------------------------------------------------------
# cli.admin adds this group.


@click.group("grant")
def admin_grant() -> None:
    """Homeoffice: the agents (office PCs) that are an employee's own equipment."""


@admin_grant.command("add")
@click.argument("user")
@click.argument("agent")
@click.pass_obj
def grant_add(socket: Path, user: str, agent: str) -> None:
    """Let employee USER reach AGENT in homeoffice mode."""
    admin_request(socket, "grant.add", user=user, agent=agent)
    click.echo(f"{agent} granted to {user}")


@admin_grant.command("remove")
@click.argument("user")
@click.argument("agent")
@click.pass_obj
def grant_remove(socket: Path, user: str, agent: str) -> None:
    """Take AGENT away from employee USER."""
    admin_request(socket, "grant.remove", user=user, agent=agent)
    click.echo(f"{agent} no longer granted to {user}")
