"""The spare data connection (``spare``) in the sans-I/O protocol: an agent's data
connection dialled ahead, kept live with heartbeats, which carries exactly one dial
and its answer, then the usual splice. Paired in memory, time passed in."""

from __future__ import annotations

import json

import pytest

from relay import message as m
from relay.errors import ProtocolError
from relay.protocol import (
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    PING_INTERVAL,
    PREAMBLE,
    Closed,
    Connection,
    Event,
    Side,
    State,
)

T0 = 1000.0
KEY = "A" * 43
DIAL = m.Dial(
    token="dt", target="rdp", session_id="s-1", client_key=KEY, user="alice@acme", mode="access"
)


def transfer(src: Connection, dst: Connection, now: float = T0) -> list[Event]:
    dst.receive_data(src.data_to_send(), now)
    return dst.events_received()


def spare_pair() -> tuple[Connection, Connection]:
    agent = Connection(Side.CONNECTOR, now=T0)
    gateway = Connection(Side.ACCEPTOR, now=T0)
    agent.send(m.SpareHello(), T0)
    assert transfer(agent, gateway) == [m.SpareHello()]
    assert agent.state is gateway.state is State.SPARE
    return agent, gateway


def frame_types(data: bytes) -> list[str]:
    out = []
    while data:
        n = int.from_bytes(data[:4], "big")
        out.append(json.loads(data[4 : 4 + n])["t"])
        data = data[4 + n :]
    return out


def test_a_spare_lives_past_the_handshake_deadline_on_heartbeats() -> None:
    agent, gateway = spare_pair()
    now = T0
    # Far past the handshake deadline: each side pings, the other answers, nobody closes.
    for _ in range(10):
        now += PING_INTERVAL
        for side, other in ((gateway, agent), (agent, gateway)):
            side.handle_timer(now)
            transfer(side, other, now)
            transfer(other, side, now)
    assert now - T0 > HANDSHAKE_TIMEOUT and gateway.state is State.SPARE


def test_a_silent_spare_is_closed() -> None:
    _, gateway = spare_pair()
    gateway.handle_timer(T0 + IDLE_TIMEOUT + 1)
    assert gateway.state is State.CLOSED
    assert any(isinstance(e, Closed) for e in gateway.events_received())


def test_one_dial_then_the_usual_splice_with_a_fresh_deadline() -> None:
    agent, gateway = spare_pair()
    later = T0 + 10 * HANDSHAKE_TIMEOUT
    gateway.send(DIAL, later)
    assert transfer(gateway, agent, later) == [DIAL]
    assert agent.state is gateway.state is State.SPARE_DIALLED
    agent.send(m.DataHello("dt"), later)
    assert transfer(agent, gateway, later) == [m.DataHello("dt")]
    assert agent.state is gateway.state is State.EXPECT_SPLICE
    # The splice gets its own handshake deadline, counted from the answer.
    gateway.handle_timer(later + 1)
    agent.handle_timer(later + 1)
    assert gateway.state is agent.state is State.EXPECT_SPLICE
    gateway.send(m.Spliced(), later + 1)
    transfer(gateway, agent, later + 1)
    assert agent.state is gateway.state is State.RAW


def test_a_spare_answered_but_never_spliced_times_out() -> None:
    agent, gateway = spare_pair()
    later = T0 + 10 * HANDSHAKE_TIMEOUT
    gateway.send(DIAL, later)
    transfer(gateway, agent, later)
    agent.send(m.DataHello("dt"), later)
    transfer(agent, gateway, later)
    gateway.handle_timer(later + HANDSHAKE_TIMEOUT + 1)
    assert gateway.state is State.CLOSED


def test_the_agent_may_refuse_the_dial_on_the_spare() -> None:
    agent, gateway = spare_pair()
    gateway.send(DIAL, T0)
    transfer(gateway, agent)
    agent.send(m.DialFailed("dt", "target unreachable"), T0)
    assert transfer(agent, gateway) == [m.DialFailed("dt", "target unreachable")]
    assert gateway.state is State.CLOSED


def test_an_agent_may_not_answer_before_a_dial() -> None:
    _, gateway = spare_pair()
    body = json.dumps(m.DataHello("dt").to_json()).encode()
    gateway.receive_data(len(body).to_bytes(4, "big") + body, T0)
    assert gateway.state is State.CLOSED
    assert "error" in frame_types(gateway.data_to_send())


def test_a_gateway_sends_one_dial_on_a_spare_only() -> None:
    agent, gateway = spare_pair()
    gateway.send(DIAL, T0)
    transfer(gateway, agent)
    with pytest.raises(ProtocolError, match="may not send dial"):
        gateway.send(DIAL, T0)


def test_spare_is_a_hello() -> None:
    gateway = Connection(Side.ACCEPTOR, now=T0)
    gateway.receive_data(PREAMBLE, T0)
    body = json.dumps({"t": "spare"}).encode()
    gateway.receive_data(len(body).to_bytes(4, "big") + body, T0)
    assert gateway.events_received() == [m.SpareHello()]
