"""The lab every integration test starts from: a gateway, a directory, an agent, an echo service.

A plain module (tests/support is on sys.path) rather than conftest, so that test files
import it by a name no other folder shares.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from gatewayd.demo import EchoServer, Lab, Proc

PASSWORD = "integration pass phrase"
_users = itertools.count(1)


class World:
    """The lab plus the directory every test starts from."""

    def __init__(self, lab: Lab, echo: EchoServer) -> None:
        self.lab = lab
        self.echo = echo
        self.agent_proc: Proc | None = None

    def new_user(self, vendor: str = "acme") -> str:
        user = f"u{next(_users)}-{vendor}"
        self.lab.vendor_user(user, vendor, PASSWORD)
        return user


def build_world(root: Path, *, gateway_keys: str = "", extra_config: str = "") -> World:
    lab = Lab(root)
    lab.init(extra_config=extra_config, gateway_keys=gateway_keys)
    lab.start_gateway()
    echo = EchoServer()
    lab.admin("org", "add", "clinic", "--name", "Clinic")
    lab.admin("org", "add", "other", "--name", "Other clinic")
    lab.admin("vendor", "add", "acme", "--name", "Acme")
    lab.admin("vendor", "add", "nobody", "--name", "No agreement AS")
    lab.admin("vendor", "add", "attended", "--name", "Attended only AS")
    lab.agreement("acme", "clinic", "access", unattended=True)
    lab.agreement("attended", "clinic", "access", unattended=False)
    lab.enroll_agent("pc1", "clinic")
    world = World(lab, echo)
    world.agent_proc = lab.start_agent("pc1", {"echo": echo.port})
    return world
