"""Tunnels: dial pairing and splicing.

A ``tunnel`` connection names a live session by its ticket. The gateway checks the
policy again, takes a place under the session's tunnel limit, asks the node that
holds the session's agent to have it dial (``dial`` with a one-time token), and
waits for the agent's ``data`` connection with that token (:class:`DialPairing`).
The durable :class:`~gatewayd.event.TunnelStarted` is written as the dial goes out,
so that its fsync runs while the agent dials; ``spliced`` waits for both (nothing
flows before the record is on disk), and a dial that fails is followed by
:class:`~gatewayd.event.TunnelFailed` with the same tunnel id. The two connections
are then spliced opaquely until either side ends (:class:`~gatewayd.event.TunnelEnded`).

An agent with a live session keeps one data connection dialled ahead (``spare``,
:class:`Spares`): the next dial for it goes on that connection rather than the
control connection, and the agent answers on it at once, with no TLS handshake of
its own; it then dials the next spare.

``gw connect`` does the same on its side (``tunnel_spare``, :meth:`Tunnels.serve_client_spare`):
a tunnel connection dialled ahead and bound to its session's ticket, at most
:data:`MAX_CLIENT_SPARES` per session, closed when the session ends; ``tunnel_open`` on it
is served exactly as a ``tunnel`` would be, every check made then. Either way the
client may send the end-to-end handshake's first message with its request (``early``):
it is held here and reaches the agent only after ``tunnel.start`` is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from auth.base import b64d, b64e
from relay import message as m
from relay.aio import ConnectionClosed, FramedLink, Pipe
from relay.errors import GatewayError, ProtocolError, RemoteError

from .access import NO_PQ_KEY, Access
from .audit import AuditError
from .clock import Clock
from .config import Config, ConfigHolder
from .event import EventBus, TunnelEnded, TunnelFailed, TunnelRefused, TunnelStarted
from .rejection import RejectionLog
from .session import Session, SessionDirectory

#: Most bytes of a client's first end-to-end handshake message sent with its request
#: (a hybrid one is about 2.4 KiB).
MAX_EARLY = 8 * 1024

#: Most ``tunnel_spare`` connections one session may keep at once: the client keeps one,
#: and dials the next as it uses it.
MAX_CLIENT_SPARES = 2

#: Starts a task the daemon keeps until it is done (and waits for at shutdown).
Spawn = Callable[[Coroutine[Any, Any, Any]], None]


class DialError(GatewayError):
    """The agent could not serve a dial request."""


class DialPairing:
    """Dial requests waiting for the agent's data connection, by one-time token."""

    def __init__(self) -> None:
        #: token -> (agent id, future of the agent's data connection).
        self.pending: dict[str, tuple[str, asyncio.Future[FramedLink]]] = {}

    def expect(self, agent_id: str) -> tuple[str, asyncio.Future[FramedLink]]:
        """A new token for a dial of ``agent_id``, and the future its answer sets."""
        token = secrets.token_urlsafe(32)
        waiter: asyncio.Future[FramedLink] = asyncio.get_running_loop().create_future()
        self.pending[token] = (agent_id, waiter)
        return token, waiter

    def forget(self, token: str) -> None:
        self.pending.pop(token, None)

    def answer(self, token: str, agent_id: str | None, link: FramedLink) -> str | None:
        """The agent's data connection for ``token``; None when it was paired, else
        why not: ``unknown`` (no such token, or not this agent's) or ``answered``."""
        pending = self.pending.get(token)
        if pending is None or agent_id is None or pending[0] != agent_id:
            return "unknown"
        waiter = pending[1]
        if waiter.done():
            return "answered"
        waiter.set_result(link)
        return None

    def fail(self, token: str, agent_id: str, reason: str) -> None:
        """The agent says it cannot serve the dial (only the agent that was asked)."""
        pending = self.pending.get(token)
        if pending is not None and pending[0] == agent_id and not pending[1].done():
            pending[1].set_exception(DialError(reason))


class Spares:
    """Agents' data connections dialled ahead (``spare``): at most one per agent.

    A spare carries exactly one dial: the first :meth:`take` hands it out and it is
    never handed out again. A dial sent on a spare that closes before answering is sent
    again on the control connection (:meth:`Tunnels.serve_spare`).
    """

    def __init__(self) -> None:
        #: agent id -> its spare, not yet used.
        self.idle: dict[str, FramedLink] = {}
        #: spare -> the dial sent on it, until the agent answers.
        self.dialled: dict[FramedLink, m.Dial] = {}

    def park(self, agent_id: str, link: FramedLink) -> None:
        previous = self.idle.get(agent_id)
        self.idle[agent_id] = link
        if previous is not None:  # one per agent: a newer one replaces it
            previous.send_error("session_ended", "replaced by a newer spare connection")

    def send(self, agent_id: str, dial: m.Dial) -> bool:
        """Send ``dial`` on the agent's spare; False when it has none (or it is closing)."""
        link = self.idle.pop(agent_id, None)
        if link is None:
            return False
        try:
            link.send(dial)
        except ProtocolError:  # closed meanwhile
            return False
        self.dialled[link] = dial
        return True

    def drop(self, agent_id: str, link: FramedLink) -> m.Dial | None:
        """The spare is done; the dial it carried and did not answer, if any."""
        if self.idle.get(agent_id) is link:
            del self.idle[agent_id]
        return self.dialled.pop(link, None)


class Tunnels:
    """Serves ``tunnel``, ``data`` and ``spare`` connections."""

    def __init__(
        self,
        holder: ConfigHolder,
        bus: EventBus,
        clock: Clock,
        *,
        access: Access,
        directory: SessionDirectory,
        dials: DialPairing,
        rejections: RejectionLog,
        verified_agent: Callable[[FramedLink], Awaitable[str | None]],
        spawn: Spawn,
    ) -> None:
        self.holder = holder
        self.bus = bus
        self.clock = clock
        self.access = access
        self.directory = directory
        self.dials = dials
        self.rejections = rejections
        self.verified_agent = verified_agent
        self.spawn = spawn
        self.spares = Spares()

    @property
    def config(self) -> Config:
        return self.holder.current

    def _live_session(self, link: FramedLink, ticket: str, reason: str) -> Session | None:
        """The live session of ``ticket``; None (refused, recorded with ``reason``) for
        one that is unknown or ended."""
        session = self.directory.by_ticket(ticket)
        if session is not None and not session.ended.is_set():
            return session
        self.rejections.refuse(
            "tunnel.refused", link.peer, "unknown_session", self.clock.now(), reason=reason
        )
        link.send_error("session_ended", "no such session")
        return None

    async def serve(self, link: FramedLink, hello: m.TunnelHello) -> bool:
        session = self._live_session(link, hello.ticket, "unknown or ended session")
        if session is None:
            return False
        fields = {
            "session": session.id,
            "user": session.user,
            "agent": session.agent,
            "target": session.target,
            "mode": session.mode,
            "source": link.peer,
            "reason_given": session.reason,
        }
        decision = await self.access.decide(session.user, session.agent, session.mode)
        if not decision.allowed:
            self.bus.publish(TunnelRefused(**fields, reason=decision.reason))
            session.end(f"no longer allowed: {decision.reason}")
            link.send_error("denied", decision.reason)
            return False
        # Check and take the place with no await between, so that concurrent requests
        # cannot all pass the check before any of them is counted.
        if len(session.tunnels) + session.reserved >= self.config.limits.max_tunnels_per_session:
            self.bus.publish(TunnelRefused(**fields, reason="too many tunnels"))
            link.send_error("rate_limited", "too many tunnels in this session")
            return False
        try:
            early = b64d(hello.early, max_len=MAX_EARLY) if hello.early else b""
        except ValueError:
            link.send_error("protocol_error", "tunnel.early: not base64url, or too long")
            return False
        session.reserved += 1
        try:
            return await self._open(link, session, fields, hello.cipher or m.BASE_CIPHER, early)
        finally:
            session.reserved -= 1

    async def _open(
        self,
        link: FramedLink,
        session: Session,
        fields: dict[str, Any],
        cipher: str,
        early: bytes = b"",
    ) -> bool:
        place = self.directory.locate(session.agent)
        if place is None:
            self.bus.publish(TunnelRefused(**fields, reason="agent offline"))
            link.send_error("agent_offline", f"agent {session.agent} is not connected")
            return False
        if place.unreachable:  # a cluster whose bus is down: the agent's node cannot be asked
            self.bus.publish(TunnelRefused(**fields, reason=place.unreachable))
            link.send_error("unavailable", place.unreachable)
            return False
        if await self.access.classic_refused(session.agent):
            self.bus.publish(TunnelRefused(**fields, reason=NO_PQ_KEY))
            link.send_error("denied", f"agent {session.agent}: {NO_PQ_KEY}")
            return False
        if cipher != m.BASE_CIPHER and cipher not in place.ciphers:
            # Passed on, it would break an agent that does not know the member.
            why = f"the agent does not run the end-to-end cipher {cipher}"
            self.bus.publish(TunnelRefused(**fields, reason=why))
            link.send_error("denied", why)
            return False
        token, waiter = self.dials.expect(session.agent)
        tunnel_id = secrets.token_hex(6)
        e2e = await self.access.e2e(session.agent)
        start = TunnelStarted(**fields, tunnel=tunnel_id, e2e=e2e, cipher=cipher)
        durable: asyncio.Task[int] | None = None
        try:
            dial = m.Dial(
                token=token,
                target=session.target,
                session_id=session.id,
                client_key=b64e(session.client_key),
                user=session.user,
                mode=session.mode,
                cipher=cipher,
            )
            if not self.spares.send(session.agent, dial) and not self.directory.ask_to_dial(
                session.agent, dial
            ):
                raise DialError(f"agent {session.agent} is not connected")
            # The record's fsync runs while the agent dials; spliced waits for both.
            durable = asyncio.ensure_future(self.bus.record(start))
            async with asyncio.timeout(self.config.limits.dial_timeout):
                agent_link = await asyncio.shield(waiter)
        except (TimeoutError, DialError, ProtocolError) as exc:
            if durable is not None:
                await durable  # the start is on record: the failure follows it
            reason = str(exc) or "the agent did not answer in time"
            self.bus.publish(TunnelFailed(**fields, tunnel=tunnel_id, reason=reason))
            link.send_error("dial_failed", reason)
            return False
        except asyncio.CancelledError:
            if durable is not None:
                self.spawn(self._failed(durable, fields, tunnel_id, "the gateway stopped"))
            raise
        finally:
            self.dials.forget(token)
        assert durable is not None
        try:
            await durable
        except AuditError:
            agent_link.send_error("unavailable", "audit log unavailable")
            agent_link.close()
            raise
        if session.ended.is_set():
            agent_link.send_error("session_ended", session.end_reason)
            agent_link.close()
            link.send_error("session_ended", session.end_reason)
            return False
        link.send(m.Spliced())
        agent_link.send(m.Spliced())
        client_t, client_rest = link.detach()
        agent_t, agent_rest = agent_link.detach()
        pipe = Pipe(client_t, agent_t, names=("client", "agent"))
        session.tunnels.add(pipe)
        session.tunnel_count += 1
        started = self.clock.monotonic()
        # The client's first handshake message came with its request: held until now
        # (the record is on disk), it goes to the agent ahead of anything else.
        pipe.start(early + client_rest, agent_rest)
        self.spawn(self._watch(session, pipe, tunnel_id, fields, started))
        return True

    async def _failed(
        self, durable: asyncio.Task[int], fields: dict[str, Any], tunnel_id: str, reason: str
    ) -> None:
        """A dial given up after its tunnel.start went out: its failure follows the record."""
        with contextlib.suppress(AuditError):
            await durable
        self.bus.publish(TunnelFailed(**fields, tunnel=tunnel_id, reason=reason))

    async def _watch(
        self,
        session: Session,
        pipe: Pipe,
        tunnel_id: str,
        fields: dict[str, Any],
        started: float,
    ) -> None:
        result = await pipe.done
        session.tunnels.discard(pipe)
        session.bytes_up += result.bytes_a_to_b
        session.bytes_down += result.bytes_b_to_a
        session.last_activity = max(session.last_activity, pipe.last_activity)
        self.bus.publish(
            TunnelEnded(
                **fields,
                tunnel=tunnel_id,
                bytes_up=result.bytes_a_to_b,
                bytes_down=result.bytes_b_to_a,
                duration=round(self.clock.monotonic() - started, 3),
                reason=result.reason,
            )
        )

    async def serve_client_spare(self, link: FramedLink, hello: m.TunnelSpare) -> bool:
        """Keep ``gw connect``'s tunnel connection dialled ahead until it asks for its
        tunnel (``tunnel_open``), then serve it as a ``tunnel`` with every check made
        again at that moment. True when it became a tunnel (the caller keeps it open).

        It is bound to its session by the ticket: refused for a session that is unknown
        or ended, at most :data:`MAX_CLIENT_SPARES` per session, closed when the session
        ends. Its heartbeats keep the connection, never the session: they are not the
        session's activity."""
        reason = "spare connection for an unknown or ended session"
        session = self._live_session(link, hello.ticket, reason)
        if session is None:
            return False
        if len(session.spares) >= MAX_CLIENT_SPARES:
            self.rejections.refuse(
                "tunnel.refused",
                link.peer,
                "rate_limited",
                self.clock.now(),
                session=session.id,
                user=session.user,
                reason="too many spare connections",
            )
            link.send_error("rate_limited", "too many spare connections in this session")
            return False
        session.spares.add(link)
        asked = asyncio.ensure_future(link.expect(m.TunnelOpen))
        ended = asyncio.ensure_future(session.ended.wait())
        try:
            await asyncio.wait((asked, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            session.spares.discard(link)
            ended.cancel()
            asked.cancel()
        if session.ended.is_set():
            if asked.done() and not asked.cancelled():
                asked.exception()  # the connection's own end: moot once the session ended
            link.send_error("session_ended", session.end_reason or "session ended")
            return False
        msg = asked.result()  # raises what ended the connection
        assert isinstance(msg, m.TunnelOpen)
        return await self.serve(
            link, m.TunnelHello(hello.ticket, early=msg.early, cipher=msg.cipher)
        )

    async def serve_spare(self, link: FramedLink, hello: m.SpareHello) -> bool:
        """Keep an agent's spare data connection until a dial goes on it and it answers.

        True when it was paired with a tunnel (the caller keeps it open)."""
        agent_id = await self.verified_agent(link)
        if agent_id is None:
            self.rejections.reject(
                link.peer,
                "auth_failed",
                "spare data connection without an enrolled agent's certificate",
                self.clock.now(),
            )
            link.send_error("auth_failed", "agent not enrolled, disabled, or certificate unknown")
            return False
        self.spares.park(agent_id, link)
        try:
            msg = await link.expect(m.DataHello, m.DialFailed)
        except (ConnectionClosed, RemoteError):
            unanswered = self.spares.drop(agent_id, link)
            if unanswered is not None and not self.directory.ask_to_dial(agent_id, unanswered):
                self.dials.fail(unanswered.token, agent_id, f"agent {agent_id} is not connected")
            raise
        self.spares.drop(agent_id, link)
        if isinstance(msg, m.DialFailed):
            self.dials.fail(msg.token, agent_id, msg.reason[:200])
            return False
        assert isinstance(msg, m.DataHello)
        return self._pair(link, msg, agent_id)

    async def serve_data(self, link: FramedLink, hello: m.DataHello) -> bool:
        return self._pair(link, hello, await self.verified_agent(link))

    def _pair(self, link: FramedLink, hello: m.DataHello, agent_id: str | None) -> bool:
        why = self.dials.answer(hello.token, agent_id, link)
        if why == "unknown":
            self.rejections.reject(
                link.peer,
                "auth_failed",
                "data connection with an unknown token or the wrong agent",
                self.clock.now(),
                agent=agent_id,
            )
            link.send_error("auth_failed", "unknown dial token")
            return False
        if why == "answered":
            link.send_error("session_ended", "dial request already answered")
            return False
        return True
