"""Windows journeys: the Windows build of CPython runs ``gw`` under Wine against a real
Linux gatewayd, agent and echo service on loopback (tests/support/wine.py builds it).

- the Windows ``gw connect -L`` and ``--stdio`` log in with password + TOTP (the TLS
  exporter found in ``libssl-3.dll``), carry a round trip, and the gateway audits them;
- the agent key is pinned in ``%APPDATA%\\gw\\known_agents.json`` on the first run,
  accepted on the second and a changed key refused;
- the Windows ``gw agent enroll`` and ``gw agent run`` serve a tunnel a Linux client
  opens, after the person at the machine approves it with ``gw agent approve`` (the
  loopback endpoint guarded by the token file).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from wine import WindowsGw, windows_gw, winpath
from world import PASSWORD, World, build_world

from gatewayd.demo import BIN, free_port, round_trip, wait_for
from relay import noise

pytestmark = [pytest.mark.windows, pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def win() -> Iterator[WindowsGw]:
    found = windows_gw()
    if isinstance(found, str):
        pytest.skip(found)
    found.start_server()
    known = found.appdata / "gw" / "known_agents.json"
    known.unlink(missing_ok=True)
    try:
        yield found
    finally:
        found.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, win: WindowsGw) -> Iterator[World]:
    w = build_world(tmp_path_factory.mktemp("winlab"))
    try:
        yield w
    finally:
        w.lab.close()
        w.echo.close()


def _connect_args(world: World, user: str, *extra: str) -> list[str]:
    lab = world.lab
    return [
        "connect",
        "pc1",
        "--gateway",
        lab.gateway,
        "--ca-file",
        winpath(lab.ca_file),
        "--user",
        user,
        "--target",
        "echo",
        "--mode",
        "access",
        "--reason",
        "windows journey",
        "--password-stdin",
        "--totp",
        lab.totp(user),
        *extra,
    ]


def _session(world: World, user: str) -> dict[str, Any]:
    (start,) = [r for r in world.lab.events("session.start") if r.get("user") == user]
    return start


def test_windows_connect_local_round_trip_audited_and_agent_pinned(
    world: World, win: WindowsGw
) -> None:
    user = world.new_user()
    port = free_port()
    proc = win.start("connect-L", *_connect_args(world, user, "-L", f"127.0.0.1:{port}"))
    proc.send(PASSWORD + "\n")
    proc.wait_for("listening on", 120, "the Windows gw connect -L to listen")
    data = os.urandom(3000)
    assert round_trip(port, data) == data.upper()
    assert round_trip(port, b"second connection") == b"SECOND CONNECTION"
    proc.stop()
    start = _session(world, user)
    session = start["session"]
    records = [r for r in world.lab.audit_records() if r.get("session") == session]
    assert {"auth.attempt", "session.start", "tunnel.start", "tunnel.end"} <= {
        r["event"] for r in records
    }
    attempts = [r for r in records if r["event"] == "auth.attempt"]
    assert attempts and all(r.get("outcome") in ("ok", "success", "granted") for r in attempts), (
        attempts
    )
    # First contact pinned the agent's key in %APPDATA%\gw, where gw keeps it on Windows.
    known = json.loads((win.appdata / "gw" / "known_agents.json").read_text())
    assert f"{world.lab.gateway} pc1" in known


def test_windows_connect_stdio_second_run_uses_the_pinned_key(world: World, win: WindowsGw) -> None:
    known = win.appdata / "gw" / "known_agents.json"
    before = known.read_text()
    user = world.new_user()
    payload = bytes(range(256)) * 8 + b"\r\n\n\x1a end"
    status, out, err = win.run_bytes(
        *_connect_args(world, user, "--stdio"), stdin=PASSWORD.encode() + b"\n" + payload
    )
    assert status == 0, err
    assert out == payload.upper()
    assert known.read_text() == before  # checked against the pin, nothing re-pinned
    assert _session(world, user)["mode"] == "access"


def test_windows_connect_refuses_an_agent_whose_key_changed(world: World, win: WindowsGw) -> None:
    known = win.appdata / "gw" / "known_agents.json"
    pinned = known.read_text()
    entries = json.loads(pinned)
    entries[f"{world.lab.gateway} pc1"] = noise.fingerprint(os.urandom(32))
    known.write_text(json.dumps(entries))
    try:
        user = world.new_user()
        status, out, err = win.run(*_connect_args(world, user, "--stdio"), stdin=PASSWORD + "\n")
    finally:
        known.write_text(pinned)
    assert status == 3, err
    assert "has CHANGED since it was first seen" in err and out == ""
    assert not [r for r in world.lab.events("tunnel.start") if r.get("user") == user]


def test_windows_gw_agents_lists_what_the_user_may_reach(world: World, win: WindowsGw) -> None:
    lab = world.lab
    user = world.new_user()
    args = ["agents", "--gateway", lab.gateway, "--ca-file", winpath(lab.ca_file)]
    status, out, err = win.run(
        *args,
        "--user",
        user,
        "--password-stdin",
        "--totp",
        lab.totp(user),
        "--json",
        stdin=PASSWORD + "\n",
    )
    assert status == 0, err
    rows = {row["agent"]: row for row in json.loads(out)}
    assert "access" in rows["pc1"]["modes"] and rows["pc1"]["online"]


def _linux_connect(world: World, user: str) -> subprocess.Popen[str]:
    lab = world.lab
    args = [
        *lab.connect_args("winpc", user, "echo", "access"),
        "--stdio",
        "--password-stdin",
        "--totp",
        lab.totp(user),
    ]
    proc = subprocess.Popen(
        [str(BIN / args[0]), *args[1:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=lab.env(),
    )
    assert proc.stdin is not None
    proc.stdin.write(f"{PASSWORD}\nfrom linux to windows")
    proc.stdin.close()
    return proc


def test_windows_agent_serves_a_linux_client_after_approval(world: World, win: WindowsGw) -> None:
    lab = world.lab
    token = lab.admin("agent", "add", "winpc", "--org", "clinic").strip()
    state = winpath(lab.root / "agent-winpc")
    ca = winpath(lab.ca_file)
    enroll = ["agent", "enroll", "--gateway", lab.gateway, "--ca-file", ca, "--token", token]
    status, out, err = win.run(*enroll, "--state-dir", state)
    assert status == 0, err
    assert "enrolled as agent winpc" in out
    agent = win.start(
        "agent-winpc",
        "agent",
        "run",
        "--state-dir",
        state,
        f"--target=echo=127.0.0.1:{world.echo.port}",
        "--no-prompt",
    )
    agent.wait_for("connected", 120, "the Windows agent to connect")
    # The Windows agent's approvals endpoint: loopback TCP and a token file, no socket file.
    token_file = lab.root / "agent-winpc" / "approval.token"
    assert token_file.is_file()
    assert not (lab.root / "agent-winpc" / "approval.sock").exists()
    # Its ACL grants the agent's user alone; Wine shows that as no access for others.
    assert stat.S_IMODE(token_file.stat().st_mode) & 0o007 == 0

    user = world.new_user("attended")  # access without approval is not agreed
    client = _linux_connect(world, user)
    pending: list[dict[str, Any]] = []

    def asked() -> bool:
        status, out, err = win.run("agent", "approvals", "--state-dir", state, "--json")
        assert status == 0, err
        pending[:] = json.loads(out)
        return bool(pending)

    wait_for(asked, 120, "the approval request at the Windows agent")
    (request,) = pending
    assert request["user"] == user and request["mode"] == "access"
    status, out, err = win.run("agent", "approve", request["id"], "--state-dir", state)
    assert status == 0, err
    client.wait(60)
    assert client.stdout is not None and client.stderr is not None
    with client.stdout, client.stderr:
        stdout, stderr = client.stdout.read(), client.stderr.read()
    assert client.returncode == 0, stderr
    assert stdout == "FROM LINUX TO WINDOWS"
    assert request["sas"] in stderr
    (result,) = [r for r in lab.events("approval.result") if r.get("user") == user]
    assert result["outcome"] == "approved" and result["by"].endswith("(token)")
    assert [r for r in lab.events("tunnel.start") if r.get("user") == user]
    agent.stop()

    # The same agent with --approval-command: cmd.exe runs it; exit status 0 approves.
    agent = win.start(
        "agent-winpc-command",
        "agent",
        "run",
        "--state-dir",
        state,
        f"--target=echo=127.0.0.1:{world.echo.port}",
        "--no-prompt",
        "--approval-command",
        'if "%GW_USER%"=="' + (second := world.new_user("attended")) + '" (exit 0) else (exit 3)',
    )
    agent.wait_for("connected", 120, "the Windows agent to connect again")
    client = _linux_connect(world, second)
    client.wait(120)
    assert client.stdout is not None and client.stderr is not None
    with client.stdout, client.stderr:
        stdout, stderr = client.stdout.read(), client.stderr.read()
    assert client.returncode == 0, stderr + agent.output()
    assert stdout == "FROM LINUX TO WINDOWS"
    (result,) = [r for r in lab.events("approval.result") if r.get("user") == second]
    assert result["outcome"] == "approved" and result["by"] == "approval_command"
    agent.stop()
