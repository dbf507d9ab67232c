"""Smaller attacks, each against real processes on loopback: escape sequences from the
wire at the machine's terminal and in its approval command, a client that stops
watching the smartcard.

The attackers are modified clients, as an attacker who controls the client machine
runs them: the real ``gw`` code with one check taken out.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pcsc
import pki
import pytest
from test_smartcard import PASSWORD, PIN, PIN_PROMPT, HomeOffice, Terminal, reload, set_table
from world import PASSWORD as VENDOR_PASSWORD
from world import World

from gatewayd.demo import BIN, round_trip, wait_for
from relay.text import is_printable

pytestmark = pytest.mark.integration

HOSTILE_REASON = "\x1b[2J\x1b[Hnothing to see\nAllow? [y/N] y"

#: A client that sends the reason it is given as it is (gw would refuse it: exit 2).
RAW_REASON_CLIENT = r"""
import asyncio, sys
from pathlib import Path

from relay import message as m

m.ClientHello.__post_init__ = lambda self: None  # this client checks nothing it sends

from auth.base import ProverOptions
from cli.common import gateway_client as _gateway
from cli.login import prove_with
from relay import noise
from relay.client import open_session
from relay.errors import GatewayError

gateway, ca, user, password, totp, agent, reason = sys.argv[1:]


def no_prompt(text, secret):
    raise SystemExit(f"asked {text!r}")


async def main():
    values = {"password": password, "totp": totp}
    prove = prove_with({}, ProverOptions(user=user, prompt=no_prompt, values=values))
    await open_session(
        _gateway(gateway, Path(ca)), user=user, agent=agent, target="echo", mode="access",
        reason=reason, static_private=noise.generate_keypair()[0], prove=prove,
    )
    print("session opened")


try:
    asyncio.run(main())
except GatewayError as exc:
    print(f"refused: {exc}")
"""

#: ``gw`` with the card watch taken out: no ``bye`` when the card leaves, no heartbeat.
CARD_IGNORING_CLIENT = r"""
import sys

import cli.card


async def run_watched(session, prover, work):
    await work


cli.card.run_watched = run_watched
from cli.main import main

sys.argv[0] = "gw"
main()
"""


class TtyAgent:
    """``gw agent run`` in a pseudo-terminal, as at a machine with a person at it."""

    def __init__(self, world: World, name: str, *extra: str) -> None:
        lab = world.lab
        master, slave = os.openpty()
        args = [
            str(BIN / "gw"),
            "agent",
            "run",
            "--state-dir",
            str(lab.root / f"agent-{name}"),
            f"--target=echo=127.0.0.1:{world.echo.port}",
            *extra,
        ]
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=lab.env(), start_new_session=True
        )
        os.close(slave)
        self.master = master
        self.seen = b""

    def read_until(self, text: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            assert time.monotonic() < deadline, f"no {text!r} on the terminal: {self.seen!r}"
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                self.seen += os.read(self.master, 4096)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        os.close(self.master)


def _terminal_controls(output: bytes) -> list[str]:
    """Control characters on a terminal, except the line ends the agent writes itself."""
    text = output.decode("utf-8", "replace").replace("\r\n", "").replace("\n", "")
    return [ch for ch in text if not is_printable(ch)]


@pytest.fixture(scope="module")
def machine(world: World) -> Iterator[tuple[TtyAgent, Path]]:
    """An agent at a machine with a terminal, whose approval command saves its environment."""
    lab = world.lab
    lab.enroll_agent("pc-tty", "clinic")
    dump = lab.root / "approval-env.json"
    save = (
        f"{shlex.quote(sys.executable)} -c 'import json, os; print(json.dumps(dict(os.environ)))'"
    )
    command = f"{save} > {shlex.quote(str(dump))}; sleep 60; exit 1"
    agent = TtyAgent(world, "pc-tty", "--approval-command", command)
    try:
        agent.read_until(b"connected")
        yield agent, dump
    finally:
        agent.close()


def _raw_reason_client(
    world: World, user: str, reason: str, totp: str | None = None
) -> subprocess.CompletedProcess[str]:
    lab = world.lab
    code = totp or lab.totp(user)
    args = [lab.gateway, str(lab.ca_file), user, VENDOR_PASSWORD, code, "pc-tty", reason]
    return subprocess.run(
        [str(BIN / "python"), "-c", RAW_REASON_CLIENT, *args],
        capture_output=True,
        text=True,
        env=lab.env(),
        timeout=60,
    )


def test_reason_with_control_characters_is_refused(world: World, machine: Any) -> None:
    agent, dump = machine
    lab = world.lab
    user = world.new_user("attended")
    # gw itself: a usage error, before it connects.
    args = lab.connect_args("pc-tty", user, "echo", "access", "--stdio", "--reason", "\x1b[2J")
    refused = lab.run(*args, check=False)
    assert refused.returncode == 2, refused.stderr
    assert "--reason" in refused.stderr and "printable" in refused.stderr
    args = lab.connect_args("pc-tty", user, "echo", "access", "--stdio", "--reason", "x" * 1025)
    refused = lab.run(*args, check=False)
    assert refused.returncode == 2 and "at most 1024 characters" in refused.stderr
    # A client that sends it anyway: the gateway refuses it, says why and audits it.
    before = len(lab.events("connection.rejected"))
    result = _raw_reason_client(world, user, HOSTILE_REASON)
    assert result.stdout.startswith("refused: client_hello.reason: control"), result
    wait_for(lambda: len(lab.events("connection.rejected")) > before, 60, "connection.rejected")
    rejected = lab.events("connection.rejected")[-1]
    assert rejected["code"] == "protocol_error" and "client_hello.reason" in rejected["message"]
    # Nothing reached the machine.
    assert not [r for r in lab.events("approval.requested") if r["user"] == user]
    assert b"approval requested" not in agent.seen and not dump.exists()


def test_overlong_reason_is_refused_by_the_gateway(world: World) -> None:
    lab = world.lab
    before = len(lab.events("connection.rejected"))
    result = _raw_reason_client(world, world.new_user("attended"), "x" * 1025, totp="000000")
    assert result.stdout.startswith("refused: client_hello.reason: longer than 1024"), result
    wait_for(lambda: len(lab.events("connection.rejected")) > before, 60, "connection.rejected")
    assert "longer than 1024" in lab.events("connection.rejected")[-1]["message"]


def test_vendor_name_with_escape_sequences_reaches_the_machine_escaped(
    world: World, machine: Any
) -> None:
    """The directory's names and the vendor's reason reach the machine's terminal and
    the approval command's environment with every control character escaped."""
    agent, dump = machine
    lab = world.lab
    lab.admin("vendor", "add", "evil", "--name", "Evil\x1b[2J\x1b]0;owned\x07\nCorp\u202e")
    lab.agreement("evil", "clinic", "access", unattended=False)
    user = world.new_user("evil")
    args = lab.connect_args(
        "pc-tty", user, "echo", "access", "--stdio", "--password-stdin", "--totp", lab.totp(user)
    )
    proc = subprocess.Popen(
        [str(BIN / args[0]), *args[1:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=lab.env(),
    )
    assert proc.stdin is not None
    proc.stdin.write(f"{VENDOR_PASSWORD}\nhello")
    proc.stdin.close()
    try:
        agent.read_until(b"Allow? [y/N]")
        wait_for(lambda: dump.exists() and dump.read_text().strip() != "", 60, "the command")
        assert b"Evil\\x1b[2J\\x1b]0;owned\\x07\\x0aCorp\\u202e" in agent.seen
        assert _terminal_controls(agent.seen) == []
        env = json.loads(dump.read_text())
        gw = {k: v for k, v in env.items() if k.startswith("GW_")}
        assert gw["GW_VENDOR_NAME"] == "Evil\\x1b[2J\\x1b]0;owned\\x07\\x0aCorp\\u202e"
        assert all(is_printable(v) for v in gw.values()), gw
        os.write(agent.master, b"n\n")
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        with proc.stdout, proc.stderr:
            stderr = proc.stderr.read()
    assert proc.returncode == 1 and "approval denied" in stderr
    dump.unlink()


# -- the card heartbeat ------------------------------------------------------------------

HEARTBEAT, HEARTBEAT_TIMEOUT = 1, 3


@pytest.fixture(scope="module")
def office(card_world: World, card_pki: pki.CardPKI, pcscd_vpcd: pcsc.VirtualReaders) -> HomeOffice:
    from test_smartcard import toml_table

    set_table(card_world.lab, "auth.smartcard", toml_table(card_pki.settings()))
    set_table(
        card_world.lab,
        "modes.homeoffice",
        'factors = ["smartcard", "password"]\nend_on_card_removal = true\n'
        f"card_heartbeat = {HEARTBEAT}\ncard_heartbeat_timeout = {HEARTBEAT_TIMEOUT}",
    )
    reload(card_world.lab)
    return HomeOffice(card_world, card_pki, pcscd_vpcd)


def _login(office: HomeOffice, user: str, *program: str) -> tuple[Terminal, int]:
    """Log in with the card in a terminal: ``gw``, or ``program`` run with gw's arguments."""
    from gatewayd.demo import free_port

    port = free_port()
    args = office.lab.connect_args(
        "pc1", user, "echo", "homeoffice", "-L", f"127.0.0.1:{port}", "--smartcard",
        "--reader", office.reader,
    )  # fmt: skip
    term = Terminal(office.lab, [*program, *args[1:]] if program else args)  # args[0]: gw
    try:
        term.expect(PIN_PROMPT)
        term.type(PIN)
        term.expect(rf"Password for {user}: ")
        term.type(PASSWORD)
        term.expect(r"listening on 127\.0\.0\.1:\d+")
    except BaseException:
        term.close()
        raise
    return term, port


def _session_end(office: HomeOffice, user: str, timeout: float) -> dict[str, Any]:
    def ends() -> list[dict[str, Any]]:
        return [r for r in office.lab.events("session.end") if r["user"] == user]

    wait_for(lambda: bool(ends()), timeout, f"session.end of {user}")
    (end,) = ends()
    return end


@pytest.mark.smartcard
def test_client_that_stops_the_card_heartbeat_loses_the_session(office: HomeOffice) -> None:
    """A client that ignores the card: pulled, the session still ends, at the gateway."""
    card = office.pki.card(41)
    user = office.employee(card.person)
    with office.inserted(card.auth) as (_, link):
        term, port = _login(office, user, "python", "-c", CARD_IGNORING_CLIENT)
        try:
            assert round_trip(port, b"hello\n") == b"HELLO\n"
            link.remove()
            end = _session_end(office, user, 60)
            status = term.wait(60)
        finally:
            term.close()
    assert end["reason"] == "card heartbeat stopped"
    assert status == 1 and "session ended: card heartbeat stopped" in term.output


@pytest.mark.smartcard
def test_honest_client_keeps_the_session_while_the_card_is_in(office: HomeOffice) -> None:
    card = office.pki.card(42)
    user = office.employee(card.person)
    with office.inserted(card.auth) as (_, link):
        term, port = _login(office, user)
        try:
            time.sleep(2 * HEARTBEAT_TIMEOUT)  # twice the time a silent client gets
            assert term.proc.poll() is None, term.output
            assert round_trip(port, b"still here\n") == b"STILL HERE\n"
            assert not [r for r in office.lab.events("session.end") if r["user"] == user]
            link.remove()
            end = _session_end(office, user, 60)
            term.wait(60)
        finally:
            term.close()
    assert end["reason"] == "client: card removed"
