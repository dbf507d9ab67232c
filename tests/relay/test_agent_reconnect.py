"""The agent's reconnect schedule: full-jitter backoff, capped, and the choice of node.

Random sources are injected: a fixed sequence for exact values, a seeded generator for
the spread of many agents that lost the same node at the same moment.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from relay.agent import Backoff, Endpoint, Reconnect, parse_hostport, resolve
from relay.errors import GatewayError


def fixed(values: Iterable[float]) -> Callable[[], float]:
    it = iter(values)
    return lambda: next(it)


def test_ceiling_doubles_from_first_up_to_the_cap() -> None:
    b = Backoff(first=0.5, cap=10.0)
    assert [b.ceiling(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    # Far past the cap, and a count that would overflow 2**n as a float: still the cap.
    assert b.ceiling(10_000) == 10.0
    assert b.ceiling(-3) == 0.5


def test_wait_is_the_ceiling_scaled_by_the_random_draw() -> None:
    b = Backoff(first=1.0, cap=60.0)
    assert b.wait(0, lambda: 0.0) == 0.0
    assert b.wait(3, lambda: 0.5) == 4.0
    assert b.wait(20, lambda: 0.999) == pytest.approx(59.94)


def test_waits_stay_within_zero_and_the_ceiling() -> None:
    b = Backoff(first=1.0, cap=60.0)
    rng = random.Random(1)
    for failures in range(12):
        for _ in range(200):
            assert 0.0 <= b.wait(failures, rng.random) < b.ceiling(failures)


def test_full_jitter_spreads_a_crowd_over_the_whole_window() -> None:
    """1,000 agents whose node died at one moment: their first retries cover [0, first)
    evenly, so no second of it gets much more than its share (no thundering herd)."""
    rng = random.Random(7)
    crowd = [Reconnect(Backoff(first=10.0, cap=60.0), rng.random) for _ in range(1000)]
    waits = [r.next_wait() for r in crowd]
    assert min(waits) >= 0.0 and max(waits) < 10.0
    per_second = Counter(int(w) for w in waits)
    assert set(per_second) == set(range(10))
    assert max(per_second.values()) < 2 * 100  # each second's fair share is 100
    assert statistics.mean(waits) == pytest.approx(5.0, abs=0.5)
    # The second retries are spread over [0, 2 * first).
    again = [r.next_wait() for r in crowd]
    assert max(again) >= 15.0 and min(again) < 5.0


def test_failures_in_a_row_raise_the_ceiling_and_a_stable_connection_resets_it() -> None:
    r = Reconnect(Backoff(first=1.0, cap=8.0), lambda: 0.999999)
    waits = [round(r.next_wait(), 3) for _ in range(6)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    r.succeeded()
    assert round(r.next_wait(), 3) == 1.0


def test_a_refused_identity_waits_the_longest() -> None:
    r = Reconnect(Backoff(first=1.0, cap=60.0), lambda: 0.5)
    r.refused()
    assert r.next_wait() == 30.0


A, B, C = (Endpoint(f"10.0.0.{i}", 8443, f"10.0.0.{i}") for i in (1, 2, 3))


def test_first_choice_is_random_then_never_the_node_that_just_failed() -> None:
    r = Reconnect(Backoff(), fixed([0.0, 0.0, 0.99, 0.5]))
    assert r.choose([A, B, C]) == A
    assert r.choose([A, B, C]) == B  # A excluded: [B, C][0]
    assert r.choose([A, B, C]) == C  # B excluded: [A, C][1]
    assert r.choose([A, B, C]) == B  # C excluded: [A, B][1]


def test_a_single_node_is_tried_again() -> None:
    r = Reconnect(Backoff(), fixed([0.3, 0.9]))
    assert r.choose([A]) == A
    assert r.choose([A]) == A


def test_the_agents_of_a_dead_node_spread_over_the_survivors() -> None:
    rng = random.Random(3)
    moved = Counter()
    for _ in range(600):
        r = Reconnect(Backoff(), rng.random)
        r.last = A  # was on A, which died
        moved[r.choose([A, B, C])] += 1
    assert moved[A] == 0
    assert 240 < moved[B] < 360 and 240 < moved[C] < 360


def test_every_node_is_reached_when_several_are_down() -> None:
    """Random moves visit every node: an agent does not bounce between two dead ones."""
    rng = random.Random(11)
    r = Reconnect(Backoff(), rng.random)
    nodes = [Endpoint(f"10.0.1.{i}", 8443, "gw") for i in range(5)]
    seen = {r.choose(nodes) for _ in range(60)}
    assert seen == set(nodes)


def test_resolve_keeps_address_literals_and_expands_names() -> None:
    async def go() -> tuple[list[Endpoint], list[str]]:
        return await resolve(
            ["127.0.0.1:1", "[::1]:2", "localhost:3", "no-such-host.invalid:4", "127.0.0.1:1"]
        )

    found, problems = asyncio.run(go())
    assert found[:2] == [Endpoint("127.0.0.1", 1, "127.0.0.1"), Endpoint("::1", 2, "::1")]
    named = [e for e in found if e.port == 3]
    # localhost is one node per address, each checked against the name "localhost".
    assert named and all(e.name == "localhost" and e.port == 3 for e in named)
    assert "127.0.0.1" in {e.host for e in named}
    assert len(problems) == 1 and problems[0].startswith("no-such-host.invalid:4: ")
    # The repeated literal is one node.
    assert found.count(Endpoint("127.0.0.1", 1, "127.0.0.1")) == 1


def test_endpoint_names_the_address_when_it_differs() -> None:
    assert str(Endpoint("127.0.0.1", 8443, "127.0.0.1")) == "127.0.0.1:8443"
    assert str(Endpoint("10.1.2.3", 8443, "gw.example.org")) == "gw.example.org:8443 (10.1.2.3)"


@pytest.mark.parametrize("bad", ["gw", "gw:", ":8443", "gw:0", "gw:65536", "gw:²", "gw:123456"])
def test_parse_hostport_refuses_with_one_clear_error(bad: str) -> None:
    with pytest.raises(GatewayError, match="expected HOST:PORT"):
        parse_hostport(bad)


def test_schedule_over_a_long_outage_is_bounded() -> None:
    """An hour of failures: the waits never pass the cap, and their sum is about half
    the attempts times the cap (full jitter's mean), not a tight loop."""
    rng = random.Random(5)
    r = Reconnect(Backoff(first=1.0, cap=60.0), rng.random)
    waits = list(itertools.islice(iter(r.next_wait, None), 200))
    assert max(waits) < 60.0
    assert sum(waits[10:]) == pytest.approx(190 * 30.0, rel=0.15)


def test_the_reconnect_loop_moves_on_and_waits_as_scheduled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's own loop, with its connections scripted and its waits recorded: it
    never tries the node that just failed again at once, a stable connection resets the
    backoff, a refused identity waits the longest."""
    import ssl

    import relay.agent as relay_agent
    from relay.agent import Agent, AgentState
    from relay.errors import RemoteError

    monkeypatch.setattr(relay_agent, "client_context", lambda *_: ssl.create_default_context())
    state = AgentState("pc1", "127.0.0.1:1", tmp_path, bytes(32))
    logged: list[tuple[str, dict[str, object]]] = []
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 5:
            raise asyncio.CancelledError

    agent = Agent(
        state,
        {"echo": ("127.0.0.1", 7)},
        gateways=["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
        log=lambda event, **fields: logged.append((event, fields)),
        backoff=Backoff(first=1.0, cap=8.0),
        rand=lambda: 0.5,
        sleep=sleep,
    )
    tried: list[int] = []
    script = ["fail", "fail", "stable", "refused", "fail"]

    async def control(endpoint: Endpoint) -> None:
        tried.append(endpoint.port)
        step = script[len(tried) - 1]
        if step == "stable":
            agent.stable = True  # the gateway sent a request: it took this agent
            raise GatewayError("control connection closed (connection lost)")
        if step == "refused":
            raise RemoteError("auth_failed", "agent not enrolled")
        raise OSError("connection refused")

    monkeypatch.setattr(agent, "_control", control)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(agent._run())
    assert tried == [2, 3, 2, 3, 2]
    assert all(a != b for a, b in itertools.pairwise(tried))
    assert waits == [0.5, 1.0, 0.5, 4.0, 4.0]
    events = [e for e, _ in logged]
    assert events.count("connection to the gateway failed") == 4
    refused = [f for e, f in logged if e == "gateway refused the agent"]
    assert refused == [
        {"gateway": "127.0.0.1:3", "code": "auth_failed", "message": "agent not enrolled"}
    ]
