"""ssh through gw as ``~/.ssh/config`` says (docs/client.md): the real OpenSSH client
and server, ``gw login`` once, then ssh three times in a row with no password or code;
and without a login, ``gw connect --stdio`` asks on the controlling terminal, never on
the standard input and output that carry ssh's stream."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest
from sshd import Sshd, sshd_fixture  # noqa: F401
from world import PASSWORD, World

from gatewayd.demo import BIN

pytestmark = pytest.mark.integration

#: A bound on waits for a prompt or a process: a guard against a hang, never a speed promise.
HANG_GUARD = 60


@pytest.fixture(scope="module")
def host(world: World, sshd: Sshd) -> str:
    """An agent exposing the ssh server as its target ``ssh``."""
    world.lab.enroll_agent("build-pc", "clinic")
    world.lab.start_agent("build-pc", {"ssh": sshd.port})
    return "build-pc"


def env(world: World, home: Path) -> dict[str, str]:
    out = world.lab.env() | {"XDG_CONFIG_HOME": str(home), "GW_REASON": "ticket 4711"}
    out.pop("GW_PASSWORD", None)
    return out


def test_ssh_three_times_after_one_login(
    world: World, sshd: Sshd, host: str, tmp_path: Path
) -> None:
    lab = world.lab
    user = world.new_user()
    profile = tmp_path / "gw" / "config.toml"
    profile.parent.mkdir(parents=True)
    profile.write_text(f'gateway = "{lab.gateway}"\nca_file = "{lab.ca_file}"\nuser = "{user}"\n')
    login = subprocess.run(
        [str(BIN / "gw"), "login", "--password-stdin", "--totp", lab.totp(user)],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        env=env(world, tmp_path),
        timeout=HANG_GUARD,
        check=False,
    )
    assert login.returncode == 0, login.stderr
    # The block docs/client.md gives, with the test's own keys and no host key prompt.
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host {host}\n"
        f"    ProxyCommand {BIN / 'gw'} connect %h --target ssh --stdio\n"
        f"    User {os.environ.get('USER') or 'root'}\n"
        f"    IdentityFile {sshd.client_key}\n"
        "    IdentitiesOnly yes\n    BatchMode yes\n    StrictHostKeyChecking no\n"
        "    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n"
    )
    for run in range(3):
        result = subprocess.run(
            ["ssh", "-F", str(config), host, "echo", f"run-{run}"],
            capture_output=True,
            text=True,
            env=env(world, tmp_path),
            timeout=HANG_GUARD,
            check=False,
        )
        assert result.returncode == 0, f"run {run}: {result.stderr}"
        assert result.stdout == f"run-{run}\n"
    factors = [r["factor"] for r in lab.events("auth.attempt") if r["user"] == user]
    assert factors == ["password", "totp", "credential", "credential", "credential"]
    starts = [r for r in lab.events("session.start") if r["user"] == user]
    assert [(s["agent"], s["target"], s["reason_given"]) for s in starts] == [
        (host, "ssh", "ticket 4711")
    ] * 3


def test_without_a_login_it_asks_on_the_terminal(world: World, tmp_path: Path) -> None:
    """stdin and stdout are pipes (ssh's stream); the password is asked on /dev/tty."""
    lab = world.lab
    user = world.new_user()
    master, slave = pty.openpty()
    terminal = os.ttyname(slave)

    def take_the_terminal() -> None:  # in the child, after setsid: the pty becomes its tty
        os.close(os.open(terminal, os.O_RDWR))

    args = lab.connect_args("pc1", user, "echo", "access", "--stdio", "--totp", lab.totp(user))
    proc = subprocess.Popen(
        [str(BIN / args[0]), *args[1:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(world, tmp_path),
        start_new_session=True,
        preexec_fn=take_the_terminal,
    )
    seen = b""  # the parent keeps the pty's slave open: no EIO while gw has not opened it
    try:
        deadline = time.monotonic() + HANG_GUARD
        while b"assword" not in seen:
            assert time.monotonic() < deadline, f"no password prompt on the terminal: {seen!r}"
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                seen += os.read(master, 4096)
        os.write(master, PASSWORD.encode() + b"\n")
        out, err = proc.communicate(b"through the pipes", timeout=HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
    assert proc.returncode == 0, err
    assert out == b"THROUGH THE PIPES"  # the echo service answers in capitals
    assert b"assword" not in err and PASSWORD.encode() not in err + out
    assert PASSWORD.encode() not in seen  # typed without echo
