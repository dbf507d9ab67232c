"""Agents' control connections: who is online, with which targets, and what they say.

An enrolled agent keeps one mutually authenticated TLS connection (``agent_hello``)
open for as long as it runs. :class:`Agents` checks its certificate against the
directory, keeps the connection as the agent's :class:`AgentConn` (a newer one
replaces an older), sends it what the gateway asks (dial requests, approval
requests, session notices) and hands what it answers to whoever asked: a dial's
failure to the dial pairing, an approval answer to the approval that waits for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from relay import message as m
from relay.aio import ConnectionClosed, FramedLink
from relay.errors import RemoteError

from . import ca
from .clock import Clock
from .event import AgentConnected, AgentDisconnected, EventBus
from .rejection import RejectionLog
from .store import Store

#: What the agent said about a dial request: (token, agent id, its reason).
DialFailedHandler = Callable[[str, str, str], None]
#: An approval answer from an agent: (agent id, the answer).
ApprovalHandler = Callable[[str, m.ApprovalAnswer], None]


@dataclass(eq=False)
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
        return agent_id

    async def serve(self, link: FramedLink, hello: m.AgentHello) -> None:
        agent_id = await self.verified(link)
        if agent_id is None:
            self.rejections.refuse(
                "agent.rejected",
                link.peer,
                "agent_rejected",
                self.clock.now(),
                reason="no enrolled certificate or disabled",
            )
            link.send_error("auth_failed", "agent not enrolled, disabled, or certificate unknown")
            return
        agent = await self.store.get_agent(agent_id)
        assert agent is not None
        previous = self.online.get(agent_id)
        if previous is not None:
            previous.link.send_error("session_ended", "replaced by a newer connection")
        conn = AgentConn(
            agent_id,
            agent.org,
            link,
            frozenset(hello.targets),
            self.clock.now(),
            link.peer,
            ciphers=hello.ciphers,
        )
        self.online[agent_id] = conn
        await self.store.touch_agent(agent_id, self.clock.now())
        self.bus.publish(
            AgentConnected(
                agent=agent_id, org=agent.org, source=link.peer, targets=sorted(hello.targets)
            )
        )
        reason = "closed"
        try:
            while True:
                msg = await link.expect(m.DialFailed, m.ApprovalAnswer)
                if isinstance(msg, m.ApprovalAnswer):
                    self.on_approval(agent_id, msg)
                    continue
                assert isinstance(msg, m.DialFailed)
                self.on_dial_failed(msg.token, agent_id, msg.reason[:200])
        except (ConnectionClosed, RemoteError) as exc:
            reason = exc.code if isinstance(exc, ConnectionClosed) else f"error: {exc.code}"
        finally:
            if self.online.get(agent_id) is conn:
                del self.online[agent_id]
            self.bus.publish(AgentDisconnected(agent=agent_id, source=link.peer, reason=reason))
