"""An online agent's control connection at scale (gatewayd/agent.py): served by callbacks.

Ten thousand idle agents per gatewayd: once its hello is taken, an agent's link has no
task waiting on it and no message queue; what it says and its close are handled as they
arrive. Real framed links over a socket pair (no TLS: the certificate check is the
directory's and is stubbed here), a real store and audit log; no sleeps.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.agent import Agents
from gatewayd.audit import AuditLog
from gatewayd.clock import ManualClock
from gatewayd.event import AgentDisconnected, Event, EventBus
from gatewayd.rejection import RejectionLog
from gatewayd.store import Agent, Store
from relay import message as m
from relay.aio import FramedLink
from relay.protocol import Closed, Side

KEY = bytes(range(32))
#: A bound on every wait: a hang fails the test, nothing is timed.
HANG = 30.0


class Rejections(RejectionLog):
    """The rejection log, and every rejection's code as it is counted."""

    def __init__(self, audit: AuditLog) -> None:
        super().__init__(audit)
        self.codes: list[str] = []

    def reject(self, source: str, code: str, message: str, now: float, **fields: Any) -> None:
        self.codes.append(code)
        super().reject(source, code, message, now, **fields)


class World:
    def __init__(self, root: Path) -> None:
        self.clock = ManualClock()
        self.store = Store(root / "directory.db", KEY)
        self.audit = AuditLog(root / "audit.jsonl", node="t", fsync=False)
        self.bus = EventBus(self.audit)
        self.events: list[Event] = []
        self.bus.subscribe(self.events.append)
        self.dial_failures: list[tuple[str, str, str]] = []
        self.answers: list[tuple[str, m.ApprovalAnswer]] = []
        self.rejections = Rejections(self.audit)
        self.agents = Agents(
            self.store,
            self.bus,
            self.rejections,
            self.clock.clock(),
            on_dial_failed=lambda *failure: self.dial_failures.append(failure),
            on_approval=lambda agent, answer: self.answers.append((agent, answer)),
        )

        async def enrolled(link: FramedLink) -> Agent:  # the TLS certificate's agent
            return Agent("pc1", "clinic", False, True, "fp", "nk", None, None, "pq" * 800)

        self.agents._enrolled = enrolled  # type: ignore[method-assign]

    async def disconnected(self, count: int = 1) -> list[AgentDisconnected]:
        """The agent.disconnect events, once there are ``count`` of them."""
        async with asyncio.timeout(HANG):
            while True:
                gone = [e for e in self.events if isinstance(e, AgentDisconnected)]
                if len(gone) >= count:
                    return gone
                await asyncio.sleep(0)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    asyncio.run(w.store.close())


#: Every link the test made, closed at its end (no socket is left to the collector).
LINKS: list[FramedLink] = []


async def pair() -> tuple[FramedLink, FramedLink]:
    """(gateway's end, agent's end) of one framed connection."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    gateway = FramedLink(Side.ACCEPTOR)
    agent = FramedLink(Side.CONNECTOR)
    await loop.connect_accepted_socket(lambda: gateway, a)
    await loop.create_connection(lambda: agent, sock=b)
    LINKS.extend((gateway, agent))
    return gateway, agent


async def close_all() -> None:
    links = LINKS[:]
    LINKS.clear()
    for link in links:
        link.abort()
    async with asyncio.timeout(HANG):
        await asyncio.gather(*(link.lost for link in links))


async def online(w: World, targets: tuple[str, ...] = ("ssh",)) -> tuple[FramedLink, FramedLink]:
    gateway, agent = await pair()
    agent.send(m.AgentHello(targets=targets))
    async with asyncio.timeout(HANG):
        hello = await gateway.expect(m.AgentHello)
        assert isinstance(hello, m.AgentHello)
        assert await w.agents.serve(gateway, hello) is True
    return gateway, agent


async def until(check: Any) -> None:
    async with asyncio.timeout(HANG):
        while not check():
            await asyncio.sleep(0)


def test_an_online_agent_costs_no_task_and_no_queue(world: World) -> None:
    async def main() -> None:
        gateway, agent = await online(world)
        conn = world.agents.get("pc1")
        assert conn is not None and conn.link is gateway and conn.targets == {"ssh"}
        # Nothing waits on the link: the only task left is this test's own.
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert gateway._queue is None
        assert not hasattr(conn, "__dict__")  # slots: no per-agent dict
        # The directory row (with its keys) is not kept by anything reachable from it.
        assert not any(isinstance(v, Agent) for v in vars(gateway).values())
        agent.send(m.DialFailed("tok", "x" * 500))
        agent.send(m.ApprovalAnswer("req1", True, by="nurse"))
        await until(lambda: world.dial_failures and world.answers)
        assert world.dial_failures == [("tok", "pc1", "x" * 200)]
        assert world.answers == [("pc1", m.ApprovalAnswer("req1", True, by="nurse"))]
        assert world.agents.send("pc1", m.Ping())
        agent.close()
        (gone,) = await world.disconnected()
        assert (gone.agent, gone.reason) == ("pc1", "eof")
        assert world.agents.get("pc1") is None
        assert world.rejections.codes == []
        await close_all()

    asyncio.run(main())


def test_an_unexpected_message_ends_the_agent_as_a_protocol_error(world: World) -> None:
    async def main() -> None:
        _, agent = await online(world)
        agent.send(m.Pong())
        agent.send(m.Ping())
        # Not something an online agent may say (its own side would refuse to send it).
        body = json.dumps(m.AgentHello(targets=("ssh",)).to_json()).encode()
        assert agent.transport is not None
        agent.transport.write(len(body).to_bytes(4, "big") + body)
        (gone,) = await world.disconnected()
        assert gone.reason == "protocol_error"
        assert world.agents.get("pc1") is None
        async with asyncio.timeout(HANG):
            closed = await agent.closed
        assert closed.code == "protocol_error"
        assert world.rejections.codes == ["protocol_error"]
        await close_all()

    asyncio.run(main())


def test_a_newer_connection_replaces_the_older_which_ends_alone(world: World) -> None:
    async def main() -> None:
        first, first_agent = await online(world)
        second, _ = await online(world, ("rdp",))
        async with asyncio.timeout(HANG):
            closed = await first_agent.closed
        assert closed.code == "session_ended"
        (gone,) = await world.disconnected()
        assert gone.reason == "session_ended"
        conn = world.agents.get("pc1")
        assert conn is not None and conn.link is second and conn.targets == {"rdp"}
        # The older link's late events change nothing.
        first._dispatch()
        assert world.agents.get("pc1") is conn
        assert world.rejections.codes == []
        await close_all()

    asyncio.run(main())


def test_an_error_frame_from_the_agent_ends_it(world: World) -> None:
    async def main() -> None:
        _, agent = await online(world)
        agent.send_error("going_away", "bye")
        (gone,) = await world.disconnected()
        assert gone.reason == "error: going_away"
        assert world.agents.get("pc1") is None
        await close_all()

    asyncio.run(main())


def test_a_handler_that_fails_ends_that_agent_only(world: World) -> None:
    def broken(agent: str, answer: m.ApprovalAnswer) -> None:
        raise RuntimeError("boom")

    world.agents.on_approval = broken

    async def main() -> None:
        _, agent = await online(world)
        agent.send(m.ApprovalAnswer("req1", True))
        (gone,) = await world.disconnected()
        assert gone.reason == "internal"
        async with asyncio.timeout(HANG):
            closed = await agent.closed
        assert closed.code == "internal"
        await close_all()

    asyncio.run(main())


def test_listen_hands_over_what_was_queued_first_then_recv_is_refused() -> None:
    async def main() -> None:
        gateway, agent = await pair()
        agent.send(m.AgentHello(targets=("ssh",)))
        agent.send(m.DialFailed("t1", "r"))
        agent.close()
        async with asyncio.timeout(HANG):
            await gateway.closed
        seen: list[m.Message | Closed] = []
        gateway.listen(seen.append)
        assert [type(e) for e in seen] == [m.AgentHello, m.DialFailed, Closed]
        with pytest.raises(RuntimeError):
            await gateway.recv()
        await close_all()

    asyncio.run(main())
