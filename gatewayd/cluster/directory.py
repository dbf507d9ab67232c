"""The session directory of a node in a cluster: agents and sessions of every node.

Theory of operation
-------------------

Each node holds the control connections of the agents that dialled it and the
sessions of the clients that logged in to it. :class:`ClusterDirectory` answers the
session directory's questions (:class:`gatewayd.session.SessionDirectory`) for the
whole cluster, over the MQTT bus (:mod:`gatewayd.cluster.wire` lists the topics):

- *Presence.* When an agent connects here, this node publishes, retained, that it
  holds it (with its targets and when it connected); when the agent leaves, it
  clears the topic. Every node keeps the last presence of every agent. The node's
  last will marks it ``dead``: every node then drops that node's agents and clears
  their topics. A node that finds a presence naming itself for an agent it does not
  hold (its own, from before a restart) clears it; one that holds an agent whose topic
  was cleared or taken by an older connection publishes its own again. After every
  (re)connection to the broker a node forgets what it knew, reads the retained
  presence again, and publishes its own.
- *Dial routing.* A tunnel of a client here to an agent held by node A: the dial
  request, with this node's data address, goes to A (``to/A``, kind ``agent``); A
  hands it to the agent and acknowledges (``ack``), or says why not (``failed``); the
  agent dials its data connection straight to this node, which pairs it as ever. No
  acknowledgement within ``reply_timeout``: the tunnel fails, saying A did not answer.
  Approval requests and session notices travel the same way, in order with the
  dials, and approval answers come back (``answer``).
- *Revocation.* Every admin change (an ``admin.change`` event on this node's event
  bus) is told to every node (``all``, kind ``changed``), which re-checks its live
  sessions against the shared directory at once; a kill of a session this node does
  not hold is asked of every node (``kill``), and the holder ends it and says so.
- *Outage.* With the broker gone, tunnels already spliced flow on (they never touch
  the bus); a session or tunnel to an agent of another node fails with a clear
  ``unavailable`` error; agents held here stay reachable from here. Changes made here
  meanwhile are told when the bus is back, and every node re-checks its sessions then.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from relay import message as m
from relay.errors import GatewayError, ProtocolError

from ..agent import Agents
from ..config import ClusterSection
from ..event import AdminChanged, AgentConnected, AgentDisconnected, Event, EventBus
from ..session import AgentPlace, Approvals, SessionDirectory
from ..tunnel import DialError, DialPairing
from . import wire
from .bus import Bus

log = structlog.get_logger("gatewayd.cluster")

#: Dials and approval requests relayed for other nodes that this node remembers, to send
#: the agent's refusal or answer back (the oldest are forgotten beyond this).
MAX_ROUTED = 4096

Spawn = Callable[[Coroutine[Any, Any, Any]], None]


class ClusterUnavailable(GatewayError):
    """The cluster bus is down: what needed another node cannot be done now."""


@dataclass(frozen=True, slots=True)
class RemoteAgent:
    """An agent held by another node."""

    node: str
    targets: frozenset[str]
    unreachable: str = ""
    #: What the agent said in its hello on its node (its presence); () from an older
    #: node: ChaChaPoly, which every agent runs.
    ciphers: tuple[str, ...] = ()


class _Routed:
    """Keys of requests relayed for other nodes -> the node that asked, bounded."""

    def __init__(self) -> None:
        self._by_key: OrderedDict[str, str] = OrderedDict()

    def add(self, key: str, node: str) -> None:
        self._by_key[key] = node
        while len(self._by_key) > MAX_ROUTED:
            self._by_key.popitem(last=False)

    def pop(self, key: str) -> str | None:
        return self._by_key.pop(key, None)

    def get(self, key: str) -> str | None:
        return self._by_key.get(key)


class ClusterDirectory(SessionDirectory):
    """The session directory of one node of a cluster."""

    def __init__(
        self,
        agents: Agents,
        section: ClusterSection,
        *,
        events: EventBus,
        dials: DialPairing,
        approvals: Approvals,
        revalidate: Callable[[str], Coroutine[Any, Any, int]],
    ) -> None:
        super().__init__(agents)
        self.section = section
        self.node = section.node_id
        self.data_address = wire.hostport(section.data_address)
        # Another node (or worker on a shared port) does not know this node's tickets.
        self.tunnel_address = self.data_address
        self.dials = dials
        self.approvals = approvals
        self.revalidate = revalidate
        self.bus = Bus(
            section,
            node=self.node,
            will=wire.NodeState(self.node, "dead").encode(),
            on_message=self.receive,
            on_up=self._bus_up,
            on_down=self._bus_down,
        )
        #: The last state of each node and the presence of each agent, as the bus said.
        self.nodes: dict[str, wire.NodeState] = {}
        self.places: dict[str, wire.Presence] = {}
        #: agent -> the node last known to hold it, kept when that node is said dead: a
        #: broker shutting down sends every node's will, and while it is down a client
        #: should hear that the bus is down, not that its agent is gone.
        self.last_known: dict[str, str] = {}
        #: Dials this node asked of others: token -> (node, agent, the no-answer timer).
        self.asked: dict[str, tuple[str, str, asyncio.TimerHandle]] = {}
        #: Approval requests this node sent to agents of others: request -> node.
        self.asked_approvals = _Routed()
        #: Requests of other nodes relayed to agents here (dial token / approval request).
        self.routed_dials = _Routed()
        self.routed_approvals = _Routed()
        self.kills: dict[str, asyncio.Future[bool]] = {}
        self.changed_while_down = False
        self.closing = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        # The agents' answers come here first: those of requests relayed for another
        # node go back to it, the rest to this node's dial pairing and approvals.
        self.local_dial_failed, self.local_approval = agents.on_dial_failed, agents.on_approval
        agents.on_dial_failed, agents.on_approval = self._agent_dial_failed, self._agent_answer
        events.subscribe(self.on_event)

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self.bus.run())

    async def close(self) -> None:
        """A clean stop: the node says it is gone (its agents with it), then leaves."""
        self.closing = True
        for agent in list(self.agents.online):
            self.bus.publish(wire.agent_topic(agent), b"", retain=True)
        self.bus.publish(wire.node_topic(self.node), self._state("dead"), retain=True)
        await self.bus.flush(2.0)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for task in list(self.tasks):
            task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _state(self, state: str) -> bytes:
        return wire.NodeState(self.node, state, self.data_address).encode()

    def _bus_up(self) -> None:
        # What was known may be stale: the retained presence arrives again now.
        self.nodes.clear()
        self.places.clear()
        self.bus.publish(wire.node_topic(self.node), self._state("up"), retain=True)
        for conn in list(self.agents.online.values()):
            self._claim(conn.id, conn.targets, conn.since, conn.ciphers)
        if self.changed_while_down:
            self.changed_while_down = False
            self._broadcast("changed", why=f"changes on node {self.node} while the bus was down")
        if self.bus.connections > 1:
            self._spawn(self.revalidate("the cluster bus is back"))

    def _bus_down(self) -> None:
        for token, (node, agent, timer) in list(self.asked.items()):
            timer.cancel()
            del self.asked[token]
            self.local_dial_failed(token, agent, f"the cluster bus went down asking node {node}")

    def status(self) -> dict[str, Any] | None:
        """What ``gw admin status`` shows of the cluster."""
        return {
            "node": self.node,
            "bus": "up" if self.bus.up else "down",
            "data_address": self.data_address,
            "nodes": {n: s.state for n, s in sorted(self.nodes.items())},
            "agents": {a: p.node for a, p in sorted(self.places.items())},
        }

    # -- the directory's questions --------------------------------------------------------

    def _down(self, agent_id: str, node: str) -> str:
        return (
            f"agent {agent_id} is held by gateway node {node} and the cluster bus is down; "
            "try again shortly"
        )

    def locate(self, agent_id: str) -> AgentPlace | None:
        local = self.agents.get(agent_id)
        if local is not None:
            return local
        place = self.places.get(agent_id)
        if place is None and not self.bus.up and agent_id in self.last_known:
            node = self.last_known[agent_id]
            return RemoteAgent(node, frozenset(), self._down(agent_id, node))
        if place is None or place.node == self.node:
            return None
        state = self.nodes.get(place.node)
        if state is not None and state.state == "dead":
            return None
        unreachable = "" if self.bus.up else self._down(agent_id, place.node)
        return RemoteAgent(place.node, place.targets, unreachable, place.ciphers)

    def ask_to_dial(self, agent_id: str, dial: m.Dial) -> bool:
        # The agent dials this node itself (not a worker beside it on a shared port).
        dial = dataclasses.replace(dial, address=self.data_address)
        if self.agents.get(agent_id) is not None:
            return self.agents.send(agent_id, dial)
        place = self.locate(agent_id)
        if place is None:
            return False
        assert isinstance(place, RemoteAgent)
        if place.unreachable:
            raise DialError(place.unreachable)
        if not self._relay(place.node, agent_id, dial):
            raise DialError(self._down(agent_id, place.node))
        timer = asyncio.get_running_loop().call_later(
            self.section.reply_timeout, self._no_answer, dial.token
        )
        self.asked[dial.token] = (place.node, agent_id, timer)
        return True

    def _no_answer(self, token: str) -> None:
        asked = self.asked.pop(token, None)
        if asked is not None:
            node, agent, _ = asked
            self.local_dial_failed(
                token,
                agent,
                f"gateway node {node} holding agent {agent} did not answer within "
                f"{self.section.reply_timeout:g} s",
            )

    def send_to_agent(self, agent_id: str, msg: m.Approve | m.Notice) -> bool:
        if self.agents.get(agent_id) is not None:
            return self.agents.send(agent_id, msg)
        place = self.locate(agent_id)
        if not isinstance(place, RemoteAgent) or place.unreachable:
            return False
        if isinstance(msg, m.Approve):
            self.asked_approvals.add(msg.request, place.node)
        return self._relay(place.node, agent_id, msg)

    def _relay(self, node: str, agent_id: str, msg: m.Message) -> bool:
        note = wire.Note("agent", self.node, {"agent": agent_id, "msg": msg.to_json()})
        return self.bus.publish(wire.direct_topic(node), note.encode())

    async def end_anywhere(self, sid: str, reason: str) -> bool:
        if self.end(sid, reason):
            return True
        if not self.bus.up:
            raise ClusterUnavailable(
                f"session {sid} is not on this node and the cluster bus is down; try again shortly"
            )
        req = secrets.token_hex(8)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.kills[req] = done
        try:
            self._broadcast("kill", session=sid, reason=reason, req=req)
            async with asyncio.timeout(self.section.reply_timeout):
                return await done
        except TimeoutError:
            return False
        finally:
            self.kills.pop(req, None)

    def _broadcast(self, kind: str, **fields: Any) -> bool:
        return self.bus.publish(wire.BROADCAST_TOPIC, wire.Note(kind, self.node, fields).encode())

    def _reply(self, node: str, kind: str, **fields: Any) -> None:
        self.bus.publish(wire.direct_topic(node), wire.Note(kind, self.node, fields).encode())

    # -- this node's events -> the bus ----------------------------------------------------

    def on_event(self, event: Event) -> None:
        if isinstance(event, AgentConnected):
            conn = self.agents.get(event.agent)
            if conn is not None:
                self._claim(conn.id, conn.targets, conn.since, conn.ciphers)
        elif isinstance(event, AgentDisconnected):
            if self.agents.get(event.agent) is None:
                self.places.pop(event.agent, None)
                self.bus.publish(wire.agent_topic(event.agent), b"", retain=True)
        elif isinstance(event, AdminChanged):
            why = f"{event.op} by {event.by} on node {self.node}"
            if not self._broadcast("changed", why=why):
                self.changed_while_down = True

    def _claim(
        self, agent_id: str, targets: frozenset[str], since: float, ciphers: tuple[str, ...]
    ) -> None:
        presence = wire.Presence(self.node, targets, since, ciphers)
        self.places[agent_id] = presence
        self.bus.publish(wire.agent_topic(agent_id), presence.encode(), retain=True)

    # -- the bus -> this node -------------------------------------------------------------

    def receive(self, topic: str, payload: bytes) -> None:
        """One message from the bus; a malformed one is logged and dropped."""
        try:
            if topic == self.bus.direct_topic:
                self._direct(wire.Note.decode(payload, wire.DIRECT_KINDS))
            elif topic == wire.BROADCAST_TOPIC:
                self._broadcasted(wire.Note.decode(payload, wire.BROADCAST_KINDS))
            elif (node := wire.topic_id(topic, "nodes")) is not None:
                self._node_state(node, payload)
            elif (agent := wire.topic_id(topic, "agents")) is not None:
                self._presence(agent, wire.Presence.decode(payload))
            else:
                raise wire.WireError("unexpected topic")
        except (wire.WireError, ProtocolError) as exc:
            log.warning("cluster message dropped", topic=topic[:200], error=str(exc))

    def _node_state(self, node: str, payload: bytes) -> None:
        if not payload:
            self.nodes.pop(node, None)
            return
        state = wire.NodeState.decode(payload)
        if state.node != node:
            raise wire.WireError("node state names another node")
        if node == self.node:
            if state.state == "dead" and self.bus.up and not self.closing:  # an earlier life's will
                self.bus.publish(wire.node_topic(self.node), self._state("up"), retain=True)
            return
        self.nodes[node] = state
        if state.state == "dead":
            for agent, place in list(self.places.items()):
                if place.node == node:
                    del self.places[agent]
                    self.bus.publish(wire.agent_topic(agent), b"", retain=True)
            log.info("cluster node dead: its agents are offline", node=node)

    def _presence(self, agent_id: str, presence: wire.Presence | None) -> None:
        local = self.agents.get(agent_id)
        if presence is None:
            self.places.pop(agent_id, None)
            self.last_known.pop(agent_id, None)
            if local is not None:  # cleared while it is here: say so again
                self._claim(local.id, local.targets, local.since, local.ciphers)
            return
        if presence.node == self.node:
            if local is None:  # from before a restart, or it has just left
                self.places.pop(agent_id, None)
                self.bus.publish(wire.agent_topic(agent_id), b"", retain=True)
            return
        if local is not None and local.since > presence.since:
            self._claim(
                local.id, local.targets, local.since, local.ciphers
            )  # ours is the newer connection
            return
        state = self.nodes.get(presence.node)
        if state is not None and state.state == "dead":
            return
        self.places[agent_id] = presence
        self.last_known[agent_id] = presence.node

    def _direct(self, note: wire.Note) -> None:
        if note.kind == "agent":
            self._for_agent(note)
        elif note.kind == "ack":
            asked = self.asked.get(note.text("token"))
            if asked is not None and asked[0] == note.sender:
                asked[2].cancel()
                del self.asked[note.text("token")]
        elif note.kind == "failed":
            token = note.text("token")
            asked = self.asked.get(token)
            if asked is not None and asked[0] == note.sender:
                asked[2].cancel()
                del self.asked[token]
                self.local_dial_failed(token, asked[1], note.text("reason")[:200])
        elif note.kind == "answer":
            answer = m.from_json(note.message())
            if not isinstance(answer, m.ApprovalAnswer):
                raise wire.WireError("answer: not an approval answer")
            if self.asked_approvals.get(answer.request) == note.sender:  # only the node asked
                self.asked_approvals.pop(answer.request)
                self.local_approval(note.text("agent", ident=True), answer)
        elif note.kind == "killed":
            done = self.kills.get(note.text("req"))
            if done is not None and not done.done():
                done.set_result(True)

    def _for_agent(self, note: wire.Note) -> None:
        """Another node asks this one to hand a message to an agent held here."""
        agent_id = note.text("agent", ident=True)
        msg = m.from_json(note.message())
        if not isinstance(msg, m.Dial | m.Approve | m.Notice):
            raise wire.WireError(f"agent: {msg.TYPE} is not for an agent")
        if isinstance(msg, m.Dial) and not msg.address:
            raise wire.WireError("agent: a relayed dial names no data address")
        try:
            sent = self.agents.send(agent_id, msg)
        except ProtocolError:
            sent = False
        if isinstance(msg, m.Dial):
            if not sent:
                reason = f"agent {agent_id} is not connected to gateway node {self.node}"
                self._reply(note.sender, "failed", token=msg.token, reason=reason)
                return
            self.routed_dials.add(msg.token, note.sender)
            self._reply(note.sender, "ack", token=msg.token)
        elif isinstance(msg, m.Approve) and sent:
            self.routed_approvals.add(msg.request, note.sender)

    def _broadcasted(self, note: wire.Note) -> None:
        if note.sender == self.node:
            return
        if note.kind == "kill":
            if self.end(note.text("session"), note.text("reason")[:300]):
                self._reply(note.sender, "killed", req=note.text("req"))
        elif note.kind == "changed":
            self._spawn(self.revalidate(note.text("why")[:300]))

    # -- the agents here answer -----------------------------------------------------------

    def _agent_dial_failed(self, token: str, agent_id: str, reason: str) -> None:
        node = self.routed_dials.pop(token)
        if node is None:
            self.local_dial_failed(token, agent_id, reason)
        else:
            self._reply(node, "failed", token=token, reason=reason)

    def _agent_answer(self, agent_id: str, answer: m.ApprovalAnswer) -> None:
        node = self.routed_approvals.pop(answer.request)
        if node is None:
            self.local_approval(agent_id, answer)
        else:
            self._reply(node, "answer", agent=agent_id, msg=answer.to_json())
