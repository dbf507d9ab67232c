"""Prometheus metrics and health endpoints on a small local HTTP listener.

Theory of operation
-------------------

``prometheus-client`` and the certificate parser are imported by the code that uses
them, so a daemon without ``[metrics]`` never loads them (4 MiB of memory saved).

:class:`Metrics` is an :class:`~gatewayd.event.EventBus` subscriber: every typed event
the daemon publishes (an auth attempt, a session started, a tunnel ended...) updates
its counters, gauges and histograms, so no code that publishes knows of metrics. The
bus also reports how long each audit write and each wait for the disk took
(:meth:`Metrics.audit_timing`).

:class:`MetricsServer` serves them with ``[metrics] enabled = true`` (default off) on
``[metrics] listen`` (``127.0.0.1:9464``): plain HTTP/1.1, one request per connection,
``GET`` only, on the daemon's own event loop. It reads at most :data:`MAX_REQUEST`
bytes of request head within :data:`READ_TIMEOUT` seconds and serves at most
:data:`MAX_CLIENTS` connections at once; anything else gets a ``400``/``404``/``405``
and the connection is closed, so junk cannot stall the loop or the daemon.

- ``/metrics``: Prometheus text format (``prometheus-client``'s exposition).
- ``/healthz``: ``200 ok`` while the loop answers (alive).
- ``/readyz``: ``200 ready`` when the daemon can take sessions: accepting (not
  draining), the audit log writable, the store answering, and the server certificate
  valid for more than ``[metrics] cert_days`` days; else ``503`` and one line per
  failed check.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import platform
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from relay.errors import GatewayError

from . import event as ev
from .audit import AuditLog
from .config import ConfigHolder
from .event import EventBus

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = structlog.get_logger("gatewayd.metrics")

#: Bytes of request line and headers read at most (a scraper sends a few hundred).
MAX_REQUEST = 8192
#: Seconds a client has to send its request head (a slow-loris holds nothing longer).
READ_TIMEOUT = 5.0
#: Connections served at once; more are closed at once (Prometheus uses one).
MAX_CLIENTS = 32

#: Buckets of the audit write and commit latencies: 50 us to 2.5 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    *(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05),
    *(0.1, 0.25, 0.5, 1.0, 2.5),
)
#: Buckets of the wait for a person's approval (the timeout is at most 600 s).
APPROVAL_BUCKETS = (1.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gatewayd")
    except PackageNotFoundError:  # pragma: no cover - a source tree without metadata
        return "unknown"


class Metrics:
    """The daemon's metrics, fed by the events on the bus."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # prometheus-client (4 MiB of the daemon's memory) is imported only here, by a
        # daemon with [metrics] enabled.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Gauge(
            "gatewayd_build_info",
            "Version of gatewayd and Python",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(_version(), platform.python_version()).set(1)
        self.agents_online = Gauge(
            "gatewayd_agents_online", "Agents holding a control connection to this node", registry=r
        )
        self.sessions_live = Gauge("gatewayd_sessions_live", "Sessions open now", registry=r)
        self.sessions_opened = Counter(
            "gatewayd_sessions_opened", "Sessions started", ["mode"], registry=r
        )
        self.sessions_refused = Counter(
            "gatewayd_sessions_refused", "Session requests refused", ["mode"], registry=r
        )
        self.tunnels_live = Gauge("gatewayd_tunnels_live", "Tunnels open now", registry=r)
        self.tunnels_opened = Counter(
            "gatewayd_tunnels_opened", "Tunnels started", ["mode"], registry=r
        )
        self.tunnels_failed = Counter(
            "gatewayd_tunnels_failed", "Tunnels refused or failed before they started", registry=r
        )
        self.relayed = Counter(
            "gatewayd_relayed_bytes",
            "Bytes relayed through tunnels, counted when each tunnel ends "
            "(up: client to agent, down: agent to client)",
            ["direction"],
            registry=r,
        )
        self.auth_attempts = Counter(
            "gatewayd_auth_attempts",
            "Factors checked at login",
            ["factor", "outcome"],
            registry=r,
        )
        self.lockouts = Counter("gatewayd_lockouts", "Accounts locked after failures", registry=r)
        self.approval_wait = Histogram(
            "gatewayd_approval_wait_seconds",
            "How long the person at the machine took to answer (or the timeout)",
            ["outcome"],
            buckets=APPROVAL_BUCKETS,
            registry=r,
        )
        self.enrollments = Counter(
            "gatewayd_agent_enrollments", "Enrollment tokens presented", ["outcome"], registry=r
        )
        self.rejected = Counter(
            "gatewayd_connections_rejected",
            "Connections turned away before they had a role (TLS, junk, rate limits)",
            registry=r,
        )
        self.audit_write = Histogram(
            "gatewayd_audit_write_seconds",
            "Time to append one audit record",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.audit_commit = Histogram(
            "gatewayd_audit_commit_seconds",
            "Time from writing a durable audit record until it is on disk (fsync, group commit)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.audit_failed = Gauge(
            "gatewayd_audit_failed",
            "1 while the audit log cannot be written (new sessions are refused)",
            registry=r,
        )
        # What is live, by id: an event that comes twice or out of order (a failed dial
        # has tunnel.start then tunnel.failed; an agent reconnects before its old
        # connection is seen gone) cannot push a gauge off.
        self._agents: dict[str, int] = {}
        self._sessions: set[str] = set()
        self._tunnels: set[str] = set()
        self.reloads = Counter(
            "gatewayd_reloads", "Config reloads (SIGHUP)", ["outcome"], registry=r
        )

    def __call__(self, event: ev.Event) -> None:
        """The EventBus subscriber."""
        match event:
            case ev.AuthAttempt():
                self.auth_attempts.labels(event.factor, event.outcome).inc()
            case ev.AuthLocked():
                self.lockouts.inc()
            case ev.SessionStarted():
                self.sessions_opened.labels(event.mode).inc()
                self._sessions.add(event.session)
                self.sessions_live.set(len(self._sessions))
            case ev.SessionEnded():
                self._sessions.discard(event.session)
                self.sessions_live.set(len(self._sessions))
            case ev.SessionRefused():
                self.sessions_refused.labels(event.mode).inc()
            case ev.TunnelStarted():
                self.tunnels_opened.labels(event.mode).inc()
                self._tunnels.add(event.tunnel)
                self.tunnels_live.set(len(self._tunnels))
            case ev.TunnelEnded():
                self._tunnels.discard(event.tunnel)
                self.tunnels_live.set(len(self._tunnels))
                self.relayed.labels("up").inc(max(event.bytes_up, 0))
                self.relayed.labels("down").inc(max(event.bytes_down, 0))
            case ev.TunnelFailed():
                self._tunnels.discard(event.tunnel)
                self.tunnels_live.set(len(self._tunnels))
                self.tunnels_failed.inc()
            case ev.TunnelRefused():
                self.tunnels_failed.inc()
            case ev.ApprovalAnswered():
                self.approval_wait.labels(event.outcome).observe(max(event.seconds, 0.0))
            case ev.AgentConnected():
                self._agents[event.agent] = self._agents.get(event.agent, 0) + 1
                self.agents_online.set(len(self._agents))
            case ev.AgentDisconnected():
                left = self._agents.pop(event.agent, 0) - 1
                if left > 0:  # its newer connection is still there
                    self._agents[event.agent] = left
                self.agents_online.set(len(self._agents))
            case ev.AgentEnrolled():
                self.enrollments.labels(event.outcome).inc()
            case ev.ConnectionRejected():
                self.rejected.inc()
            case ev.RejectionsSummarised():
                self.rejected.inc(event.count)
            case ev.GatewayReloaded():
                self.reloads.labels(event.outcome).inc()
            case _:
                pass

    def audit_timing(self, write: float, commit: float | None) -> None:
        """The bus's timing of one audit record (commit: None for a non-durable one)."""
        self.audit_write.observe(write)
        if commit is not None:
            self.audit_commit.observe(commit)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


Check = Callable[[], "Awaitable[str | None] | str | None"]


@dataclass
class Readiness:
    """What ``/readyz`` asks; each check returns None (fine) or why not."""

    accepting: Callable[[], bool]
    audit_failure: Callable[[], str | None]
    store_ping: Callable[[], Any]
    cert_file: Callable[[], Path]
    cert_days: Callable[[], float]
    now: Callable[[], float]

    async def problems(self) -> list[str]:
        out = []
        if not self.accepting():
            out.append("draining: not taking new sessions")
        failure = self.audit_failure()
        if failure is not None:
            out.append(f"audit log not writable: {failure}")
        try:
            result = self.store_ping()
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, READ_TIMEOUT)
        except Exception as exc:  # any failure of the store is "not ready"
            out.append(f"store not reachable: {type(exc).__name__}: {exc}")
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(self.cert_file().read_bytes())
            left = cert.not_valid_after_utc.timestamp() - self.now()
            if left < self.cert_days() * 86400:
                expires = cert.not_valid_after_utc.isoformat()
                out.append(
                    f"server certificate expires {expires} (within {self.cert_days():g} days)"
                )
        except (OSError, ValueError) as exc:
            out.append(f"server certificate unreadable: {exc}")
        return out


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class MetricsServer:
    """The local HTTP listener of ``/metrics``, ``/healthz`` and ``/readyz``."""

    def __init__(self, metrics: Metrics, readiness: Readiness) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self._server: asyncio.Server | None = None
        self._clients = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST)
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            writer.write(await self._answer(reader))
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except (OSError, TimeoutError, ConnectionError):
            pass
        except Exception:  # never let a request end the listener
            log.exception("metrics request failed")
        finally:
            self._clients -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            return _response("400 Bad Request", b"bad request\n")
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response("400 Bad Request", b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return _response("405 Method Not Allowed", b"GET only\n")
        if target == b"/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            self.metrics.audit_failed.set(1 if self.readiness.audit_failure() else 0)
            return _response("200 OK", self.metrics.exposition(), CONTENT_TYPE_LATEST)
        if target == b"/healthz":
            return _response("200 OK", b"ok\n")
        if target == b"/readyz":
            problems = await self.readiness.problems()
            if problems:
                body = "".join(f"{p}\n" for p in problems).encode()
                return _response("503 Service Unavailable", body)
            return _response("200 OK", b"ready\n")
        return _response("404 Not Found", b"not found: /metrics, /healthz, /readyz\n")


async def start(
    holder: ConfigHolder,
    bus: EventBus,
    *,
    accepting: Callable[[], bool],
    audit: AuditLog,
    store_ping: Callable[[], Any],
) -> MetricsServer | None:
    """With ``[metrics] enabled``: subscribe the metrics to ``bus`` and serve them.

    The listener's address needs a restart to change; ``cert_days`` and the
    certificate's path follow SIGHUP.
    """
    section = holder.current.metrics
    if not section.enabled:
        return None
    metrics = Metrics()
    bus.subscribe(metrics)
    bus.time_audit(metrics.audit_timing)
    readiness = Readiness(
        accepting=accepting,
        audit_failure=lambda: audit.failure,
        store_ping=store_ping,
        cert_file=lambda: holder.current.tls.cert_file,
        cert_days=lambda: holder.current.metrics.cert_days,
        now=time.time,
    )
    server = MetricsServer(metrics, readiness)
    host, port = section.listen
    try:
        bound = await server.start(host, port)
    except OSError as exc:
        raise GatewayError(
            f"cannot listen for metrics on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    log.info("metrics listening", listen=f"{bound[0]}:{bound[1]}")
    return server
