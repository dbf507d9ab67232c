"""A peer that makes us write and never reads: bounded pings, stalled writers closed.

The protocol object is driven with explicit times; the framed link on a hand-driven
transport whose write buffer the test fills.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from relay import message as m
from relay.aio import LINK_HARD_CAP, LINK_HIGH_WATER, FramedLink
from relay.protocol import (
    MAX_PINGS,
    PING_WINDOW,
    PREAMBLE,
    STALL_TIMEOUT,
    Closed,
    Connection,
    Side,
    State,
)

T0 = 1000.0
HELLO = m.ClientHello(
    user="mallory",
    agent="pc-1",
    target="rdp",
    mode="access",
    client_key="A" * 43,
    reason="x",
    factors=(),
)


def frame(msg: m.Message) -> bytes:
    body = json.dumps(msg.to_json(), separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


def gateway_awaiting_auth() -> Connection:
    """A gateway's connection at the first factor (a person may take minutes there)."""
    conn = Connection(Side.ACCEPTOR, now=T0, handshake_timeout=3600)
    conn.receive_data(PREAMBLE + frame(HELLO), T0)
    assert conn.state is State.EXPECT_AUTH
    conn.events_received()
    return conn


def pongs(conn: Connection) -> int:
    return conn.data_to_send().count(b'"t":"pong"')


def test_pings_within_the_bound_are_answered_window_after_window() -> None:
    conn = gateway_awaiting_auth()
    for window in range(3):
        now = T0 + window * PING_WINDOW
        conn.receive_data(b"".join(frame(m.Ping(i)) for i in range(MAX_PINGS)), now)
        assert pongs(conn) == MAX_PINGS
    assert conn.state is State.EXPECT_AUTH


def test_a_ping_over_the_bound_is_a_protocol_error() -> None:
    conn = gateway_awaiting_auth()
    conn.receive_data(b"".join(frame(m.Ping(i)) for i in range(MAX_PINGS + 1)), T0 + 1)
    assert conn.state is State.CLOSED
    out = conn.data_to_send()
    assert out.count(b'"t":"pong"') == MAX_PINGS and b"protocol_error" in out
    (closed,) = [e for e in conn.events_received() if isinstance(e, Closed)]
    assert closed.code == "protocol_error" and "pings" in closed.message


def test_the_bound_holds_on_an_authenticated_link_too() -> None:
    conn = Connection(Side.ACCEPTOR, now=T0)
    conn.receive_data(PREAMBLE + frame(m.AgentHello(targets=("rdp",))), T0)
    assert conn.state is State.AGENT
    conn.receive_data(b"".join(frame(m.Ping(i)) for i in range(MAX_PINGS + 1)), T0)
    assert conn.state is State.CLOSED


def test_a_peer_that_does_not_read_is_closed_after_the_stall_timeout() -> None:
    conn = gateway_awaiting_auth()
    conn.pause_writing(T0 + 1)
    conn.pause_writing(T0 + 5)  # a second report does not move the start
    timer = conn.get_timer()
    assert timer is not None and timer <= T0 + 1 + STALL_TIMEOUT
    conn.handle_timer(T0 + STALL_TIMEOUT)
    assert conn.state is State.EXPECT_AUTH
    conn.handle_timer(T0 + 1 + STALL_TIMEOUT)
    assert conn.state is State.CLOSED and conn.write_stalled
    assert conn.data_to_send() == b""  # nothing more is queued for a peer that does not read
    (closed,) = conn.events_received()
    assert closed == Closed("timeout", "peer does not read")


def test_a_peer_that_reads_again_in_time_stays() -> None:
    conn = Connection(Side.ACCEPTOR, now=T0, handshake_timeout=3600)
    conn.receive_data(PREAMBLE + frame(HELLO), T0)
    conn.pause_writing(T0 + 1)
    conn.resume_writing()
    conn.handle_timer(T0 + 1 + STALL_TIMEOUT)
    assert conn.state is State.EXPECT_AUTH and not conn.write_stalled


class Transport(asyncio.Transport):
    """A transport whose write buffer holds what the test says the peer left unread."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.unread = 0
        self.reading = True
        self.closed = self.aborted = False
        self.limits: dict[str, Any] = {}

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data
        self.unread += len(data)

    def get_write_buffer_size(self) -> int:
        return self.unread

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = {"high": high, "low": low}

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def test_the_link_stops_reading_while_the_peer_does_not_read() -> None:
    async def main() -> None:
        link = FramedLink(Side.ACCEPTOR)
        transport = Transport()
        link.connection_made(transport)
        assert transport.limits["high"] == LINK_HIGH_WATER
        link.data_received(PREAMBLE + frame(HELLO))
        link.pause_writing()  # the transport's buffer passed the high-water mark
        assert not transport.reading and link.conn.writing_paused
        link.resume_writing()
        assert transport.reading and not link.conn.writing_paused
        link.abort()

    asyncio.run(main())


def test_the_link_aborts_a_peer_past_the_hard_cap() -> None:
    async def main() -> None:
        link = FramedLink(Side.ACCEPTOR)
        transport = Transport()
        link.connection_made(transport)
        link.data_received(PREAMBLE + frame(HELLO))
        transport.unread = LINK_HARD_CAP  # the peer left all this unread
        link.data_received(frame(m.Ping(1)))  # one more pong is too much
        assert transport.aborted and not transport.closed
        closed = await link.closed
        assert closed.code == "timeout" and "unread" in closed.message

    asyncio.run(main())
