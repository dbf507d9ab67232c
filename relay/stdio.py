"""Standard input and output as asyncio transports, for ``gw connect --stdio``.

On POSIX the loop watches a stream that is a pipe (``connect_read_pipe``/
``connect_write_pipe``). Any other kind is not watched: a regular file is always
"ready" (libuv aborts the process when given one as a pipe), a terminal or
``/dev/null`` is a character device, and a socket given as both streams (inetd
style) would be closed for writing by the pipe transport when its peer ends its
input. Such a stream, and on Windows
every stream (the proactor loop can only watch handles opened for overlapped I/O),
gets a thread that blocks in ``os.read``/``os.write`` and hands the bytes to the
loop. Both behave as the pipe transports do for :class:`relay.aio.Pipe`:
flow control both ways, an end of input reported once as ``eof_received``, and
closing standard output tells the program reading it that the stream ended.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import socket
import stat
import sys
import threading
from typing import Any

#: Bytes read from standard input at a time.
CHUNK = 64 * 1024


async def open_stdio(
    protocol: asyncio.Protocol,
) -> tuple[asyncio.ReadTransport, asyncio.WriteTransport]:
    """Standard input read into ``protocol``; standard output to write to."""
    loop = asyncio.get_running_loop()
    stdin, stdout = _stream(sys.stdin, "input"), _stream(sys.stdout, "output")
    stdout.flush()
    reader: asyncio.ReadTransport
    writer: asyncio.WriteTransport
    if _watchable(stdin):
        reader, _ = await loop.connect_read_pipe(lambda: protocol, stdin)
    else:
        reader = ThreadReadTransport(loop, protocol, stdin.fileno())
    if _watchable(stdout):
        writer, _ = await loop.connect_write_pipe(asyncio.Protocol, stdout)
    else:
        writer = ThreadWriteTransport(loop, asyncio.Protocol(), stdout.fileno())
    return reader, writer


def _stream(stream: Any, name: str) -> Any:
    """``sys.stdin``/``sys.stdout``, or OSError saying in one line that it is closed."""
    try:
        os.fstat(stream.fileno())
    except (AttributeError, ValueError, OSError):
        raise OSError(errno.EBADF, f"standard {name} is closed") from None
    return stream


def _watchable(stream: Any) -> bool:
    """Whether the loop watches ``stream``: a pipe, on POSIX."""
    return sys.platform != "win32" and stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode)


def _end_output(fd: int) -> None:
    """Close ``fd`` so that its reader sees the end of the stream.

    A socket may live on in another descriptor (standard input too): it is shut down
    for writing first, or the peer would never see the end.
    """
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        os.close(fd)


async def finish_output(transport: asyncio.WriteTransport) -> None:
    """Standard output written out and closed, before the program may exit.

    The loop's own pipe transports need nothing: their writes were made at once or
    are made while the loop runs. A thread's writes would die with the program.
    """
    if isinstance(transport, ThreadWriteTransport):
        await transport.finish()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    """From a thread: run ``callback`` on the loop, unless the loop is gone."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


class ThreadReadTransport(asyncio.ReadTransport):
    """A file descriptor read by a thread; its bytes delivered on the loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol, fd: int
    ) -> None:
        super().__init__()
        self._loop, self._protocol, self._fd = loop, protocol, fd
        self._paused = False
        self._closing = False
        self._held: collections.deque[bytes] = collections.deque()  # read while paused
        self._go = threading.Event()  # set while the thread may read on
        self._go.set()
        loop.call_soon(protocol.connection_made, self)
        threading.Thread(target=self._read, name=f"read fd {fd}", daemon=True).start()

    def _read(self) -> None:
        while True:
            self._go.wait()
            try:
                data = os.read(self._fd, CHUNK)
            except OSError:
                data = b""
            self._go.clear()  # one chunk at a time: the loop lets the thread go on
            _call_soon(self._loop, self._received, data)
            if not data:
                return

    def _received(self, data: bytes) -> None:
        if self._closing:
            return
        self._held.append(data)
        self._deliver()

    def _deliver(self) -> None:
        while self._held and not self._paused and not self._closing:
            data = self._held.popleft()
            if data:
                self._protocol.data_received(data)  # type: ignore[attr-defined]
            else:
                self._protocol.eof_received()  # type: ignore[attr-defined]
                return
        if not self._held and not self._paused and not self._closing:
            self._go.set()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._loop.call_soon(self._deliver)

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._held.clear()
            self._loop.call_soon(self._protocol.connection_lost, None)


class ThreadWriteTransport(asyncio.WriteTransport):
    """A file descriptor written by a thread, with the pipe transports' flow control."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol, fd: int
    ) -> None:
        super().__init__()
        self._loop, self._protocol, self._fd = loop, protocol, fd
        self._queue: collections.deque[bytes | None] = collections.deque()
        self._wake = threading.Condition()
        self._buffered = 0
        self._high, self._low = 64 * 1024, 16 * 1024
        self._paused = False
        self._closing = False
        self._lost = False
        self._ended: asyncio.Future[None] = loop.create_future()
        loop.call_soon(protocol.connection_made, self)
        threading.Thread(target=self._write, name=f"write fd {fd}", daemon=True).start()

    def _write(self) -> None:
        error: OSError | None = None
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                data = self._queue.popleft()
            if data is None:
                break
            if error is None:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self._fd, view) :]
                except OSError as exc:
                    error = exc
            _call_soon(self._loop, self._written, len(data))
        _end_output(self._fd)  # the reader of this stream sees its end
        _call_soon(self._loop, self._gone, error)

    def _written(self, size: int) -> None:
        self._buffered -= size
        if self._paused and self._buffered <= self._low:
            self._paused = False
            self._protocol.resume_writing()

    def _gone(self, error: OSError | None) -> None:
        if not self._ended.done():
            self._ended.set_result(None)
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(error)

    def _put(self, item: bytes | None) -> None:
        with self._wake:
            self._queue.append(item)
            self._wake.notify()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        chunk = bytes(data)
        self._buffered += len(chunk)
        self._put(chunk)
        if not self._paused and self._buffered > self._high:
            self._paused = True
            self._protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def can_write_eof(self) -> bool:
        return False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Write what is buffered, then close: the reader sees the end of the stream."""
        if not self._closing:
            self._closing = True
            self._put(None)

    async def finish(self) -> None:
        """Close, and wait until the thread has written what was buffered and closed."""
        self.close()
        await asyncio.shield(self._ended)

    def abort(self) -> None:
        """Drop what is buffered and close at once."""
        with self._wake:
            self._queue.clear()
        self._buffered = 0
        self.close()
