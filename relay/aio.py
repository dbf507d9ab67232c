"""The asyncio shell around the sans-I/O pieces: event loop, framed links, the byte pipe.

This is the one module of ``relay/`` that does I/O. It feeds bytes from
transports into :class:`relay.protocol.Connection` and writes what it returns,
re-arms the protocol's timer with ``loop.call_at``, and, once a tunnel is spliced,
hands both transports to :class:`Pipe`, which moves bytes with back-pressure:
when one side's write buffer passes its high-water mark the other side stops
reading, so a slow reader never grows anyone's memory beyond one buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from . import message as m
from .errors import GatewayError, RemoteError
from .protocol import (
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    PING_INTERVAL,
    Closed,
    Connection,
    Side,
    State,
)
from .tls import channel_binding

T = TypeVar("T")

#: Write-buffer high-water mark for spliced transports: 256 KiB keeps a gigabit
#: link busy over a few milliseconds of latency while bounding per-tunnel memory.
HIGH_WATER = 256 * 1024
#: Control links carry small messages: past this much unread, stop reading the peer.
LINK_HIGH_WATER = 64 * 1024
#: Past this much unread on a control link, the peer is not reading: close it at once.
LINK_HARD_CAP = 1024 * 1024


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed, else on asyncio's default loop.

    What start-up made (modules, classes, the config) is frozen out of the garbage
    collector first (``gc.freeze``), so that a collection on the data path walks only
    what was made since: no pause that grows with the size of the program.
    """
    gc.freeze()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main)
    return uvloop.run(main)


class ConnectionClosed(GatewayError):
    """The link closed before the expected message arrived."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.code = code


class FramedLink(asyncio.Protocol):
    """A transport speaking the gateway protocol, as awaitable messages.

    Flow control: when the transport's write buffer passes :data:`LINK_HIGH_WATER`
    the link stops reading the peer (so a peer that sends pings and never reads the
    pongs makes us queue no more), and tells the protocol, whose timer closes the
    link if the peer still does not read after its ``stall_timeout``. More than
    :data:`LINK_HARD_CAP` unread closes it at once. A link closed for not reading is
    aborted, not flushed.
    """

    def __init__(
        self,
        side: Side,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        ping_interval: float = PING_INTERVAL,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.conn = Connection(
            side,
            now=time.monotonic(),
            handshake_timeout=handshake_timeout,
            ping_interval=ping_interval,
            idle_timeout=idle_timeout,
        )
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        #: What recv() takes; None once :meth:`listen` gave the events to a callback.
        self._queue: asyncio.Queue[m.Message | Closed] | None = asyncio.Queue()
        self._listener: Callable[[m.Message | Closed], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.closed: asyncio.Future[Closed] = self._loop.create_future()
        #: Done when the transport is gone (after TLS close_notify both ways, or an abort).
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self.peer: str = "?"

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit from asyncio.Transport; duck typing it is.
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        with contextlib.suppress(AttributeError, NotImplementedError):
            transport.set_write_buffer_limits(high=LINK_HIGH_WATER)  # type: ignore[attr-defined]
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data, time.monotonic())
        self._flush()

    def eof_received(self) -> bool | None:
        self.conn.receive_eof()
        self._flush()
        return None

    def pause_writing(self) -> None:
        self.conn.pause_writing(time.monotonic())
        if self.transport is not None:
            with contextlib.suppress(AttributeError, RuntimeError):
                self.transport.pause_reading()
        self._arm()

    def resume_writing(self) -> None:
        self.conn.resume_writing()
        if self.transport is not None and self.conn.state is not State.CLOSED:
            with contextlib.suppress(AttributeError, RuntimeError):
                self.transport.resume_reading()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn.state is not State.CLOSED and self.conn.state is not State.RAW:
            self.conn.receive_eof()
            self._dispatch()
        if self._timer is not None:
            self._timer.cancel()
        if not self.closed.done():
            self.closed.set_result(Closed("eof", "connection lost", by_peer=True))
        if not self.lost.done():
            self.lost.set_result(None)

    # -- API --------------------------------------------------------------------------

    def send(self, msg: m.Message) -> None:
        """Send a message (ProtocolError if the protocol does not allow it now)."""
        self.conn.send(msg, time.monotonic())
        self._flush()

    def send_error(self, code: str, message: str = "") -> None:
        self.conn.send_error(code, message)
        self._flush()

    async def recv(self) -> m.Message:
        """The next message; raises RemoteError for an error frame, ConnectionClosed on close."""
        queue = self._queue
        if queue is None:
            raise RuntimeError("this link hands what it receives to its listener")
        event = await queue.get()
        if isinstance(event, m.Error):
            # Drain the Closed that follows an error frame.
            raise RemoteError(event.code, event.message)
        if isinstance(event, Closed):
            queue.put_nowait(event)  # every later recv() sees the close too
            raise ConnectionClosed(event.code, event.message)
        return event

    async def expect(self, *types: type[m.Message]) -> m.Message:
        """The next message that is not a keepalive; ProtocolError-free type check."""
        while True:
            msg = await self.recv()
            if isinstance(msg, m.Ping | m.Pong):
                continue
            if isinstance(msg, types):
                return msg
            self.send_error("protocol_error", f"unexpected {msg.TYPE}")
            raise ConnectionClosed("protocol_error", f"unexpected {msg.TYPE}")

    def listen(self, listener: Callable[[m.Message | Closed], None]) -> None:
        """From now on hand every message (pings and error frames too) and then the
        close to ``listener`` as it arrives, instead of queueing it for :meth:`recv`.

        A long-lived link that only reacts to what comes (an agent's control connection)
        then needs no task waiting on it, nor a queue: what is queued already goes to
        ``listener`` first, and :meth:`recv` is no longer allowed."""
        queue, self._queue = self._queue, None
        self._listener = listener
        while queue is not None and not queue.empty():
            listener(queue.get_nowait())

    def extend_handshake(self, seconds: float) -> None:
        """Allow the handshake ``seconds`` more from now (see Connection.extend_handshake)."""
        self.conn.extend_handshake(time.monotonic(), seconds)
        self._arm()

    def channel_binding(self) -> bytes:
        """RFC 9266 tls-exporter value of this link."""
        assert self.transport is not None
        obj = self.transport.get_extra_info("ssl_object")
        if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
            raise GatewayError("not a TLS connection")
        return channel_binding(obj)

    def peer_certificate(self) -> bytes | None:
        """DER of the certificate the peer presented, if any (verified by TLS)."""
        assert self.transport is not None
        obj = self.transport.get_extra_info("ssl_object")
        if obj is None:
            return None
        cert: bytes | None = obj.getpeercert(binary_form=True)
        return cert

    def close(self) -> None:
        """Flush what is queued and close."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def aclose(self, timeout: float = 2.0) -> None:
        """Close, then wait at most ``timeout`` for the TLS shutdown to finish.

        A short-lived client (``gw fido2 register``) calls this last, so that its event
        loop does not end with a close still in flight.
        """
        if self.conn.state is State.RAW:
            return  # detached: the transport belongs to a pipe now
        self.close()
        if self.transport is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.lost), timeout)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """After ``spliced``: the transport and the raw bytes already read past the frames."""
        assert self.transport is not None
        leftover = self.conn.take_raw()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return self.transport, leftover

    # -- internals --------------------------------------------------------------------

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            if transport.get_write_buffer_size() > LINK_HARD_CAP:
                self.conn.stall(f"peer left more than {LINK_HARD_CAP} bytes unread")
        self._dispatch()
        if self.conn.state is State.CLOSED and transport is not None:
            if self.conn.write_stalled:
                reset(transport)  # flushing to a peer that does not read would never end
            elif not transport.is_closing():
                transport.close()
        self._arm()

    def _dispatch(self) -> None:
        for event in self.conn.events_received():
            if self._listener is not None:
                self._listener(event)
            elif self._queue is not None:
                self._queue.put_nowait(event)
            if isinstance(event, Closed) and not self.closed.done():
                self.closed.set_result(event)

    def _arm(self) -> None:
        when = self.conn.get_timer()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            # The protocol's clock is time.monotonic(); the loop's clock is its own.
            delay = max(0.0, when - time.monotonic())
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.conn.handle_timer(time.monotonic())
        self._flush()


async def open_link(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    timeout: float = 10.0,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> FramedLink:
    """Dial the gateway and return a connector-side link (preamble already queued)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, link = await loop.create_connection(
            lambda: FramedLink(Side.CONNECTOR, handshake_timeout=handshake_timeout),
            host,
            port,
            ssl=ssl_context,
            server_hostname=server_hostname or host,
            ssl_handshake_timeout=timeout,
        )
    return link


# -- the byte pipe ----------------------------------------------------------------------


class Codec(Protocol):
    """What a pipe end does to bytes it reads before the other end writes them."""

    def feed(self, data: bytes) -> tuple[Sequence[bytes | bytearray | memoryview], bool]:
        """Buffers for the other side, and whether an in-band end of stream was seen."""
        ...  # pragma: no cover

    def end(self) -> bytes | None:
        """Bytes to send the other side when this side's input ends; None: close it.

        Raises GatewayError when the input must not end here (a truncated stream).
        """
        ...  # pragma: no cover


class BufferedCodec(Codec, Protocol):
    """A codec the transport reads straight into (asyncio's BufferedProtocol).

    ``get_buffer`` is where the next read lands; ``filled(n)`` is :meth:`Codec.feed`
    for the ``n`` bytes just read there. Buffers it returns are the other side's to
    keep: the codec never writes to them again.
    """

    def get_buffer(self, sizehint: int) -> memoryview: ...  # pragma: no cover

    def filled(
        self, n: int
    ) -> tuple[Sequence[bytes | bytearray | memoryview], bool]: ...  # pragma: no cover


@dataclass
class PipeResult:
    bytes_a_to_b: int
    bytes_b_to_a: int
    reason: str
    """Which side ended it first and how: ``a closed``, ``b closed``, ``stopped: ...``."""
    cut: bool = False
    """Ended by :meth:`Pipe.abort`: buffered bytes were dropped and both sides reset."""


def reset(transport: Any) -> None:
    """Abort ``transport``; a TCP socket under it is closed with a reset (SO_LINGER 0).

    The application at the other end then reads ECONNRESET, not a clean end of stream
    that would make it believe it received everything.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError, TypeError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


#: A pipe end hands the other side's transport its buffers once per loop iteration
#: (one TLS flush, one send), or at once when this many bytes are waiting: a TLS
#: transport encrypts a batch into one object, kept below glibc's mmap threshold.
_BATCH_BYTES = 64 * 1024


class _EndBase:
    """One side of a pipe: reads its transport, writes the other side's."""

    def __init__(self, pipe: Pipe, name: str, transport: asyncio.BaseTransport) -> None:
        self.pipe = pipe
        self.name = name
        self.transport: Any = transport
        self.other: _EndBase
        self.codec: Codec | None = None
        self.count = 0
        self.eof = False
        self.input_closed = False
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_bytes = 0
        self._flush_soon: asyncio.Handle | None = None

    def data_received(self, data: bytes) -> None:
        if self.pipe.done.done() or self.input_closed:
            return  # a transport may deliver what it had read after the pipe or input stopped
        self.count += len(data)
        self.pipe.last_activity = time.monotonic()
        if self.codec is None:
            self.other.transport.write(data)
            return
        try:
            out, eof = self.codec.feed(data)
        except GatewayError as exc:  # a record that does not decrypt: end the tunnel
            self.pipe.abort(f"{self.name} sent bad data: {exc}")
            return
        self._forward(out, eof)

    def _forward(
        self, out: Sequence[bytes | bytearray | memoryview], eof: bool, more: bool = False
    ) -> None:
        """Hand ``out`` over now, or later in this loop turn when ``more`` is coming.

        A read that filled its buffer says that more is waiting in the socket: the
        writes are batched. A short read (a keystroke) goes out at once.
        """
        if out:
            self._out += out
            for buf in out:
                self._out_bytes += len(buf)
            if not more or self._out_bytes >= _BATCH_BYTES:
                self.flush()
            elif self._flush_soon is None:
                self._flush_soon = self.pipe.loop.call_soon(self.flush)
        if eof:  # the peer's end of stream, in-band: this side's input is over
            self.flush()
            self.eof = True
            self.pipe.half_close(self.other)

    def flush(self) -> None:
        """Write what this side read and has not handed over yet."""
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        if self._out:
            out, self._out = self._out, []
            self._out_bytes = 0
            transport = self.other.transport
            if not transport.is_closing():
                transport.writelines(out)

    def eof_received(self) -> bool | None:
        if self.eof:  # in-band already, or reported twice around set_protocol()
            return True if self.transport.can_write_eof() else None
        self.eof = True
        if self.pipe.done.done():
            return None
        self.flush()
        try:
            tail = self.codec.end() if self.codec is not None else None
        except GatewayError as exc:  # the stream was cut: what came is incomplete
            self.pipe.abort(f"{self.name} cut: {exc}")
            return None
        if tail is None:
            self.pipe.finish(f"{self.name} closed")
            return None
        self.other.transport.write(tail)
        if self.other.eof:
            self.pipe.finish(f"{self.name} closed")
            return None
        # Keep our write side open: the other direction still flows. (A TLS transport
        # has no half-close and warns when asked to keep one.)
        return True if self.transport.can_write_eof() else None

    def pause_writing(self) -> None:
        self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pipe.done.done():
            return
        if not self.eof:
            if exc is not None:  # reset or failed: the other side must not see a clean end
                self.pipe.abort(f"{self.name} failed: {exc}")
                return
            # Gone without an end of stream: for the tunnel, a cut (no END record).
            self.eof_received()
            if self.pipe.done.done():
                return
        reason = f"{self.name} closed" if exc is None else f"{self.name} failed: {exc}"
        self.pipe.finish(reason)


class _End(_EndBase, asyncio.Protocol):
    """A pipe end that gets its bytes in new objects (the gateway's opaque splice)."""


class _BufferedEnd(_EndBase, asyncio.BufferedProtocol):
    """A pipe end whose transport reads straight into its codec's buffer."""

    codec: BufferedCodec

    _asked = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = self.codec.get_buffer(sizehint)
        self._asked = len(buf)
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.pipe.done.done() or self.input_closed:
            return
        self.count += nbytes
        self.pipe.last_activity = time.monotonic()
        try:
            out, eof = self.codec.filled(nbytes)
        except GatewayError as exc:  # a record that does not decrypt: end the tunnel
            self.pipe.abort(f"{self.name} sent bad data: {exc}")
            return
        if nbytes < self._asked and not eof and not self._out:
            # A short read (a keystroke) and nothing held: straight to the other side.
            if out:
                transport = self.other.transport
                if not transport.is_closing():
                    transport.writelines(out)
            return
        self._forward(out, eof, more=nbytes >= self._asked)


class Passthrough:
    """The opaque splice (the gateway's): bytes go on as they came.

    Each read lands in a buffer that is handed on as it is: one copy less than a read
    into the transport's own buffer. The next read reuses that buffer only when nothing
    refers to it any more (the other side's transport took a copy or sent it: a TLS
    transport encrypts at once, a socket sends at once when it can); a write the
    transport still holds is never overwritten.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def get_buffer(self, sizehint: int) -> memoryview:
        # TLS asks for what it has decrypted (plus a little); a socket for 64 KiB.
        size = min(max(sizehint, 4096), PASS_READ_MAX) if sizehint > 0 else PASS_READ_MAX
        # Two references: the attribute and getrefcount's argument. Any other (a view
        # in a transport's queue) and the buffer is someone's: take a new one.
        if len(self._buf) < size or sys.getrefcount(self._buf) > 2:
            self._buf = bytearray(size)
        return memoryview(self._buf)

    def filled(self, n: int) -> tuple[list[memoryview], bool]:
        return [memoryview(self._buf)[:n]], False

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        return [data], False

    def end(self) -> bytes | None:
        return None


#: Largest read buffer of the opaque splice: below glibc's mmap threshold (128 KiB,
#: fixed in gatewayd), so that a buffer is never a fresh mapping to fault in and unmap.
PASS_READ_MAX = 64 * 1024


def _end(pipe: Pipe, name: str, transport: asyncio.BaseTransport, codec: Codec | None) -> _EndBase:
    end: _EndBase
    if codec is None:
        codec = Passthrough()
    if hasattr(codec, "get_buffer"):
        end = _BufferedEnd(pipe, name, transport)
    else:
        end = _End(pipe, name, transport)
    end.codec = codec
    return end


def nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on the TCP socket under ``transport``, if there is one.

    uvloop and asyncio set it on the sockets they make; a pipe sets it again on both
    of its ends, so that no small record of an interactive tunnel waits for an ACK.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError, AttributeError, TypeError, ValueError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Pipe:
    """Splice two transports in both directions, with an optional codec per direction.

    ``codec_a`` transforms what ``a`` reads before ``b`` writes it, and ``codec_b``
    the other way. Without codecs the pipe copies opaquely (the gateway's splice).

    A codec whose input ends without its in-band end of stream (:meth:`Codec.end`
    raises) makes the pipe :meth:`abort`: both transports are reset, so an application
    at either end sees a reset rather than a clean end of a truncated stream.
    """

    def __init__(
        self,
        a: asyncio.BaseTransport,
        b: asyncio.BaseTransport,
        *,
        codec_a: Codec | None = None,
        codec_b: Codec | None = None,
        names: tuple[str, str] = ("a", "b"),
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.a = _end(self, names[0], a, codec_a)
        self.b = _end(self, names[1], b, codec_b)
        self.a.other, self.b.other = self.b, self.a
        self.done: asyncio.Future[PipeResult] = self.loop.create_future()
        self.last_activity = time.monotonic()

    def start(
        self,
        pending_a: bytes = b"",
        pending_b: bytes = b"",
        *,
        eof_a: bool = False,
        eof_b: bool = False,
    ) -> None:
        """Take over both transports and feed what was already read from each."""
        for end in (self.a, self.b):
            end.transport.set_protocol(end)
            nodelay(end.transport)
            with contextlib.suppress(AttributeError, NotImplementedError):
                end.transport.set_write_buffer_limits(high=HIGH_WATER)
        for end, pending, eof in ((self.a, pending_a, eof_a), (self.b, pending_b, eof_b)):
            if pending:
                end.data_received(pending)
            if eof:
                end.eof_received()
            if end.transport.is_closing():
                end.connection_lost(None)
        if self.done.done():
            return
        for end in (self.a, self.b):
            with contextlib.suppress(AttributeError, RuntimeError):
                end.transport.resume_reading()

    @property
    def a_to_b(self) -> int:
        return self.a.count

    @property
    def b_to_a(self) -> int:
        return self.b.count

    def half_close(self, end: _EndBase) -> None:
        """The other side ended its stream in-band: end ours the same way if we can."""
        transport = end.transport
        if transport.can_write_eof():
            transport.write_eof()
            if end.eof:
                self.finish(f"{end.other.name} closed")
        else:
            self.finish(f"{end.other.name} closed")

    def end_input(self, end: _EndBase) -> None:
        """``end``'s application is gone: end its stream in-band now and read no more of it.

        The other direction goes on until the peer ends its stream too.
        """
        end.input_closed = True
        if not end.eof and not self.done.done():
            end.eof_received()

    def finish(self, reason: str) -> None:
        """Stop: flush and close both transports (idempotent)."""
        if self.done.done():
            return
        # Done first: closing a transport may call back into the pipe at once.
        self.done.set_result(PipeResult(self.a.count, self.b.count, reason))
        for end in (self.a, self.b):
            end.flush()
        for end in (self.a, self.b):
            if not end.transport.is_closing():
                end.transport.close()

    def abort(self, reason: str) -> None:
        """Stop at once, dropping what is buffered; both sides see a reset (idempotent)."""
        if not self.done.done():
            self.done.set_result(PipeResult(self.a.count, self.b.count, reason, cut=True))
        for end in (self.a, self.b):
            end.flush()  # as if written at once: what the kernel has not sent is dropped
        for end in (self.a, self.b):
            reset(end.transport)


class PausedProtocol(asyncio.Protocol):
    """Holds a fresh transport still until a pipe takes it; keeps what it already read."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        with contextlib.suppress(AttributeError, RuntimeError):
            transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data

    def eof_received(self) -> bool | None:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
