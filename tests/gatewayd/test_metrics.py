"""Metrics fed by the events on the bus, readiness, and the HTTP answers, without sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gatewayd import event as ev
from gatewayd.metrics import MAX_REQUEST, Metrics, MetricsServer, Readiness

CONTEXT = {
    "session": "s1",
    "user": "alice",
    "agent": "pc1",
    "target": "rdp",
    "mode": "access",
    "source": "192.0.2.1:5000",
    "reason_given": "ticket",
}


def values(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_each_event_moves_its_metric() -> None:
    m = Metrics()
    attempt: dict[str, Any] = dict(
        session="s1", user="alice", source="x", mode="access", agent="pc1"
    )
    m(ev.AuthAttempt(factor="password", outcome="success", reason="ok", **attempt))
    m(ev.AuthAttempt(factor="totp", outcome="failure", reason="wrong code", **attempt))
    m(ev.AuthLocked(user="alice", failures=5, seconds=60.0))
    m(ev.AgentConnected(agent="pc1", org="clinic", source="x", targets=["rdp"]))
    m(ev.SessionStarted(expires=1.0, approved_by=None, **CONTEXT))
    m(ev.TunnelStarted(tunnel="t1", **CONTEXT))
    m(
        ev.ApprovalAnswered(
            request="r", outcome="approved", by="bob", reason=None, seconds=7.0, **CONTEXT
        )
    )
    m(ev.TunnelEnded(tunnel="t1", bytes_up=10, bytes_down=200, duration=1.0, reason="x", **CONTEXT))
    m(ev.TunnelFailed(tunnel="t2", reason="agent did not dial", **CONTEXT))
    m(
        ev.RejectionsSummarised(
            source="x", count=7, codes={"tls": 7}, first="a", last="b", interval=60.0, recorded=10
        )
    )
    m(ev.ConnectionRejected(source="x", code="tls", message="bad"))
    m(ev.GatewayReloaded(outcome="failure", reason="bad config"))
    # A failed dial: tunnel.start, then tunnel.failed with the same id (no tunnel.end).
    m(ev.TunnelStarted(tunnel="t2", **CONTEXT))
    m(ev.TunnelFailed(tunnel="t2", reason="no answer", **CONTEXT))
    # An agent back before its old connection is seen gone: still one, and online.
    m(ev.AgentConnected(agent="pc1", org="clinic", source="y", targets=["rdp"]))
    m(ev.AgentDisconnected(agent="pc1", source="x", reason="replaced"))
    m.audit_timing(0.0001, 0.002)
    m.audit_timing(0.0001, None)
    v = values(m)
    assert (
        v[("gatewayd_auth_attempts_total", (("factor", "password"), ("outcome", "success")))] == 1
    )
    assert v[("gatewayd_auth_attempts_total", (("factor", "totp"), ("outcome", "failure")))] == 1
    assert v[("gatewayd_lockouts_total", ())] == 1
    assert v[("gatewayd_agents_online", ())] == 1
    assert v[("gatewayd_sessions_live", ())] == 1
    assert v[("gatewayd_sessions_opened_total", (("mode", "access"),))] == 1
    assert v[("gatewayd_tunnels_live", ())] == 0
    assert v[("gatewayd_tunnels_failed_total", ())] == 2
    assert v[("gatewayd_relayed_bytes_total", (("direction", "up"),))] == 10
    assert v[("gatewayd_relayed_bytes_total", (("direction", "down"),))] == 200
    assert v[("gatewayd_approval_wait_seconds_sum", (("outcome", "approved"),))] == 7.0
    assert v[("gatewayd_connections_rejected_total", ())] == 8
    assert v[("gatewayd_reloads_total", (("outcome", "failure"),))] == 1
    assert v[("gatewayd_audit_write_seconds_count", ())] == 2
    assert v[("gatewayd_audit_commit_seconds_count", ())] == 1


def test_the_bus_feeds_a_subscriber_after_the_audit_writer(tmp_path: Path) -> None:
    from gatewayd.audit import AuditLog

    async def run() -> Metrics:
        log = AuditLog(tmp_path / "audit.jsonl", node="t", fsync=False)
        bus = ev.EventBus(log)
        m = Metrics()
        bus.subscribe(m)
        bus.time_audit(m.audit_timing)
        bus.publish(ev.AgentConnected(agent="pc1", org="o", source="x", targets=[]))
        await bus.record(ev.GatewayStopped(reason="signal"))
        await log.close()
        return m

    v = values(asyncio.run(run()))
    assert v[("gatewayd_agents_online", ())] == 1
    assert v[("gatewayd_audit_write_seconds_count", ())] == 2
    assert v[("gatewayd_audit_commit_seconds_count", ())] == 1


def readiness(**over: Any) -> Readiness:
    cert = Path(__file__).parent / "no-such-cert.pem"
    base: dict[str, Any] = dict(
        accepting=lambda: True,
        audit_failure=lambda: None,
        store_ping=lambda: None,
        cert_file=lambda: cert,
        cert_days=lambda: 14.0,
        now=lambda: 0.0,
    )
    base.update(over)
    return Readiness(**base)


def test_readiness_names_each_reason() -> None:
    async def broken_store() -> None:
        raise OSError("connection refused")

    problems = asyncio.run(
        readiness(
            accepting=lambda: False,
            audit_failure=lambda: "disk full",
            store_ping=broken_store,
        ).problems()
    )
    assert problems[0] == "draining: not taking new sessions"
    assert problems[1] == "audit log not writable: disk full"
    assert problems[2] == "store not reachable: OSError: connection refused"
    assert problems[3].startswith("server certificate unreadable")


async def answer(data: bytes, *, eof: bool = True) -> bytes:
    reader = asyncio.StreamReader(limit=MAX_REQUEST)
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return await MetricsServer(Metrics(), readiness())._answer(reader)


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
        (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", b"200"),
        (b"GET /readyz HTTP/1.1\r\n\r\n", b"503"),  # the certificate is not there
        (b"GET /nope HTTP/1.1\r\n\r\n", b"404"),
        (b"DELETE /metrics HTTP/1.1\r\n\r\n", b"405"),
        (b"GET /metrics\r\n\r\n", b"400"),
        (b"\x00\xff\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\n", b"400"),  # cut short
        (b"GET /" + b"a" * (MAX_REQUEST + 10) + b" HTTP/1.1\r\n\r\n", b"400"),
    ],
)
def test_http_answers(request_: bytes, status: bytes) -> None:
    reply = asyncio.run(answer(request_))
    assert reply.split(b" ", 2)[1] == status
    assert b"Connection: close" in reply
