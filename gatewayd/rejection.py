"""Rejected connections on the record, without letting a flood fill the disk.

Every connection the gateway turns away before it has a role (a failed TLS
handshake, garbage, an oversized frame, silence) is worth a record, but an
unauthenticated peer must not be able to write one record per connection for as
long as it likes. Per source (an IPv4 host, an IPv6 /64: one subscriber's
addresses) and interval, the first ``per_interval`` rejections get their own
``connection.rejected`` record; the rest are counted, and one
``connection.rejected.summary`` record per source and interval says how many there
were, of which kinds, and when the first and last came. Across all sources at most
``total_per_interval`` rejections per interval get a record of their own, so that
many sources together cannot fill the disk either. Nothing is
dropped: a summary is written when its interval is over (at the next rejection
or the next :meth:`RejectionLog.flush_due`), when the table of sources is full
(the oldest goes first), and at shutdown (:meth:`RejectionLog.flush_all`).

Each record is a typed event (:mod:`gatewayd.event`) published on the daemon's
:class:`~gatewayd.event.EventBus`: ``refuse`` names the refusal (``agent.rejected``,
``auth.rate_limited``...) and :data:`REFUSALS` gives its event class, so the audit
writer and the metrics see the same thing.

Time is a parameter (``now``), so the tests need no clock.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

from .audit import AuditError, AuditLog, now_rfc3339
from .event import (
    AgentRejected,
    AuthRateLimited,
    ConnectionRejected,
    EnrollRateLimited,
    Event,
    EventBus,
    RejectionsSummarised,
    TunnelWithoutSession,
)

log = structlog.get_logger("gatewayd.rejection")

#: Full records per source and interval: enough to see what a scanner or a broken
#: client does, few enough that 3,000 junk connections cost a handful of lines.
PER_INTERVAL = 10
#: Seconds of one interval (the same minute the login rate limit counts in).
INTERVAL = 60.0
#: Own records per interval across all sources (a spread-out flood).
TOTAL_PER_INTERVAL = 600
#: Sources tracked at once; past this the oldest interval is summarised early. Bounds
#: memory under a spread-out flood (about 200 bytes each).
MAX_SOURCES = 10_000

#: The refusals before a role, by record name: the event each one is.
REFUSALS: dict[str, type[Event]] = {
    "agent.rejected": AgentRejected,
    "auth.rate_limited": AuthRateLimited,
    "tunnel.refused": TunnelWithoutSession,
    "agent.enroll": EnrollRateLimited,
}


def source_host(source: str) -> str:
    """``IP`` of ``IP:PORT`` or ``[V6]:PORT``; the whole text when there is no port."""
    host, sep, port = source.rpartition(":")
    if not sep or not port.isdigit():
        return source
    return host.strip("[]") or source


def source_key(source: str) -> str:
    """What one source is: its IPv4 address, or the /64 of its IPv6 address."""
    host = source_host(source)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6 and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address.ipv4_mapped or address) if address.version == 6 else host


@dataclass
class _Window:
    start: float
    seen: int = 0
    recorded: int = 0
    suppressed: int = 0
    first: float = 0.0
    last: float = 0.0
    codes: Counter[str] = field(default_factory=Counter)


class RejectionLog:
    """Writes ``connection.rejected`` records, at most ``per_interval`` per source and interval."""

    def __init__(
        self,
        bus: EventBus | AuditLog,
        *,
        per_interval: int = PER_INTERVAL,
        interval: float = INTERVAL,
        max_sources: int = MAX_SOURCES,
        total_per_interval: int = TOTAL_PER_INTERVAL,
    ) -> None:
        self.bus = bus if isinstance(bus, EventBus) else EventBus(bus)
        self.per_interval = per_interval
        self.interval = interval
        self.max_sources = max_sources
        self.total_per_interval = total_per_interval
        self._total_start = float("-inf")
        self._total = 0
        # Insertion order is start order: a source whose interval ends is re-inserted.
        self._windows: dict[str, _Window] = {}

    def reject(self, source: str, code: str, message: str, now: float, **fields: Any) -> None:
        """One connection from ``source`` was turned away with ``code``."""
        self._admit(
            ConnectionRejected(source=source, code=code, message=message, detail=fields), code, now
        )

    def refuse(self, event: str, source: str, kind: str, now: float, **fields: Any) -> None:
        """Record ``event`` for an unauthenticated peer, within the bounds; ``kind`` is what
        a summary counts it as (``tls``, ``rate_limited``...)."""
        cls = REFUSALS[event]
        named = {f.name for f in dataclasses.fields(cls)} - {"detail"}
        given = {k: v for k, v in fields.items() if k in named}
        detail = {k: v for k, v in fields.items() if k not in named}
        build: Any = cls  # each refusal class takes source, its own fields and detail
        self._admit(build(source=source, detail=detail, **given), kind, now)

    def _admit(self, event: Event, kind: str, now: float) -> None:
        """Publish ``event`` within the bounds, or count it for the summary."""
        self.flush_due(now)
        source: str = getattr(event, "source")  # noqa: B009 - every refusal has one
        host = source_key(source)
        if now >= self._total_start + self.interval:
            self._total_start, self._total = now, 0
        window = self._windows.get(host)
        if window is None:
            if len(self._windows) >= self.max_sources:
                oldest = next(iter(self._windows))
                self._close(oldest, self._windows.pop(oldest))
            window = self._windows[host] = _Window(start=now)
        window.seen += 1
        if window.seen <= self.per_interval and self._total < self.total_per_interval:
            self._total += 1
            window.recorded += 1
            self._write(event)
            return
        if not window.suppressed:
            window.first = now
        window.suppressed += 1
        window.last = now
        window.codes[kind] += 1

    def flush_due(self, now: float) -> None:
        """Summarise every interval that is over."""
        while self._windows:
            host, window = next(iter(self._windows.items()))
            if now < window.start + self.interval:
                return
            del self._windows[host]
            self._close(host, window)

    def flush_all(self) -> None:
        """Summarise every interval now (shutdown)."""
        while self._windows:
            host = next(iter(self._windows))
            self._close(host, self._windows.pop(host))

    @property
    def pending(self) -> int:
        """Rejections counted but not yet on the record in a summary."""
        return sum(w.suppressed for w in self._windows.values())

    def _close(self, host: str, window: _Window) -> None:
        if not window.suppressed:
            return
        self._write(
            RejectionsSummarised(
                source=host,
                count=window.suppressed,
                codes=dict(sorted(window.codes.items())),
                first=now_rfc3339(window.first),
                last=now_rfc3339(window.last),
                interval=self.interval,
                recorded=window.recorded,
            )
        )

    def _write(self, event: Event) -> None:
        try:
            self.bus.publish(event)
        except AuditError as exc:
            # The audit log's failure refuses new sessions; say here what was not recorded.
            log.error(
                "cannot record a rejected connection",
                error=str(exc),
                record=event.NAME,
                **event.record(),
            )
