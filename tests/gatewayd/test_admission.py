"""The handshake admission's bookkeeping (gatewayd/admission.py), step by step on a loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from gateway_config import MINIMAL

from gatewayd.admission import WAITING_PER_SLOT, Admission, AdmissionFull
from gatewayd.config import parse
from relay.errors import ConfigError


async def turn() -> None:
    """Let every task that can run, run (no time passes)."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_one_source_holds_at_most_its_share_and_others_get_the_rest() -> None:
    async def main() -> None:
        a = Admission(total=4, per_source=2)
        await a.enter("10.0.0.1")
        await a.enter("10.0.0.1")
        third = asyncio.create_task(a.enter("10.0.0.1"))
        await turn()
        assert not third.done()  # its own cap, though the global one has room
        await a.enter("10.0.0.2")
        await a.enter("10.0.0.2")
        assert a.active == 4
        a.leave("10.0.0.1")
        await turn()
        assert third.done() and a.active == 4

    asyncio.run(main())


def test_freed_slots_go_round_robin_and_fifo_per_source() -> None:
    async def main() -> None:
        a = Admission(total=1, per_source=1)
        order: list[str] = []
        await a.enter("x")

        async def wait(key: str, name: str) -> None:
            await a.enter(key)
            order.append(name)

        tasks = [
            asyncio.create_task(wait(k, n))
            for k, n in (("x", "x1"), ("x", "x2"), ("x", "x3"), ("y", "y1"))
        ]
        await turn()
        for _ in range(4):
            a.leave("x" if not order or order[-1].startswith("x") else "y")
            await turn()
        # x just had a slot: the waiting source y goes first, then x in its own order.
        assert order == ["y1", "x1", "x2", "x3"]
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_waiter_cancelled_holds_nothing_even_when_its_slot_comes_first() -> None:
    async def main() -> None:
        a = Admission(total=1, per_source=1)
        await a.enter("x")
        gone = asyncio.create_task(a.enter("x"))
        late = asyncio.create_task(a.enter("x"))
        await turn()
        gone.cancel()  # cancelled, not yet run: the freed slot must skip it
        a.leave("x")
        await turn()
        assert gone.cancelled() and late.done() and a.active == 1
        late_granted = asyncio.create_task(a.enter("y"))
        await turn()
        granted_then_cancelled = late_granted
        a.leave("x")  # grants y ...
        granted_then_cancelled.cancel()  # ... whose task is cancelled before it runs
        await turn()
        assert a.active == 0 and a.waiting == 0
        await a.enter("z")  # nothing leaked
        assert a.active == 1

    asyncio.run(main())


def test_a_crowd_beyond_the_queue_is_turned_away_at_once_not_held() -> None:
    async def main() -> None:
        a = Admission(total=2, per_source=1)
        assert (a.max_waiting, a.max_waiting_per_source) == (
            2 * WAITING_PER_SLOT,
            WAITING_PER_SLOT,
        )
        await a.enter("x")
        waiters = [asyncio.create_task(a.enter("x")) for _ in range(WAITING_PER_SLOT)]
        await turn()
        assert a.waiting == WAITING_PER_SLOT
        with pytest.raises(AdmissionFull):  # its own queue is full: at once, no wait
            await a.enter("x")
        # Another source still gets a slot, then waits in its own queue ...
        await a.enter("y")
        others = [asyncio.create_task(a.enter(f"10.0.0.{i}")) for i in range(WAITING_PER_SLOT)]
        await turn()
        assert a.waiting == 2 * WAITING_PER_SLOT
        with pytest.raises(AdmissionFull):  # ... until the queues hold all they may
            await a.enter("z")
        assert "z" not in a._sources  # turned away: nothing kept
        while a.active:  # every holder's handshake ends; each waiter gets its turn
            a.leave(next(k for k, source in a._sources.items() if source.active))
            await turn()
        await asyncio.gather(*waiters, *others)
        assert a.waiting == 0
        await a.enter("z")  # room again

    asyncio.run(main())


def test_cancelled_waiters_free_their_places_in_the_queue() -> None:
    async def main() -> None:
        a = Admission(total=1, per_source=1)
        await a.enter("x")
        waiters = [asyncio.create_task(a.enter("x")) for _ in range(WAITING_PER_SLOT)]
        await turn()
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert a.waiting == 0
        late = asyncio.create_task(a.enter("x"))
        await turn()
        assert a.waiting == 1 and not late.done()
        a.leave("x")
        await turn()
        assert late.done() and a.waiting == 0 and a.active == 1

    asyncio.run(main())


def test_caps_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Admission(total=0, per_source=1)


LISTEN = 'listen = "127.0.0.1:8443"\n'


def with_gateway_keys(keys: str) -> str:
    """The minimal config with ``keys`` added to its [gateway] section."""
    return MINIMAL.replace(LISTEN, LISTEN + keys)


def test_caps_are_read_from_the_gateway_section(tmp_path: Path) -> None:
    cfg = parse(MINIMAL, tmp_path / "gatewayd.toml")
    assert (cfg.gateway.max_handshakes, cfg.gateway.max_handshakes_per_source) == (64, 8)
    text = with_gateway_keys("max_handshakes = 200\nmax_handshakes_per_source = 20\n")
    cfg = parse(text, tmp_path / "gatewayd.toml")
    assert (cfg.gateway.max_handshakes, cfg.gateway.max_handshakes_per_source) == (200, 20)


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ("max_handshakes = 0", "gateway.max_handshakes: must be between 1 and 100000"),
        ('max_handshakes = "many"', "gateway.max_handshakes"),
        ("max_handshakes_per_source = -1", "gateway.max_handshakes_per_source: must be between"),
        (
            "max_handshakes = 4\nmax_handshakes_per_source = 8",
            "gateway.max_handshakes_per_source: must not exceed max_handshakes (4)",
        ),
    ],
)
def test_bad_caps_are_one_clear_problem(tmp_path: Path, keys: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(with_gateway_keys(keys + "\n"), tmp_path / "gatewayd.toml")
    assert problem in str(info.value)
