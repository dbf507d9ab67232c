"""Tunnels: dial pairing and splicing.

A ``tunnel`` connection names a live session by its ticket. The gateway checks the
policy again, takes a place under the session's tunnel limit, asks the node that
holds the session's agent to have it dial (``dial`` with a one-time token), and
waits for the agent's ``data`` connection with that token (:class:`DialPairing`).
Then the durable :class:`~gatewayd.event.TunnelStarted` is published, and the two
connections are spliced opaquely until either side ends
(:class:`~gatewayd.event.TunnelEnded`).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from auth.base import b64e
from relay import message as m
from relay.aio import FramedLink, Pipe
from relay.errors import GatewayError, ProtocolError

from .access import NO_PQ_KEY, Access
from .audit import AuditError
from .clock import Clock
from .config import Config, ConfigHolder
from .event import EventBus, TunnelEnded, TunnelFailed, TunnelRefused, TunnelStarted
from .rejection import RejectionLog
from .session import Session, SessionDirectory

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


class Tunnels:
    """Serves ``tunnel`` and ``data`` connections."""

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

    @property
    def config(self) -> Config:
        return self.holder.current

    async def serve(self, link: FramedLink, hello: m.TunnelHello) -> bool:
        session = self.directory.by_ticket(hello.ticket)
        if session is None or session.ended.is_set():
            self.rejections.refuse(
                "tunnel.refused",
                link.peer,
                "unknown_session",
                self.clock.now(),
                reason="unknown or ended session",
            )
            link.send_error("session_ended", "no such session")
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
        session.reserved += 1
        try:
            return await self._open(link, session, fields)
        finally:
            session.reserved -= 1

    async def _open(self, link: FramedLink, session: Session, fields: dict[str, Any]) -> bool:
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
        token, waiter = self.dials.expect(session.agent)
        tunnel_id = secrets.token_hex(6)
        try:
            dial = m.Dial(
                token=token,
                target=session.target,
                session_id=session.id,
                client_key=b64e(session.client_key),
                user=session.user,
                mode=session.mode,
            )
            if not self.directory.ask_to_dial(session.agent, dial):
                raise DialError(f"agent {session.agent} is not connected")
            async with asyncio.timeout(self.config.limits.dial_timeout):
                agent_link = await asyncio.shield(waiter)
        except (TimeoutError, DialError, ProtocolError) as exc:
            reason = str(exc) or "the agent did not answer in time"
            self.bus.publish(TunnelFailed(**fields, tunnel=tunnel_id, reason=reason))
            link.send_error("dial_failed", reason)
            return False
        finally:
            self.dials.forget(token)
        try:
            await self.bus.record(
                TunnelStarted(**fields, tunnel=tunnel_id, e2e=await self.access.e2e(session.agent))
            )
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
        pipe.start(client_rest, agent_rest)
        self.spawn(self._watch(session, pipe, tunnel_id, fields, started))
        return True

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

    async def serve_data(self, link: FramedLink, hello: m.DataHello) -> bool:
        agent_id = await self.verified_agent(link)
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
