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

The command groups live in their own modules; this one only puts them together.
"""

from __future__ import annotations

import click

from .admin import admin
from .agent import agent
from .audit import audit
from .connect import agents_cmd, connect
from .fido2 import fido2
from .known_agents import known_agents
from .login import login_cmd, logout_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gatewayd", prog_name="gw", message="%(prog)s %(version)s")
def main() -> None:
    """gw: reach an agent's service through gatewayd; run agents; administer; read the audit."""


for _command in (
    connect,
    agents_cmd,
    login_cmd,
    logout_cmd,
    agent,
    admin,
    audit,
    fido2,
    known_agents,
):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
