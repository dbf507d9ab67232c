"""A new tunnel in an open session, as fast as it can be made safely: real gatewayd,
gw agent and gw connect processes on loopback.

- The agent keeps one data connection dialled ahead while it has a session
  (``spare``): each is used for exactly one tunnel and replaced at once; none is kept
  once the agent's last session ended.
- ``tunnel.start`` is written as the dial goes out (its fsync overlaps the agent's
  answer), and is on disk before any byte flows: a gatewayd killed right after a
  tunnel carried its first byte has the record in the log *and* within the head
  file's durable mark.
"""

from __future__ import annotations

import contextlib
import re
import signal

import pytest
from world import PASSWORD, World

from gatewayd.audit import read_head
from gatewayd.demo import free_port, round_trip, wait_for

pytestmark = pytest.mark.integration

READY = "spare data connection ready"


def agent_log(world: World) -> str:
    assert world.agent_proc is not None
    return world.agent_proc.output()


def opened(log: str, session: str) -> list[str]:
    """How each tunnel of the session reached the agent: ``spare`` or ``new``."""
    return re.findall(rf"tunnel open session={re.escape(session)} .*?via=(\w+)", log)


def session_of(world: World, user: str) -> str:
    (decision,) = [r for r in world.lab.events("policy.decision") if r.get("user") == user]
    return str(decision["session"])


def test_each_spare_serves_one_tunnel_and_is_replaced(world: World) -> None:
    before = agent_log(world).count(READY)
    user = world.new_user()
    proc, port = world.lab.connect_local("pc1", user, PASSWORD, "echo", "--reason", "spare")
    session = session_of(world, user)
    # The session's announcement makes the agent dial its first spare.
    wait_for(lambda: agent_log(world).count(READY) >= before + 1, 60, "the first spare")
    for i in range(3):
        assert round_trip(port, f"tunnel {i}".encode()) == f"TUNNEL {i}".encode()
        # Used once: the agent dials the next one at once.
        wait_for(lambda i=i: agent_log(world).count(READY) >= before + 2 + i, 60, "a new spare")
    log = agent_log(world)
    assert opened(log, session) == ["spare"] * 3
    assert log.count(READY) == before + 4  # one per tunnel, plus the one waiting now
    starts = [r for r in world.lab.events("tunnel.start") if r["session"] == session]
    assert len(starts) == 3 and len({r["tunnel"] for r in starts}) == 3

    proc.stop()
    wait_for(
        lambda: "spare data connection closed reason=no session left" in agent_log(world),
        20,
        "the agent to drop its spare once the session ended",
    )
    assert agent_log(world).count(READY) == before + 4


def test_a_dial_that_fails_after_tunnel_start_is_on_record_as_failed(world: World) -> None:
    """tunnel.start goes out with the dial; an agent that then cannot reach its target
    (here: a port nothing listens on) leaves tunnel.failed with the same tunnel id, on
    the spare as on the control connection."""
    world.lab.enroll_agent("pc-dead", "clinic")
    agent = world.lab.start_agent("pc-dead", {"echo": free_port()})
    try:
        user = world.new_user()
        _, port = world.lab.connect_local("pc-dead", user, PASSWORD, "echo", "--reason", "dead")
        session = session_of(world, user)
        wait_for(lambda: READY in agent.output(), 60, "the spare")
        for _ in range(2):  # the first on the spare, the second on the control connection
            with contextlib.suppress(OSError):  # closed or reset: nothing comes back
                assert round_trip(port, b"nobody there") == b""

        def failed() -> list[dict[str, object]]:
            return [r for r in world.lab.events("tunnel.failed") if r["session"] == session]

        wait_for(lambda: len(failed()) == 2, 60, "two tunnel.failed")
        starts = [r for r in world.lab.events("tunnel.start") if r["session"] == session]
        assert sorted(r["tunnel"] for r in starts) == sorted(r["tunnel"] for r in failed())
        assert all("unreachable" in str(r["reason"]) for r in failed())
        assert not [r for r in world.lab.events("tunnel.end") if r["session"] == session]
    finally:
        agent.stop()


def test_tunnel_start_is_durable_before_the_first_byte(world: World) -> None:
    """Last in this module: it kills the module's gatewayd."""
    user = world.new_user()
    _, port = world.lab.connect_local("pc1", user, PASSWORD, "echo", "--reason", "crash")
    session = session_of(world, user)
    assert round_trip(port, b"first byte") == b"FIRST BYTE"
    gateway = next(p for p in world.lab.procs if p.name == "gatewayd")
    gateway.stop(signal.SIGKILL)
    (start,) = [r for r in world.lab.events("tunnel.start") if r["session"] == session]
    head = read_head(world.lab.audit_path)
    assert head is not None and head.seq >= start["seq"]
