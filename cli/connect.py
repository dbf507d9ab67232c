"""``gw connect`` and ``gw agents``: log in at the gateway and reach an agent's service."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from relay.errors import RemoteError
from relay.text import is_printable

from .common import (
    EXIT_LOCAL,
    config_home,
    execute,
    fail,
    gateway_client,
    info,
    print_rows,
    prompt,
    prompt_on_terminal,
    read_stdin_line,
)
from .profile import client_target, profile_options


class Progress:
    """What ``gw connect`` waits for (login, approval with the seconds left, dialling), on
    one line of a terminal (standard error), rewritten in place; nothing in scripts."""

    def __init__(self) -> None:
        self.on = sys.stderr.isatty()
        self._shown = False
        self._timer: asyncio.TimerHandle | None = None

    def show(self, text: str) -> None:
        if self.on:
            sys.stderr.write(f"\r\x1b[K{text}")
            sys.stderr.flush()
            self._shown = True

    def clear(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False

    def say(self, message: str) -> None:
        """A message on its own line: the progress line is erased first."""
        self.clear()
        info(message)

    def ask(self, text: str, secret: bool) -> str:
        """A prompt at the start of a clean line."""
        self.clear()
        return prompt(text, secret)

    def countdown(self, seconds: float, sas: str) -> None:
        """Approval: the seconds left, once a second, until :meth:`clear`."""
        if not self.on:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds

        def tick() -> None:
            left = max(0.0, deadline - loop.time())
            self.show(f"gw: waiting for approval at the machine: {left:.0f} s left (code {sas})")
            self._timer = loop.call_later(1.0, tick) if left > 0 else None

        tick()

    def around(self, prove: Any) -> Any:
        """A ``prove`` callback that clears the line first, so prompts start clean."""

        async def answer(method: str, payload: dict[str, Any], binding: bytes) -> Any:
            self.clear()
            return await prove(method, payload, binding)

        return answer


def _local_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"expected [ADDR:]PORT, got {value!r}", param_hint="-L")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def _check_reason(value: str) -> str:
    """``--reason`` is shown at the machine: printable text on one line, bounded."""
    from relay.message import MAX_REASON

    if len(value) > MAX_REASON:
        raise click.BadParameter(f"at most {MAX_REASON} characters", param_hint="--reason")
    if not is_printable(value):
        raise click.BadParameter(
            "printable text on one line only (no control, line break or bidi characters)",
            param_hint="--reason",
        )
    return value


def _client_key(path: Path | None) -> bytes:
    """The client's Noise static key: kept per user so the agent sees a stable identity."""
    from relay import noise

    if path is None:
        return noise.generate_keypair()[0]
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
        fail(f"{path} is not a 32-byte key", EXIT_LOCAL)
    except FileNotFoundError:
        key = noise.generate_keypair()[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key


def _add_factor_values(values: dict[str, Any], pairs: tuple[str, ...]) -> None:
    """``--factor-value FACTOR=VALUE``: the value a factor's prover finds under its name."""
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(
                f"expected FACTOR=VALUE, got {pair!r}", param_hint="--factor-value"
            )
        if name == "password":
            raise click.BadParameter(
                "the password is not taken here (it would show in the process list): "
                "use --password-stdin or GW_PASSWORD",
                param_hint="--factor-value",
            )
        if name in values:
            raise click.BadParameter(
                f"{name} is set by its own option or given twice", param_hint="--factor-value"
            )
        values[name] = value


@click.command()
@click.argument("agent")
@profile_options
@click.option("--target", required=True, help="Name of the agent's service.")
@click.option(
    "--mode",
    default=None,
    type=click.Choice(["access", "support", "homeoffice"]),
    help="[env GW_MODE; profile; else the mode you are logged in for; else access]",
)
@click.option(
    "-L", "local", metavar="[ADDR:]PORT", help="Listen here; each connection is a tunnel."
)
@click.option("--stdio", is_flag=True, help="One tunnel on standard input and output.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
@click.option("--totp", "totp_code", metavar="CODE", help="Authenticator code (else asked).")
@click.option(
    "--fido2",
    "use_fido2",
    is_flag=True,
    help="Prove the second factor with your security key (YubiKey), not a code.",
)
@click.option(
    "--fido2-device",
    metavar="NAME",
    default=None,
    help="The security key to use when several are there (a part of its name: the USB "
    "product or the NFC/PC/SC reader); implies --fido2.",
)
@click.option(
    "--smartcard",
    "use_smartcard",
    is_flag=True,
    help="Prove who you are with your PKI smartcard; its PIN is asked (homeoffice).",
)
@click.option(
    "--reader",
    metavar="NAME",
    default=None,
    help="The smartcard reader (a unique part of its name); default: one with a card.",
)
@click.option(
    "--pkcs11-module",
    metavar="PATH",
    envvar="GW_PKCS11_MODULE",
    default=None,
    help="Use the smartcard through this PKCS#11 module (the card's middleware, "
    "e.g. OpenSC's opensc-pkcs11.so) instead of PIV over PC/SC [env GW_PKCS11_MODULE].",
)
@click.option(
    "--cert-label",
    metavar="LABEL",
    default=None,
    help="With --pkcs11-module: the certificate's label, when the card holds several that fit.",
)
@click.option(
    "--reason",
    default="",
    envvar="GW_REASON",
    callback=lambda _ctx, _param, value: _check_reason(value),
    help="Why (ticket number, sentence); kept in the audit trail [env GW_REASON].",
)
@click.option(
    "--known-agents",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Pinned agent keys (default ~/.config/gw/known_agents.json).",
)
@click.option(
    "--agent-key",
    "agent_key",
    metavar="FINGERPRINT",
    default=None,
    help="The agent's key fingerprint (SHA256:..., from `gw agent fingerprint` at the "
    "machine); anything else is refused before a byte is sent.",
)
@click.option(
    "--strict-agent-key",
    is_flag=True,
    help="Refuse an agent whose key is not known (known-agents file or --agent-key) "
    "instead of pinning it on first use.",
)
@click.option(
    "--identity",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Your Noise key file (default ~/.config/gw/identity.key).",
)
@click.option(
    "--factor-value",
    "factor_values",
    multiple=True,
    metavar="FACTOR=VALUE",
    help="A value for that factor's prover, e.g. a plug-in factor's code (repeatable; "
    "else the factor asks).",
)
@click.option("-v", "--verbose", is_flag=True, help="Say what happens, with each tunnel's SAS.")
def connect(
    agent: str,
    gateway: str | None,
    ca_file: Path | None,
    user: str | None,
    target: str,
    mode: str | None,
    local: str | None,
    stdio: bool,
    password_stdin: bool,
    totp_code: str | None,
    use_fido2: bool,
    fido2_device: str | None,
    use_smartcard: bool,
    reader: str | None,
    pkcs11_module: str | None,
    cert_label: str | None,
    reason: str,
    known_agents: Path | None,
    agent_key: str | None,
    strict_agent_key: bool,
    identity: Path | None,
    factor_values: tuple[str, ...],
    verbose: bool,
) -> None:
    """Open an end-to-end encrypted tunnel to TARGET on AGENT through the gateway."""
    from auth.base import ProverOptions
    from relay import noise
    from relay.client import AgentKeyCheck, KnownAgents, describe, open_session

    from .card import run_watched
    from .fido2 import choose_key
    from .known_agents import fingerprint_arg
    from .login import Logins, choose_mode, credential_prover, ended, prove_with

    if bool(local) == stdio:
        raise click.UsageError("give exactly one of -L [ADDR:]PORT or --stdio")
    if stdio:
        # Standard input and output carry the tunnel (ssh's ProxyCommand): whatever
        # must be asked is asked on the controlling terminal.
        prompt_on_terminal()
        for stream, name in ((sys.stdin, "input"), (sys.stdout, "output")):
            if stream is None:  # closed when gw started: its descriptor will be a socket's
                fail(f"standard {name} is closed", EXIT_LOCAL)
    listen = _local_address(local) if local else None
    resolved, gateway, ca_path, user = client_target(gateway, ca_file, user)
    password = None
    if password_stdin:
        password = read_stdin_line()
        if not password:
            fail("--password-stdin: standard input held no password", EXIT_LOCAL)
    password = password or os.environ.get("GW_PASSWORD")
    gw = gateway_client(gateway, ca_path)
    where = f"{gw.host}:{gw.port}"
    logins = Logins()
    mode = choose_mode(resolved, mode, logins, where, user)
    stored = logins.load(where, user, mode, time.time())
    progress = Progress()
    expected = fingerprint_arg(agent_key, "--agent-key") if agent_key else None
    values: dict[str, Any] = {"password": password, "totp": totp_code, "notify": progress.say}
    values["smartcard_reader"] = reader
    values["fido2_device_name"] = fido2_device
    values["fido2_choose"] = choose_key
    use_fido2 = use_fido2 or fido2_device is not None
    values["pkcs11_module"] = pkcs11_module
    values["cert_label"] = cert_label
    if cert_label is not None and not pkcs11_module:
        raise click.UsageError("--cert-label needs --pkcs11-module")
    _add_factor_values(values, factor_values)
    by_card = use_smartcard or reader is not None or cert_label is not None
    smartcard_first = ("smartcard",) if by_card else ()
    options = ProverOptions(user=user, prompt=progress.ask, values=values)
    provers: dict[str, Any] = {}
    home = config_home()
    known = KnownAgents(known_agents or home / "known_agents.json")
    agent_keys = AgentKeyCheck(known, f"{gw.host}:{gw.port}", agent, expected, strict_agent_key)
    static = _client_key(identity or home / "identity.key")

    prove = progress.around(credential_prover(stored, prove_with(provers, options)))

    def pending(seconds: float, sas: str) -> None:
        progress.say(
            f"gw: waiting for approval at the machine (up to {seconds:.0f} s).\n"
            f"gw: the person there sees this code; it must match: {sas}"
        )
        progress.countdown(seconds, sas)

    async def opened(credential: str) -> Any:
        progress.show(f"gw: logging in to {where} as {user}...")
        try:
            return await open_session(
                gw,
                user=user,
                agent=agent,
                target=target,
                mode=mode,
                reason=reason,
                static_private=static,
                prove=prove,
                on_pending=pending,
                factors=smartcard_first + (("fido2", "totp") if use_fido2 else ("totp", "fido2")),
                agent_keys=agent_keys,
                credential=credential,
            )
        finally:
            progress.clear()

    async def session() -> None:
        started = time.monotonic()
        try:
            s = await opened(stored.credential if stored else "")
        except RemoteError as exc:
            if stored is None or not ended(exc):
                raise
            logins.remove(where, user, mode)
            progress.say(f"gw: your gw login has ended ({describe(exc)}); asking for your factors")
            s = await opened("")
        if s.pinned:
            how = "checked with --agent-key" if expected else "first connection, not checked"
            fp = noise.fingerprint(s.agent_identity)
            progress.say(f"gw: pinned the key of agent {agent} ({how}): {fp}")
        if verbose:
            progress.say(
                f"gw: session {s.opened.session_id} open in {time.monotonic() - started:.2f}s"
            )

        def shown(est: Any) -> None:
            progress.clear()
            if verbose:
                how = "X25519 + ML-KEM-768" if est.hybrid else "X25519"
                how += ", AES-256-GCM" if est.cipher == "AESGCM" else ", ChaCha20-Poly1305"
                progress.say(
                    f"gw: tunnel to {agent}/{target} end-to-end encrypted ({how}); SAS {est.sas}"
                )

        s.on_tunnel = shown
        s.on_dial = lambda: progress.show(f"gw: dialling {agent}/{target}...")

        async def work() -> None:
            if listen is not None:

                def ready(where: str) -> None:
                    progress.say(f"gw: listening on {where} for {agent}/{target}")

                def failed(why: str) -> None:
                    progress.say(f"gw: tunnel failed: {why}")

                why = await s.serve_local(listen[0], listen[1], failed, ready)
                if why:
                    fail(f"session ended: {why}")
                progress.say("gw: session ended")
            else:
                await s.stdio()

        try:
            # With a smartcard login, pulling the card ends the session (exit 1).
            await run_watched(s, provers.get("smartcard"), work())
        finally:
            s.close()
            for p in provers.values():
                await p.aclose()

    async def cleared() -> None:
        try:
            await session()
        finally:
            progress.clear()  # the terminal is left clean, whatever ended the session

    execute(cleared())


@click.command("agents")
@profile_options
@click.option(
    "--mode",
    default=None,
    type=click.Choice(["access", "support", "homeoffice"]),
    help="Log in with this mode's factors (or its gw login) [env GW_MODE; profile; "
    "else the mode you are logged in for; else access].",
)
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--totp", "totp_code", metavar="CODE", help="Authenticator code (else asked).")
@click.option("--fido2", "use_fido2", is_flag=True, help="Use your security key.")
@click.option("--smartcard", "use_smartcard", is_flag=True, help="Use your smartcard.")
@click.option("--json", "as_json", is_flag=True)
def agents_cmd(
    gateway: str | None,
    ca_file: Path | None,
    user: str | None,
    mode: str | None,
    password_stdin: bool,
    totp_code: str | None,
    use_fido2: bool,
    use_smartcard: bool,
    as_json: bool,
) -> None:
    """After login: the agents you may reach, with the modes allowed for each."""
    from auth.base import ProverOptions
    from relay import noise
    from relay.client import describe, list_agents

    from .login import Logins, choose_mode, credential_prover, ended, prove_with

    resolved, gateway, ca_path, user = client_target(gateway, ca_file, user)
    password = read_stdin_line() if password_stdin else os.environ.get("GW_PASSWORD")
    gw = gateway_client(gateway, ca_path)
    where = f"{gw.host}:{gw.port}"
    logins = Logins()
    mode = choose_mode(resolved, mode, logins, where, user)
    stored = logins.load(where, user, mode, time.time())
    values = {"password": password, "totp": totp_code, "notify": info}
    provers: dict[str, Any] = {}
    prove = credential_prover(
        stored, prove_with(provers, ProverOptions(user=user, prompt=prompt, values=values))
    )
    first = ("smartcard",) if use_smartcard else ()

    async def listed(credential: str) -> dict[str, Any]:
        return await list_agents(
            gw,
            user=user,
            mode=mode,
            static_private=noise.generate_keypair()[0],
            prove=prove,
            factors=first + (("fido2", "totp") if use_fido2 else ("totp", "fido2")),
            credential=credential,
        )

    async def go() -> dict[str, Any]:
        try:
            try:
                return await listed(stored.credential if stored else "")
            except RemoteError as exc:
                if stored is None or not ended(exc):
                    raise
                logins.remove(where, user, mode)
                info(f"gw: your gw login has ended ({describe(exc)}); asking for your factors")
                return await listed("")
        finally:
            for p in provers.values():
                await p.aclose()

    found = execute(go())
    rows = [{"agent": k, **v} for k, v in sorted(found.items())]
    print_rows(rows, as_json, ["agent", "org", "modes", "online", "targets"])


# -- agent ----------------------------------------------------------------------------
