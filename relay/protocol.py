"""The gateway wire protocol as a plain object: bytes in, events out.

Theory of operation
-------------------

Every connection to the gateway port is TCP + TLS 1.3. Inside TLS, the side that
dialled (``CONNECTOR``: ``gw``, an agent) sends the 4-byte preamble ``GWP`` +
version, then frames. A frame is a 4-byte big-endian length followed by that
many bytes of UTF-8 JSON holding one message (see :mod:`relay.message`). The
gateway (``ACCEPTOR``) checks the preamble before anything else, so a peer of
another protocol or version is told so at once.

The first message names the connection's role, and the role decides what may
follow. The tables below hold every rule about order: ``PEER_MAY_SEND`` says
which message types are acceptable from the peer in each state, ``TRANSITIONS``
moves the state on a message sent or received. States are named by what the
connection expects next (as aioquic does). A message that is not allowed is a
*remote* error: the connection answers with an ``error`` frame and closes; it
never raises out of :meth:`Connection.receive_data`. Sending a message that is
not allowed is a *local* error and raises at once.

When the gateway pairs a tunnel it sends ``spliced``; from then on the
connection carries raw bytes (the end-to-end Noise session) and this object
steps aside: :meth:`Connection.take_raw` hands over what was buffered. An agent's
``spare`` connection (a data connection dialled ahead) waits in ``SPARE``, with
heartbeats, until the gateway sends one ``dial`` on it; the agent answers ``data``
(then the usual splice, its handshake deadline counted from then) or ``dial_failed``.
``gw connect``'s ``tunnel_spare`` (a tunnel connection dialled ahead, bound to its
session's ticket) waits likewise in ``CLIENT_SPARE`` until it sends ``tunnel_open``.

Time is a parameter: the adapter calls :meth:`Connection.handle_timer` with the
current time whenever :meth:`Connection.get_timer` says so. The handshake must
finish within ``handshake_timeout``; established control connections send a
ping every ``ping_interval`` and close a peer silent for ``idle_timeout``.

A peer may not make us write without end: more than ``max_pings`` pings within
``ping_window`` seconds is a protocol error (each ping costs us a pong), and a peer
that stops reading is closed. The adapter reports its transport's flow control with
:meth:`Connection.pause_writing` / :meth:`Connection.resume_writing` (and stops
reading meanwhile); writing paused for ``stall_timeout`` seconds closes the
connection (``write_stalled`` is then true: nothing more is worth writing to it).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from . import message as m
from .errors import FrameTooLarge, ProtocolError, UnsupportedVersion

VERSION = 1
PREAMBLE = b"GWP" + bytes([VERSION])

#: Largest frame either side accepts. Control messages are small; the largest
#: legitimate ones carry a certificate chain or a FIDO2 attestation (a few KiB).
#: 64 KiB bounds the memory one unauthenticated peer can make us hold.
MAX_FRAME = 64 * 1024

#: Defaults for the timers; the daemon's config may change them.
HANDSHAKE_TIMEOUT = 10.0
PING_INTERVAL = 20.0
IDLE_TIMEOUT = 60.0
#: Pings a peer may send per window. An honest peer sends one per PING_INTERVAL.
MAX_PINGS = 10
PING_WINDOW = 10.0
#: How long a peer may leave our writes unread (write buffer above its high-water mark).
STALL_TIMEOUT = 30.0


class Side(enum.Enum):
    CONNECTOR = "connector"  # gw connect, the agent
    ACCEPTOR = "acceptor"  # the gateway


class State(enum.Enum):
    EXPECT_PREAMBLE = "expect_preamble"
    EXPECT_HELLO = "expect_hello"
    EXPECT_AUTH = "expect_auth"  # client session: factors being proved
    EXPECT_ENROLLED = "expect_enrolled"
    EXPECT_REGISTERED = "expect_registered"  # registering a factor credential with a code
    EXPECT_SPLICE = "expect_splice"  # tunnel/data connection waiting for its pair
    SPARE = "spare"  # agent's data connection dialled ahead, waiting for a dial
    SPARE_DIALLED = "spare_dialled"  # ... the dial sent on it, waiting for its answer
    CLIENT_SPARE = "client_spare"  # gw connect's connection dialled ahead of a tunnel
    SESSION = "session"  # authenticated client control connection
    AGENT = "agent"  # agent control connection
    RAW = "raw"  # spliced: raw bytes, not parsed here
    CLOSED = "closed"


_HELLOS = {
    "client_hello": State.EXPECT_AUTH,
    "agent_hello": State.AGENT,
    "enroll": State.EXPECT_ENROLLED,
    "register": State.EXPECT_REGISTERED,
    "tunnel": State.EXPECT_SPLICE,
    "data": State.EXPECT_SPLICE,
    "spare": State.SPARE,
    "tunnel_spare": State.CLIENT_SPARE,
}
_KEEPALIVE = frozenset({"ping", "pong", "error"})

#: Message types the peer may send, by (our side, state).
PEER_MAY_SEND: dict[tuple[Side, State], frozenset[str]] = {
    (Side.ACCEPTOR, State.EXPECT_HELLO): frozenset(_HELLOS),
    (Side.ACCEPTOR, State.EXPECT_AUTH): frozenset({"auth_response"}) | _KEEPALIVE,
    (Side.ACCEPTOR, State.SESSION): frozenset({"bye", "card_present"}) | _KEEPALIVE,
    (Side.ACCEPTOR, State.AGENT): frozenset({"dial_failed", "approval"}) | _KEEPALIVE,
    (Side.ACCEPTOR, State.EXPECT_ENROLLED): frozenset({"error"}),
    (Side.ACCEPTOR, State.EXPECT_REGISTERED): frozenset({"auth_response"}) | _KEEPALIVE,
    (Side.ACCEPTOR, State.EXPECT_SPLICE): frozenset({"error"}),
    (Side.ACCEPTOR, State.SPARE): _KEEPALIVE,
    (Side.ACCEPTOR, State.SPARE_DIALLED): frozenset({"data", "dial_failed"}) | _KEEPALIVE,
    (Side.ACCEPTOR, State.CLIENT_SPARE): frozenset({"tunnel_open"}) | _KEEPALIVE,
    (Side.CONNECTOR, State.EXPECT_AUTH): frozenset(
        {"auth_request", "approval_pending", "session", "agent_list", "logged_in", "logged_out"}
    )
    | _KEEPALIVE,
    (Side.CONNECTOR, State.SESSION): _KEEPALIVE,
    (Side.CONNECTOR, State.AGENT): frozenset({"dial", "approve", "notice"}) | _KEEPALIVE,
    (Side.CONNECTOR, State.EXPECT_ENROLLED): frozenset({"enrolled", "error"}),
    (Side.CONNECTOR, State.EXPECT_REGISTERED): frozenset({"auth_request", "registered"})
    | _KEEPALIVE,
    (Side.CONNECTOR, State.EXPECT_SPLICE): frozenset({"spliced", "error"}),
    (Side.CONNECTOR, State.SPARE): frozenset({"dial"}) | _KEEPALIVE,
    (Side.CONNECTOR, State.SPARE_DIALLED): _KEEPALIVE,
    (Side.CONNECTOR, State.CLIENT_SPARE): _KEEPALIVE,
}

#: State changes on a message of a type, sent or received, in a state.
TRANSITIONS: dict[tuple[State, str], State] = {
    **{(State.EXPECT_HELLO, hello): state for hello, state in _HELLOS.items()},
    (State.EXPECT_AUTH, "session"): State.SESSION,
    (State.EXPECT_AUTH, "agent_list"): State.CLOSED,
    (State.EXPECT_AUTH, "logged_in"): State.CLOSED,
    (State.EXPECT_AUTH, "logged_out"): State.CLOSED,
    (State.EXPECT_ENROLLED, "enrolled"): State.CLOSED,
    (State.EXPECT_REGISTERED, "registered"): State.CLOSED,
    (State.EXPECT_SPLICE, "spliced"): State.RAW,
    (State.SPARE, "dial"): State.SPARE_DIALLED,
    (State.SPARE_DIALLED, "data"): State.EXPECT_SPLICE,
    (State.SPARE_DIALLED, "dial_failed"): State.CLOSED,
    (State.CLIENT_SPARE, "tunnel_open"): State.EXPECT_SPLICE,
    (State.SESSION, "bye"): State.CLOSED,
}

#: States in which the connection is still being set up (the handshake timer runs).
HANDSHAKE_STATES = frozenset(
    {
        State.EXPECT_PREAMBLE,
        State.EXPECT_HELLO,
        State.EXPECT_AUTH,
        State.EXPECT_ENROLLED,
        State.EXPECT_REGISTERED,
        State.EXPECT_SPLICE,
    }
)
#: States with heartbeats.
LIVE_STATES = frozenset(
    {State.SESSION, State.AGENT, State.SPARE, State.SPARE_DIALLED, State.CLIENT_SPARE}
)


@dataclass(frozen=True, slots=True)
class Closed:
    """Event: the connection is over. ``code`` is an error code or ``"eof"``."""

    code: str
    message: str = ""
    by_peer: bool = False


Event = m.Message | Closed


class Connection:
    """One end of one gateway-protocol connection, without I/O."""

    def __init__(
        self,
        side: Side,
        *,
        now: float,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        ping_interval: float = PING_INTERVAL,
        idle_timeout: float = IDLE_TIMEOUT,
        max_frame: int = MAX_FRAME,
        max_pings: int = MAX_PINGS,
        ping_window: float = PING_WINDOW,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        self.side = side
        self.state = State.EXPECT_PREAMBLE if side is Side.ACCEPTOR else State.EXPECT_HELLO
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self._handshake_deadline = now + handshake_timeout
        self._last_received = now
        self._last_sent = now
        self._ping_seq = 0
        self.max_pings = max_pings
        self.ping_window = ping_window
        self.stall_timeout = stall_timeout
        self._pings_since = now
        self._pings = 0
        self._paused_since: float | None = None
        #: True once the connection was closed because the peer did not read.
        self.write_stalled = False
        self._buffer = bytearray()
        self._out = bytearray(PREAMBLE if side is Side.CONNECTOR else b"")
        self._events: list[Event] = []
        self.close_code: str | None = None

    # -- input ----------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes read from the transport."""
        if self.state in (State.CLOSED, State.RAW):
            if self.state is State.RAW:
                self._buffer += data
            return
        self._last_received = now
        self._buffer += data
        try:
            self._parse(now)
        except ProtocolError as exc:
            self._fail(getattr(exc, "code", "protocol_error"), str(exc))

    def receive_eof(self) -> None:
        """The transport reported end of stream."""
        if self.state not in (State.CLOSED, State.RAW):
            self._close(Closed("eof", "connection closed by peer", by_peer=True))

    def events_received(self) -> list[Event]:
        """Events parsed since the last call."""
        events, self._events = self._events, []
        return events

    # -- output ---------------------------------------------------------------------

    def send(self, msg: m.Message, now: float | None = None) -> None:
        """Queue a message. Raises ProtocolError if this side may not send it now."""
        if self.state in (State.CLOSED, State.RAW):
            raise ProtocolError(f"cannot send {msg.TYPE} in state {self.state.value}")
        if isinstance(msg, m.Error):
            self._queue(msg)
            self._close(Closed(msg.code, msg.message))
            return
        if not self._may_send(msg.TYPE):
            raise ProtocolError(f"{self.side.value} may not send {msg.TYPE} in {self.state.value}")
        self._queue(msg)
        if now is not None:
            self._last_sent = now
        self._enter(TRANSITIONS.get((self.state, msg.TYPE), self.state), now)

    def send_error(self, code: str, message: str = "") -> None:
        """Queue an error frame and close (a no-op once closed)."""
        if self.state not in (State.CLOSED, State.RAW):
            self.send(m.Error(code, message))

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport (possibly empty)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def take_raw(self) -> bytes:
        """After ``spliced``: the bytes received past the last frame. Hands over the stream."""
        if self.state is not State.RAW:
            raise ProtocolError("take_raw() before the connection was spliced")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    # -- time -----------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None."""
        when: float | None = None
        if self.state in HANDSHAKE_STATES:
            when = self._handshake_deadline
        elif self.state in LIVE_STATES:
            when = min(
                self._last_sent + self.ping_interval, self._last_received + self.idle_timeout
            )
        if when is not None and self._paused_since is not None:
            when = min(when, self._paused_since + self.stall_timeout)
        return when

    # -- flow control ---------------------------------------------------------------

    def pause_writing(self, now: float) -> None:
        """The transport's write buffer passed its high-water mark: the peer is not reading."""
        if self._paused_since is None:
            self._paused_since = now

    def resume_writing(self) -> None:
        """The write buffer drained below its low-water mark."""
        self._paused_since = None

    @property
    def writing_paused(self) -> bool:
        return self._paused_since is not None

    def stall(self, message: str) -> None:
        """Close at once because the peer does not read (the adapter saw too much queued)."""
        if self.state not in (State.CLOSED, State.RAW):
            self.write_stalled = True
            self._close(Closed("timeout", message))

    def extend_handshake(self, now: float, seconds: float) -> None:
        """Give the handshake until ``now + seconds`` (a person types a code, touches a key)."""
        self._handshake_deadline = max(self._handshake_deadline, now + seconds)

    def handle_timer(self, now: float) -> None:
        """Act on timeouts: handshake deadline, heartbeat, idle peer."""
        if self.state in (State.CLOSED, State.RAW):
            return
        if self._paused_since is not None and now >= self._paused_since + self.stall_timeout:
            self.stall("peer does not read")
        elif self.state in HANDSHAKE_STATES and now >= self._handshake_deadline:
            self._fail("timeout", "handshake not completed in time")
        elif self.state in LIVE_STATES:
            if now >= self._last_received + self.idle_timeout:
                self._fail("timeout", "peer silent for too long")
            elif now >= self._last_sent + self.ping_interval:
                self._ping_seq += 1
                self.send(m.Ping(self._ping_seq), now)

    # -- internals ------------------------------------------------------------------

    def _may_send(self, mtype: str) -> bool:
        if self.side is Side.CONNECTOR and self.state is State.EXPECT_HELLO:
            return mtype in _HELLOS
        if self.side is Side.ACCEPTOR:
            # What the gateway may send is what the connector may receive.
            allowed = PEER_MAY_SEND.get((Side.CONNECTOR, self.state), frozenset())
        else:
            allowed = PEER_MAY_SEND.get((Side.ACCEPTOR, self.state), frozenset())
        return mtype in allowed

    def _queue(self, msg: m.Message) -> None:
        body = json.dumps(msg.to_json(), separators=(",", ":")).encode()
        if len(body) > self.max_frame:
            raise ProtocolError(f"{msg.TYPE} is larger than the frame limit")
        self._out += len(body).to_bytes(4, "big") + body

    def _parse(self, now: float) -> None:
        if self.state is State.EXPECT_PREAMBLE:
            if len(self._buffer) < len(PREAMBLE):
                if not PREAMBLE[:3].startswith(bytes(self._buffer[:3])):
                    raise ProtocolError("not a gateway protocol connection")
                return
            head = bytes(self._buffer[:4])
            del self._buffer[:4]
            if head[:3] != PREAMBLE[:3]:
                raise ProtocolError("not a gateway protocol connection")
            if head[3] != VERSION:
                raise UnsupportedVersion(
                    f"protocol version {head[3]} (this gateway speaks {VERSION})"
                )
            self.state = State.EXPECT_HELLO
        while self.state not in (State.CLOSED, State.RAW) and len(self._buffer) >= 4:
            length = int.from_bytes(self._buffer[:4], "big")
            if length > self.max_frame:
                raise FrameTooLarge(f"frame of {length} bytes (limit {self.max_frame})")
            if len(self._buffer) < 4 + length:
                return
            body = bytes(self._buffer[4 : 4 + length])
            del self._buffer[: 4 + length]
            self._receive_message(body, now)

    def _receive_message(self, body: bytes, now: float) -> None:
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            # RecursionError: a frame of nothing but "[[[[..." nests past the parser's limit.
            raise ProtocolError("frame is not valid JSON") from exc
        try:
            msg = m.from_json(obj)
        except (TypeError, ValueError) as exc:  # dataclass rejected the shape
            raise ProtocolError(f"malformed message: {exc}") from exc
        allowed = PEER_MAY_SEND.get((self.side, self.state), frozenset())
        if msg.TYPE not in allowed:
            raise ProtocolError(f"unexpected {msg.TYPE} in state {self.state.value}")
        if isinstance(msg, m.Error):
            self._events.append(msg)
            self._close(Closed(msg.code, msg.message, by_peer=True))
            return
        if isinstance(msg, m.Ping):
            if now >= self._pings_since + self.ping_window:
                self._pings_since, self._pings = now, 0
            self._pings += 1
            if self._pings > self.max_pings:
                raise ProtocolError(
                    f"more than {self.max_pings} pings in {self.ping_window:g} seconds"
                )
            self.send(m.Pong(msg.seq))
        self._enter(TRANSITIONS.get((self.state, msg.TYPE), self.state), now)
        self._events.append(msg)

    def _enter(self, state: State, now: float | None) -> None:
        # A spare data connection waits in a live state for as long as it is kept; the
        # handshake it then finishes (``data`` until ``spliced``) gets a deadline of its own.
        if now is not None and self.state in LIVE_STATES and state in HANDSHAKE_STATES:
            self._handshake_deadline = now + self.handshake_timeout
        self.state = state

    def _fail(self, code: str, message: str) -> None:
        # One place maps remote misbehaviour to an error frame and a close.
        self._queue(m.Error(code, message))
        self._close(Closed(code, message))

    def _close(self, event: Closed) -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_code = event.code
            self._buffer.clear()
            self._events.append(event)
