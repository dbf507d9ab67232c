"""The session broker: authenticates, decides, pairs and splices.

One :class:`Broker` per gatewayd process. Each accepted TLS connection is handed
to :meth:`Broker.handle`, which reads its first message and serves its role:

- ``client_hello``: prove each factor the mode needs, ask the policy, open a
  session and keep its control connection until it ends;
- ``tunnel``: a new tunnel of a live session: ask the session's agent to dial,
  wait for its data connection, write the durable ``tunnel.start`` record, then
  splice the two connections opaquely until either side ends;
- ``agent_hello``: an enrolled agent's control connection (mutual TLS);
- ``data``: an agent's answer to a dial request;
- ``enroll``: a new agent trades its one-time token for a certificate.

The peer learns only a generic ``auth_failed`` when a factor fails; the audit
record gets the specific reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PublicKey
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from auth import registry
from auth.base import AuthContext, Outcome, b64d, b64e
from relay import message as m
from relay.aio import ConnectionClosed, FramedLink, Pipe
from relay.errors import ConfigError, GatewayError, ProtocolError, RemoteError, TLSBindingError

from . import ca, policy
from .audit import AuditError, AuditLog
from .config import Config, ConfigHolder
from .event import (
    AgentConnected,
    AgentDisconnected,
    AgentEnrolled,
    AgentsListed,
    ApprovalAnswered,
    ApprovalRequested,
    AuthAttempt,
    AuthLocked,
    EventBus,
    PolicyDecided,
    SessionEnded,
    SessionRefused,
    SessionStarted,
    TunnelEnded,
    TunnelFailed,
    TunnelRefused,
    TunnelStarted,
)
from .rejection import RejectionLog
from .store import Attempt, AttemptEnd, Credential, Lockout, Store, StoreError, User

log = structlog.get_logger("gatewayd.broker")

#: Seconds a person gets for each factor (typing a code, a PIN, touching a key).
AUTH_STEP_TIMEOUT = 120.0
#: Why ``[e2e] require_hybrid`` refuses an agent enrolled before the hybrid handshake.
NO_PQ_KEY = "no post-quantum key ([e2e] require_hybrid is on; enroll the agent again)"

_REPLAYED = "already used (a replay, or a concurrent login with the same proof)"
_CHANGED = "credential changed during the login (by an administrator or another login)"


class DialError(GatewayError):
    """The agent could not serve a dial request."""


@dataclass(eq=False)
class AgentConn:
    id: str
    org: str
    link: FramedLink
    targets: frozenset[str]
    since: float
    source: str


@dataclass(eq=False)
class Session:
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
    tunnel_count: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    card_timeout: float = 0.0
    """Seconds without a ``card_present`` after which the session ends (0: not watched)."""
    card_seen: float = field(default_factory=time.monotonic)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str = ""

    def end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()


class RateLimiter:
    """At most ``limit`` events per key (a source, see :func:`source_key`; a user name)
    in any 60-second window."""

    WINDOW = 60.0
    #: Sources remembered at most; the oldest are forgotten first.
    MAX_SOURCES = 100_000

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._hits: dict[str, deque[float]] = {}

    def allow(self, source: str, now: float) -> bool:
        hits = self._hits.get(source)
        if hits is None:
            if len(self._hits) >= self.MAX_SOURCES:
                self._hits.pop(next(iter(self._hits)))
            hits = self._hits[source] = deque()
        while hits and hits[0] <= now - self.WINDOW:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        return True


def _host(source: str) -> str:
    return source.rpartition(":")[0].strip("[]") or source


def source_key(source: str) -> str:
    """Whom a source address's rate limit counts: the IPv4 address, or the IPv6 /64.

    One IPv6 host commonly holds a whole /64 (SLAAC, privacy addresses), so counting
    single IPv6 addresses would give it 2**64 budgets (RFC 7707, section 3).
    """
    host = _host(source)
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _cn(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode()


class Broker:
    def __init__(
        self,
        config: Config | ConfigHolder,
        store: Store,
        audit: AuditLog,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.holder = config if isinstance(config, ConfigHolder) else ConfigHolder(config)
        config = self.holder.current
        self.store = store
        self.audit = audit
        #: Every audit record of the broker is an event published here (the audit writer first).
        self.bus = EventBus(audit)
        self.now = now
        self.ca_key, self.ca_cert = ca.load_ca(config.tls.ca_file, config.tls.ca_key_file)
        self.agents: dict[str, AgentConn] = {}
        self.sessions: dict[str, Session] = {}
        self.tickets: dict[str, Session] = {}
        self.pending_dials: dict[str, tuple[str, asyncio.Future[FramedLink]]] = {}
        #: request id -> (agent id, future of the agent's answer); each is used once.
        self.pending_approvals: dict[str, tuple[str, asyncio.Future[m.ApprovalAnswer]]] = {}
        self.auth_limiter = RateLimiter(config.limits.auth_per_minute)
        self.user_limiter = RateLimiter(config.limits.auth_per_user_per_minute)
        self.accepting = True
        self.tasks: set[asyncio.Task[Any]] = set()
        #: connection.rejected records, bounded per source (a flood cannot fill the disk).
        self.rejections = RejectionLog(audit)

    @property
    def config(self) -> Config:
        """The config in force (SIGHUP replaces it in the holder all parts share)."""
        return self.holder.current

    @config.setter
    def config(self, value: Config) -> None:
        self.holder.current = value

    # -- entry ----------------------------------------------------------------------

    async def handle(self, link: FramedLink) -> None:
        """Serve one accepted connection until its role is done."""
        keep_open = False
        try:
            hello = await link.expect(
                m.ClientHello,
                m.AgentHello,
                m.EnrollRequest,
                m.TunnelHello,
                m.DataHello,
                m.RegisterHello,
            )
            if not self.accepting and not isinstance(hello, m.DataHello):
                link.send_error("shutdown", "the gateway is shutting down")
                return
            if isinstance(hello, m.ClientHello):
                await self._client(link, hello)
            elif isinstance(hello, m.TunnelHello):
                keep_open = await self._tunnel(link, hello)
            elif isinstance(hello, m.AgentHello):
                await self._agent(link, hello)
            elif isinstance(hello, m.DataHello):
                keep_open = self._data(link, hello)
            elif isinstance(hello, m.RegisterHello):
                await self._register(link, hello)
            else:
                assert isinstance(hello, m.EnrollRequest)
                await self._enroll(link, hello)
        except (ConnectionClosed, RemoteError) as exc:
            code = exc.code
            if code not in ("eof", "session_ended"):
                self.rejections.reject(link.peer, code, str(exc), self.now())
        except AuditError as exc:
            log.error("audit log failed", error=str(exc))
            link.send_error("unavailable", "the gateway cannot write its audit log")
        except (StoreError, TLSBindingError, ConfigError, ProtocolError) as exc:
            log.error("request failed", source=link.peer, error=str(exc))
            link.send_error("internal", "internal error")
        except Exception:
            # The catch-all: tell the peer nothing specific, keep the daemon up.
            log.exception("unexpected error", source=link.peer)
            link.send_error("internal", "internal error")
        finally:
            if not keep_open:
                link.close()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- client sessions ------------------------------------------------------------

    def _choose(self, step: tuple[str, ...], offered: tuple[str, ...], enrolled: set[str]) -> str:
        """Pick the factor of a step: one the client offers and the user holds, if any."""
        for name in offered:
            if name in step and name in enrolled:
                return name
        for name in step:
            if name in enrolled:
                return name
        return step[0]

    def _lockout(self) -> Lockout:
        lo = self.config.lockout
        return Lockout(
            threshold=lo.threshold,
            base_seconds=lo.base_seconds,
            max_seconds=lo.max_seconds,
            decay_seconds=lo.decay_seconds,
            hard_limit=lo.hard_limit,
        )

    async def _authenticate(self, link: FramedLink, hello: m.ClientHello, sid: str) -> bool:
        """Prove every factor of the mode; audit each attempt. True when all passed.

        Nothing read before an ``await`` is written back after it. Each factor's check
        runs in a slot of the store's lockout (:meth:`Store.begin_attempt`, taken once
        the answer is in, so the lock is checked before every factor), its outcome is
        counted and the lock decided in the same transaction that gives the slot back,
        and a lock set meanwhile by a parallel connection fails even a right answer.
        What an accepted factor changes (a TOTP step, a key's counter, a rehashed
        password) is applied by a conditional update; if that fails (a replay, or the
        credential was changed by an administrator while this login waited), the
        login fails.
        """
        cfg = self.config
        lockout = self._lockout()
        user = self.store.get_user(hello.user)
        binding = link.channel_binding()
        enrolled = set(self.store.credential_methods(hello.user)) if user else set()
        steps = cfg.mode(hello.mode).factors
        for index, step in enumerate(steps):
            method = self._choose(step, hello.factors, enrolled)
            verifier = registry.get(method).verifier()
            credential = self.store.load_credential(hello.user, method) if user else None
            ctx = AuthContext(
                user=hello.user,
                channel_binding=binding,
                now=self.now(),
                source=link.peer,
                credential=credential.data if credential else None,
                settings=cfg.auth.get(method, {}),
                counters=credential.counters if credential else {},
            )
            challenge = verifier.begin(ctx)
            link.extend_handshake(AUTH_STEP_TIMEOUT)
            link.send(m.AuthRequest(method, challenge.payload))
            try:
                response = await link.expect(m.AuthResponse)
            except (ConnectionClosed, RemoteError) as exc:
                # The client gave up on this factor (no security key, wrong key, no touch):
                # still an attempt on the record. Not counted towards the lockout.
                self.bus.publish(
                    AuthAttempt(
                        session=sid,
                        user=hello.user,
                        factor=method,
                        outcome="failure",
                        reason=f"no answer from the client ({exc.code})",
                        source=link.peer,
                        mode=hello.mode,
                        agent=hello.agent,
                    )
                )
                raise
            assert isinstance(response, m.AuthResponse)
            # The lock, checked before this factor: a slot, or why not.
            attempt = Attempt.UNKNOWN
            if user is not None and not user.disabled:
                attempt = self.store.begin_attempt(hello.user, self.now(), lockout)
            try:
                if response.method != method:
                    outcome = Outcome.reject(f"answered {response.method[:32]}")
                else:
                    outcome = await asyncio.to_thread(
                        verifier.complete, ctx, challenge.state, response.payload
                    )
                outcome_ok, reason, detail = outcome.ok, outcome.reason, dict(outcome.detail)
                refused = None
                if index == 0 and user is not None:
                    # Told only after the first factor, with the answer an unknown user gets.
                    refused = self._source_refused(user, link.peer)
                verified = outcome_ok and attempt is Attempt.GO
                if verified and refused is None and credential is not None:
                    verified, why = self._apply(hello.user, method, credential, outcome)
                    if not verified:
                        outcome_ok, reason = False, why
            except BaseException:
                # Cancelled, or the verifier's settings or the store failed: free the
                # slot without counting (the end below is never reached).
                if attempt is Attempt.GO:
                    self.store.cancel_attempt(hello.user)
                raise
            # Checked after the factor ran, so the answer takes as long either way.
            if user is None:
                outcome_ok, reason = False, "unknown user"
            elif user.disabled:
                outcome_ok, reason = False, "user disabled"
            elif attempt is not Attempt.GO:
                outcome_ok, reason = False, f"{attempt.value} ({reason})"
            elif refused is not None:
                outcome_ok, reason = False, refused if outcome_ok else f"{refused} ({reason})"
            if attempt is Attempt.GO:
                # The lock, checked after this factor: counted and decided atomically.
                end = self.store.end_attempt(
                    hello.user,
                    ok=verified,  # a refused source is not a wrong answer: not counted
                    final=index == len(steps) - 1 and outcome_ok,
                    now=self.now(),
                    policy=lockout,
                )
                if end.newly_locked is not None:
                    self._audit_locked(hello.user, end)
                if outcome_ok and end.locked(self.now()):
                    outcome_ok, reason = False, "account locked meanwhile by other attempts"
            self.bus.publish(
                AuthAttempt(
                    session=sid,
                    user=hello.user,
                    factor=method,
                    outcome="success" if outcome_ok else "failure",
                    reason=reason,
                    source=link.peer,
                    mode=hello.mode,
                    agent=hello.agent,
                    detail={k: v for k, v in detail.items() if k not in ("event", "seq", "ts")},
                )
            )
            if not outcome_ok:
                await self.bus.flush()
                link.send_error("auth_failed", "authentication failed")
                return False
        return True

    def _apply(
        self, user: str, method: str, credential: Credential, outcome: Outcome
    ) -> tuple[bool, str]:
        """Store what an accepted factor changes, conditionally; (applied, why not)."""
        now = self.now()
        if outcome.counter is not None:
            key, value = outcome.counter
            if not self.store.advance_counter(
                user, method, key, value, version=credential.version, now=now
            ):
                # Which condition failed, for the audit record: the counter is already
                # there (a replay), or the credential or the key is not what was verified.
                now_stored = self.store.load_credential(user, method)
                reached = now_stored.counters.get(key) if now_stored is not None else None
                version_kept = now_stored is not None and now_stored.version == credential.version
                if reached is not None and reached >= value and (key or version_kept):
                    return False, f"{_REPLAYED} (counter {value} already reached)"
                return False, _CHANGED
        elif self.store.credential_version(user, method) != credential.version:
            return False, _CHANGED
        if outcome.rehash is not None and not self.store.replace_credential(
            user, method, dict(outcome.rehash), credential.version, now
        ):
            return False, _CHANGED
        return True, "ok"

    def _audit_locked(self, user: str, end: AttemptEnd) -> None:
        if end.admin_locked:
            self.bus.publish(
                AuthLocked(
                    user=user,
                    failures=end.failures,
                    seconds=None,
                    until="unlocked by an administrator",
                )
            )
        else:
            self.bus.publish(AuthLocked(user=user, failures=end.failures, seconds=end.newly_locked))

    def _decide(self, user_id: str, agent_id: str, mode: str) -> policy.Decision:
        user = self.store.get_user(user_id)
        agent = self.store.get_agent(agent_id)
        if user is None:
            return policy.deny("unknown user")
        if agent is None:
            return policy.deny(f"unknown agent {agent_id}")
        vendor_disabled = self.store.vendor_disabled(user.vendor) if user.vendor else None
        agreements = self.store.agreements_between(user.vendor, agent.org) if user.vendor else []
        return policy.decide(
            user=user,
            agent=agent,
            org_disabled=self.store.org_disabled(agent.org),
            mode=mode,
            now=self.now(),
            vendor_disabled=vendor_disabled,
            agreements=agreements,
            grants=self.store.grants_of(user_id),
        )

    async def _client(self, link: FramedLink, hello: m.ClientHello) -> None:
        sid = secrets.token_hex(8)
        if self.audit.failure is not None:
            link.send_error("unavailable", "the gateway cannot write its audit log")
            return
        # Per source (an IPv6 /64 counts as one) and per claimed user name, known or not,
        # so that many sources cannot spread guesses at one account past the lockout.
        now = time.monotonic()
        self.user_limiter.limit = self.config.limits.auth_per_user_per_minute
        limited = None
        if not self.auth_limiter.allow(source_key(link.peer), now):
            limited = "source"
        elif not self.user_limiter.allow(hello.user, now):
            limited = "user"
        if limited is not None:
            # Bounded per source like every refusal before login (a flood cannot fill the disk).
            self.rejections.refuse(
                "auth.rate_limited",
                link.peer,
                "rate_limited",
                self.now(),
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
        if not await self._authenticate(link, hello, sid):
            return
        if not hello.agent:
            await self._list_agents(link, hello, sid)
            return
        decision = self._decide(hello.user, hello.agent, hello.mode)
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
        online = self.agents.get(hello.agent)
        if online is None:
            self.bus.publish(SessionRefused(**context, reason="agent offline"))
            link.send_error("agent_offline", f"agent {hello.agent} is not connected")
            return
        if hello.target not in online.targets:
            self.bus.publish(SessionRefused(**context, reason="target unknown"))
            link.send_error("target_unknown", f"agent {hello.agent} has no target {hello.target}")
            return
        if self._classic_refused(hello.agent):
            self.bus.publish(SessionRefused(**context, reason=NO_PQ_KEY))
            link.send_error("denied", f"agent {hello.agent}: {NO_PQ_KEY}")
            return
        approved_by = ""
        if decision.needs_approval:
            answer = await self._ask_approval(link, online, hello, sid, client_key, context)
            if answer is None:
                return
            approved_by = answer
        agent = self.store.get_agent(hello.agent)
        assert agent is not None and agent.noise_key is not None
        mode_cfg = self.config.mode(hello.mode)
        watched = mode_cfg.end_on_card_removal and self._card_proved(hello)
        now = self.now()
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
            expires=now + mode_cfg.max_session,
            idle_timeout=mode_cfg.idle_timeout,
            link=link,
            agreement=decision.agreement,
            approved_by=approved_by,
            unattended=not decision.needs_approval and hello.mode != "homeoffice",
            card_timeout=mode_cfg.card_heartbeat_timeout if watched else 0.0,
        )
        await self.bus.record(
            SessionStarted(**context, expires=session.expires, approved_by=approved_by or None)
        )
        self.sessions[sid] = session
        self.tickets[session.ticket] = session
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
            )
        )
        if not decision.needs_approval:
            # Unattended access and home office: announced at the machine, with the
            # client key, the only one the agent then accepts in this session's tunnels
            # (an approved session's key was bound by the approval itself).
            self._notify_agent(session, "start")
        try:
            await self._hold(session)
        finally:
            self._notify_agent(session, "end")  # the agent forgets the session's key
            self.sessions.pop(sid, None)
            self.tickets.pop(session.ticket, None)
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
                    duration=round(self.now() - session.started, 3),
                    tunnels=session.tunnel_count,
                    bytes_up=session.bytes_up + sum(p.a_to_b for p in session.tunnels),
                    bytes_down=session.bytes_down + sum(p.b_to_a for p in session.tunnels),
                )
            )

    def _source_refused(self, user: User, source: str) -> str | None:
        """A vendor may restrict where its users log in from (CIDRs in the directory).

        Why this source is refused, or None. Asked only after the first factor ran, so
        that the answer (``auth_failed``) and its timing are an unknown user's: the
        check cannot tell whether a user exists.
        """
        if user.vendor is None:
            return None
        networks = self.store.source_networks(user.vendor)
        if policy.source_allowed(networks, source):
            return None
        return f"source address not allowed for vendor {user.vendor}"

    async def _list_agents(self, link: FramedLink, hello: m.ClientHello, sid: str) -> None:
        """After login: the agents this user may reach, each with the modes allowed."""
        found: dict[str, Any] = {}
        for row in self.store.list_rows("agents"):
            modes = [mode for mode in m.MODES if self._decide(hello.user, row["id"], mode).allowed]
            if modes:
                online = self.agents.get(row["id"])
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

    async def _ask_approval(
        self,
        link: FramedLink,
        online: AgentConn,
        hello: m.ClientHello,
        sid: str,
        client_key: bytes,
        context: dict[str, Any],
    ) -> str | None:
        """Ask the person at the agent's machine; the approver's name, or None if not approved."""
        agent = self.store.get_agent(hello.agent)
        user = self.store.get_user(hello.user)
        assert agent is not None and agent.noise_key is not None and user is not None
        vendor = user.vendor or ""
        timeout = self.config.mode(hello.mode).approval_timeout
        request = secrets.token_hex(6)
        waiter: asyncio.Future[m.ApprovalAnswer] = asyncio.get_running_loop().create_future()
        self.pending_approvals[request] = (hello.agent, waiter)
        asked = time.monotonic()
        link.extend_handshake(timeout + 10)
        await self.bus.record(ApprovalRequested(**context, request=request, timeout=timeout))
        try:
            online.link.send(
                m.Approve(
                    request=request,
                    session_id=sid,
                    user=hello.user,
                    vendor=vendor,
                    vendor_name=self.store.vendor_name(vendor) if vendor else "",
                    mode=hello.mode,
                    target=hello.target,
                    reason=hello.reason,
                    client_key=b64e(client_key),
                    timeout=timeout,
                )
            )
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
            self.pending_approvals.pop(request, None)
        await self.bus.record(
            ApprovalAnswered(
                **context,
                request=request,
                outcome=outcome,
                by=by or None,
                reason=reason or None,
                seconds=round(time.monotonic() - asked, 3),
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

    def _notify_agent(self, session: Session, event: str) -> None:
        """Sessions not approved at the machine are announced there when they start;
        every session's end is told, so that the agent forgets its client key."""
        online = self.agents.get(session.agent)
        if online is None:
            return
        try:
            user = self.store.get_user(session.user)
            vendor = user.vendor if user is not None and user.vendor else ""
            vendor_name = self.store.vendor_name(vendor) if vendor else ""
        except StoreError:  # called as a session ends: the notice matters, not the name
            vendor_name = ""
        with contextlib.suppress(ProtocolError):
            online.link.send(
                m.Notice(
                    event=event,
                    session_id=session.id,
                    user=session.user,
                    vendor_name=vendor_name,
                    mode=session.mode,
                    target=session.target,
                    reason=session.reason,
                    client_key=b64e(session.client_key) if event == "start" else "",
                )
            )

    async def revalidate(self, why: str) -> int:
        """After a directory change: end every live session the policy no longer allows."""
        ended = 0
        for session in list(self.sessions.values()):
            decision = self._decide(session.user, session.agent, session.mode)
            if not decision.allowed:
                session.end(f"no longer allowed: {decision.reason} ({why})")
                ended += 1
        return ended

    def _card_proved(self, hello: m.ClientHello) -> bool:
        """Whether a smartcard was one of the factors this login proved.

        Every step's factor passed, and each was picked by :meth:`_choose` from the mode,
        what the client offered and what the user holds; the same choice, made again.
        """
        enrolled = set(self.store.credential_methods(hello.user))
        steps = self.config.mode(hello.mode).factors
        return any(self._choose(step, hello.factors, enrolled) == "smartcard" for step in steps)

    async def _hold(self, session: Session) -> None:
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
                        session.card_seen = time.monotonic()
                        continue
                    assert isinstance(msg, m.Bye)
                    session.end(f"client: {msg.reason}" if msg.reason else "client closed")
                    return
            session.end("client closed")

        reader = asyncio.get_running_loop().create_task(control())
        try:
            while not session.ended.is_set():
                now = self.now()
                if now >= session.expires:
                    session.end("maximum session length reached")
                    break
                idle = time.monotonic() - max(
                    [session.last_activity, *(p.last_activity for p in session.tunnels)]
                )
                if idle >= session.idle_timeout:
                    session.end("idle timeout")
                    break
                wait = min(session.expires - now, session.idle_timeout - idle, 60.0)
                if session.card_timeout:
                    silent = time.monotonic() - session.card_seen
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

    # -- tunnels ----------------------------------------------------------------------

    async def _tunnel(self, link: FramedLink, hello: m.TunnelHello) -> bool:
        session = self.tickets.get(hello.ticket)
        if session is None or session.ended.is_set():
            self.rejections.refuse(
                "tunnel.refused",
                link.peer,
                "unknown_session",
                self.now(),
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
        decision = self._decide(session.user, session.agent, session.mode)
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
            return await self._open_tunnel(link, session, fields)
        finally:
            session.reserved -= 1

    async def _open_tunnel(
        self, link: FramedLink, session: Session, fields: dict[str, Any]
    ) -> bool:
        online = self.agents.get(session.agent)
        if online is None:
            self.bus.publish(TunnelRefused(**fields, reason="agent offline"))
            link.send_error("agent_offline", f"agent {session.agent} is not connected")
            return False
        if self._classic_refused(session.agent):
            self.bus.publish(TunnelRefused(**fields, reason=NO_PQ_KEY))
            link.send_error("denied", f"agent {session.agent}: {NO_PQ_KEY}")
            return False
        token = secrets.token_urlsafe(32)
        waiter: asyncio.Future[FramedLink] = asyncio.get_running_loop().create_future()
        self.pending_dials[token] = (session.agent, waiter)
        tunnel_id = secrets.token_hex(6)
        try:
            online.link.send(
                m.Dial(
                    token=token,
                    target=session.target,
                    session_id=session.id,
                    client_key=b64e(session.client_key),
                    user=session.user,
                    mode=session.mode,
                )
            )
            async with asyncio.timeout(self.config.limits.dial_timeout):
                agent_link = await asyncio.shield(waiter)
        except (TimeoutError, DialError, ProtocolError) as exc:
            reason = str(exc) or "the agent did not answer in time"
            self.bus.publish(TunnelFailed(**fields, tunnel=tunnel_id, reason=reason))
            link.send_error("dial_failed", reason)
            return False
        finally:
            self.pending_dials.pop(token, None)
        try:
            await self.bus.record(
                TunnelStarted(**fields, tunnel=tunnel_id, e2e=self._e2e(session.agent))
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
        started = time.monotonic()
        pipe.start(client_rest, agent_rest)
        self.spawn(self._watch_tunnel(session, pipe, tunnel_id, fields, started))
        return True

    async def _watch_tunnel(
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
                duration=round(time.monotonic() - started, 3),
                reason=result.reason,
            )
        )

    def _data(self, link: FramedLink, hello: m.DataHello) -> bool:
        pending = self.pending_dials.get(hello.token)
        agent_id = self._verified_agent(link)
        if pending is None or agent_id is None or pending[0] != agent_id:
            self.rejections.reject(
                link.peer,
                "auth_failed",
                "data connection with an unknown token or the wrong agent",
                self.now(),
                agent=agent_id,
            )
            link.send_error("auth_failed", "unknown dial token")
            return False
        waiter = pending[1]
        if waiter.done():
            link.send_error("session_ended", "dial request already answered")
            return False
        waiter.set_result(link)
        return True

    # -- agents -----------------------------------------------------------------------

    def _verified_agent(self, link: FramedLink) -> str | None:
        """The id of the enrolled agent whose certificate this link presented, else None."""
        der = link.peer_certificate()
        if der is None:
            return None
        try:
            agent_id = _cn(x509.load_der_x509_certificate(der))
        except ValueError:
            return None
        agent = self.store.get_agent(agent_id)
        if agent is None or agent.disabled or agent.cert_fingerprint != ca.fingerprint(der):
            return None
        return agent_id

    async def _agent(self, link: FramedLink, hello: m.AgentHello) -> None:
        agent_id = self._verified_agent(link)
        if agent_id is None:
            self.rejections.refuse(
                "agent.rejected",
                link.peer,
                "agent_rejected",
                self.now(),
                reason="no enrolled certificate or disabled",
            )
            link.send_error("auth_failed", "agent not enrolled, disabled, or certificate unknown")
            return
        agent = self.store.get_agent(agent_id)
        assert agent is not None
        previous = self.agents.get(agent_id)
        if previous is not None:
            previous.link.send_error("session_ended", "replaced by a newer connection")
        conn = AgentConn(agent_id, agent.org, link, frozenset(hello.targets), self.now(), link.peer)
        self.agents[agent_id] = conn
        self.store.touch_agent(agent_id, self.now())
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
                    waiting = self.pending_approvals.get(msg.request)
                    if waiting is not None and waiting[0] == agent_id and not waiting[1].done():
                        waiting[1].set_result(msg)
                    continue
                assert isinstance(msg, m.DialFailed)
                pending = self.pending_dials.get(msg.token)
                if pending is not None and pending[0] == agent_id and not pending[1].done():
                    pending[1].set_exception(DialError(msg.reason[:200]))
        except (ConnectionClosed, RemoteError) as exc:
            reason = exc.code if isinstance(exc, ConnectionClosed) else f"error: {exc.code}"
        finally:
            if self.agents.get(agent_id) is conn:
                del self.agents[agent_id]
            self.bus.publish(AgentDisconnected(agent=agent_id, source=link.peer, reason=reason))

    async def _register(self, link: FramedLink, hello: m.RegisterHello) -> None:
        """A person registers a factor credential (a security key) with a one-time code."""
        from .fido2_registration import serve_registration  # late: it imports the admin ops

        await serve_registration(self, link, hello)

    async def _enroll(self, link: FramedLink, hello: m.EnrollRequest) -> None:
        source = link.peer
        if not self.auth_limiter.allow(source_key(source), time.monotonic()):
            self.rejections.refuse(
                "agent.enroll",
                source,
                "enroll_rate_limited",
                self.now(),
                outcome="failure",
                reason="rate limited",
            )
            link.send_error("rate_limited", "too many attempts; try again later")
            return
        now = self.now()
        agent_id = self.store.agent_for_token(hello.token, now)
        if agent_id is None:
            await self.bus.record(
                AgentEnrolled(
                    agent=None,
                    source=source,
                    outcome="failure",
                    reason="unknown, used or expired token",
                )
            )
            link.send_error("auth_failed", "enrollment token unknown, used or expired")
            return
        try:
            noise_key = b64d(hello.noise_key)
            if len(noise_key) != 32:
                raise ValueError("noise key must be 32 bytes")
            if hello.pq_key:  # an ML-KEM-768 encapsulation key (FIPS 203 7.2's checks)
                MLKEM768PublicKey.from_public_bytes(b64d(hello.pq_key))
            cert = ca.sign_agent_csr(
                self.ca_key, self.ca_cert, hello.csr, agent_id, self.config.enrollment.cert_days
            )
        except (ValueError, ca.CAError) as exc:
            await self.bus.record(
                AgentEnrolled(agent=agent_id, source=source, outcome="failure", reason=str(exc))
            )
            link.send_error("protocol_error", str(exc))
            return
        der = cert.public_bytes(Encoding.DER)
        taken = self.store.take_enrollment(
            hello.token, ca.fingerprint(der), hello.noise_key, now, hello.pq_key or None
        )
        if taken != agent_id:
            link.send_error("auth_failed", "enrollment token unknown, used or expired")
            return
        await self.bus.record(
            AgentEnrolled(
                agent=agent_id, source=source, outcome="success", fingerprint=ca.fingerprint(der)
            )
        )
        link.send(m.Enrolled(agent=agent_id, certificate=ca.cert_pem(cert).decode()))

    # -- end-to-end handshake --------------------------------------------------------

    def _e2e(self, agent_id: str) -> str:
        """The end-to-end handshake of the agent's tunnels: ``hybrid`` for an agent with
        an ML-KEM key (it answers no other, and clients are given the key)."""
        agent = self.store.get_agent(agent_id)
        return "hybrid" if agent is not None and agent.pq_key else "classic"

    def _classic_refused(self, agent_id: str) -> bool:
        """``[e2e] require_hybrid`` is on and the agent can only run the classic handshake."""
        return self.config.e2e.require_hybrid and self._e2e(agent_id) == "classic"

    # -- control --------------------------------------------------------------------

    def kill_session(self, sid: str, reason: str) -> bool:
        session = self.sessions.get(sid)
        if session is None:
            return False
        session.end(reason)
        return True

    def session_rows(self) -> list[dict[str, Any]]:
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
            for s in self.sessions.values()
        ]

    async def drain(self, timeout: float) -> None:
        """Stop taking sessions; wait up to ``timeout`` for tunnels, then end the rest."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        # Polling a few times a second is plenty for a once-per-lifetime drain.
        while any(s.tunnels for s in self.sessions.values()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        for s in list(self.sessions.values()):
            s.end("gateway shutting down")
        for a in list(self.agents.values()):
            a.link.send_error("shutdown", "the gateway is shutting down")
        deadline = time.monotonic() + 2.0
        while (self.sessions or self.tasks) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
