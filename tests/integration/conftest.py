"""A real gatewayd, a real agent and a real echo service on loopback, per test module."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.demo import EchoServer, Lab

PASSWORD = "integration pass phrase"
_users = itertools.count(1)


class World:
    """The lab plus the directory every test starts from."""

    def __init__(self, lab: Lab, echo: EchoServer) -> None:
        self.lab = lab
        self.echo = echo
        self.agent_proc = None

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
    lab.admin(
        "agreement",
        "add",
        "--vendor",
        "acme",
        "--org",
        "clinic",
        "--modes",
        "access",
        "--unattended",
    )
    lab.admin("agreement", "add", "--vendor", "attended", "--org", "clinic", "--modes", "access")
    lab.enroll_agent("pc1", "clinic")
    world = World(lab, echo)
    world.agent_proc = lab.start_agent("pc1", {"echo": echo.port})
    return world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(
        tmp_path_factory.mktemp("lab"),
        gateway_keys="handshake_timeout = 2",
        extra_config="[lockout]\nthreshold = 3\nbase_seconds = 60\n",
    )
    try:
        yield w
    finally:
        w.lab.close()
        w.echo.close()
