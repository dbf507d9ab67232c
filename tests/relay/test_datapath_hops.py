"""The splice's small-message path: one read and one write per message, read buffers
reused only when nothing refers to them, the bytes whole whatever the chunking."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from loopback import splice_ends

from relay.aio import Pipe

MESSAGES = 200


def _run(main: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(main())  # type: ignore[arg-type]


def _io_counts() -> tuple[int, int]:
    """This process's read and write system calls so far (read/write/readv/writev only:
    the application threads' recv/send are not counted), this look included."""
    fd = os.open("/proc/self/io", os.O_RDONLY)
    try:
        text = os.read(fd, 4096).decode()
    finally:
        os.close(fd)
    fields = dict(line.split(": ") for line in text.splitlines())
    return int(fields["syscr"]), int(fields["syscw"])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_a_small_message_costs_one_read_and_one_write_per_hop() -> None:
    """Ping-pong through a real splice on loopback: for every message that crosses the
    pipe, its loop makes one read and one write, no retry, no second flush."""

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        apps, ends = await splice_ends(timeout=60)
        pipe = Pipe(ends[0], ends[1])
        pipe.start()
        a, b = apps
        msg = os.urandom(100)

        def echo() -> None:
            while data := b.recv(65536):
                b.sendall(data)

        def ping() -> tuple[int, int]:
            a.sendall(msg)  # warm-up: the first message of a connection
            a.recv(100, socket.MSG_WAITALL)
            looked = _io_counts()
            before = _io_counts()  # the look itself: one read
            for _ in range(MESSAGES):
                a.sendall(msg)
                assert a.recv(100, socket.MSG_WAITALL) == msg
            after = _io_counts()
            look = before[0] - looked[0]
            return after[0] - before[0] - look, after[1] - before[1]

        echoing = threading.Thread(target=echo, daemon=True)
        echoing.start()
        try:
            return await loop.run_in_executor(None, ping)
        finally:
            a.shutdown(socket.SHUT_WR)  # the pipe passes the end on: the echo stops
            await loop.run_in_executor(None, echoing.join, 60)
            await asyncio.wait_for(pipe.done, 60)
            a.close()
            b.close()

    counts: list[tuple[int, int]] = []

    async def outer() -> None:
        counts.append(await main())

    _run(outer)
    reads, writes = counts[0]
    hops = 2 * MESSAGES  # there and back
    assert reads == hops and writes == hops


class HoldingTransport(asyncio.Transport):
    """A transport that keeps some writes queued (by reference, as a socket transport
    does when the kernel is full) and copies the others at once."""

    def __init__(self, hold: list[bool]) -> None:
        super().__init__()
        self.protocol: Any = None
        self.hold = hold
        self.calls = 0
        self.parts: list[bytes | memoryview] = []

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol  # type: ignore[no-any-return]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines([data])

    def writelines(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        keep = self.hold[self.calls % len(self.hold)]
        self.calls += 1
        for part in parts:
            self.parts.append(memoryview(part) if keep else bytes(part))

    def received(self) -> bytes:
        return b"".join(bytes(p) for p in self.parts)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 70_000), min_size=1, max_size=25),
    hints=st.lists(st.sampled_from([-1, 1, 300, 4096, 20_000, 1 << 20]), min_size=1),
    hold=st.lists(st.booleans(), min_size=1, max_size=5),
)
def test_bytes_arrive_whole_whatever_the_reads_and_queued_writes(
    chunks: list[int], hints: list[int], hold: list[bool]
) -> None:
    """Reads of any size (each at most what the buffer offers), a transport that keeps
    some writes queued by reference: every byte arrives once and in order, so a reused
    read buffer never overwrites a write still queued."""

    async def main() -> None:
        source, sink = HoldingTransport([False]), HoldingTransport(hold)
        pipe = Pipe(source, sink)
        pipe.start()
        data = os.urandom(sum(chunks))
        pos = 0
        for i, want in enumerate(chunks):
            buf = pipe.a.get_buffer(hints[i % len(hints)])  # type: ignore[attr-defined]
            n = min(want, len(buf))
            buf[:n] = data[pos : pos + n]
            pipe.a.buffer_updated(n)  # type: ignore[attr-defined]
            pos += n
        pipe.a.flush()
        assert sink.received() == data[:pos]

    _run(main)


def test_a_read_buffer_nobody_holds_is_read_into_again() -> None:
    """The transport took a copy: the next read lands in the same buffer (no new
    allocation per message; the old bytes are still there). It kept a view: the next
    read gets a fresh buffer of its own."""

    async def main() -> None:
        sink = HoldingTransport([False, True, False])
        pipe = Pipe(HoldingTransport([False]), sink)
        pipe.start()

        def message(text: bytes) -> bytes:
            """Read ``text``; what the buffer held before."""
            buf = pipe.a.get_buffer(4096)  # type: ignore[attr-defined]
            before = bytes(buf[: len(text)])
            buf[: len(text)] = text
            buf.release()
            pipe.a.buffer_updated(len(text))  # type: ignore[attr-defined]
            return before

        assert message(b"one") == bytes(3)  # copied by the transport
        assert message(b"two") == b"one"  # read into again; this one is held
        assert message(b"six") == bytes(3)  # a buffer of its own
        assert sink.received() == b"onetwosix"

    _run(main)
