"""The tunnel core as its users run it: real gatewayd, agent and gw processes on loopback."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import struct

import pytest
from world import PASSWORD, World, build_world

from gatewayd.demo import free_port, round_trip, wait_for

pytestmark = pytest.mark.integration


def records(world: World, event: str, **match: object) -> list[dict[str, object]]:
    return [r for r in world.lab.events(event) if all(r.get(k) == v for k, v in match.items())]


def test_local_forward_many_tunnels_one_login(world: World) -> None:
    user = world.new_user()
    proc, port = world.lab.connect_local("pc1", user, PASSWORD, "echo", "--reason", "ticket 42")
    for i in range(5):
        payload = f"tunnel {i} ".encode() * 1000
        assert round_trip(port, payload) == payload.upper()
    big = bytes(range(256)) * 20000  # 5 MB through one tunnel, both ways
    assert round_trip(port, big, timeout=60) == big.upper()
    proc.stop()
    wait_for(lambda: bool(records(world, "session.end", user=user)), 60, "session.end")

    attempts = records(world, "auth.attempt", user=user)
    assert [(a["factor"], a["outcome"]) for a in attempts] == [
        ("password", "success"),
        ("totp", "success"),
    ]
    (decision,) = records(world, "policy.decision", user=user)
    assert decision["decision"] == "allow" and decision["reason_given"] == "ticket 42"
    session = decision["session"]
    starts = records(world, "tunnel.start", session=session)
    ends = records(world, "tunnel.end", session=session)
    assert len(starts) == len(ends) == 6
    assert max(e["bytes_up"] for e in ends) > len(big)  # Noise framing adds a little
    assert all(e["reason"] in ("client closed", "agent closed") for e in ends)
    (end,) = records(world, "session.end", session=session)
    assert end["tunnels"] == 6 and end["bytes_down"] > len(big)


def test_stdio_round_trip_with_half_close(world: World) -> None:
    user = world.new_user()
    result = world.lab.connect_stdio("pc1", user, PASSWORD, "echo", "one line\nand another\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ONE LINE\nAND ANOTHER\n"


def test_audit_cli_filters_and_verifies(world: World) -> None:
    user = world.new_user()
    assert world.lab.connect_stdio("pc1", user, PASSWORD, "echo", "x").returncode == 0
    cfg = str(world.lab.config)
    out = world.lab.run("gw", "audit", "--config", cfg, "--user", user, "--json").stdout
    events = [json.loads(line)["event"] for line in out.splitlines()]
    assert events[:2] == ["admin.change", "admin.change"]  # user.add, totp.enroll
    assert events[2:6] == ["auth.attempt", "auth.attempt", "policy.decision", "session.start"]
    table = world.lab.run("gw", "audit", "--config", cfg, "--event", "tunnel.", "--since", "10m")
    assert "tunnel.start" in table.stdout and "TS" in table.stdout
    assert "ok:" in world.lab.run("gw", "audit", "verify", "--config", cfg).stdout
    bad = world.lab.run("gw", "audit", "--config", cfg, "--since", "yesterday", check=False)
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_wrong_password_is_refused_and_audited(world: World) -> None:
    user = world.new_user()
    result = world.lab.connect_stdio("pc1", user, "not the password", "echo", "x")
    assert result.returncode == 1
    assert result.stderr.strip() == "gw: authentication failed"
    assert "Traceback" not in result.stderr
    (attempt,) = records(world, "auth.attempt", user=user)
    assert attempt["outcome"] == "failure" and attempt["reason"] == "wrong password"


def test_totp_code_is_single_use(world: World) -> None:
    user = world.new_user()
    code = world.lab.totp(user)
    first = world.lab.connect_stdio("pc1", user, PASSWORD, "echo", "x", totp=code)
    assert first.returncode == 0, first.stderr
    second = world.lab.connect_stdio("pc1", user, PASSWORD, "echo", "x", totp=code)
    assert second.returncode == 1 and "authentication failed" in second.stderr
    reasons = [a["reason"] for a in records(world, "auth.attempt", user=user, factor="totp")]
    assert reasons == ["ok", "code already used"]


def test_the_next_step_code_is_accepted_once_the_current_one_is_used(world: World) -> None:
    """One step of drift each way (RFC 6238 5.2): the lab logs a user in again at once with
    the next step's code instead of waiting for it, and the gateway takes it, once."""
    user = world.new_user()
    first = world.lab.connect_stdio("pc1", user, PASSWORD, "echo", "x")
    second = world.lab.connect_stdio("pc1", user, PASSWORD, "echo", "y")
    assert (first.returncode, second.returncode) == (0, 0), second.stderr
    reasons = [a["reason"] for a in records(world, "auth.attempt", user=user, factor="totp")]
    assert reasons == ["ok", "ok"]


def test_consecutive_failures_lock_the_account(world: World) -> None:
    user = world.new_user()
    for _ in range(3):  # the code does not matter: the password is wrong
        failed = world.lab.connect_stdio("pc1", user, "wrong", "echo", "x", totp="000000")
        assert failed.returncode == 1
    # Right password and code now, but the account is locked.
    locked = world.lab.connect_stdio("pc1", user, PASSWORD, "echo", "x")
    assert locked.returncode == 1 and "authentication failed" in locked.stderr
    assert records(world, "auth.locked", user=user)
    assert records(world, "auth.attempt", user=user)[-1]["reason"].startswith("account locked")


def test_unknown_user_is_audited(world: World) -> None:
    result = world.lab.run(
        *world.lab.connect_args(
            "pc1", "ghost", "echo", "access", "--stdio", "--password-stdin", "--totp", "123456"
        ),
        input="whatever\n",
        check=False,
    )
    assert result.returncode == 1
    assert records(world, "auth.attempt", user="ghost")[0]["reason"] == "unknown user"


@pytest.mark.parametrize(
    ("vendor", "reason"),
    [("nobody", "no agreement between vendor nobody and org clinic")],
)
def test_policy_denials_carry_the_reason(world: World, vendor: str, reason: str) -> None:
    user = world.new_user(vendor)
    result = world.lab.connect_stdio("pc1", user, PASSWORD, "echo", "x")
    assert result.returncode == 1
    assert result.stderr.startswith("gw: denied by policy:") and reason in result.stderr
    (decision,) = records(world, "policy.decision", user=user)
    assert decision["decision"] == "deny" and reason in decision["reason"]


def test_unknown_target_and_agent(world: World) -> None:
    user = world.new_user()
    result = world.lab.connect_stdio("pc1", user, PASSWORD, "ssh", "x")
    assert result.returncode == 1 and "has no target ssh" in result.stderr
    user = world.new_user()
    result = world.lab.connect_stdio("pc9", user, PASSWORD, "echo", "x")
    assert result.returncode == 1 and "unknown agent pc9" in result.stderr


def test_gateway_unreachable_and_wrong_ca(world: World, tmp_path: object) -> None:
    lab = world.lab
    args = lab.connect_args("pc1", "anyone", "echo", "access", "--stdio", "--password-stdin")
    args[args.index("--gateway") + 1] = f"127.0.0.1:{free_port()}"
    result = lab.run(*args, input="pw\n", check=False)
    assert result.returncode == 3 and "cannot reach the gateway" in result.stderr
    other = lab.root / "other-ca.pem"
    other.write_bytes(ssl.get_server_certificate(("127.0.0.1", lab.port)).encode())
    args = lab.connect_args("pc1", "anyone", "echo", "access", "--stdio", "--password-stdin")
    args[args.index("--ca-file") + 1] = str(other)
    result = lab.run(*args, input="pw\n", check=False)
    assert result.returncode == 3 and "certificate does not verify" in result.stderr


def test_changed_agent_key_is_refused(world: World) -> None:
    user = world.new_user()
    known = world.lab.root / f"known-{user}.json"
    ok = world.lab.connect_stdio("pc1", user, PASSWORD, "echo", "x", "--known-agents", str(known))
    assert ok.returncode == 0, ok.stderr
    pinned = json.loads(known.read_text())
    (entry,) = pinned
    pinned[entry] = "A" * 43  # another key
    known.write_text(json.dumps(pinned))
    user2 = world.new_user()
    bad = world.lab.connect_stdio("pc1", user2, PASSWORD, "echo", "x", "--known-agents", str(known))
    assert bad.returncode == 3
    assert "has CHANGED" in bad.stderr and bad.stdout == ""


def test_enrollment_token_is_single_use(world: World) -> None:
    token = world.lab.admin("agent", "add", "pc-once", "--org", "clinic").strip()
    lab = world.lab
    for i, expect in enumerate((0, 1)):
        result = lab.run(
            "gw",
            "agent",
            "enroll",
            "--gateway",
            lab.gateway,
            "--ca-file",
            str(lab.ca_file),
            "--token",
            token,
            "--state-dir",
            str(lab.root / f"once-{i}"),
            check=False,
        )
        assert result.returncode == expect, result.stderr
    assert "unknown, used or expired" in result.stderr
    outcomes = [r["outcome"] for r in records(world, "agent.enroll")]
    assert "failure" in outcomes


def _tls(world: World) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(world.lab.ca_file))
    # A hang guard only: the gateway's own handshake timeout (2 s here) answers first.
    raw = socket.create_connection(("127.0.0.1", world.lab.port), timeout=30)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _read_error(sock: ssl.SSLSocket) -> dict[str, object]:
    head = sock.recv(4)
    body = b""
    (length,) = struct.unpack(">I", head)
    while len(body) < length:
        body += sock.recv(length - len(body))
    return json.loads(body)


def test_bad_input_never_takes_the_daemon_down(world: World) -> None:
    lab = world.lab
    # Not TLS at all.
    with socket.create_connection(("127.0.0.1", lab.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"\x00" * 1000)
        s.recv(100)
    # TLS, then another protocol.
    with _tls(world) as s:
        s.sendall(b"HELO")
        assert _read_error(s)["code"] == "protocol_error"
    # Wrong version.
    with _tls(world) as s:
        s.sendall(b"GWP\x09")
        assert _read_error(s)["code"] == "unsupported_version"
    # An oversized frame.
    with _tls(world) as s:
        s.sendall(b"GWP\x01" + struct.pack(">I", 10_000_000))
        assert _read_error(s)["code"] == "frame_too_large"
    # Valid framing, invalid message.
    with _tls(world) as s:
        body = json.dumps({"t": "client_hello", "user": 5}).encode()
        s.sendall(b"GWP\x01" + struct.pack(">I", len(body)) + body)
        assert _read_error(s)["code"] == "protocol_error"
    # A silent peer is closed after the handshake timeout (2 s in this lab).
    with _tls(world) as s:
        s.sendall(b"GWP\x01")
        assert _read_error(s)["code"] == "timeout"
    # And the daemon still serves.
    user = world.new_user()
    assert lab.connect_stdio("pc1", user, PASSWORD, "echo", "still up").stdout == "STILL UP"
    codes = {r["code"] for r in world.lab.events("connection.rejected")}
    assert {"tls", "protocol_error", "unsupported_version", "frame_too_large", "timeout"} <= codes


def test_check_config_names_the_key(world: World) -> None:
    bad = world.lab.config.with_name("bad.toml")
    text = world.lab.config.read_text()
    bad.write_text(text.replace(f'listen = "{world.lab.gateway}"', 'listen = "127.0.0.1:99999"'))
    result = world.lab.run("gatewayd", "check-config", "--config", str(bad), check=False)
    assert result.returncode == 4 and "gateway.listen" in result.stderr
    good = world.lab.run("gatewayd", "check-config", "--config", str(world.lab.config))
    assert good.stdout.strip().endswith(": ok")


def test_agent_reconnects_and_sigterm_stops_cleanly(tmp_path: object) -> None:
    world = build_world(tmp_path)  # type: ignore[arg-type]
    lab = world.lab
    try:
        gateway = lab.procs[0]
        assert gateway.stop(signal.SIGTERM) == 0
        stops = lab.events("gateway.stop")
        assert stops and stops[-1]["reason"] == "signal"
        lab.start_gateway()
        agent = world.agent_proc
        assert agent is not None
        wait_for(lambda: agent.output().count("connected gateway") >= 2, 60, "agent to reconnect")
        user = world.new_user()
        assert lab.connect_stdio("pc1", user, PASSWORD, "echo", "back").stdout == "BACK"
        assert "ok:" in lab.run("gw", "audit", "verify", "--config", str(lab.config)).stdout
    finally:
        lab.close()
        world.echo.close()
