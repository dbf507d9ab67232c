"""What every ``gw`` command shares: exit codes, one-line failures, prompts, tables.

Exit codes (fixed, for scripts):

== ========================================================================
0  success
1  the request failed: authentication, policy, agent offline, tunnel failed
2  usage error (click's own)
3  the gateway or the daemon cannot be reached, or TLS/keys do not verify
4  local problem: the config, a file, a device, a missing optional dependency
== ========================================================================

The table is docs/exit-codes.md's, shared with ``gatewayd``.
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
from relay.text import parse_hostport, printable

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


#: Set by :func:`prompt_on_terminal`: standard input and output carry data.
_ASK_TTY: list[bool] = []


def prompt_on_terminal() -> None:
    """From now on :func:`prompt` asks on the controlling terminal (``/dev/tty``), never on
    standard input or output (``gw connect --stdio``: they carry ssh's stream)."""
    _ASK_TTY.append(True)


def _ask_tty(text: str, secret: bool) -> str:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        fail(
            f"{text.strip().rstrip(':')} needed, but there is no terminal to ask on",
            EXIT_LOCAL,
        )
    with open(fd, "r+b", buffering=0) as tty:
        if secret:
            import termios

            old = termios.tcgetattr(fd)
            new = old[:]
            new[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSAFLUSH, new)
        try:
            tty.write(text.encode())
            line = bytearray()
            while len(line) < 4096 and (byte := tty.read(1)) not in (b"", b"\n"):
                line += byte
        finally:
            if secret:
                termios.tcsetattr(fd, termios.TCSAFLUSH, old)
                tty.write(b"\n")
    return line.decode("utf-8", "replace").rstrip("\r")


def prompt(text: str, secret: bool) -> str:
    """Ask the person at the terminal (on stderr, so stdout stays data)."""
    if _ASK_TTY and not os.environ.get("GW_FORCE_PROMPT") and os.name == "posix":
        return _ask_tty(text, secret)
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


def gateway_client(gateway: str, ca_file: Path) -> Any:
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


def config_home() -> Path:
    from relay.platform import config_home  # %APPDATA%\gw on Windows

    return config_home()


def gateway_config(given: Path | None) -> Any:
    """gatewayd's config: ``--config``, else ``$GATEWAYD_CONFIG``, else
    ``/etc/gatewayd/gatewayd.toml``; a problem with it is exit 4, as for ``gatewayd``."""
    from gatewayd import config as config_mod

    path = config_mod.default_path(given)
    try:
        return config_mod.load(path)
    except GatewayError as exc:
        fail(f"config error: {exc}", EXIT_LOCAL)


class AdminSocket:
    """The admin socket that gatewayd's config names, read when a command first needs it
    (so that ``gw admin ... --help`` works without any config)."""

    def __init__(self, config: Path | None) -> None:
        self.config = config
        self._path: Path | None = None

    def path(self) -> Path:
        if self._path is None:
            self._path = gateway_config(self.config).admin.socket
        return self._path


def admin_request(socket: Path | AdminSocket, op: str, **args: Any) -> Any:
    from gatewayd.admin import AdminError, request

    if isinstance(socket, AdminSocket):
        socket = socket.path()
    try:
        return run(request(socket, op, {k: v for k, v in args.items() if v is not None}))
    except AdminError as exc:
        code = EXIT_UNREACHABLE if str(exc).startswith("cannot reach") else EXIT_FAILED
        fail(str(exc), code)


def print_rows(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in table)]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def cell(value: Any) -> str:
    """One table cell; text from the wire (names, reasons) is escaped for the terminal."""
    if value is None:
        return "-"
    if isinstance(value, float) and value > 1e9:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value))
    if isinstance(value, list):
        return ",".join(printable(str(v)) for v in value)
    return printable(str(value))
