"""The daemon's life cycle: start-up, serve, reload on SIGHUP, drain on SIGTERM.

:func:`serve` does every side effect the config implies (open the store and the
audit log, load keys, bind the port and the admin socket), tells systemd it is
ready, and runs until a signal asks it to stop.

Connections are accepted as plain TCP and upgraded with ``loop.start_tls`` so that
a failed TLS handshake (a port scanner, a client that does not trust our CA) is
seen, audited and closed without disturbing anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import ssl
from typing import Any

import structlog

from auth import registry
from relay.aio import FramedLink
from relay.errors import GatewayError
from relay.protocol import Side
from relay.tls import server_context

from . import config as config_mod
from . import malloc, systemd
from . import metrics as metrics_mod
from .admin import AdminServer
from .admission import Admission, AdmissionFull
from .audit import AuditLog, open_audit_log
from .broker import Broker
from .config import Config, ConfigHolder
from .event import GatewayReloaded, GatewayStarted, GatewayStopped
from .login import source_key
from .logs import log_failed_logins
from .store import Store, load_secrets_key

log = structlog.get_logger("gatewayd")

#: Seconds SIGTERM waits for open tunnels before ending them.
DRAIN_TIMEOUT = 10.0
#: Seconds between looks for rejected-connection summaries whose interval is over.
SUMMARY_EVERY = 5.0


def lock_file(path: os.PathLike[str], what: str) -> int:
    """Hold an exclusive lock on ``path`` (created if missing) for the life of the process.

    flock(2) locks are the file's, not SQLite's (which uses fcntl record locks), so
    this does not disturb the database; the descriptor stays open until exit.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise GatewayError(f"cannot open {what} {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise GatewayError(
            f"another gatewayd is already running with {what} {path}; stop it first, "
            "or give this one its own [store] and [audit] paths"
        ) from exc
    return fd


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port and hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise GatewayError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class Gateway:
    def __init__(self, config: Config, *, worker: int = 0) -> None:
        #: The config in force, shared by every part; SIGHUP replaces it here.
        self.holder = ConfigHolder(config)
        #: ``gatewayd --workers N``: this worker's number (0: not a worker); a reload
        #: makes the file's config this worker's again (gatewayd.cluster.workers).
        self.worker = worker
        self.ssl_context: ssl.SSLContext | None = None
        self.stopping = asyncio.Event()
        self.reloads = 0

    @property
    def config(self) -> Config:
        return self.holder.current

    def load_tls(self, config: Config | None = None) -> ssl.SSLContext:
        tls = (config or self.config).tls
        try:
            return server_context(tls.cert_file, tls.key_file, tls.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise GatewayError(f"cannot load TLS files ({tls.cert_file}): {exc}") from exc

    async def run(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        self.ssl_context = self.load_tls()
        keylog = os.environ.get("SSLKEYLOGFILE")
        if keylog:
            log.warning(
                "SSLKEYLOGFILE is set: gatewayd writes every TLS session secret to this file; "
                "anyone who can read it can decrypt the captured traffic. Unset it unless "
                "you are debugging on purpose.",
                sslkeylogfile=keylog,
            )
        # One process per state database and audit log, before either is touched (the
        # nodes of a cluster share the database; each keeps an audit log of its own).
        cfg.store.path.parent.mkdir(parents=True, exist_ok=True)
        state_lock = lock_file(cfg.store.path, "the state database") if cfg.cluster is None else -1
        try:
            audit = open_audit_log(cfg)
        except GatewayError:
            if state_lock >= 0:
                os.close(state_lock)
            raise
        # The directory: PostgreSQL shared by a cluster's nodes, else SQLite.
        database = cfg.cluster.database if cfg.cluster is not None else None
        try:
            store = await Store.open(
                database or cfg.store.path, load_secrets_key(cfg.store.secrets_key_file)
            )
        except GatewayError:
            if state_lock >= 0:
                os.close(state_lock)
            raise
        audit.start()
        audit.write_startup_records()
        broker = Broker(self.holder, store, audit)
        _warn_factor_files(cfg)
        admin = AdminServer(store, audit, broker)
        host, port = cfg.gateway.listen
        sock = bind(host, port, cfg.gateway.reuse_port)
        # One admission for both ports: the caps bound this process's handshakes.
        admission = Admission(cfg.gateway.max_handshakes, cfg.gateway.max_handshakes_per_source)
        acceptor = loop.create_task(accept_loop(self, sock, broker, audit, admission))
        # A node's own port for the data connections agents dial for its clients.
        data_listen = cfg.cluster.data_listen if cfg.cluster is not None else None
        data_sock = bind(*data_listen, reuse_port=False) if data_listen is not None else None
        data_acceptor = (
            loop.create_task(accept_loop(self, data_sock, broker, audit, admission))
            if data_sock
            else None
        )
        summaries = loop.create_task(_summaries(broker))
        trimmer = loop.create_task(malloc.trim_every())  # freed heap pages go back
        await admin.start()
        broker.bus.subscribe(log_failed_logins)  # one warning line per failed login
        metrics = await metrics_mod.start(
            self.holder,
            broker.bus,
            accepting=lambda: broker.accepting and not self.stopping.is_set(),
            audit=audit,
            store_ping=lambda: store.org_exists(""),
        )
        await broker.start()  # the cluster bus, with [cluster]
        bound = sock.getsockname()
        await broker.bus.record(
            GatewayStarted(
                listen=f"{bound[0]}:{bound[1]}",
                config=str(cfg.path),
                version=1,
                tls_keylog=bool(keylog),
                reuse_port=cfg.gateway.reuse_port,
                pid=os.getpid(),
            )
        )
        for sig, handler in (
            (signal.SIGTERM, self.stopping.set),
            (signal.SIGINT, self.stopping.set),
            (signal.SIGHUP, lambda: broker.spawn(self.reload(broker, audit))),
        ):
            loop.add_signal_handler(sig, handler)
        watchdog = systemd.watchdog_interval()
        dog = loop.create_task(self._watchdog(watchdog)) if watchdog else None
        malloc.settle()  # start-up's garbage and freed heap pages go before serving
        systemd.notify("READY=1", f"STATUS=listening on {host}:{bound[1]}")
        log.info("gatewayd ready", listen=f"{host}:{bound[1]}", admin=str(cfg.admin.socket))
        try:
            await self.stopping.wait()
        finally:
            systemd.notify("STOPPING=1")
            log.info("gatewayd stopping")
            acceptor.cancel()
            sock.close()
            if data_acceptor is not None and data_sock is not None:
                data_acceptor.cancel()
                data_sock.close()
            await admin.close()
            if metrics is not None:
                await metrics.close()
            await broker.drain(DRAIN_TIMEOUT)
            if dog is not None:
                dog.cancel()
            summaries.cancel()
            trimmer.cancel()
            broker.rejections.flush_all()  # nothing counted is left off the record
            with contextlib.suppress(GatewayError):
                await broker.bus.record(GatewayStopped(reason="signal"))
            await audit.close()
            await store.close()
            if state_lock >= 0:
                os.close(state_lock)

    async def reload(self, broker: Broker, audit: AuditLog) -> None:
        """SIGHUP: re-read config and certificates; live tunnels are untouched."""
        systemd.notify("RELOADING=1")
        try:
            new = config_mod.load(self.config.path)
            if self.worker:
                from .cluster.workers import worker_config

                new = worker_config(new, self.worker)
            ctx = self.load_tls(new)
        except GatewayError as exc:
            log.error("reload failed; keeping the running config", error=str(exc))
            broker.bus.publish(GatewayReloaded(outcome="failure", reason=str(exc)))
            systemd.notify("READY=1")
            return
        old = self.config
        self.holder.current = new  # the broker, admin server and registration read it here
        self.ssl_context = ctx
        broker.auth_limiter.limit = new.limits.auth_per_minute
        for failure in registry.reload(new.auth):  # each factor's hook, plug-ins' too
            log.error("factor reload failed", error=failure)
        _warn_factor_files(new)
        fixed = [
            name
            for name, a, b in (
                ("gateway.listen", old.gateway.listen, new.gateway.listen),
                ("store", old.store, new.store),
                ("audit", old.audit, new.audit),
                ("admin", old.admin, new.admin),
                ("cluster", old.cluster, new.cluster),
                ("metrics.listen", old.metrics.listen, new.metrics.listen),
                ("metrics.enabled", old.metrics.enabled, new.metrics.enabled),
            )
            if a != b
        ]
        broker.bus.publish(GatewayReloaded(outcome="success", needs_restart=fixed))
        self.reloads += 1
        systemd.notify("READY=1")

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def _warn_factor_files(cfg: Config) -> None:
    """Say so when a factor's files (CA certificates, CRLs) are unusable.

    The daemon still serves: modes that do not need the factor work, and each login
    that does fails with its reason in the audit record (``settings invalid``).
    """
    try:
        unfilled = config_mod.check_factor_files(cfg)
    except GatewayError as exc:
        log.warning("logins with this factor will fail until fixed", error=str(exc))
        return
    for warning in unfilled:
        log.warning("logins with this factor will fail until configured", warning=warning)


async def _summaries(broker: Broker) -> None:
    """Write the summaries of rejected connections whose interval is over, also when quiet."""
    while True:
        await asyncio.sleep(SUMMARY_EVERY)
        broker.rejections.flush_due(broker.now())


async def accept_loop(
    gateway: Gateway,
    sock: socket.socket,
    broker: Broker,
    audit: AuditLog,
    admission: Admission | None = None,
) -> None:
    """Accept TCP connections; each is upgraded to TLS and served in its own task.

    The handshakes are admitted by ``admission`` (:mod:`gatewayd.admission`): a global cap
    and a per-source cap; a connection waiting for its slot is not read from."""
    loop = asyncio.get_running_loop()
    if admission is None:
        section = gateway.config.gateway
        admission = Admission(section.max_handshakes, section.max_handshakes_per_source)
    while True:
        try:
            conn, peer = await loop.sock_accept(sock)
        except OSError as exc:  # EMFILE and friends: back off, never die
            log.warning("accept failed", error=str(exc))
            await asyncio.sleep(0.1)
            continue
        broker.spawn(_upgrade(gateway, conn, peer, broker, audit, admission))


async def _upgrade(
    gateway: Gateway,
    conn: socket.socket,
    peer: Any,
    broker: Broker,
    audit: AuditLog,
    admission: Admission,
) -> None:
    """Wait for a handshake slot, TLS handshake (a failure is counted in the rejection
    summaries), then hand the link to the broker. The wait counts towards the timeout."""
    source = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
    key = source_key(source)
    timeout = gateway.config.gateway.handshake_timeout
    assert gateway.ssl_context is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout(timeout):
            await admission.enter(key)
    except TimeoutError:
        conn.close()
        reason = f"no TLS handshake slot within {timeout:g} seconds (too many at once)"
        broker.rejections.reject(source, "tls", reason, broker.now())
        return
    except AdmissionFull:  # the peer backs off and comes back (see gatewayd.admission)
        conn.close()
        reason = "too many TLS handshakes waiting; try again later"
        broker.rejections.reject(source, "tls", reason, broker.now())
        return
    except asyncio.CancelledError:  # the gateway stops: the waiting socket goes too
        conn.close()
        raise
    left = max(deadline - loop.time(), 0.001)
    # The link's own deadline (first message) starts now; a spare data connection's later
    # handshake gets the whole timeout again, so the link keeps the configured one.
    link = FramedLink(Side.ACCEPTOR, handshake_timeout=timeout)
    try:
        # uvloop returns its SSL protocol here, not ours: keep our own reference.
        await loop.connect_accepted_socket(
            lambda: link,
            conn,
            ssl=gateway.ssl_context,
            ssl_handshake_timeout=left,
        )
    except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
        conn.close()
        reason = str(exc)[:200] or type(exc).__name__
        broker.rejections.reject(source, "tls", reason, broker.now())
        return
    finally:
        admission.leave(key)
    await broker.handle(link)


async def serve(config: Config, *, worker: int = 0) -> None:
    await Gateway(config, worker=worker).run()
