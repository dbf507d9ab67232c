"""Typed events of the daemon, and the bus that hands each to its consumers once.

Theory of operation
-------------------

A part of the daemon (login, sessions, tunnels, agents, enrollment, admin) says what
happened by building one frozen, slotted event (``AuthAttempt``, ``SessionStarted``,
``TunnelEnded``...) and publishing it on the :class:`EventBus`. The bus gives it to
the audit writer first, which appends the audit record (``NAME`` and the fields of
:meth:`Event.record`, exactly as ``docs/audit.md`` lists them), then to every other
subscriber (metrics, the cluster bus), in the order they subscribed. A new consumer
subscribes; no code that publishes changes.

Durability: an event whose class says ``DURABLE`` (a session or tunnel starts, a
policy decision, an approval, an enrollment, an admin change) must be on disk before
the daemon acts on it, so it is published with ``await bus.record(event)``, which
returns once the audit record has been fsync'ed (group commit). Publishing it with
the synchronous :meth:`EventBus.publish` is a programming error (``TypeError``).
:meth:`EventBus.flush` waits for everything published so far (a failed login's
records before the peer hears ``auth_failed``).

An audit log that cannot be written raises :class:`gatewayd.audit.AuditError` from
``publish``/``record`` as it did from the audit calls; the other subscribers are not
told of an event the audit trail lacks. A subscriber that raises is logged and
skipped: metrics must not end a session.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog

from .audit import AuditLog

log = structlog.get_logger("gatewayd.event")

#: Field metadata: the field's mapping is spread into the record (factor details, the
#: ids an admin change touched) instead of being one field.
SPREAD: Mapping[str, bool] = {"spread": True}


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event: ``NAME`` is the audit record's ``event`` field."""

    NAME: ClassVar[str] = ""
    DURABLE: ClassVar[bool] = False
    #: Fields left out of the record when None (absent, as docs/audit.md says).
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()

    def record(self) -> dict[str, Any]:
        """The audit record's fields besides ``ts``, ``seq``, ``prev``, ``node``, ``event``."""
        out: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(self)}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("spread"):
                for key, item in value.items():
                    if key in out or key in names:
                        raise TypeError(f"{self.NAME}: {key!r} given twice")
                    out[key] = item
            elif value is not None or f.name not in self.OMIT_IF_NONE:
                out[f.name] = value
        return out


@dataclass(frozen=True, slots=True)
class SessionContext(Event):
    """Who asked for what: the fields every record of a session's requests begins with."""

    session: str
    user: str
    agent: str
    target: str
    mode: str
    source: str
    reason_given: str

    def context(self) -> dict[str, str]:
        """These fields alone, to build the next event of the same request from."""
        return {f: getattr(self, f) for f in CONTEXT_FIELDS}


CONTEXT_FIELDS = ("session", "user", "agent", "target", "mode", "source", "reason_given")


# -- login ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthAttempt(Event):
    NAME = "auth.attempt"
    session: str
    user: str
    factor: str
    outcome: str
    reason: str
    source: str
    mode: str
    agent: str
    detail: Mapping[str, Any] = field(default_factory=dict, metadata=SPREAD)
    """The factor's own fields (certificate subject, key id...)."""


@dataclass(frozen=True, slots=True)
class AuthLocked(Event):
    NAME = "auth.locked"
    OMIT_IF_NONE = frozenset({"until"})
    user: str
    failures: int
    seconds: float | None
    until: str | None = None


@dataclass(frozen=True, slots=True)
class LoginIssued(Event):
    """``gw login`` proved the mode's factors: a login credential exists from now on."""

    NAME = "login.issued"
    DURABLE = True
    session: str
    """The login's own session id; every later use of the credential names it."""
    user: str
    mode: str
    source: str
    credential: str
    expires: float
    idle_timeout: float


@dataclass(frozen=True, slots=True)
class LoginEnded(Event):
    """``gw logout`` ended a login credential (an administrator's ``gw admin user
    logout`` is an ``admin.change``)."""

    NAME = "login.ended"
    DURABLE = True
    session: str
    user: str
    source: str
    credential: str
    login_session: str
    """The session of the ``gw login`` that made the credential."""
    reason: str


# -- sessions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyDecided(SessionContext):
    NAME = "policy.decision"
    DURABLE = True
    decision: str
    reason: str
    agreement: str | None
    approval: str


@dataclass(frozen=True, slots=True)
class ApprovalRequested(SessionContext):
    NAME = "approval.requested"
    DURABLE = True
    request: str
    timeout: float


@dataclass(frozen=True, slots=True)
class ApprovalAnswered(SessionContext):
    NAME = "approval.result"
    DURABLE = True
    request: str
    outcome: str
    by: str | None
    reason: str | None
    seconds: float


@dataclass(frozen=True, slots=True)
class AgentsListed(Event):
    NAME = "agents.listed"
    session: str
    user: str
    source: str
    agents: list[str]


@dataclass(frozen=True, slots=True)
class SessionStarted(SessionContext):
    NAME = "session.start"
    DURABLE = True
    expires: float
    approved_by: str | None


@dataclass(frozen=True, slots=True)
class SessionRefused(SessionContext):
    NAME = "session.refused"
    reason: str


@dataclass(frozen=True, slots=True)
class SessionEnded(Event):
    NAME = "session.end"
    session: str
    user: str
    agent: str
    target: str
    mode: str
    reason_given: str
    reason: str
    duration: float
    tunnels: int
    bytes_up: int
    bytes_down: int


# -- tunnels ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TunnelStarted(SessionContext):
    NAME = "tunnel.start"
    DURABLE = True
    tunnel: str
    e2e: str = "classic"
    """The end-to-end handshake: ``classic`` (X25519) or ``hybrid`` (X25519 + ML-KEM-768)."""
    cipher: str = "ChaChaPoly"
    """The end-to-end cipher the client named, the only one the agent then answers:
    ``AESGCM`` (AES-256-GCM) or ``ChaChaPoly`` (ChaCha20-Poly1305)."""


@dataclass(frozen=True, slots=True)
class TunnelEnded(SessionContext):
    NAME = "tunnel.end"
    tunnel: str
    bytes_up: int
    bytes_down: int
    duration: float
    reason: str


@dataclass(frozen=True, slots=True)
class TunnelRefused(SessionContext):
    NAME = "tunnel.refused"
    reason: str


@dataclass(frozen=True, slots=True)
class TunnelFailed(SessionContext):
    NAME = "tunnel.failed"
    tunnel: str
    reason: str


# -- agents -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentEnrolled(Event):
    """An enrollment token was presented (``outcome`` says whether it worked)."""

    NAME = "agent.enroll"
    DURABLE = True
    OMIT_IF_NONE = frozenset({"agent", "reason", "fingerprint"})
    agent: str | None
    source: str
    outcome: str
    reason: str | None = None
    fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class AgentConnected(Event):
    NAME = "agent.connect"
    agent: str
    org: str
    source: str
    targets: list[str]


@dataclass(frozen=True, slots=True)
class AgentDisconnected(Event):
    NAME = "agent.disconnect"
    agent: str
    source: str
    reason: str


# -- administration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminChanged(Event):
    NAME = "admin.change"
    DURABLE = True
    by: str
    op: str
    touched: Mapping[str, Any] = field(default_factory=dict, metadata=SPREAD)
    """The ids the change touched and what it set."""


@dataclass(frozen=True, slots=True)
class AdminRefused(Event):
    NAME = "admin.refused"
    by: str
    uid: int


@dataclass(frozen=True, slots=True)
class AuditAcknowledged(Event):
    """An operator looked into a gap or re-anchor that verify reports (``gw audit acknowledge``)."""

    NAME = "audit.acknowledged"
    DURABLE = True
    by: str
    acknowledged_seq: int
    acknowledged_hash: str | None
    problem: str
    reason: str


# -- security keys ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fido2Registered(Event):
    """A registration code was presented to add a security key (``outcome`` says how it went)."""

    NAME = "fido2.register"
    DURABLE = True
    user: str
    method: str
    source: str
    outcome: str
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict, metadata=SPREAD)
    """On success the key's fields (``key_id``, ``key_name``, ``aaguid``...)."""


# -- refusals before a role (bounded by gatewayd.rejection.RejectionLog) ----------------


@dataclass(frozen=True, slots=True)
class ConnectionRejected(Event):
    """A connection turned away before it had a role (TLS, junk, an oversized frame...)."""

    NAME = "connection.rejected"
    source: str
    code: str
    message: str
    detail: Mapping[str, Any] = field(default_factory=dict, metadata=SPREAD)


@dataclass(frozen=True, slots=True)
class RejectionsSummarised(Event):
    """The rejections of one source and interval that had no record of their own."""

    NAME = "connection.rejected.summary"
    source: str
    count: int
    codes: Mapping[str, int]
    first: str
    last: str
    interval: float
    recorded: int


@dataclass(frozen=True, slots=True)
class AgentRejected(Event):
    NAME = "agent.rejected"
    source: str
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict, metadata=SPREAD)


@dataclass(frozen=True, slots=True)
class AuthRateLimited(Event):
    NAME = "auth.rate_limited"
    OMIT_IF_NONE = frozenset({"session", "limit"})
    source: str
    user: str
    session: str | None = None
    limit: str | None = None
    """Which limit: ``source`` or ``user``."""
    detail: Mapping[str, Any] = field(default_factory=dict, metadata=SPREAD)


@dataclass(frozen=True, slots=True)
class TunnelWithoutSession(Event):
    """A tunnel asked for under a session this node does not know (or that ended)."""

    NAME = "tunnel.refused"
    source: str
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict, metadata=SPREAD)


@dataclass(frozen=True, slots=True)
class EnrollRateLimited(Event):
    """An enrollment refused before its token was looked at (too many failures)."""

    NAME = "agent.enroll"
    source: str
    outcome: str
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict, metadata=SPREAD)


# -- the daemon -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayStarted(Event):
    NAME = "gateway.start"
    DURABLE = True
    listen: str
    config: str
    version: int
    tls_keylog: bool
    reuse_port: bool
    pid: int
    detail: Mapping[str, Any] = field(default_factory=dict, metadata=SPREAD)
    """What else start-up says (a cluster node's fields)."""


@dataclass(frozen=True, slots=True)
class GatewayStopped(Event):
    NAME = "gateway.stop"
    DURABLE = True
    reason: str


@dataclass(frozen=True, slots=True)
class GatewayReloaded(Event):
    """SIGHUP: ``needs_restart`` on success, ``reason`` on failure."""

    NAME = "gateway.reload"
    OMIT_IF_NONE = frozenset({"reason", "needs_restart"})
    outcome: str
    reason: str | None = None
    needs_restart: list[str] | None = None


Subscriber = Callable[[Event], None]
#: Told how long each audit write took and, for a durable event, the wait for the disk.
AuditTiming = Callable[[float, "float | None"], None]


class EventBus:
    """Publish each event once: the audit writer first, then every subscriber."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self._subscribers: list[Subscriber] = []
        self._timings: list[AuditTiming] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def time_audit(self, observer: AuditTiming) -> None:
        """Tell ``observer`` the audit write (and commit) time of every event (metrics)."""
        self._timings.append(observer)

    def publish(self, event: Event) -> int:
        """Publish a non-durable event now; its audit record's sequence number."""
        if event.DURABLE:
            raise TypeError(f"{event.NAME} is durable: publish it with `await bus.record()`")
        start = time.perf_counter()
        seq = self.audit.write(event.NAME, **event.record())
        self._timed(time.perf_counter() - start, None)
        self._deliver(event)
        return seq

    async def record(self, event: Event) -> int:
        """Publish an event and return once its audit record is on disk."""
        start = time.perf_counter()
        seq = self.audit.write(event.NAME, **event.record())
        written = time.perf_counter()
        await self.audit.commit(seq)
        self._timed(written - start, time.perf_counter() - written)
        self._deliver(event)
        return seq

    def _timed(self, write: float, commit: float | None) -> None:
        for observer in self._timings:
            try:
                observer(write, commit)
            except Exception:
                log.exception("audit timing observer failed")

    async def flush(self) -> None:
        """Wait until every event published so far is on disk."""
        await self.audit.commit()

    def _deliver(self, event: Event) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber failed", record=event.NAME)
