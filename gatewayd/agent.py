"""Agents' control connections: who is online, with which targets, and what they say.

An enrolled agent keeps one mutually authenticated TLS connection (``agent_hello``)
open for as long as it runs. :class:`Agents` checks its certificate against the
directory, keeps the connection as the agent's :class:`AgentConn` (a newer one
replaces an older), sends it what the gateway asks (dial requests, approval
requests, session notices) and hands what it answers to whoever asked: a dial's
failure to the dial pairing, an approval answer to the approval that waits for it.

One gatewayd holds ten thousand of these connections, nearly all idle, so an online
agent costs as little as it can: once its hello is accepted, no task waits on its
link; the link hands each message to :meth:`Agents._received` as it arrives
(:meth:`relay.aio.FramedLink.listen`), and the close ends it there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from cryptography import x509
from cryptography.x509.oid import NameOID

from relay import message as m
from relay.aio import FramedLink
from relay.protocol import Closed

from . import ca
from .clock import Clock
from .event import AgentConnected, AgentDisconnected, EventBus
from .rejection import RejectionLog
from .store import Agent, Store

log = structlog.get_logger("gatewayd.agent")

#: Ends of an agent's connection that are no rejection: its end of file, and the
#: gateway's own (replaced by a newer connection, shutting down, an internal error).
_NOT_REJECTED = frozenset({"eof", "session_ended", "shutdown", "internal"})

#: What the agent said about a dial request: (token, agent id, its reason).
DialFailedHandler = Callable[[str, str, str], None]
#: An approval answer from an agent: (agent id, the answer).
ApprovalHandler = Callable[[str, m.ApprovalAnswer], None]


@dataclass(eq=False, slots=True)
class AgentConn:
    id: str
    org: str
    link: FramedLink
    targets: frozenset[str]
    since: float
    source: str
    unreachable: str = ""
    """Always reachable: this node holds the connection (see ``SessionDirectory.locate``)."""
    ciphers: tuple[str, ...] = ()
    """The end-to-end ciphers the agent said it runs (its hello); () for ChaChaPoly alone."""
    ended: bool = field(default=False, repr=False)
    """Its link has closed and it is off the books (``agent.disconnect`` is written)."""


def _cn(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode()


class Agents:
    """The agents whose control connection this gatewayd holds."""

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        rejections: RejectionLog,
        clock: Clock,
        *,
        on_dial_failed: DialFailedHandler,
        on_approval: ApprovalHandler,
    ) -> None:
        self.store = store
        self.bus = bus
        self.rejections = rejections
        self.clock = clock
        self.on_dial_failed = on_dial_failed
        self.on_approval = on_approval
        #: agent id -> its live control connection.
        self.online: dict[str, AgentConn] = {}

    def get(self, agent_id: str) -> AgentConn | None:
        """Where this agent is: its control connection here, or None."""
        return self.online.get(agent_id)

    def send(self, agent_id: str, msg: m.Message) -> bool:
        """Send ``msg`` on the agent's control connection; False when it is not online.

        Raises ProtocolError if the connection is going away."""
        online = self.online.get(agent_id)
        if online is None:
            return False
        online.link.send(msg)
        return True

    def shutdown(self) -> None:
        """Tell every agent the gateway is going away."""
        for a in list(self.online.values()):
            a.link.send_error("shutdown", "the gateway is shutting down")

    async def verified(self, link: FramedLink) -> str | None:
        """The id of the enrolled agent whose certificate this link presented, else None."""
        agent = await self._enrolled(link)
        return agent.id if agent is not None else None

    async def _enrolled(self, link: FramedLink) -> Agent | None:
        """The enrolled, enabled agent whose certificate this link presented, else None."""
        der = link.peer_certificate()
        if der is None:
            return None
        try:
            agent_id = _cn(x509.load_der_x509_certificate(der))
        except ValueError:
            return None
        agent = await self.store.get_agent(agent_id)
        if agent is None or agent.disabled or agent.cert_fingerprint != ca.fingerprint(der):
            return None
        return agent

    async def serve(self, link: FramedLink, hello: m.AgentHello) -> bool:
        """Take the agent's control connection; True when it stays open (from then on
        its messages and its close are handled as they come, without a task)."""
        agent = await self._enrolled(link)
        if agent is None:
            self.rejections.refuse(
                "agent.rejected",
                link.peer,
                "agent_rejected",
                self.clock.now(),
                reason="no enrolled certificate or disabled",
            )
            link.send_error("auth_failed", "agent not enrolled, disabled, or certificate unknown")
            return False
        # Only the id and the org stay: the directory row (with its keys) is not kept.
        agent_id, org = agent.id, agent.org
        del agent
        previous = self.online.get(agent_id)
        if previous is not None:
            previous.link.send_error("session_ended", "replaced by a newer connection")
        conn = AgentConn(
            agent_id,
            org,
            link,
            frozenset(hello.targets),
            self.clock.now(),
            link.peer,
            ciphers=hello.ciphers,
        )
        self.online[agent_id] = conn
        self.bus.publish(
            AgentConnected(agent=agent_id, org=org, source=link.peer, targets=sorted(hello.targets))
        )
        # What came meanwhile (a close too) goes to _received now; a store failure below
        # closes the link (the broker), which ends the agent there like any close.
        link.listen(lambda event: self._received(conn, event))
        await self.store.touch_agent(agent_id, self.clock.now())
        return True

    def _received(self, conn: AgentConn, event: m.Message | Closed) -> None:
        """One message from an online agent's control connection, or its close."""
        if conn.ended:
            return
        try:
            if isinstance(event, m.ApprovalAnswer):
                self.on_approval(conn.id, event)
            elif isinstance(event, m.DialFailed):
                self.on_dial_failed(event.token, conn.id, event.reason[:200])
            elif isinstance(event, m.Ping | m.Pong):
                pass
            elif isinstance(event, m.Error):
                self._ended(conn, f"error: {event.code}", event.code, event.message)
            elif isinstance(event, Closed):
                self._ended(conn, event.code, event.code, event.message)
            else:
                conn.link.send_error("protocol_error", f"unexpected {event.TYPE}")
                self._ended(conn, "protocol_error", "protocol_error", f"unexpected {event.TYPE}")
        except Exception:
            # The catch-all, as for any connection: the peer learns nothing specific,
            # the daemon stays up, the agent is off the books.
            log.exception("unexpected error", source=conn.link.peer, agent=conn.id)
            conn.link.send_error("internal", "internal error")
            self._ended(conn, "internal", "internal", "internal error")

    def _ended(self, conn: AgentConn, reason: str, code: str, message: str) -> None:
        """The agent's connection is over: off the books, audited once. A close for the
        peer's fault (a timeout, a protocol error, its error frame) counts as a rejected
        connection; its end of file and the gateway's own ends do not."""
        if conn.ended:
            return
        conn.ended = True
        if self.online.get(conn.id) is conn:
            del self.online[conn.id]
        if code not in _NOT_REJECTED:
            self.rejections.reject(conn.link.peer, code, message or code, self.clock.now())
        conn.link.close()
        self.bus.publish(AgentDisconnected(agent=conn.id, source=conn.link.peer, reason=reason))
