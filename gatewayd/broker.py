"""The session broker: reads each connection's first message and hands it to its part.

One :class:`Broker` per gatewayd process. Each accepted TLS connection is handed
to :meth:`Broker.handle`, which reads its first message and serves its role with
the part that owns it:

- ``client_hello``: :class:`gatewayd.session.Sessions` (login by
  :class:`gatewayd.login.Login`, the policy's decision, approval, the session);
- ``tunnel``: :class:`gatewayd.tunnel.Tunnels` (ask the session's agent to dial,
  pair its data connection, the durable ``tunnel.start``, splice);
- ``agent_hello``: :class:`gatewayd.agent.Agents` (an enrolled agent's control
  connection, mutual TLS);
- ``data``: an agent's answer to a dial request (:class:`gatewayd.tunnel.DialPairing`);
- ``enroll``: :class:`gatewayd.enrollment.Enrollment` (a token for a certificate);
- ``register``: :func:`gatewayd.fido2_registration.serve_registration`.

The parts share the store, the event bus (every audit record is an event published
there, :mod:`gatewayd.event`), the config holder and one clock
(:class:`gatewayd.clock.Clock`); the broker builds them, answers the admin socket's
queries about live state, and drains them at shutdown. Whatever a part raises ends
only that connection, with a generic error to the peer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from relay import message as m
from relay.aio import ConnectionClosed, FramedLink
from relay.errors import ConfigError, ProtocolError, RemoteError, TLSBindingError

from . import ca
from .access import Access
from .agent import AgentConn, Agents
from .audit import AuditError, AuditLog
from .clock import Clock
from .config import Config, ConfigHolder
from .enrollment import Enrollment
from .event import EventBus
from .fido2_registration import serve_registration
from .login import AUTH_STEP_TIMEOUT, Login, RateLimiter, source_key
from .rejection import RejectionLog
from .session import Approvals, Session, SessionDirectory, Sessions
from .store import Store, StoreError, StoreUnavailable
from .tunnel import DialError, DialPairing, Tunnels

__all__ = [
    "AUTH_STEP_TIMEOUT",
    "AgentConn",
    "Broker",
    "DialError",
    "RateLimiter",
    "Session",
    "source_key",
]

log = structlog.get_logger("gatewayd.broker")


class Broker:
    def __init__(
        self,
        config: Config | ConfigHolder,
        store: Store,
        audit: AuditLog,
        *,
        now: Callable[[], float] = time.time,
        clock: Clock | None = None,
    ) -> None:
        self.holder = config if isinstance(config, ConfigHolder) else ConfigHolder(config)
        config = self.holder.current
        self.store = store
        self.audit = audit
        self.clock = clock if clock is not None else Clock(now=now)
        self.now = self.clock.now
        #: Every audit record of the parts is an event published here (the audit writer first).
        self.bus = EventBus(audit)
        self.ca_key, self.ca_cert = ca.load_ca(config.tls.ca_file, config.tls.ca_key_file)
        self.accepting = True
        self.tasks: set[asyncio.Task[Any]] = set()
        #: connection.rejected records, bounded per source (a flood cannot fill the disk).
        self.rejections = RejectionLog(self.bus)
        holder, bus, clock_ = self.holder, self.bus, self.clock
        self.login = Login(holder, store, bus, clock_)
        self.access = Access(holder, store, clock_)
        self.dials = DialPairing()
        self.approvals = Approvals()
        self.agents = Agents(
            store,
            bus,
            self.rejections,
            clock_,
            on_dial_failed=self.dials.fail,
            on_approval=self.approvals.answer,
        )
        self.sessions = self._directory(config)
        self.clients = Sessions(
            holder,
            store,
            bus,
            clock_,
            login=self.login,
            access=self.access,
            directory=self.sessions,
            approvals=self.approvals,
            rejections=self.rejections,
        )
        self.tunnels = Tunnels(
            holder,
            bus,
            clock_,
            access=self.access,
            directory=self.sessions,
            dials=self.dials,
            rejections=self.rejections,
            verified_agent=self.agents.verified,
            spawn=self.spawn,
        )
        self.enrollment = Enrollment(
            holder,
            store,
            bus,
            clock_,
            rejections=self.rejections,
            ca_key=self.ca_key,
            ca_cert=self.ca_cert,
        )

    def _directory(self, config: Config) -> SessionDirectory:
        """Alone: this node's agents and sessions; with ``[cluster]``: every node's."""
        if config.cluster is None:
            return SessionDirectory(self.agents)
        from .cluster.directory import ClusterDirectory  # aiomqtt only for a cluster

        return ClusterDirectory(
            self.agents,
            config.cluster,
            events=self.bus,
            dials=self.dials,
            approvals=self.approvals,
            revalidate=self.revalidate,
        )

    async def start(self) -> None:
        """Join the cluster, if there is one."""
        await self.sessions.start()

    @property
    def config(self) -> Config:
        """The config in force (SIGHUP replaces it in the holder all parts share)."""
        return self.holder.current

    @config.setter
    def config(self, value: Config) -> None:
        self.holder.current = value

    @property
    def auth_limiter(self) -> RateLimiter:
        """Logins, registrations and enrollments per source (SIGHUP sets its limit)."""
        return self.login.auth_limiter

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
                m.SpareHello,
                m.TunnelSpare,
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
                keep_open = await self._agent(link, hello)
            elif isinstance(hello, m.DataHello):
                keep_open = await self._data(link, hello)
            elif isinstance(hello, m.SpareHello):
                keep_open = await self.tunnels.serve_spare(link, hello)
            elif isinstance(hello, m.TunnelSpare):
                keep_open = await self.tunnels.serve_client_spare(link, hello)
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
        except StoreUnavailable as exc:
            # PostgreSQL down: fail closed, and say so (the daemon's log names the cause).
            log.error("directory database unavailable", source=link.peer, error=str(exc))
            link.send_error("unavailable", "the gateway cannot reach its directory database")
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

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- roles (each a method, so that a test's broker can stand between) -------------

    async def _client(self, link: FramedLink, hello: m.ClientHello) -> None:
        await self.clients.serve(link, hello)

    async def _tunnel(self, link: FramedLink, hello: m.TunnelHello) -> bool:
        return await self.tunnels.serve(link, hello)

    async def _agent(self, link: FramedLink, hello: m.AgentHello) -> bool:
        return await self.agents.serve(link, hello)

    async def _data(self, link: FramedLink, hello: m.DataHello) -> bool:
        return await self.tunnels.serve_data(link, hello)

    async def _register(self, link: FramedLink, hello: m.RegisterHello) -> None:
        """A person registers a factor credential (a security key) with a one-time code."""
        await serve_registration(self, link, hello)

    async def _enroll(self, link: FramedLink, hello: m.EnrollRequest) -> None:
        await self.enrollment.serve(link, hello)

    # -- queries and control (the admin socket) --------------------------------------

    def kill_session(self, sid: str, reason: str) -> bool:
        return self.sessions.end(sid, reason)

    def session_rows(self) -> list[dict[str, Any]]:
        return self.sessions.rows()

    async def end_session(self, sid: str, reason: str) -> bool:
        """End a live session on whichever node holds it; False when none does."""
        return await self.sessions.end_anywhere(sid, reason)

    def cluster_status(self) -> dict[str, Any] | None:
        """The cluster as this node sees it (None for a node alone)."""
        return self.sessions.status()

    def session_count(self) -> int:
        return len(self.sessions)

    def rejections_pending(self) -> int:
        """Rejected connections counted towards a summary record not written yet."""
        return self.rejections.pending

    def online_agents(self) -> dict[str, frozenset[str]]:
        """The agents online here, each with the targets it offers."""
        return {a.id: a.targets for a in self.agents.online.values()}

    async def revalidate(self, why: str) -> int:
        """After a directory change: end every live session the policy no longer allows."""
        return await self.clients.revalidate(why)

    async def drain(self, timeout: float) -> None:
        """Stop taking sessions; wait up to ``timeout`` for tunnels, then end the rest."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        # Polling a few times a second is plenty for a once-per-lifetime drain.
        while any(s.tunnels for s in self.sessions.live()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        for s in self.sessions.live():
            s.end("gateway shutting down")
        self.agents.shutdown()
        deadline = time.monotonic() + 2.0
        while (self.sessions or self.tasks) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.sessions.close()
