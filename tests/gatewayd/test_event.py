"""Typed events and the bus: the audit record each makes, durability, subscribers.

A real audit log in a temporary folder; no sockets, no sleeps."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gatewayd.audit import AuditLog
from gatewayd.event import (
    AdminChanged,
    AgentEnrolled,
    AuthAttempt,
    AuthLocked,
    Event,
    EventBus,
    SessionStarted,
    TunnelStarted,
)

CONTEXT = {
    "session": "s1",
    "user": "vera@acme",
    "agent": "pc1",
    "target": "ssh",
    "mode": "access",
    "source": "192.0.2.7:5000",
    "reason_given": "ticket 42",
}


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.jsonl", node="n1", fsync=False)


def test_record_fields_in_order_and_spread() -> None:
    attempt = AuthAttempt(
        session="s1",
        user="vera",
        factor="password",
        outcome="success",
        reason="ok",
        source="192.0.2.7:5000",
        mode="access",
        agent="pc1",
        detail={"rehashed": "scrypt"},
    )
    assert list(attempt.record()) == [
        "session",
        "user",
        "factor",
        "outcome",
        "reason",
        "source",
        "mode",
        "agent",
        "rehashed",
    ]
    started = TunnelStarted(**CONTEXT, tunnel="t1")
    assert list(started.record()) == [*CONTEXT, "tunnel", "e2e", "cipher"]
    assert started.context() == CONTEXT
    assert AdminChanged(by="root", op="org.add", touched={"org": "x"}).record() == {
        "by": "root",
        "op": "org.add",
        "org": "x",
    }


def test_absent_fields_stay_absent_and_nulls_stay_null() -> None:
    assert AgentEnrolled(agent=None, source="s", outcome="failure", reason="r").record() == {
        "source": "s",
        "outcome": "failure",
        "reason": "r",
    }
    assert AuthLocked(user="u", failures=5, seconds=60).record() == {
        "user": "u",
        "failures": 5,
        "seconds": 60,
    }
    # approved_by is written as null when no approval was needed (docs/audit.md).
    assert SessionStarted(**CONTEXT, expires=1.0, approved_by=None).record()["approved_by"] is None


def test_a_spread_field_cannot_overwrite_a_named_one() -> None:
    attempt = AuthAttempt("s", "u", "f", "success", "ok", "src", "access", "a", {"user": "x"})
    with pytest.raises(TypeError):
        attempt.record()


def test_events_are_frozen() -> None:
    locked = AuthLocked(user="u", failures=1, seconds=1)
    with pytest.raises(AttributeError):
        locked.user = "v"  # type: ignore[misc]


def test_durable_events_cannot_be_published_without_waiting(audit: AuditLog) -> None:
    bus = EventBus(audit)
    with pytest.raises(TypeError, match="durable"):
        bus.publish(SessionStarted(**CONTEXT, expires=1.0, approved_by=None))
    assert not audit.path.read_text()


def test_audit_first_then_subscribers_in_order(audit: AuditLog) -> None:
    bus = EventBus(audit)
    seen: list[tuple[str, str, int]] = []
    bus.subscribe(lambda e: seen.append(("metrics", e.NAME, len(records(audit.path)))))
    bus.subscribe(lambda e: seen.append(("cluster", e.NAME, len(records(audit.path)))))
    bus.publish(AuthLocked(user="u", failures=3, seconds=60))
    seq = asyncio.run(bus.record(TunnelStarted(**CONTEXT, tunnel="t1")))
    assert seen == [
        ("metrics", "auth.locked", 1),
        ("cluster", "auth.locked", 1),
        ("metrics", "tunnel.start", 2),
        ("cluster", "tunnel.start", 2),
    ]
    lines = records(audit.path)
    assert [r["event"] for r in lines] == ["auth.locked", "tunnel.start"]
    assert lines[1]["seq"] == seq
    assert {k: lines[1][k] for k in (*CONTEXT, "tunnel")} == {**CONTEXT, "tunnel": "t1"}


def test_a_failing_subscriber_does_not_stop_the_others(audit: AuditLog) -> None:
    bus = EventBus(audit)
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("metrics down")

    bus.subscribe(broken)
    bus.subscribe(seen.append)
    event = AuthLocked(user="u", failures=3, seconds=60)
    bus.publish(event)
    assert seen == [event]


def test_durable_record_waits_for_the_disk(audit: AuditLog) -> None:
    """With the flusher running, record() returns only once the head file says durable."""

    async def run() -> int:
        audit.start()
        try:
            bus = EventBus(audit)
            return await bus.record(AdminChanged(by="root", op="org.add", touched={"org": "x"}))
        finally:
            await audit.close()

    seq = asyncio.run(run())
    assert audit._durable >= seq
