"""``gw admin``: change the directory of a running gatewayd through its admin socket."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from relay.text import printable

from .card import admin_grant
from .common import (
    EXIT_LOCAL,
    AdminSocket,
    admin_request,
    fail,
    info,
    print_rows,
    prompt,
    read_stdin_line,
)
from .directory import (
    add_lifecycle,
    agreement_accept,
    agreement_remove,
    agreement_resume,
    agreement_show,
    agreement_suspend,
    vendor_networks,
)
from .fido2 import admin_fido2


@click.group()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="gatewayd's config (names the admin socket); default $GATEWAYD_CONFIG or "
    "/etc/gatewayd/gatewayd.toml.",
)
@click.pass_context
def admin(ctx: click.Context, config_path: Path | None) -> None:
    """Change the directory of a running gatewayd."""
    ctx.obj = AdminSocket(config_path)  # read when a command runs: --help needs no config


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
    admin_request(socket, "org.add", org=org, name=name)
    click.echo(f"org {org} added")


@admin_org.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def org_list(socket: Path, as_json: bool) -> None:
    print_rows(admin_request(socket, "list", what="orgs"), as_json, ["id", "name", "created"])


@admin.group("vendor")
def admin_vendor() -> None:
    """Vendors (suppliers)."""


@admin_vendor.command("add")
@click.argument("vendor")
@click.option("--name", required=True)
@click.pass_obj
def vendor_add(socket: Path, vendor: str, name: str) -> None:
    admin_request(socket, "vendor.add", vendor=vendor, name=name)
    click.echo(f"vendor {vendor} added")


@admin_vendor.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def vendor_list(socket: Path, as_json: bool) -> None:
    print_rows(admin_request(socket, "list", what="vendors"), as_json, ["id", "name", "created"])


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
    result = admin_request(
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
    result = admin_request(socket, "user.set_cert", user=user, **card)
    click.echo(f"user {user}: {describe_card(result)}")


@admin_user.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def user_list(socket: Path, as_json: bool) -> None:
    rows = admin_request(socket, "list", what="users")
    print_rows(
        rows, as_json, ["id", "kind", "vendor", "org", "disabled", "failures", "admin_locked"]
    )


@admin_user.command("logout")
@click.argument("user")
@click.pass_obj
def user_logout(socket: Path, user: str) -> None:
    """End every gw login credential of USER and the sessions opened with them (audited)."""
    result = admin_request(socket, "user.logout", user=user)
    ended = result.get("ended") or []
    sessions = result.get("sessions_ended") or 0
    click.echo(f"user {user}: {len(ended)} login credential(s) ended, {sessions} session(s) ended")


@admin_user.command("unlock")
@click.argument("user")
@click.pass_obj
def user_unlock(socket: Path, user: str) -> None:
    """Clear USER's failed logins and lock, also the lock that only an admin lifts (audited)."""
    result = admin_request(socket, "user.unlock", user=user)
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
    result = admin_request(socket, "totp.enroll", user=user)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(result["uri"])
    if sys.stdout.isatty():
        _print_qr(result["uri"])


@admin.group("factor")
def admin_factor() -> None:
    """Any auth factor with an enrollment hook (a plug-in's too)."""


def _params(_ctx: click.Context, _param: click.Parameter, pairs: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}")
        if key in params:
            raise click.BadParameter(f"{key} given twice")
        params[key] = value
    return params


@admin_factor.command("enroll")
@click.argument("user")
@click.argument("factor")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_params,
    help="A parameter for the factor's enrollment (repeatable).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def factor_enroll(
    socket: Path, user: str, factor: str, params: dict[str, str], as_json: bool
) -> None:
    """Enroll USER in FACTOR through the factor's own enrollment; print what it shows once."""
    result = admin_request(socket, "factor.enroll", user=user, factor=factor, params=params)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"user {result['user']} enrolled in {result['factor']}")
    for key, value in result.items():
        if key not in ("user", "factor"):
            click.echo(f"{key}: {value}")


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
    result = admin_request(
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
    rows = admin_request(socket, "list", what="agreements")
    for row in rows:
        row["accepted"] = (
            "+".join(side for side in ("vendor", "org") if row.get(f"{side}_accepted")) or "-"
        )
    cols = ["id", "vendor", "org", "modes", "unattended", "state", "accepted", "valid_until"]
    print_rows(rows, as_json, cols)


@admin.group("agent")
def admin_agent() -> None:
    """Agents (reachable machines)."""


#: Agents one ``gw admin agent add --count`` or ``--names-file`` makes at most: a
#: rollout's worth, while a typo (an extra zero) is caught before it fills the directory.
MAX_BATCH = 10_000


def _batch_names(agent: str | None, count: int | None, names_file: Path | None) -> list[str]:
    """The agents to add: AGENT, AGENT-001..AGENT-N (--count), or one per line of FILE."""
    from relay.message import valid_id

    if names_file is not None:
        if agent is not None or count is not None:
            raise click.UsageError("--names-file takes no AGENT and no --count")
        try:
            lines = names_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {names_file}: {exc}", EXIT_LOCAL)
        names = [n.strip() for n in lines if n.strip() and not n.lstrip().startswith("#")]
        if not names:
            fail(f"{names_file} names no agent", EXIT_LOCAL)
    elif agent is None:
        raise click.UsageError("give AGENT (a name, or a prefix with --count), or --names-file")
    elif count is not None:
        width = max(3, len(str(count)))
        names = [f"{agent}-{i:0{width}d}" for i in range(1, count + 1)]
    else:
        names = [agent]
    if len(names) > MAX_BATCH:
        fail(f"{len(names)} agents at once: at most {MAX_BATCH}", EXIT_LOCAL)
    seen: set[str] = set()
    for name in names:
        if not valid_id(name):
            fail(f"not a valid agent id: {printable(name)} (letters, digits, . _ - @)", EXIT_LOCAL)
        if name in seen:
            fail(f"{name} is named twice", EXIT_LOCAL)
        seen.add(name)
    return names


@admin_agent.command("add")
@click.argument("agent", required=False)
@click.option("--org", required=True)
@click.option("--ttl", type=float, default=None, help="Token lifetime in seconds.")
@click.option(
    "--count",
    type=click.IntRange(1, MAX_BATCH),
    default=None,
    help="Add N agents named AGENT-001 ... AGENT-N (AGENT is the prefix).",
)
@click.option(
    "--names-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Add one agent per line of FILE (blank lines and # comments skipped).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def agent_add(
    socket: Path,
    agent: str | None,
    org: str,
    ttl: float | None,
    count: int | None,
    names_file: Path | None,
    as_json: bool,
) -> None:
    """Register AGENT and print its one-time enrollment token.

    With --count or --names-file (a rollout): one line per agent on standard output,
    AGENT<TAB>TOKEN (--json: a list of objects).
    """
    names = _batch_names(agent, count, names_file)
    if len(names) == 1 and count is None and names_file is None:
        result = admin_request(socket, "agent.add", agent=names[0], org=org, ttl=ttl)
        if as_json:
            click.echo(json.dumps(result))
            return
        click.echo(result["token"])
        expires = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(result["expires"]))
        info(f"one-time enrollment token for {names[0]}, valid until {expires}")
        return
    results = []
    try:
        for name in names:
            result = admin_request(socket, "agent.add", agent=name, org=org, ttl=ttl)
            results.append(result)
            if not as_json:  # as it goes: tokens made before a failure are not lost
                click.echo(f"{name}\t{result['token']}")
    finally:
        if as_json:
            click.echo(json.dumps(results))
        if len(results) < len(names):
            info(f"{len(results)} of {len(names)} agents added; the rest were not")
    expires = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(results[-1]["expires"]))
    info(f"{len(results)} one-time enrollment tokens, valid until {expires}")


@admin_agent.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def agent_list(socket: Path, as_json: bool) -> None:
    rows = admin_request(socket, "list", what="agents")
    cols = ["id", "org", "online", "enrolled", "last_seen", "disabled", "e2e"]
    print_rows(rows, as_json, cols)


@admin.group("sessions")
def admin_sessions() -> None:
    """Live sessions."""


@admin_sessions.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def sessions_list(socket: Path, as_json: bool) -> None:
    rows = admin_request(socket, "sessions.list")
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
    print_rows(rows, as_json, cols)


@admin_sessions.command("kill")
@click.argument("session")
@click.pass_obj
def sessions_kill(socket: Path, session: str) -> None:
    admin_request(socket, "sessions.kill", session=session)
    click.echo(f"session {session} ended")


@admin.command("status")
@click.pass_obj
def admin_status(socket: Path) -> None:
    click.echo(json.dumps(admin_request(socket, "status"), indent=1))


add_lifecycle(admin_user, "user")
add_lifecycle(admin_vendor, "vendor")
add_lifecycle(admin_agent, "agent")
add_lifecycle(admin_org, "org", removable=False)
admin_vendor.add_command(vendor_networks)
for _command in (
    agreement_accept,
    agreement_suspend,
    agreement_resume,
    agreement_show,
    agreement_remove,
):
    admin_agreement.add_command(_command)
admin.add_command(admin_fido2)
admin.add_command(admin_grant)
