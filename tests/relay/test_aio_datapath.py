"""The tunnel's data path on real loopback sockets, in one process.

Two pipes as ``gw connect`` and the agent run them (local socket, Sealer/Opener, the
tunnel socket between them; the gateway's TLS splice left out): the bytes arrive
whole and in order in both directions, each record is one 64 KiB frame (four whole
TLS records), the transports read straight into the codecs (BufferedProtocol), every
socket of a pipe has TCP_NODELAY, and the crypto still refuses what it must: a byte
changed in flight or a tunnel cut without its end record resets the local side.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from loopback import splice_ends

from relay import aio, noise, tunnel
from relay.aio import PausedProtocol, Pipe

MIB = 1 << 20


async def _accept_one(loop: asyncio.AbstractEventLoop) -> tuple[Any, Any, asyncio.Server]:
    """A connected pair of loop transports (held by PausedProtocol) on loopback."""
    accepted: asyncio.Future[PausedProtocol] = loop.create_future()

    def factory() -> PausedProtocol:
        proto = PausedProtocol()
        accepted.set_result(proto)
        return proto

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    t, _ = await loop.create_connection(PausedProtocol, "127.0.0.1", port)
    await asyncio.sleep(0)
    far = await accepted
    return t, far.transport, server


class Tunnel:
    """app_a <-> [pipe A: Sealer/Opener] <-> tunnel socket <-> [pipe B] <-> app_b."""

    async def start(self, on_wire: Callable[[bytearray], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.servers: list[asyncio.Server] = []
        send, receive = os.urandom(32), os.urandom(32)
        # The applications' sockets: plain blocking sockets, as a real application.
        self.app_a, self.app_b = [], []
        ends = []
        for _ in range(2):
            listener = socket.create_server(("127.0.0.1", 0))
            app = socket.create_connection(listener.getsockname())
            conn, _ = listener.accept()
            listener.close()
            conn.setblocking(False)
            t, _ = await loop.connect_accepted_socket(PausedProtocol, conn)
            ends.append((app, t))
        (self.app_a, local_a), (self.app_b, local_b) = ends
        for app in (self.app_a, self.app_b):
            app.settimeout(10)
        tunnel_a, tunnel_b, server = await _accept_one(loop)
        self.servers.append(server)
        self.tunnel_sockets = [tunnel_a.get_extra_info("socket"), tunnel_b.get_extra_info("socket")]
        for sock in self.tunnel_sockets:  # as if someone had turned it off: the pipe turns it on
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        sealer_a = tunnel.Sealer(noise.CipherState(send))
        opener_b = tunnel.Opener(noise.CipherState(send))
        sealer_b = tunnel.Sealer(noise.CipherState(receive))
        opener_a = tunnel.Opener(noise.CipherState(receive))
        if on_wire is not None:
            real_filled = sealer_a.filled

            def filled(n: int) -> tuple[list[bytearray], bool]:
                out, eof = real_filled(n)
                for frame in out:
                    on_wire(frame)
                return out, eof

            sealer_a.filled = filled  # type: ignore[method-assign]
        self.pipe_a = Pipe(local_a, tunnel_a, codec_a=sealer_a, codec_b=opener_a)
        self.pipe_b = Pipe(local_b, tunnel_b, codec_a=sealer_b, codec_b=opener_b)
        self.pipe_a.start()
        self.pipe_b.start()

    def close(self) -> None:
        for app in (self.app_a, self.app_b):
            app.close()
        for server in self.servers:
            server.close()


def _run(main: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(main())  # type: ignore[arg-type]


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(min(MIB, n - len(out)))
        if not data:
            break
        out += data
    return bytes(out)


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_bytes_cross_whole_both_ways_and_each_record_is_one_whole_frame() -> None:
    frames: list[int] = []

    async def main() -> None:
        t = Tunnel()
        await t.start(on_wire=lambda frame: frames.append(len(frame)))
        try:
            # TCP_NODELAY on every socket of the path, even one that had it off.
            for sock in t.tunnel_sockets:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            up, down = os.urandom(8 * MIB + 12345), os.urandom(3 * MIB + 7)
            sending = [_in_thread(t.app_a.sendall, up), _in_thread(t.app_b.sendall, down)]
            got_b, got_a, *_ = await asyncio.gather(
                _in_thread(_read_exactly, t.app_b, len(up)),
                _in_thread(_read_exactly, t.app_a, len(down)),
                *sending,
            )
            assert got_b == up and got_a == down
            # A stream's end crosses as the END record: a clean end, both sides.
            t.app_a.shutdown(socket.SHUT_WR)
            assert await _in_thread(t.app_b.recv, 1) == b""
            t.app_b.shutdown(socket.SHUT_WR)
            assert await _in_thread(t.app_a.recv, 1) == b""
            result = await asyncio.wait_for(t.pipe_a.done, 10)
            assert not result.cut and result.bytes_a_to_b == len(up)
        finally:
            t.close()

    _run(main)
    assert sum(frames) > 8 * MIB
    assert max(frames) == tunnel.FRAME_SIZE == 4 * 16384  # whole TLS records, no runt
    # Records are as large as the reads allow: most of the bulk went in full frames.
    assert frames.count(tunnel.FRAME_SIZE) * tunnel.FRAME_SIZE > 4 * MIB


def test_the_pipe_reads_the_tunnel_into_the_codec_buffer() -> None:
    """Both codecs read in place (asyncio.BufferedProtocol), not from new objects."""

    async def main() -> None:
        t = Tunnel()
        await t.start()
        try:
            for end in (t.pipe_a.a, t.pipe_a.b, t.pipe_b.a, t.pipe_b.b):
                assert isinstance(end, asyncio.BufferedProtocol)
        finally:
            t.close()

    _run(main)


@pytest.mark.parametrize("attack", ["flip a bit", "cut without END"])
def test_a_changed_or_cut_tunnel_resets_the_application(attack: str) -> None:
    """The buffered path keeps the AEAD and the end record: a byte changed in flight
    or a tunnel cut before its END is a reset at the application, never a clean end."""

    async def main() -> None:
        t = Tunnel()
        flipped = False

        def tamper(frame: bytearray) -> None:
            nonlocal flipped
            if attack == "flip a bit" and not flipped and len(frame) > 100:
                frame[50] ^= 0x01
                flipped = True

        await t.start(on_wire=tamper)
        try:
            await _in_thread(t.app_a.sendall, os.urandom(200_000))
            if attack == "cut without END":
                aio.reset(t.pipe_a.b.transport)  # the tunnel socket dies, no END record
            result = await asyncio.wait_for(t.pipe_b.done, 10)
            assert result.cut
            with pytest.raises(ConnectionResetError):
                while await _in_thread(t.app_b.recv, MIB):
                    pass
        finally:
            t.close()

    _run(main)


def test_run_freezes_what_start_up_made() -> None:
    async def main() -> int:
        return gc.get_freeze_count()

    try:
        assert aio.run(main()) > 0
    finally:
        gc.unfreeze()


def test_a_frame_fits_the_opener_buffer_whatever_the_reads() -> None:
    """Frames split at every boundary still open in order (partial frames kept)."""
    key = os.urandom(32)
    sealer = tunnel.Sealer(noise.CipherState(key))
    opener = tunnel.Opener(noise.CipherState(key))
    data = os.urandom(5 * tunnel.MAX_RECORD_DATA + 99)
    wire = b"".join(bytes(f) for f in sealer.feed(data)[0]) + (sealer.end() or b"")
    out = bytearray()
    pos, step = 0, 1
    while pos < len(wire):
        space = opener.get_buffer()
        assert len(space) > tunnel.FRAME_SIZE  # room for the largest frame there is
        k = min(step, len(space), len(wire) - pos)
        space[:k] = wire[pos : pos + k]
        chunks, ended = opener.filled(k)
        out += b"".join(chunks)
        pos += k
        step = step * 3 + 1 if step < 100_000 else 7
    assert bytes(out) == data and ended
    with contextlib.suppress(Exception):
        opener.end()


def test_the_opaque_splice_reads_into_fresh_buffers_and_carries_bytes_whole() -> None:
    """The gateway's splice (no codecs): each read is handed on in a buffer of its own,
    so a write the transport keeps queued is never overwritten by the next read."""

    async def main() -> None:
        apps, ends = await splice_ends(timeout=10)
        pipe = Pipe(ends[0], ends[1])
        pipe.start()
        assert isinstance(pipe.a, asyncio.BufferedProtocol)
        try:
            data = os.urandom(6 * MIB + 3)
            _, got = await asyncio.gather(
                _in_thread(apps[0].sendall, data), _in_thread(_read_exactly, apps[1], len(data))
            )
            assert got == data
            apps[0].shutdown(socket.SHUT_WR)
            assert await _in_thread(apps[1].recv, 1) == b""
        finally:
            for app in apps:
                app.close()

    _run(main)
