"""``gw``: connect, agent, admin, audit. Parses arguments, calls library code, prints.

Exit codes (fixed, for scripts):

== ========================================================================
0  success
1  the request failed: authentication, policy, agent offline, tunnel failed
2  usage error (click's own)
3  the gateway or the daemon cannot be reached, or TLS/keys do not verify
4  local problem: the config, a file, a device, a missing optional dependency
== ========================================================================

The table is docs/exit-codes.md's, shared with ``gatewayd``.

The command groups live in their own modules; this one only puts them together, by name:
a command's module is imported when that command is run (or listed, by ``gw --help``), so
``gw connect`` starts without loading the admin, audit, card and FIDO2 commands.
"""

from __future__ import annotations

import importlib

import click

#: Every command: its name, the module defining it, and the object's name there.
COMMANDS = {
    "connect": ("cli.connect", "connect"),
    "agents": ("cli.connect", "agents_cmd"),
    "login": ("cli.login", "login_cmd"),
    "logout": ("cli.login", "logout_cmd"),
    "agent": ("cli.agent", "agent"),
    "admin": ("cli.admin", "admin"),
    "audit": ("cli.audit", "audit"),
    "fido2": ("cli.fido2", "fido2"),
    "known-agents": ("cli.known_agents", "known_agents"),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            # An unknown name loads them all: click's "did you mean" reads self.commands.
            for name in [cmd_name] if cmd_name in COMMANDS else list(COMMANDS):
                self.load(name)
        return self.commands.get(cmd_name)

    def load(self, name: str) -> click.Command:
        if name not in self.commands:
            module, attr = COMMANDS[name]
            command = getattr(importlib.import_module(module), attr)
            self.add_command(command, name)
        return self.commands[name]


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gatewayd", prog_name="gw", message="%(prog)s %(version)s")
def main() -> None:
    """gw: reach an agent's service through gatewayd; run agents; administer; read the audit."""


if __name__ == "__main__":  # pragma: no cover
    main()
