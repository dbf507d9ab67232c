"""Admission of new connections to their TLS handshake: a global cap and a per-source cap.

A TLS handshake is the costliest thing an unauthenticated peer can make gatewayd do. All of
them share one event loop: unbounded, a crowd reconnecting at once (10,000 agents after a
restart) shares it so thinly that no handshake finishes within ``handshake_timeout`` and
every one starts over. A global cap alone fixes that crowd, but then a few dozen peers
that connect and never send a ClientHello hold every slot until they time out, and each
new connection waits behind them (slowloris). So a source (an IPv4 address, an IPv6 /64:
:func:`gatewayd.login.source_key`, as the rate limits count them) holds at most
``per_source`` of the ``total`` slots; its further connections wait in its own FIFO
queue, and a freed slot goes to the sources with waiters in turn (round robin).

A waiting connection is an accepted socket the loop does not read, a future and nothing
else: it costs no processor time. The caller bounds the wait (it counts towards the
handshake timeout) by cancelling :meth:`Admission.enter`.

The queues are bounded too: at most :data:`WAITING_PER_SLOT` connections wait per slot
(``total`` of them in all, ``per_source`` of one source), and one more is turned away at
once (:class:`AdmissionFull`). A crowd larger than the gateway can serve within the
timeout only waited for nothing before: each of those connections held its peer for
the whole timeout, and those whose turn came just before it (their peer about to give
up) cost a handshake that was thrown away. Turned away at once, the peer backs off
(an agent's wait doubles, with full jitter) and the crowd spreads itself over time at
the rate the gateway serves; the connections that do wait are served within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field

#: Connections allowed to wait per handshake slot (globally and per source). The slots
#: serve a few hundred handshakes a second on a small machine: a queue this long is
#: served within a second or two, far inside any handshake timeout.
WAITING_PER_SLOT = 4


class AdmissionFull(Exception):
    """Too many connections wait for a handshake slot already: turn this one away now."""


@dataclass(slots=True)
class _Source:
    active: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class Admission:
    """At most ``total`` handshakes at once, at most ``per_source`` of them per source."""

    def __init__(self, total: int, per_source: int) -> None:
        if total < 1 or per_source < 1:
            raise ValueError("handshake caps must be at least 1")
        self.total = total
        self.per_source = min(per_source, total)
        self.active = 0
        #: Connections waiting in all, and at most how many may (see the module's doc).
        self.waiting = 0
        self.max_waiting = WAITING_PER_SLOT * self.total
        self.max_waiting_per_source = WAITING_PER_SLOT * self.per_source
        self._sources: dict[str, _Source] = {}
        #: Sources with a waiter and a free slot of their own, in the order they get one.
        self._ready: dict[str, None] = {}

    async def enter(self, key: str) -> None:
        """Wait for a handshake slot for source ``key``; :meth:`leave` gives it back.

        Raises :class:`AdmissionFull` at once when too many wait already (in all, or of
        this source). Cancelled (a timeout), the connection holds nothing and leaves its
        queue."""
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = _Source()
        if not source.waiting and source.active < self.per_source and self.active < self.total:
            self._grant(source)
            return
        if self.waiting >= self.max_waiting or len(source.waiting) >= self.max_waiting_per_source:
            self._forget(key, source)
            raise AdmissionFull(key)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        source.waiting.append(future)
        self.waiting += 1
        if source.active < self.per_source:
            self._ready.setdefault(key, None)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as it was cancelled
                self.leave(key)
                raise
            # A cancelled future may already be gone: _dispatch skips and drops those.
            with contextlib.suppress(ValueError):
                source.waiting.remove(future)
                self.waiting -= 1
            if not source.waiting and self._sources.get(key) is source:
                self._ready.pop(key, None)
                self._forget(key, source)
            raise

    def leave(self, key: str) -> None:
        """The handshake of a connection from ``key`` is over (done or failed)."""
        source = self._sources[key]
        source.active -= 1
        self.active -= 1
        if source.waiting:
            self._ready.setdefault(key, None)
        else:
            self._forget(key, source)
        self._dispatch()

    def _grant(self, source: _Source) -> None:
        source.active += 1
        self.active += 1

    def _dispatch(self) -> None:
        while self.active < self.total and self._ready:
            key = next(iter(self._ready))
            del self._ready[key]
            source = self._sources[key]
            future = source.waiting.popleft()
            self.waiting -= 1
            if not future.cancelled():  # its task is cancelled but has not yet run
                self._grant(source)
                future.set_result(None)
            if not source.waiting:
                self._forget(key, source)
            elif source.active < self.per_source:
                self._ready[key] = None  # to the back: the other sources go first

    def _forget(self, key: str, source: _Source) -> None:
        if not source.active and not source.waiting and self._sources.get(key) is source:
            del self._sources[key]
