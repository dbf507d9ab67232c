"""The records of one journey keep their names and fields (docs/audit.md is a contract).

A real gatewayd, agent and ``gw``: enrollment (a good token and a bad one), a directory
built with ``gw admin``, a failed login, a session with a tunnel, a session refused for
an offline agent, an agent that goes away. Each event's field sets must be exactly the
ones below, which were taken from the gateway before its records became typed events
(a field added on purpose is added here and in docs/audit.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from world import PASSWORD, World, build_world

from gatewayd.demo import wait_for

pytestmark = pytest.mark.integration

COMMON = frozenset({"ts", "seq", "prev", "node", "event"})
CONTEXT = ("session", "user", "agent", "target", "mode", "source", "reason_given")

#: event -> every field set it was written with in this journey (besides COMMON).
JOURNEY: dict[str, set[frozenset[str]]] = {
    "admin.change": {
        frozenset({"by", "op", "org"}),
        frozenset({"by", "op", "vendor"}),
        frozenset({"by", "op", "agreement", "vendor", "org", "modes", "unattended"}),
        frozenset({"by", "op", "agreement", "side"}),
        frozenset({"by", "op", "agent", "org", "token_expires"}),
        frozenset({"by", "op", "user", "vendor", "org", "password"}),
        frozenset({"by", "op", "user"}),
    },
    "agent.enroll": {
        frozenset({"agent", "source", "outcome", "fingerprint"}),
        frozenset({"source", "outcome", "reason"}),
    },
    "agent.connect": {frozenset({"agent", "org", "source", "targets"})},
    "agent.disconnect": {frozenset({"agent", "source", "reason"})},
    "auth.attempt": {
        frozenset({"session", "user", "factor", "outcome", "reason", "source", "mode", "agent"}),
    },
    "policy.decision": {
        frozenset({*CONTEXT, "decision", "reason", "agreement", "approval"}),
    },
    "session.start": {frozenset({*CONTEXT, "expires", "approved_by"})},
    "session.refused": {frozenset({*CONTEXT, "reason"})},
    "session.end": {
        frozenset(
            {
                "session",
                "user",
                "agent",
                "target",
                "mode",
                "reason_given",
                "reason",
                "duration",
                "tunnels",
                "bytes_up",
                "bytes_down",
            }
        )
    },
    "tunnel.start": {frozenset({*CONTEXT, "tunnel", "e2e", "cipher"})},
    "tunnel.end": {
        frozenset({*CONTEXT, "tunnel", "bytes_up", "bytes_down", "duration", "reason"}),
    },
}


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(tmp_path_factory.mktemp("journey"))
    try:
        yield w
    finally:
        w.lab.close()
        w.echo.close()


def test_journey_records_keep_their_names_and_fields(journey: World, tmp_path: Path) -> None:
    lab = journey.lab
    user = journey.new_user()
    done = lab.connect_stdio("pc1", user, PASSWORD, "echo", "hello")
    assert "HELLO" in done.stdout, done.stderr
    wrong = lab.connect_stdio("pc1", user, "not the password", "echo", "x")
    assert wrong.returncode != 0
    lab.enroll_agent("pc2", "clinic")  # enrolled, never connected
    offline = lab.connect_stdio("pc2", user, PASSWORD, "echo", "x")
    assert "not connected" in offline.stderr
    bad = lab.run(
        "gw",
        "agent",
        "enroll",
        "--gateway",
        lab.gateway,
        "--ca-file",
        str(lab.ca_file),
        "--token",
        "not-a-token-" + "x" * 30,
        "--state-dir",
        str(tmp_path / "bogus"),
        check=False,
    )
    assert bad.returncode != 0
    assert journey.agent_proc is not None
    journey.agent_proc.stop()
    wait_for(lambda: bool(lab.events("agent.disconnect")), 60, "agent.disconnect")

    seen: dict[str, set[frozenset[str]]] = {}
    for record in lab.audit_records():
        if record["event"] in JOURNEY:
            seen.setdefault(record["event"], set()).add(frozenset(record) - COMMON)
    assert seen == JOURNEY
