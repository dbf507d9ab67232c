"""``gw login`` once, then ``gw connect`` and ``gw agents`` without a factor; the client
profile; and the attacks on a login credential: a stolen credential file without its
key, a replayed proof, a credential after ``gw logout`` and after the administrator
ended it, a credential used under another user's name. Real gatewayd, agent and gw
processes on loopback (the idle timeout, which needs the clock moved, is in
tests/gatewayd/test_login_credential.py)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from terminal_screen import screen
from world import PASSWORD, World

from gatewayd.demo import BIN, wait_for
from relay import message as m
from relay.client import Gateway, _login
from relay.errors import RemoteError
from relay.noise import generate_keypair
from relay.tls import client_context

pytestmark = pytest.mark.integration

#: A bound on waits for a prompt or a process: a guard against a hang, never a speed promise.
HANG_GUARD = 60


def gw(
    world: World, home: Path, *args: str, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """A ``gw`` command with its own profile folder (``XDG_CONFIG_HOME``)."""
    full = world.lab.env() | {"XDG_CONFIG_HOME": str(home)} | env
    for name in ("GW_PASSWORD", "GW_GATEWAY", "GW_CA_FILE", "GW_USER", "GW_MODE"):
        if name not in env:
            full.pop(name, None)
    return subprocess.run(
        [str(BIN / "gw"), *args],
        input=input,
        capture_output=True,
        text=True,
        env=full,
        timeout=60,
        check=False,
    )


def target(world: World, user: str) -> list[str]:
    lab = world.lab
    return ["--gateway", lab.gateway, "--ca-file", str(lab.ca_file), "--user", user]


def login(world: World, home: Path, user: str) -> None:
    code = world.lab.totp(user)
    args = ["login", *target(world, user), "--password-stdin", "--totp", code]
    result = gw(world, home, *args, input=PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    assert f"logged in as {user}" in result.stderr


def connect(world: World, home: Path, user: str, data: str = "ping", *extra: str) -> Any:
    """``gw connect --stdio`` to the echo service, with no password and no code."""
    args = ["connect", "pc1", *target(world, user), "--target", "echo", "--stdio"]
    return gw(world, home, *args, "--reason", "ticket 1", *extra, input=data)


def files(home: Path, user: str) -> tuple[Path, Path]:
    (key,) = (home / "gw" / "logins").glob(f"*_{user}_access.key")
    return key, key.with_suffix(".json")


def attempts(world: World, user: str) -> list[dict[str, Any]]:
    return [r for r in world.lab.events("auth.attempt") if r["user"] == user]


def test_login_once_then_connect_three_times_and_list(world: World, tmp_path: Path) -> None:
    user = world.new_user()
    login(world, tmp_path, user)
    key, _record = files(tmp_path, user)
    assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "gw" / "logins").stat().st_mode & 0o777 == 0o700
    for run in range(3):
        result = connect(world, tmp_path, user, f"hello {run}")
        assert result.returncode == 0, result.stderr
        # The echo service answers in capitals.
        assert result.stdout == f"HELLO {run}", result.stderr
    listed = gw(world, tmp_path, "agents", *target(world, user), "--json")
    assert listed.returncode == 0 and '"pc1"' in listed.stdout, listed.stderr
    (issued,) = [r for r in world.lab.events("login.issued") if r["user"] == user]
    assert issued["mode"] == "access" and issued["idle_timeout"] == 1800
    uses = [r for r in attempts(world, user) if r["factor"] == "credential"]
    assert len(uses) == 4
    assert all(r["outcome"] == "success" for r in uses)
    # Every use is on the record as the login it belongs to.
    assert {r["login_session"] for r in uses} == {issued["session"]}
    assert {r["credential"] for r in uses} == {issued["credential"]}
    # No password or code was asked after the login: one TOTP and one password check.
    assert [r["factor"] for r in attempts(world, user)].count("totp") == 1
    starts = [r for r in world.lab.events("session.start") if r["user"] == user]
    assert len(starts) == 3
    assert all(s["expires"] <= issued["expires"] for s in starts)


def test_profile_and_environment(world: World, tmp_path: Path) -> None:
    user = world.new_user()
    login(world, tmp_path, user)
    profile = tmp_path / "gw" / "config.toml"
    shutil.copy(world.lab.ca_file, tmp_path / "gw" / "ca.pem")
    profile.write_text(f'gateway = "{world.lab.gateway}"\nca_file = "ca.pem"\nuser = "{user}"\n')
    args = ["connect", "pc1", "--target", "echo", "--stdio", "--reason", "r"]
    result = gw(world, tmp_path, *args, input="from the profile")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "FROM THE PROFILE"
    # The environment wins over the profile, the flag over the environment.
    other = gw(world, tmp_path, *args, input="x", GW_USER="nobody-here")
    assert other.returncode != 0
    flag = gw(world, tmp_path, *args, "--user", user, input="flag", GW_USER="nobody-here")
    assert flag.returncode == 0 and flag.stdout == "FLAG", flag.stderr
    # A bad profile: one line naming the file, the line and the key.
    profile.write_text(f'user = "{user}"\n\ngatway = "{world.lab.gateway}"\n')
    bad = gw(world, tmp_path, *args, input="x")
    assert bad.returncode == 4
    assert bad.stderr.strip() == (
        f"gw: {profile} line 3: unknown key 'gatway' (did you mean 'gateway'?)"
    )
    profile.write_text("mode = 7\n")
    bad = gw(world, tmp_path, *args, input="x")
    assert bad.returncode == 4 and "line 1: mode must be a non-empty string" in bad.stderr
    profile.unlink()
    missing = gw(world, tmp_path, *args, input="x")
    assert missing.returncode == 2 and "GW_GATEWAY" in missing.stderr


def test_stolen_credential_file_without_the_key(world: World, tmp_path: Path) -> None:
    """The credential's id alone is worth nothing: another key's proof fails."""
    user = world.new_user()
    mine, thief = tmp_path / "mine", tmp_path / "thief"
    login(world, mine, user)
    thief_home = tmp_path / "thief-login"
    login(world, thief_home, user)  # the thief's own well-formed key file, for another login
    _key, record = files(mine, user)
    thief_key, _thief_record = files(thief_home, user)
    (thief / "gw" / "logins").mkdir(parents=True)
    shutil.copy(record, thief / "gw" / "logins" / record.name)
    shutil.copy(thief_key, thief / "gw" / "logins" / record.with_suffix(".key").name)
    result = connect(world, thief, user)
    assert result.returncode == 1 and result.stdout == ""
    assert "authentication failed" in result.stderr
    failed = [r for r in attempts(world, user) if r["outcome"] == "failure"]
    assert failed[-1]["reason"] == "wrong proof of the login credential's key"
    # The real holder is not affected.
    assert connect(world, mine, user, "still mine").stdout == "STILL MINE"


def test_replayed_proof_fails(world: World, tmp_path: Path) -> None:
    """A proof taken from one connection is refused on another (bound to its TLS channel)."""
    from relay import credential as cred

    user = world.new_user()
    login(world, tmp_path, user)
    key_file, record_file = files(tmp_path, user)
    key = cred.load_private(key_file.read_bytes())
    credential = record_file.read_text().split('"credential": "')[1].split('"')[0]
    links: list[Any] = []

    class Recording(Gateway):
        async def dial(self, handshake_timeout: float = 10.0) -> Any:
            links.append(await Gateway.dial(self, handshake_timeout))
            return links[-1]

    gateway = Recording("127.0.0.1", world.lab.port, client_context(world.lab.ca_file))
    seen: list[dict[str, Any]] = []

    async def honest(method: str, payload: dict[str, Any], binding: bytes) -> dict[str, Any]:
        seen.append(cred.prove(key, credential, payload, binding))
        return seen[-1]

    async def replay(method: str, payload: dict[str, Any], binding: bytes) -> dict[str, Any]:
        return seen[0]

    async def run(prove: Any) -> m.Message:
        try:
            _link, reply = await _login(
                gateway,
                user=user,
                agent="",
                target="",
                mode="access",
                reason="",
                static_private=generate_keypair()[0],
                prove=prove,
                factors=(),
                credential=credential,
            )
            return reply
        finally:
            while links:
                await links.pop().aclose()

    assert isinstance(asyncio.run(run(honest)), m.AgentList)
    with pytest.raises(RemoteError) as refused:
        asyncio.run(run(replay))
    assert refused.value.code == "auth_failed"
    last = attempts(world, user)[-1]
    assert last["factor"] == "credential" and last["outcome"] == "failure"
    assert last["reason"] == "wrong proof of the login credential's key"


def test_logout_ends_the_credential_at_the_gateway(world: World, tmp_path: Path) -> None:
    user = world.new_user()
    login(world, tmp_path, user)
    key, record = files(tmp_path, user)
    kept = tmp_path / "kept"
    kept.mkdir()
    shutil.copy(key, kept / key.name)
    shutil.copy(record, kept / record.name)
    result = gw(world, tmp_path, "logout", *target(world, user))
    assert result.returncode == 0, result.stderr
    assert not key.exists() and not record.exists()
    (ended,) = [r for r in world.lab.events("login.ended") if r["user"] == user]
    assert ended["reason"] == "logout"
    # A copy of the key taken before the logout: the gateway refuses the credential.
    shutil.copy(kept / key.name, key)
    shutil.copy(kept / record.name, record)
    after = connect(world, tmp_path, user)
    assert after.returncode == 4, after.stderr  # it falls back to the factors: no terminal
    assert "your gw login has ended" in after.stderr
    assert attempts(world, user)[-2]["reason"] == "login ended (logout)"
    assert not key.exists()  # forgotten after the gateway said so


def test_admin_ends_a_users_logins(world: World, tmp_path: Path) -> None:
    user = world.new_user()
    login(world, tmp_path, user)
    out = world.lab.admin("user", "logout", user)
    assert "1 login credential(s) ended" in out
    change = [r for r in world.lab.events("admin.change") if r.get("op") == "user.logout"]
    assert change[-1]["user"] == user and len(change[-1]["credentials"]) == 1
    after = connect(world, tmp_path, user)
    assert after.returncode == 4 and "your gw login has ended" in after.stderr
    assert attempts(world, user)[-2]["reason"].startswith("login ended (ended by administrator")


def test_admin_logout_ends_the_sessions_opened_with_the_login(world: World, tmp_path: Path) -> None:
    """A session opened with a gw login ends when the administrator logs the user out."""
    user = world.new_user()
    login(world, tmp_path, user)
    args = ["connect", "pc1", *target(world, user), "--target", "echo", "--stdio", "--reason", "r"]
    env = world.lab.env() | {"XDG_CONFIG_HOME": str(tmp_path)}
    for name in ("GW_PASSWORD", "GW_GATEWAY", "GW_CA_FILE", "GW_USER", "GW_MODE"):
        env.pop(name, None)
    with subprocess.Popen(
        [str(BIN / "gw"), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    ) as live:
        try:
            assert live.stdin is not None and live.stdout is not None
            live.stdin.write(b"still here\n")
            live.stdin.flush()
            assert live.stdout.readline() == b"STILL HERE\n"  # the session is open
            out = world.lab.admin("user", "logout", user)
            assert "1 login credential(s) ended, 1 session(s) ended" in out
            assert live.wait(HANG_GUARD) != 0
        finally:
            if live.poll() is None:
                live.kill()
    (end,) = [r for r in world.lab.events("session.end") if r["user"] == user]
    assert end["reason"].startswith("login ended: ended by administrator"), end
    after = connect(world, tmp_path, user)
    assert after.returncode == 4 and "your gw login has ended" in after.stderr


def test_credential_under_another_users_name(world: World, tmp_path: Path) -> None:
    alice, bob = world.new_user(), world.new_user()
    login(world, tmp_path, alice)
    key, record = files(tmp_path, alice)
    # Alice's key and credential put where bob's would be, then used as bob.
    shutil.copy(key, key.with_name(key.name.replace(f"_{alice}_", f"_{bob}_")))
    shutil.copy(record, record.with_name(record.name.replace(f"_{alice}_", f"_{bob}_")))
    result = connect(world, tmp_path, bob)
    assert result.returncode == 1 and "authentication failed" in result.stderr
    assert attempts(world, bob)[-1]["reason"] == f"login credential of another user ({alice})"
    assert os.path.exists(key)


# -- progress while gw connect waits -------------------------------------------------------


def _approve_when_asked(world: World) -> None:
    state = str(world.lab.root / "agent-pc1")
    found: list[dict[str, Any]] = []

    def asked() -> bool:
        out = world.lab.run("gw", "agent", "approvals", "--state-dir", state, "--json").stdout
        found[:] = json.loads(out) if out.strip().startswith("[") else []
        return bool(found)

    wait_for(asked, HANG_GUARD, "an approval request at the agent")
    world.lab.run("gw", "agent", "approve", found[0]["id"], "--state-dir", state)


def _waiting_connect(world: World, user: str, stderr: Any) -> subprocess.Popen[bytes]:
    """gw connect --stdio for a session that waits for approval at the machine."""
    args = world.lab.connect_args("pc1", user, "echo", "access", "--stdio", "--password-stdin")
    proc = subprocess.Popen(
        [str(BIN / args[0]), *args[1:], "--totp", world.lab.totp(user)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=world.lab.env(),
    )
    assert proc.stdin is not None
    proc.stdin.write(PASSWORD.encode() + b"\nhello")
    proc.stdin.close()
    return proc


def test_progress_on_a_terminal(world: World) -> None:
    """stderr a terminal: login, the approval's seconds left, dialling, each on one line."""
    user = world.new_user("attended")  # its agreement needs approval at the machine
    master, slave = pty.openpty()
    proc = _waiting_connect(world, user, slave)
    seen = b""

    def read(until: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + HANG_GUARD
        while until not in seen:
            assert time.monotonic() < deadline, f"no {until!r} on the terminal: {seen!r}"
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                seen += os.read(master, 4096)

    try:
        read(b" s left (code ")
        _approve_when_asked(world)
        assert proc.stdout is not None
        assert proc.stdout.read() == b"HELLO"
        assert proc.wait(HANG_GUARD) == 0
        read(b"dialling pc1/echo...")
        while select.select([master], [], [], 0)[0]:  # gw has exited: the rest is buffered
            seen += os.read(master, 4096)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        os.close(master)
        os.close(slave)
    assert f"gw: logging in to {world.lab.gateway} as {user}...".encode() in seen
    assert b"gw: waiting for approval at the machine: " in seen
    assert b"\r\x1b[K" in seen  # each step rewrites the one line
    # Messages stand on lines of their own, and gw leaves the terminal clean: no progress
    # line glued to a message or left behind after exit.
    *lines, last = screen(seen.decode()).split("\n")
    assert last == "", seen
    assert all(line.startswith("gw: ") and line.count("gw: ") == 1 for line in lines), seen
    assert any(line.startswith("gw: waiting for approval at the machine (up to ") for line in lines)
    assert any(line.startswith("gw: the person there sees this code; it must") for line in lines)


def test_no_progress_in_scripts(world: World) -> None:
    user = world.new_user("attended")
    proc = _waiting_connect(world, user, subprocess.PIPE)
    try:
        _approve_when_asked(world)
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(HANG_GUARD)
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and out == b"HELLO", err
    assert b"waiting for approval" in err  # the code to compare is still said, once
    for progress in (b"\x1b", b"\r", b" s left", b"logging in", b"dialling"):
        assert progress not in err


def test_logout_without_the_gateway_still_deletes_the_key(world: World, tmp_path: Path) -> None:
    """The key is what proves the credential: deleted here, it is over even untold."""
    from gatewayd.demo import free_port

    user = world.new_user()
    login(world, tmp_path, user)
    key, record = files(tmp_path, user)
    gone = f"127.0.0.1:{free_port()}"  # nobody listens there
    moved = [
        p.with_name(p.name.replace(f"_{world.lab.port}_", f"_{gone.split(':')[1]}_"))
        for p in (key, record)
    ]
    for old, new in zip((key, record), moved, strict=True):
        old.rename(new)
    args = ["logout", "--gateway", gone, "--ca-file", str(world.lab.ca_file), "--user", user]
    result = gw(world, tmp_path, *args)
    assert result.returncode == 3, result.stderr
    assert "logged out here (the key is deleted), but the gateway was not told" in result.stderr
    assert not any(p.exists() for p in moved)
    again = gw(world, tmp_path, *args)
    assert again.returncode == 0 and "not logged in" in again.stderr


# -- gw connect --stdio with standard streams of every kind -------------------------------


def _connect_with(world: World, home: Path, user: str, stdin: Any, stdout: Any) -> int:
    args = ["connect", "pc1", *target(world, user), "--target", "echo", "--stdio", "--reason", "r"]
    full = world.lab.env() | {"XDG_CONFIG_HOME": str(home)}
    for name in ("GW_PASSWORD", "GW_GATEWAY", "GW_CA_FILE", "GW_USER", "GW_MODE"):
        full.pop(name, None)
    done = subprocess.run(
        [str(BIN / "gw"), *args],
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=full,
        timeout=HANG_GUARD,
        check=False,
    )
    assert done.returncode >= 0, f"killed by signal {-done.returncode}: {done.stderr!r}"
    assert done.returncode == 0, done.stderr
    return done.returncode


def test_stdio_to_and_from_regular_files(world: World, tmp_path: Path) -> None:
    """``gw connect --stdio < IN > OUT``: files are not pipes, and must not kill gw."""
    user = world.new_user()
    login(world, tmp_path, user)
    data = bytes(range(97, 123)) * 8000  # 208,000 bytes: several reads and writes
    source, out = tmp_path / "in.bin", tmp_path / "out.bin"
    source.write_bytes(data)
    with source.open("rb") as stdin, out.open("wb") as stdout:
        _connect_with(world, tmp_path, user, stdin, stdout)
    assert out.read_bytes() == data.upper()
    # /dev/null in, a file out: an empty stream each way.
    with open(os.devnull, "rb") as stdin, out.open("wb") as stdout:
        _connect_with(world, tmp_path, user, stdin, stdout)
    assert out.read_bytes() == b""
    # A file in, /dev/null out.
    with source.open("rb") as stdin, open(os.devnull, "wb") as stdout:
        _connect_with(world, tmp_path, user, stdin, stdout)
    # No standard input at all: one clear line, no crash.
    args = ["connect", "pc1", *target(world, user), "--target", "echo", "--stdio", "--reason", "r"]
    closed = subprocess.run(
        [str(BIN / "gw"), *args],
        capture_output=True,
        env=world.lab.env() | {"XDG_CONFIG_HOME": str(tmp_path)},
        preexec_fn=lambda: os.close(0),
        timeout=HANG_GUARD,
        check=False,
    )
    assert closed.returncode == 4, closed.stderr
    assert closed.stderr.decode().splitlines()[-1] == "gw: standard input is closed"


def test_stdio_on_a_socket_and_a_terminal(world: World, tmp_path: Path) -> None:
    """A socket pair (inetd style) and a pseudo-terminal as standard input and output."""
    user = world.new_user()
    login(world, tmp_path, user)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(b"over a socket")
        ours.shutdown(socket.SHUT_WR)
        _connect_with(world, tmp_path, user, theirs, theirs)
        theirs.close()
        got = b""
        while chunk := ours.recv(65536):
            got += chunk
    assert got == b"OVER A SOCKET"
    master, slave = pty.openpty()
    try:
        os.write(master, b"typed\n\x04")  # a line, then end of input (^D)
        _connect_with(world, tmp_path, user, slave, slave)
        seen = b""
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        assert b"TYPED" in seen
    finally:
        os.close(master)
        os.close(slave)
