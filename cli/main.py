"""``gw``: connect, agent, admin, audit. Parses arguments, calls library code, prints.

Exit codes (fixed, for scripts):

== ========================================================================
0  success
1  the request failed: authentication, policy, agent offline, tunnel failed
2  usage error (click's own)
3  the gateway or the daemon cannot be reached, or TLS/keys do not verify
4  local problem: a file, a device, a missing optional dependency
== ========================================================================
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from relay.aio import run
from relay.errors import DeviceError, GatewayError, RemoteError
from relay.text import is_printable, printable

from .options import gateway_options, login_options

T = TypeVar("T")

EXIT_FAILED, EXIT_UNREACHABLE, EXIT_LOCAL = 1, 3, 4


class Failure(click.ClickException):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]  # click reads it per instance

    def show(self, file: Any = None) -> None:
        click.echo(f"gw: {self.message}", err=True)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    raise Failure(message, code)


def execute(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; every known error becomes one line and an exit code."""
    from relay.client import AgentKeyMismatch, describe

    try:
        return run(coro)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except AgentKeyMismatch as exc:
        fail(str(exc), EXIT_UNREACHABLE)
    except DeviceError as exc:  # no security key, a blocked PIN, a missing library
        fail(str(exc), EXIT_LOCAL)
    except RemoteError as exc:
        fail(describe(exc))
    except GatewayError as exc:
        text = str(exc)
        unreachable = text.startswith(("cannot reach", "the gateway's certificate"))
        fail(describe(exc), EXIT_UNREACHABLE if unreachable else EXIT_FAILED)
    except OSError as exc:
        fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", EXIT_LOCAL)


def prompt(text: str, secret: bool) -> str:
    """Ask the person at the terminal (on stderr, so stdout stays data)."""
    if not sys.stdin.isatty() and not os.environ.get("GW_FORCE_PROMPT"):
        fail(f"{text.strip().rstrip(':')} needed, but there is no terminal to ask on", EXIT_LOCAL)
    if secret:
        return getpass.getpass(text, stream=sys.stderr)
    click.echo(text, nl=False, err=True)
    return sys.stdin.readline().strip()


def read_stdin_line() -> str:
    """One line from standard input, read unbuffered so that what follows stays for the tunnel."""
    data = bytearray()
    while len(data) < 4096 and (byte := os.read(0, 1)) not in (b"", b"\n"):
        data += byte
    return data.decode("utf-8", "replace").rstrip("\r")


def info(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """gw: reach an agent's service through gatewayd; run agents; administer; read the audit."""


# -- connect --------------------------------------------------------------------------


def _gateway(gateway: str, ca_file: Path) -> Any:
    from relay.agent import parse_hostport
    from relay.client import Gateway
    from relay.tls import client_context

    try:
        host, port = parse_hostport(gateway)
        ctx = client_context(ca_file)
    except GatewayError as exc:
        raise click.BadParameter(str(exc), param_hint="--gateway") from exc
    except (OSError, ValueError) as exc:
        fail(f"cannot read the CA file {ca_file}: {exc}", EXIT_LOCAL)
    return Gateway(host, port, ctx)


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


def _config_home() -> Path:
    from relay.platform import config_home  # %APPDATA%\gw on Windows

    return config_home()


@main.command()
@click.argument("agent")
@login_options
@click.option("--target", required=True, help="Name of the agent's service.")
@click.option("--mode", required=True, type=click.Choice(["access", "support", "homeoffice"]))
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
    callback=lambda _ctx, _param, value: _check_reason(value),
    help="Why (ticket number, sentence); kept in the audit trail.",
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
@click.option("-v", "--verbose", is_flag=True, help="Say what happens, with each tunnel's SAS.")
def connect(
    agent: str,
    gateway: str,
    ca_file: Path,
    user: str,
    target: str,
    mode: str,
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
    verbose: bool,
) -> None:
    """Open an end-to-end encrypted tunnel to TARGET on AGENT through the gateway."""
    from auth.base import ProverOptions
    from relay import noise
    from relay.client import AgentKeyCheck, KnownAgents, open_session

    from .card import run_watched
    from .fido2 import choose_key
    from .known_agents import fingerprint_arg

    if bool(local) == stdio:
        raise click.UsageError("give exactly one of -L [ADDR:]PORT or --stdio")
    listen = _local_address(local) if local else None
    password = None
    if password_stdin:
        password = read_stdin_line()
        if not password:
            fail("--password-stdin: standard input held no password", EXIT_LOCAL)
    password = password or os.environ.get("GW_PASSWORD")
    gw = _gateway(gateway, ca_file)
    expected = fingerprint_arg(agent_key, "--agent-key") if agent_key else None
    values: dict[str, Any] = {"password": password, "totp": totp_code, "notify": info}
    values["smartcard_reader"] = reader
    values["fido2_device_name"] = fido2_device
    values["fido2_choose"] = choose_key
    use_fido2 = use_fido2 or fido2_device is not None
    values["pkcs11_module"] = pkcs11_module
    values["cert_label"] = cert_label
    if cert_label is not None and not pkcs11_module:
        raise click.UsageError("--cert-label needs --pkcs11-module")
    by_card = use_smartcard or reader is not None or cert_label is not None
    smartcard_first = ("smartcard",) if by_card else ()
    options = ProverOptions(user=user, prompt=prompt, values=values)
    provers: dict[str, Any] = {}
    home = _config_home()
    known = KnownAgents(known_agents or home / "known_agents.json")
    agent_keys = AgentKeyCheck(known, f"{gw.host}:{gw.port}", agent, expected, strict_agent_key)
    static = _client_key(identity or home / "identity.key")

    prove = _prove_with(provers, options)

    def pending(seconds: float, sas: str) -> None:
        info(
            f"gw: waiting for approval at the machine (up to {seconds:.0f} s).\n"
            f"gw: the person there sees this code; it must match: {sas}"
        )

    async def session() -> None:
        started = time.monotonic()
        s = await open_session(
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
        )
        if s.pinned:
            how = "checked with --agent-key" if expected else "first connection, not checked"
            fp = noise.fingerprint(s.agent_identity)
            info(f"gw: pinned the key of agent {agent} ({how}): {fp}")
        if verbose:
            info(f"gw: session {s.opened.session_id} open in {time.monotonic() - started:.2f}s")

        def shown(est: Any) -> None:
            if verbose:
                how = "X25519 + ML-KEM-768" if est.hybrid else "X25519"
                info(f"gw: tunnel to {agent}/{target} end-to-end encrypted ({how}); SAS {est.sas}")

        s.on_tunnel = shown

        async def work() -> None:
            if listen is not None:

                def ready(where: str) -> None:
                    info(f"gw: listening on {where} for {agent}/{target}")

                why = await s.serve_local(
                    listen[0], listen[1], lambda e: info(f"gw: tunnel failed: {e}"), ready
                )
                if why:
                    fail(f"session ended: {why}")
                info("gw: session ended")
            else:
                await s.stdio()

        try:
            # With a smartcard login, pulling the card ends the session (exit 1).
            await run_watched(s, provers.get("smartcard"), work())
        finally:
            s.close()
            for p in provers.values():
                await p.aclose()

    execute(session())


def _prove_with(provers: dict[str, Any], options: Any) -> Any:
    """The ``prove`` callback: builds each factor's prover on first use."""
    from auth import registry

    async def prove(method: str, payload: dict[str, Any], binding: bytes) -> dict[str, Any]:
        if method not in provers:
            try:
                provers[method] = registry.get(method).prover(options)
            except GatewayError as exc:
                fail(str(exc), EXIT_LOCAL)
        result: dict[str, Any] = await provers[method].respond(payload, binding)
        return result

    return prove


@main.command("agents")
@login_options
@click.option(
    "--mode",
    default="access",
    show_default=True,
    type=click.Choice(["access", "support", "homeoffice"]),
    help="Log in with this mode's factors.",
)
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--totp", "totp_code", metavar="CODE", help="Authenticator code (else asked).")
@click.option("--fido2", "use_fido2", is_flag=True, help="Use your security key.")
@click.option("--smartcard", "use_smartcard", is_flag=True, help="Use your smartcard.")
@click.option("--json", "as_json", is_flag=True)
def agents_cmd(
    gateway: str,
    ca_file: Path,
    user: str,
    mode: str,
    password_stdin: bool,
    totp_code: str | None,
    use_fido2: bool,
    use_smartcard: bool,
    as_json: bool,
) -> None:
    """After login: the agents you may reach, with the modes allowed for each."""
    from auth.base import ProverOptions
    from relay import noise
    from relay.client import list_agents

    password = read_stdin_line() if password_stdin else os.environ.get("GW_PASSWORD")
    gw = _gateway(gateway, ca_file)
    values = {"password": password, "totp": totp_code, "notify": info}
    provers: dict[str, Any] = {}
    prove = _prove_with(provers, ProverOptions(user=user, prompt=prompt, values=values))
    first = ("smartcard",) if use_smartcard else ()

    async def go() -> dict[str, Any]:
        try:
            return await list_agents(
                gw,
                user=user,
                mode=mode,
                static_private=noise.generate_keypair()[0],
                prove=prove,
                factors=first + (("fido2", "totp") if use_fido2 else ("totp", "fido2")),
            )
        finally:
            for p in provers.values():
                await p.aclose()

    found = execute(go())
    rows = [{"agent": k, **v} for k, v in sorted(found.items())]
    _print_rows(rows, as_json, ["agent", "org", "modes", "online", "targets"])


# -- agent ----------------------------------------------------------------------------


@main.group()
def agent() -> None:
    """Run the agent on a reachable machine."""


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
@click.option("--state-dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--target",
    "targets",
    multiple=True,
    required=True,
    metavar="NAME=HOST:PORT",
    help="A local service to expose under NAME (repeatable).",
)
@click.option("--gateway", default=None, help="Override the gateway HOST:PORT from enrollment.")
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
    state_dir: Path,
    targets: tuple[str, ...],
    gateway: str | None,
    approval_command: str | None,
    no_prompt: bool,
) -> None:
    """Connect to the gateway and serve dial requests for the named targets.

    Approval requests are asked on this terminal (when there is one), through
    `gw agent approve/deny`, and through --approval-command; the first answer counts.
    """
    from relay.agent import Agent, AgentState, parse_hostport
    from relay.approval import Approvals

    parsed: dict[str, tuple[str, int]] = {}
    for spec in targets:
        name, sep, address = spec.partition("=")
        try:
            if not sep or not name:
                raise GatewayError("expected NAME=HOST:PORT")
            parsed[name] = parse_hostport(address)
        except GatewayError as exc:
            raise click.BadParameter(f"{spec!r}: {exc}", param_hint="--target") from exc

    def log(event: str, **fields: Any) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # Values come from the gateway and the vendor: no escape sequences on this terminal.
        extra = " ".join(f"{k}={printable(str(v))}" for k, v in fields.items())
        click.echo(f"{stamp} gw-agent: {printable(event)} {extra}".rstrip(), err=True)

    async def main_() -> None:
        state = AgentState.load(state_dir)
        approvals = Approvals(
            state_dir / "approval.sock",
            command=approval_command,
            terminal=None if not no_prompt else False,
            log=log,
        )
        a = Agent(state, parsed, gateway=gateway, log=log, approvals=approvals)
        log("starting", agent=state.agent)
        await a.run()

    execute(main_())


@agent.command("approvals")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def agent_approvals(state_dir: Path, as_json: bool) -> None:
    """Pending approval requests at this machine."""
    from relay.approval import request

    rows = execute(request(state_dir / "approval.sock", "list"))
    if not rows and not as_json:
        click.echo("no pending requests")
        return
    cols = ["id", "user", "vendor_name", "mode", "target", "reason", "sas", "seconds_left"]
    _print_rows(rows, as_json, cols)


@agent.command("approve")
@click.argument("request_id")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path, file_okay=False))
def agent_approve(request_id: str, state_dir: Path) -> None:
    """Approve a pending request (recorded with your user name)."""
    from relay.approval import request

    result = execute(request(state_dir / "approval.sock", "approve", id=request_id))
    click.echo(f"approved {request_id} as {result['by']}")


@agent.command("deny")
@click.argument("request_id")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--reason", default="", help="Told to the requester and kept in the audit trail.")
def agent_deny(request_id: str, state_dir: Path, reason: str) -> None:
    """Deny a pending request."""
    from relay.approval import request

    result = execute(request(state_dir / "approval.sock", "deny", id=request_id, reason=reason))
    click.echo(f"denied {request_id} as {result['by']}")


# -- admin ----------------------------------------------------------------------------


@main.group()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="gatewayd's config (names the admin socket).",
)
@click.pass_context
def admin(ctx: click.Context, config_path: Path) -> None:
    """Change the directory of a running gatewayd."""
    from gatewayd import config as config_mod

    try:
        ctx.obj = config_mod.load(config_path).admin.socket
    except GatewayError as exc:
        fail(f"config error: {exc}", EXIT_LOCAL)


def _admin(socket: Path, op: str, **args: Any) -> Any:
    from gatewayd.admin import AdminError, request

    try:
        return run(request(socket, op, {k: v for k, v in args.items() if v is not None}))
    except AdminError as exc:
        code = EXIT_UNREACHABLE if str(exc).startswith("cannot reach") else EXIT_FAILED
        fail(str(exc), code)


def _print_rows(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    table = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in table)]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    """One table cell; text from the wire (names, reasons) is escaped for the terminal."""
    if value is None:
        return "-"
    if isinstance(value, float) and value > 1e9:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value))
    if isinstance(value, list):
        return ",".join(printable(str(v)) for v in value)
    return printable(str(value))


def _read_password(password_stdin: bool, required: bool = False) -> str | None:
    if password_stdin:
        value = read_stdin_line()
        if not value:
            fail("--password-stdin: standard input held no password", EXIT_LOCAL)
        return value
    if required:
        first = prompt("New password: ", True)
        if prompt("Again: ", True) != first:
            fail("the passwords differ", EXIT_LOCAL)
        return first
    return None


@admin.group("org")
def admin_org() -> None:
    """Health organisations."""


@admin_org.command("add")
@click.argument("org")
@click.option("--name", required=True)
@click.pass_obj
def org_add(socket: Path, org: str, name: str) -> None:
    _admin(socket, "org.add", org=org, name=name)
    click.echo(f"org {org} added")


@admin_org.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def org_list(socket: Path, as_json: bool) -> None:
    _print_rows(_admin(socket, "list", what="orgs"), as_json, ["id", "name", "created"])


@admin.group("vendor")
def admin_vendor() -> None:
    """Vendors (suppliers)."""


@admin_vendor.command("add")
@click.argument("vendor")
@click.option("--name", required=True)
@click.pass_obj
def vendor_add(socket: Path, vendor: str, name: str) -> None:
    _admin(socket, "vendor.add", vendor=vendor, name=name)
    click.echo(f"vendor {vendor} added")


@admin_vendor.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def vendor_list(socket: Path, as_json: bool) -> None:
    _print_rows(_admin(socket, "list", what="vendors"), as_json, ["id", "name", "created"])


@admin.group("user")
def admin_user() -> None:
    """People: vendor users and employees."""


@admin_user.command("add")
@click.argument("user")
@click.option("--vendor", default=None, help="Make a vendor user of VENDOR.")
@click.option("--org", default=None, help="Make an employee of ORG.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option(
    "--cert-serial",
    metavar="VALUE",
    default=None,
    help="The person's smartcard: the certificate subject's serialNumber (or the "
    "field [auth.smartcard] subject_field names).",
)
@click.option(
    "--cert-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The person's smartcard: their certificate (PEM or DER); pins its issuer.",
)
@click.pass_obj
def user_add(
    socket: Path,
    user: str,
    vendor: str | None,
    org: str | None,
    password_stdin: bool,
    cert_serial: str | None,
    cert_file: Path | None,
) -> None:
    from .card import cert_args, describe_card

    if (vendor is None) == (org is None):
        raise click.UsageError("give exactly one of --vendor or --org")
    card = cert_args(cert_serial, cert_file)
    password = _read_password(password_stdin, required=not password_stdin)
    result = _admin(
        socket, "user.add", user=user, vendor=vendor, org=org, password=password, **card
    )
    shown = describe_card(result or {})
    click.echo(f"user {user} added" + (f"; {shown}" if shown else ""))


@admin_user.command("set-cert")
@click.argument("user")
@click.option(
    "--cert-serial",
    metavar="VALUE",
    default=None,
    help="The certificate subject's serialNumber (or [auth.smartcard] subject_field).",
)
@click.option(
    "--cert-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The person's new certificate (PEM or DER); pins its issuer.",
)
@click.pass_obj
def user_set_cert(socket: Path, user: str, cert_serial: str | None, cert_file: Path | None) -> None:
    """Replace USER's smartcard (a renewed or replaced card)."""
    from .card import cert_args, describe_card

    card = cert_args(cert_serial, cert_file)
    if not card:
        raise click.UsageError("give --cert-serial VALUE or --cert-file PEM")
    result = _admin(socket, "user.set_cert", user=user, **card)
    click.echo(f"user {user}: {describe_card(result)}")


@admin_user.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def user_list(socket: Path, as_json: bool) -> None:
    rows = _admin(socket, "list", what="users")
    _print_rows(
        rows, as_json, ["id", "kind", "vendor", "org", "disabled", "failures", "admin_locked"]
    )


@admin_user.command("unlock")
@click.argument("user")
@click.pass_obj
def user_unlock(socket: Path, user: str) -> None:
    """Clear USER's failed logins and lock, also the lock that only an admin lifts (audited)."""
    result = _admin(socket, "user.unlock", user=user)
    state = "was locked" if result.get("was_locked") else "was not locked"
    click.echo(f"user {user} unlocked ({state}; {result.get('failures', 0)} failures cleared)")


@admin.group("totp")
def admin_totp() -> None:
    """Authenticator-app codes."""


@admin_totp.command("enroll")
@click.argument("user")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def totp_enroll(socket: Path, user: str, as_json: bool) -> None:
    """Make a new TOTP secret for USER and print its otpauth:// URI."""
    result = _admin(socket, "totp.enroll", user=user)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(result["uri"])
    if sys.stdout.isatty():
        _print_qr(result["uri"])


def _print_qr(uri: str) -> None:
    try:
        import qrcode
    except ImportError:
        click.echo("(install the qrcode package to see a QR code here)", err=True)
        return
    qr = qrcode.QRCode(border=1)
    qr.add_data(uri)
    qr.print_ascii(invert=True)


@admin.group("agreement")
def admin_agreement() -> None:
    """Agreements between vendors and organisations."""


@admin_agreement.command("add")
@click.option("--vendor", required=True)
@click.option("--org", required=True)
@click.option("--modes", required=True, help="Comma-separated: access, support.")
@click.option("--unattended", is_flag=True, help="Access may happen without approval.")
@click.option("--valid-from", default=None, metavar="TIME", help="Start (RFC 3339; default now).")
@click.option("--valid-until", default=None, metavar="TIME", help="End (RFC 3339; default none).")
@click.option("--id", "agreement_id", default=None)
@click.pass_obj
def agreement_add(
    socket: Path,
    vendor: str,
    org: str,
    modes: str,
    unattended: bool,
    valid_from: str | None,
    valid_until: str | None,
    agreement_id: str | None,
) -> None:
    """Add an agreement; it is usable once both sides accepted its terms of use."""
    mode_list = [x.strip() for x in modes.split(",") if x.strip()]
    result = _admin(
        socket,
        "agreement.add",
        vendor=vendor,
        org=org,
        modes=mode_list,
        unattended=unattended,
        id=agreement_id,
        valid_from=_when(valid_from, "--valid-from"),
        valid_until=_when(valid_until, "--valid-until"),
    )
    agreement = result["agreement"]
    click.echo(agreement)
    info(
        f"agreement {agreement} added; usable once both sides accept the terms of use:\n"
        f"  gw admin agreement accept {agreement} --side vendor\n"
        f"  gw admin agreement accept {agreement} --side org"
    )


def _when(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r}: expected a time like 2027-01-31T00:00:00Z", param_hint=option
        ) from exc
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


@admin_agreement.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def agreement_list(socket: Path, as_json: bool) -> None:
    rows = _admin(socket, "list", what="agreements")
    for row in rows:
        row["accepted"] = (
            "+".join(side for side in ("vendor", "org") if row.get(f"{side}_accepted")) or "-"
        )
    cols = ["id", "vendor", "org", "modes", "unattended", "state", "accepted", "valid_until"]
    _print_rows(rows, as_json, cols)


@admin.group("agent")
def admin_agent() -> None:
    """Agents (reachable machines)."""


@admin_agent.command("add")
@click.argument("agent")
@click.option("--org", required=True)
@click.option("--ttl", type=float, default=None, help="Token lifetime in seconds.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def agent_add(socket: Path, agent: str, org: str, ttl: float | None, as_json: bool) -> None:
    """Register AGENT and print its one-time enrollment token."""
    result = _admin(socket, "agent.add", agent=agent, org=org, ttl=ttl)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(result["token"])
    expires = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(result["expires"]))
    info(f"one-time enrollment token for {agent}, valid until {expires}")


@admin_agent.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def agent_list(socket: Path, as_json: bool) -> None:
    rows = _admin(socket, "list", what="agents")
    cols = ["id", "org", "online", "enrolled", "last_seen", "disabled", "e2e"]
    _print_rows(rows, as_json, cols)


@admin.group("sessions")
def admin_sessions() -> None:
    """Live sessions."""


@admin_sessions.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def sessions_list(socket: Path, as_json: bool) -> None:
    rows = _admin(socket, "sessions.list")
    cols = [
        "session",
        "user",
        "agent",
        "target",
        "mode",
        "source",
        "reason",
        "approved_by",
        "since",
        "bytes_up",
        "bytes_down",
    ]
    _print_rows(rows, as_json, cols)


@admin_sessions.command("kill")
@click.argument("session")
@click.pass_obj
def sessions_kill(socket: Path, session: str) -> None:
    _admin(socket, "sessions.kill", session=session)
    click.echo(f"session {session} ended")


@admin.command("status")
@click.pass_obj
def admin_status(socket: Path) -> None:
    click.echo(json.dumps(_admin(socket, "status"), indent=1))


# -- audit ----------------------------------------------------------------------------

from .audit import audit  # noqa: E402
from .fido2 import admin_fido2, fido2  # noqa: E402

main.add_command(audit)
main.add_command(fido2)
admin.add_command(admin_fido2)

from . import directory  # noqa: E402, F401 - show/disable/enable/remove, agreement accept
from .card import admin_grant  # noqa: E402

admin.add_command(admin_grant)

from .known_agents import agent_fingerprint, known_agents  # noqa: E402

main.add_command(known_agents)
agent.add_command(agent_fingerprint)


if __name__ == "__main__":  # pragma: no cover
    main()
