"""Sessions: the session directory, approvals at the machine, and the client's session.

A ``client_hello`` connection is served by :class:`Sessions`: the login's factors
(:class:`gatewayd.login.Login`), the policy's decision, approval at the agent's
machine when the mode asks for it, then the session itself, kept until its client
leaves, it is killed, expires, idles out or its card heartbeat stops.

The :class:`SessionDirectory` is what the rest of the daemon asks about sessions:
register, look up (by id or by tunnel ticket), end, list; and about agents: where is
this agent, and ask its node to dial. On one node the answer to "where" is this
process's :class:`gatewayd.agent.Agents`; a cluster answers it from the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from auth.base import b64d, b64e
from relay import credential
from relay import message as m
from relay.aio import ConnectionClosed, FramedLink, Pipe
from relay.errors import ProtocolError, RemoteError

from . import policy
from .access import NO_PQ_KEY, Access
from .agent import Agents
from .clock import Clock
from .config import Config, ConfigHolder
from .event import (
    AgentsListed,
    ApprovalAnswered,
    ApprovalRequested,
    EventBus,
    LoginEnded,
    LoginIssued,
    PolicyDecided,
    SessionEnded,
    SessionRefused,
    SessionStarted,
)
from .login import Login
from .rejection import RejectionLog
from .store import LoginCredential, Store, StoreError


@dataclass(eq=False)
class Session:
    """One live session: whom it is for, its limits, its tunnels, and why it ended."""

    id: str
    user: str
    agent: str
    target: str
    mode: str
    reason: str
    source: str
    client_key: bytes
    ticket: str
    started: float
    expires: float
    idle_timeout: float
    link: FramedLink
    agreement: str | None
    approved_by: str = ""
    unattended: bool = False
    tunnels: set[Pipe] = field(default_factory=set)
    reserved: int = 0
    """Tunnels being set up (dial, audit): they hold a place under the per-session limit."""
    spares: set[FramedLink] = field(default_factory=set)
    """The client's tunnel connections dialled ahead (``tunnel_spare``), not yet used."""
    tunnel_count: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    card_timeout: float = 0.0
    """Seconds without a ``card_present`` after which the session ends (0: not watched)."""
    card_seen: float = field(default_factory=time.monotonic)
    login: str | None = None
    """The ``gw login`` credential that opened the session, if one did."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str = ""

    def end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()


class AgentPlace(Protocol):
    """Where an agent is, as the session directory answers: its targets, and why it
    cannot be reached now though it is online ("" when it can)."""

    @property
    def targets(self) -> frozenset[str]: ...

    @property
    def unreachable(self) -> str: ...

    @property
    def ciphers(self) -> tuple[str, ...]: ...


class SessionDirectory:
    """Live sessions (by id and by tunnel ticket) and where their agents are.

    Alone, a node's agents are its own (:class:`gatewayd.agent.Agents`); in a cluster
    :class:`gatewayd.cluster.ClusterDirectory` answers the same questions for the
    agents and sessions of every node.
    """

    #: Where this session's tunnels go, when not where the client logged in (a cluster).
    tunnel_address = ""

    def __init__(self, agents: Agents) -> None:
        self.agents = agents
        self.by_id: dict[str, Session] = {}
        self._by_ticket: dict[str, Session] = {}

    def register(self, session: Session) -> None:
        self.by_id[session.id] = session
        self._by_ticket[session.ticket] = session

    def lookup(self, sid: str) -> Session | None:
        return self.by_id.get(sid)

    def by_ticket(self, ticket: str) -> Session | None:
        return self._by_ticket.get(ticket)

    def end(self, sid: str, reason: str) -> bool:
        """End a live session (its holder writes the end); False when there is none."""
        session = self.by_id.get(sid)
        if session is None:
            return False
        session.end(reason)
        return True

    def remove(self, session: Session) -> None:
        self.by_id.pop(session.id, None)
        self._by_ticket.pop(session.ticket, None)

    def live(self) -> list[Session]:
        return list(self.by_id.values())

    def __len__(self) -> int:
        return len(self.by_id)

    def locate(self, agent_id: str) -> AgentPlace | None:
        """Where this agent is: its control connection, or None when it is offline."""
        return self.agents.get(agent_id)

    def ask_to_dial(self, agent_id: str, dial: m.Dial) -> bool:
        """Ask the node that holds the agent to have it dial; False when it is offline.

        Raises ProtocolError if the agent's connection is going away, and
        :class:`relay.errors.GatewayError` (with what failed) when its node cannot be asked."""
        return self.agents.send(agent_id, dial)

    def send_to_agent(self, agent_id: str, msg: m.Approve | m.Notice) -> bool:
        """Send an approval request or a session notice to the agent, wherever it is held;
        False when it is offline. Raises ProtocolError if its connection is going away."""
        return self.agents.send(agent_id, msg)

    async def end_anywhere(self, sid: str, reason: str) -> bool:
        """End a live session held by any node; False when no node holds it."""
        return self.end(sid, reason)

    async def start(self) -> None:
        """Join the cluster (nothing to do for a node alone)."""

    async def close(self) -> None:
        """Leave the cluster (nothing to do for a node alone)."""

    def status(self) -> dict[str, Any] | None:
        """The cluster as this node sees it; None for a node alone."""
        return None

    def rows(self) -> list[dict[str, Any]]:
        """What ``gw admin sessions list`` shows of each live session."""
        return [
            {
                "session": s.id,
                "user": s.user,
                "agent": s.agent,
                "target": s.target,
                "mode": s.mode,
                "source": s.source,
                "reason": s.reason,
                "since": s.started,
                "approved_by": s.approved_by or ("unattended" if s.unattended else "-"),
                "tunnels": len(s.tunnels),
                "bytes_up": s.bytes_up + sum(p.a_to_b for p in s.tunnels),
                "bytes_down": s.bytes_down + sum(p.b_to_a for p in s.tunnels),
            }
            for s in self.by_id.values()
        ]


#: Seconds between a live session's notes of its login credential's use: small beside
#: the credential's idle time (30 minutes), few writes for many sessions.
LOGIN_KEEP = 60.0


class Approvals:
    """Approval requests waiting for the person at an agent's machine; each answered once."""

    def __init__(self) -> None:
        #: request id -> (agent id, future of the agent's answer).
        self.pending: dict[str, tuple[str, asyncio.Future[m.ApprovalAnswer]]] = {}

    def expect(self, agent_id: str) -> tuple[str, asyncio.Future[m.ApprovalAnswer]]:
        request = secrets.token_hex(6)
        waiter: asyncio.Future[m.ApprovalAnswer] = asyncio.get_running_loop().create_future()
        self.pending[request] = (agent_id, waiter)
        return request, waiter

    def forget(self, request: str) -> None:
        self.pending.pop(request, None)

    def answer(self, agent_id: str, msg: m.ApprovalAnswer) -> None:
        """An agent's answer: taken only from the agent that was asked, and only once."""
        waiting = self.pending.get(msg.request)
        if waiting is not None and waiting[0] == agent_id and not waiting[1].done():
            waiting[1].set_result(msg)


class Sessions:
    """Serves ``client_hello``: login, decision, approval, the session's life."""

    def __init__(
        self,
        holder: ConfigHolder,
        store: Store,
        bus: EventBus,
        clock: Clock,
        *,
        login: Login,
        access: Access,
        directory: SessionDirectory,
        approvals: Approvals,
        rejections: RejectionLog,
    ) -> None:
        self.holder = holder
        self.store = store
        self.bus = bus
        self.clock = clock
        self.login = login
        self.access = access
        self.directory = directory
        self.approvals = approvals
        self.rejections = rejections

    @property
    def config(self) -> Config:
        return self.holder.current

    async def serve(self, link: FramedLink, hello: m.ClientHello) -> None:
        sid = secrets.token_hex(8)
        if self.bus.audit.failure is not None:
            link.send_error("unavailable", "the gateway cannot write its audit log")
            return
        limited = self.login.rate_limited(link.peer, hello.user)
        if limited is not None:
            # Bounded per source like every refusal before login (a flood cannot fill the disk).
            self.rejections.refuse(
                "auth.rate_limited",
                link.peer,
                "rate_limited",
                self.clock.now(),
                session=sid,
                user=hello.user,
                limit=limited,
            )
            link.send_error("rate_limited", "too many login attempts; try again later")
            return
        try:
            client_key = b64d(hello.client_key)
        except ValueError:
            client_key = b""
        if len(client_key) != 32:
            link.send_error("protocol_error", "client_key must be a 32-byte X25519 key")
            return
        login: LoginCredential | None = None
        if hello.login_key:
            try:
                credential.check_public(hello.login_key)
            except ValueError:
                link.send_error("protocol_error", "login_key must be an Ed25519 public key")
                return
            if hello.credential:  # a login credential never makes another
                link.send_error("denied", "gw login needs the mode's factors, not a login")
                return
        if hello.credential:
            login = await self.login.prove_login(link, hello, sid)
            if login is None:
                return
            if hello.logout:
                await self.logout(link, hello, sid, login)
                return
        if not await self.login.authenticate(link, hello, sid, card_only=login is not None):
            return
        if hello.login_key:
            await self.issue_login(link, hello, sid)
            return
        if not hello.agent:
            await self.list_agents(link, hello, sid)
            return
        decision = await self.access.decide(hello.user, hello.agent, hello.mode)
        context = {
            "session": sid,
            "user": hello.user,
            "agent": hello.agent,
            "target": hello.target,
            "mode": hello.mode,
            "source": link.peer,
            "reason_given": hello.reason,
        }
        needs_reason = self.config.mode(hello.mode).require_reason
        if decision.allowed and needs_reason and not hello.reason.strip():
            decision = policy.deny("a reason is required for this mode (gw connect --reason)")
        await self.bus.record(
            PolicyDecided(
                **context,
                decision="allow" if decision.allowed else "deny",
                reason=decision.reason,
                agreement=decision.agreement,
                approval="required" if decision.needs_approval else "not required",
            )
        )
        if not decision.allowed:
            link.send_error("denied", decision.reason)
            return
        online = self.directory.locate(hello.agent)
        if online is None:
            self.bus.publish(SessionRefused(**context, reason="agent offline"))
            link.send_error("agent_offline", f"agent {hello.agent} is not connected")
            return
        if online.unreachable:
            self.bus.publish(SessionRefused(**context, reason=online.unreachable))
            link.send_error("unavailable", online.unreachable)
            return
        if hello.target not in online.targets:
            self.bus.publish(SessionRefused(**context, reason="target unknown"))
            link.send_error("target_unknown", f"agent {hello.agent} has no target {hello.target}")
            return
        if await self.access.classic_refused(hello.agent):
            self.bus.publish(SessionRefused(**context, reason=NO_PQ_KEY))
            link.send_error("denied", f"agent {hello.agent}: {NO_PQ_KEY}")
            return
        approved_by = ""
        if decision.needs_approval:
            answer = await self.ask_approval(link, hello, sid, client_key, context)
            if answer is None:
                return
            approved_by = answer
        agent = await self.store.get_agent(hello.agent)
        assert agent is not None and agent.noise_key is not None
        mode_cfg = self.config.mode(hello.mode)
        watched = mode_cfg.end_on_card_removal and await self.login.card_proved(hello)
        now = self.clock.now()
        session = Session(
            id=sid,
            user=hello.user,
            agent=hello.agent,
            target=hello.target,
            mode=hello.mode,
            reason=hello.reason,
            source=link.peer,
            client_key=client_key,
            ticket=secrets.token_urlsafe(32),
            started=now,
            expires=min(now + mode_cfg.max_session, login.expires if login else float("inf")),
            idle_timeout=mode_cfg.idle_timeout,
            link=link,
            agreement=decision.agreement,
            approved_by=approved_by,
            unattended=not decision.needs_approval and hello.mode != "homeoffice",
            card_timeout=mode_cfg.card_heartbeat_timeout if watched else 0.0,
            last_activity=self.clock.monotonic(),
            card_seen=self.clock.monotonic(),
            login=login.id if login else None,
        )
        await self.bus.record(
            SessionStarted(**context, expires=session.expires, approved_by=approved_by or None)
        )
        self.directory.register(session)
        if not decision.needs_approval:
            # Unattended access and home office: announced at the machine, with the
            # client key, the only one the agent then accepts in this session's tunnels
            # (an approved session's key was bound by the approval itself). Before the
            # client has the ticket: its first tunnel's dial finds the key bound.
            await self.notify_agent(session, "start")
        link.send(
            m.SessionOpened(
                session_id=sid,
                ticket=session.ticket,
                agent=hello.agent,
                target=hello.target,
                agent_key=agent.noise_key,
                agent_pq_key=agent.pq_key or "",
                expires=session.expires,
                watch_card=mode_cfg.end_on_card_removal,
                card_heartbeat=mode_cfg.card_heartbeat if watched else 0.0,
                tunnel_address=self.directory.tunnel_address,
                # Only to a client that said its ciphers: older ones refuse the member.
                agent_ciphers=(online.ciphers or (m.BASE_CIPHER,)) if hello.ciphers else (),
            )
        )
        keeper = None
        if session.login is not None:
            keeper = asyncio.get_running_loop().create_task(self.keep_login_alive(session))
        try:
            await self.hold(session)
        finally:
            if keeper is not None:
                keeper.cancel()
            await self.notify_agent(session, "end")  # the agent forgets the session's key
            self.directory.remove(session)
            if session.login is not None:
                await self.keep_login(session)
            for pipe in list(session.tunnels):
                pipe.abort(f"session ended: {session.end_reason}")
            self.bus.publish(
                SessionEnded(
                    session=sid,
                    user=session.user,
                    agent=session.agent,
                    target=session.target,
                    mode=session.mode,
                    reason_given=session.reason,
                    reason=session.end_reason or "client closed",
                    duration=round(self.clock.now() - session.started, 3),
                    tunnels=session.tunnel_count,
                    bytes_up=session.bytes_up + sum(p.a_to_b for p in session.tunnels),
                    bytes_down=session.bytes_down + sum(p.b_to_a for p in session.tunnels),
                )
            )

    async def issue_login(self, link: FramedLink, hello: m.ClientHello, sid: str) -> None:
        """``gw login`` passed the mode's factors: a credential bound to the client's key."""
        mode_cfg = self.config.mode(hello.mode)
        now = self.clock.now()
        login = LoginCredential(
            id=secrets.token_hex(12),
            user=hello.user,
            mode=hello.mode,
            public_key=credential.b64(credential.check_public(hello.login_key)),
            session=sid,
            source=link.peer,
            created=now,
            expires=now + mode_cfg.login_lifetime,
            idle_timeout=mode_cfg.login_idle_timeout,
            last_used=now,
        )
        await self.store.add_login(login)
        await self.bus.record(
            LoginIssued(
                session=sid,
                user=hello.user,
                mode=hello.mode,
                source=link.peer,
                credential=login.id,
                expires=login.expires,
                idle_timeout=login.idle_timeout,
            )
        )
        link.send(m.LoggedIn(login.id, login.expires, login.idle_timeout))

    async def logout(
        self, link: FramedLink, hello: m.ClientHello, sid: str, login: LoginCredential
    ) -> None:
        """``gw logout``: the client proved the credential's key; end the credential."""
        await self.store.end_logins(hello.user, self.clock.now(), "logout", login.id)
        await self.bus.record(
            LoginEnded(
                session=sid,
                user=hello.user,
                source=link.peer,
                credential=login.id,
                login_session=login.session,
                reason="logout",
            )
        )
        link.send(m.LoggedOut(login.id))

    async def keep_login_alive(self, session: Session) -> None:
        """While a session opened with a login credential lives, its traffic is the
        credential's use (told to the store every LOGIN_KEEP seconds)."""
        while True:
            await asyncio.sleep(LOGIN_KEEP)
            await self.keep_login(session)

    async def keep_login(self, session: Session) -> None:
        """A session opened with a login credential was in use: the credential's idle
        time counts from its last traffic."""
        assert session.login is not None
        last = max([session.last_activity, *(p.last_activity for p in session.tunnels)])
        active = self.clock.now() - max(0.0, self.clock.monotonic() - last)
        with contextlib.suppress(StoreError):  # the session's end matters more
            await self.store.keep_login(session.login, active)

    async def list_agents(self, link: FramedLink, hello: m.ClientHello, sid: str) -> None:
        """After login: the agents this user may reach, each with the modes allowed."""
        found: dict[str, Any] = {}
        for row in await self.store.list_rows("agents"):
            modes = [
                mode
                for mode in m.MODES
                if (await self.access.decide(hello.user, row["id"], mode)).allowed
            ]
            if modes:
                online = self.directory.locate(row["id"])
                found[row["id"]] = {
                    "org": row["org"],
                    "modes": modes,
                    "online": online is not None,
                    "targets": sorted(online.targets) if online else [],
                }
        self.bus.publish(
            AgentsListed(session=sid, user=hello.user, source=link.peer, agents=sorted(found))
        )
        link.send(m.AgentList(found))

    async def ask_approval(
        self,
        link: FramedLink,
        hello: m.ClientHello,
        sid: str,
        client_key: bytes,
        context: dict[str, Any],
    ) -> str | None:
        """Ask the person at the agent's machine; the approver's name, or None if not approved."""
        agent = await self.store.get_agent(hello.agent)
        user = await self.store.get_user(hello.user)
        assert agent is not None and agent.noise_key is not None and user is not None
        vendor = user.vendor or ""
        timeout = self.config.mode(hello.mode).approval_timeout
        request, waiter = self.approvals.expect(hello.agent)
        asked = self.clock.monotonic()
        link.extend_handshake(timeout + 10)
        await self.bus.record(ApprovalRequested(**context, request=request, timeout=timeout))
        try:
            approve = m.Approve(
                request=request,
                session_id=sid,
                user=hello.user,
                vendor=vendor,
                vendor_name=await self.store.vendor_name(vendor) if vendor else "",
                mode=hello.mode,
                target=hello.target,
                reason=hello.reason,
                client_key=b64e(client_key),
                timeout=timeout,
            )
            if not self.directory.send_to_agent(hello.agent, approve):
                raise ProtocolError("the agent is not connected")
            link.send(m.ApprovalPending(request, sid, agent.noise_key, timeout, agent.pq_key or ""))
            gone: asyncio.Future[Any] = asyncio.ensure_future(link.closed)
            either: set[asyncio.Future[Any]] = {waiter, gone}
            async with asyncio.timeout(timeout + 5):  # the agent times out first
                done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                outcome, by, reason = "abandoned", "", "the client left while waiting"
            else:
                answer = waiter.result()
                by, reason = answer.by, answer.reason
                if answer.approved:
                    outcome = "approved"
                elif not by:
                    outcome = "timeout"
                else:
                    outcome = "denied"
        except TimeoutError:
            outcome, by, reason = "timeout", "", "no answer in time"
        except ProtocolError:
            outcome, by, reason = "failed", "", "the agent's connection is gone"
        finally:
            self.approvals.forget(request)
        await self.bus.record(
            ApprovalAnswered(
                **context,
                request=request,
                outcome=outcome,
                by=by or None,
                reason=reason or None,
                seconds=round(self.clock.monotonic() - asked, 3),
            )
        )
        if outcome == "approved":
            return by or "unknown"
        message = {
            "timeout": "approval timed out: nobody answered at the machine",
            "denied": f"approval denied by {by}" + (f": {reason}" if reason else ""),
        }.get(outcome, f"approval failed: {reason}")
        link.send_error("denied", message)
        return None

    async def notify_agent(self, session: Session, event: str) -> None:
        """Sessions not approved at the machine are announced there when they start;
        every session's end is told, so that the agent forgets its client key."""
        if self.directory.locate(session.agent) is None:
            return
        try:
            user = await self.store.get_user(session.user)
            vendor = user.vendor if user is not None and user.vendor else ""
            vendor_name = await self.store.vendor_name(vendor) if vendor else ""
        except StoreError:  # called as a session ends: the notice matters, not the name
            vendor_name = ""
        with contextlib.suppress(ProtocolError):
            self.directory.send_to_agent(
                session.agent,
                m.Notice(
                    event=event,
                    session_id=session.id,
                    user=session.user,
                    vendor_name=vendor_name,
                    mode=session.mode,
                    target=session.target,
                    reason=session.reason,
                    client_key=b64e(session.client_key) if event == "start" else "",
                ),
            )

    async def revalidate(self, why: str) -> int:
        """After a directory change: end every live session the policy no longer allows,
        and every one opened with a ``gw login`` credential that has ended since."""
        ended = 0
        for session in self.directory.live():
            decision = await self.access.decide(session.user, session.agent, session.mode)
            if not decision.allowed:
                session.end(f"no longer allowed: {decision.reason} ({why})")
                ended += 1
            elif session.login is not None:
                login = await self.store.get_login(session.login)
                if login is None or login.ended is not None:
                    gone = login.ended_reason if login is not None else "gone"
                    session.end(f"login ended: {gone} ({why})")
                    ended += 1
        return ended

    async def hold(self, session: Session) -> None:
        """Keep a session until its client leaves, it is killed, expires or idles out.

        A session whose login a smartcard proved, in a mode with ``end_on_card_removal``,
        also ends when the client's ``card_present`` heartbeat stops: the client, not
        the gateway, sees the card, so a client that stops watching it (or is made not
        to) cannot keep the session past ``card_heartbeat_timeout``.
        """
        link = session.link

        async def control() -> None:
            with contextlib.suppress(ConnectionClosed, RemoteError):
                while True:
                    msg = await link.expect(m.Bye, m.CardPresent)  # keepalives are skipped
                    if isinstance(msg, m.CardPresent):
                        session.card_seen = self.clock.monotonic()
                        continue
                    assert isinstance(msg, m.Bye)
                    session.end(f"client: {msg.reason}" if msg.reason else "client closed")
                    return
            session.end("client closed")

        reader = asyncio.get_running_loop().create_task(control())
        try:
            while not session.ended.is_set():
                now = self.clock.now()
                if now >= session.expires:
                    session.end("maximum session length reached")
                    break
                idle = self.clock.monotonic() - max(
                    [session.last_activity, *(p.last_activity for p in session.tunnels)]
                )
                if idle >= session.idle_timeout:
                    session.end("idle timeout")
                    break
                wait = min(session.expires - now, session.idle_timeout - idle, 60.0)
                if session.card_timeout:
                    silent = self.clock.monotonic() - session.card_seen
                    if silent >= session.card_timeout:
                        session.end("card heartbeat stopped")
                        break
                    wait = min(wait, session.card_timeout - silent)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait, 0.05)):
                        await session.ended.wait()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if not session.end_reason.startswith("client"):
                link.send_error("session_ended", session.end_reason)
