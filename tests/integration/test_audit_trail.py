"""The trail a real gateway writes: every record validates against docs/audit.schema.json,
its checkpoints verify with the key `gatewayd init` printed, on this host and elsewhere,
and `gw audit sessions` shows the journey."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from world import PASSWORD, World, build_world

from gatewayd.demo import wait_for

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "audit.schema.json"


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A small day: logins that work and fail, a lock, junk, a reload, admin changes, a
    session with a tunnel, a refusal, a restart."""
    w = build_world(tmp_path_factory.mktemp("trail"), extra_config="[lockout]\nthreshold = 2\n")
    try:
        lab = w.lab
        user = w.new_user()
        assert lab.connect_stdio("pc1", user, PASSWORD, "echo", "hello").returncode == 0
        assert lab.connect_stdio("pc1", user, PASSWORD, "nothing", "x").returncode != 0
        locked = w.new_user()
        for _ in range(3):
            lab.connect_stdio("pc1", locked, "wrong", "echo", "x")
        nobody = w.new_user("nobody")
        assert lab.connect_stdio("pc1", nobody, PASSWORD, "echo", "x").returncode != 0
        with socket.create_connection(("127.0.0.1", int(lab.gateway.rsplit(":", 1)[1]))) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.recv(100)
        gateway = [p for p in lab.procs if p.name == "gatewayd"][-1]
        os.kill(gateway.popen.pid, signal.SIGHUP)
        wait_for(lambda: bool(lab.events("gateway.reload")), 60, "the reload record")
        assert gateway.stop() == 0
        lab.procs.remove(gateway)
        lab.start_gateway()
        yield w
    finally:
        w.lab.close()
        w.echo.close()


def test_every_record_validates_against_the_schema(journey: World) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    records = journey.lab.audit_records()
    seen = {r["event"] for r in records}
    # The journey reached the events that matter, so the check means something.
    assert {
        "gateway.start",
        "gateway.stop",
        "gateway.reload",
        "audit.checkpoint",
        "auth.attempt",
        "auth.locked",
        "policy.decision",
        "session.start",
        "session.end",
        "session.refused",
        "tunnel.start",
        "tunnel.end",
        "agent.enroll",
        "agent.connect",
        "admin.change",
        "connection.rejected",
    } <= seen, seen
    bad = [
        f"seq {r.get('seq')} ({r.get('event')}): {e.message} at {list(e.absolute_path)}"
        for r in records
        for e in validator.iter_errors(r)
    ]
    assert not bad, "\n".join(bad[:20])
    # The schema lists every event the daemon may write, and no more than the docs.
    documented = (SCHEMA.parent / "audit.md").read_text()
    for event in schema["properties"]["event"]["enum"]:
        assert f"| `{event}` |" in documented, event


def test_the_trail_verifies_with_the_key_init_printed(journey: World, tmp_path: Path) -> None:
    lab = journey.lab
    key = lab.run("gw", "audit", "key", "--config", str(lab.config)).stdout.strip()
    assert key.startswith("ed25519:")
    printed = lab.run(
        "gatewayd", "init", "--dir", str(tmp_path / "other"), "--listen", "127.0.0.1:1"
    )
    assert "audit key (verifies the trail's checkpoints): ed25519:" in printed.stdout
    ok = lab.run("gw", "audit", "verify", "--config", str(lab.config))
    assert "last verified checkpoint: seq" in ok.stdout and "ok:" in ok.stdout
    # Elsewhere: a copy of the files and the public key, no config.
    pub = tmp_path / "gateway.pub"
    pub.write_text(key + "\n")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in lab.audit_path.parent.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    elsewhere = lab.run(
        "gw", "audit", "verify", "--path", str(copy / lab.audit_path.name), "--key", str(pub)
    )
    assert "ok:" in elsewhere.stdout
    # The other gateway's key does not verify this trail.
    other = tmp_path / "other.pub"
    other.write_text(printed.stdout.split("checkpoints): ")[1].split()[0] + "\n")
    wrong = lab.run(
        "gw", "audit", "verify", "--path", str(copy / lab.audit_path.name), "--key", str(other),
        check=False,
    )  # fmt: skip
    assert wrong.returncode == 1 and "signed by key" in wrong.stderr


def test_sessions_view_of_the_journey(journey: World) -> None:
    lab = journey.lab
    out = lab.run("gw", "audit", "sessions", "--config", str(lab.config), "--json").stdout
    rows: list[dict[str, Any]] = [json.loads(x) for x in out.splitlines()]
    done = [r for r in rows if r["end"]]
    assert done and done[0]["org"] == "clinic" and done[0]["vendor"] == "acme"
    assert done[0]["agent"] == "pc1" and done[0]["target"] == "echo"
    assert done[0]["bytes_up"] > 0 and done[0]["bytes_down"] > 0
    failures = lab.run(
        "gw", "audit", "--config", str(lab.config), "--org", "clinic", "--outcome", "failure",
        "--json",
    ).stdout  # fmt: skip
    recs = [json.loads(x) for x in failures.splitlines()]
    events = {r["event"] for r in recs}
    assert {"session.refused", "auth.attempt"} <= events, events
    assert all(r.get("outcome") != "success" for r in recs)
