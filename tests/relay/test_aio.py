"""The byte pipe and the end-to-end handshake hand-over, on transports driven by hand.

The fake transports deliver exactly when a test says so, so each ordering a real
network can produce (a record right after the handshake, an END after the local end,
a close that calls back at once) is played deterministically.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import pytest
import uvloop

from relay import aio, noise, tunnel
from relay.aio import Pipe, reset


class FakeTransport(asyncio.Transport):
    """Records what is written; ``close`` may call the protocol back at once, as a TLS
    transport does when the peer's close_notify is already buffered."""

    def __init__(self, *, half_close: bool = True, calls_back_on_close: bool = False) -> None:
        super().__init__()
        self.protocol: Any = None
        self.written = bytearray()
        self.half_close = half_close
        self.calls_back_on_close = calls_back_on_close
        self.closing = False
        self.aborted = False
        self.eof_written = False
        self.reading = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol  # type: ignore[no-any-return]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing, "write after close"
        self.written += data

    def writelines(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        for part in parts:
            self.write(part)

    def can_write_eof(self) -> bool:
        return self.half_close

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.calls_back_on_close:
            self.protocol.eof_received()
            self.protocol.connection_lost(None)

    def abort(self) -> None:
        self.aborted = self.closing = True

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


async def handshake(
    client_t: FakeTransport, agent_t: FakeTransport
) -> tuple[tunnel.Established, tunnel.Established]:
    """A real Noise IK handshake between the two fake tunnel ends."""
    client_private, client_public = noise.generate_keypair()
    agent_private, agent_public = noise.generate_keypair()
    client = asyncio.create_task(
        tunnel.initiate(
            client_t, b"", static_private=client_private, agent_key=agent_public, session_id="s"
        )
    )
    await asyncio.sleep(0)  # one turn of the loop: message 1 is written
    agent_est = await tunnel.respond(
        agent_t,
        client_t.take(),
        static_private=agent_private,
        expected_client_key=client_public,
        session_id="s",
    )
    client_t.protocol.data_received(agent_t.take())  # message 2
    return await client, agent_est


def records(est: tunnel.Established, data: bytes, end: bool = False) -> bytes:
    out, _ = est.sealer.feed(data)
    tail = est.sealer.end() if end else None
    return b"".join(bytes(p) for p in out) + (tail or b"")


def test_a_record_sent_right_after_the_handshake_reaches_the_pipe() -> None:
    """The service speaks first (an ssh banner): its record arrives after the client's
    handshake is over but before its pipe starts (gw --stdio connects its pipes then)."""

    async def main() -> None:
        client_t, agent_t = FakeTransport(half_close=False), FakeTransport(half_close=False)
        est, agent_est = await handshake(client_t, agent_t)
        client_t.protocol.data_received(records(agent_est, b"SSH-2.0-OpenSSH_9.2\r\n"))
        client_t.protocol.data_received(records(agent_est, b"more", end=True))
        local = FakeTransport()
        pipe = Pipe(local, client_t, codec_a=est.sealer, codec_b=est.opener)
        pending, eof = est.take_pending()
        pipe.start(b"", pending, eof_b=eof)
        assert bytes(local.written) == b"SSH-2.0-OpenSSH_9.2\r\nmore"
        assert local.eof_written and not pipe.done.done()

    run(main)


def test_the_handshake_reader_holds_a_bounded_amount() -> None:
    async def main() -> None:
        client_t, agent_t = FakeTransport(half_close=False), FakeTransport(half_close=False)
        est, agent_est = await handshake(client_t, agent_t)
        sent = 0
        while client_t.reading:
            client_t.protocol.data_received(records(agent_est, b"z" * 60000))
            sent += 60000
        assert len(est.leftover) <= tunnel.HOLD_MAX + 70000
        local = FakeTransport()
        pipe = Pipe(local, client_t, codec_a=est.sealer, codec_b=est.opener)
        pending, eof = est.take_pending()
        pipe.start(b"", pending, eof_b=eof)
        assert client_t.reading  # the pipe reads on
        assert bytes(local.written) == b"z" * sent

    run(main)


def test_end_after_the_local_end_with_a_transport_calling_back_on_close() -> None:
    """Local input ended first; the agent's END then closes the pipe, and closing the TLS
    transport delivers its close_notify at once: the pipe stops once, without error."""

    async def main() -> None:
        client_t = FakeTransport(half_close=False, calls_back_on_close=True)
        est, agent_est = await handshake(client_t, FakeTransport(half_close=False))
        local = FakeTransport()
        pipe = Pipe(local, client_t, codec_a=est.sealer, codec_b=est.opener, names=("l", "t"))
        pipe.start()
        pipe.a.eof_received()  # standard input ended: END goes to the agent
        assert not pipe.done.done()
        client_t.protocol.data_received(records(agent_est, b"reply", end=True))
        result = pipe.done.result()
        assert (result.reason, result.cut) == ("t closed", False)
        assert bytes(local.written) == b"reply" and local.eof_written and not local.aborted

    run(main)


@pytest.mark.parametrize("how", ["eof", "lost", "reset", "eof before the pipe"])
def test_a_tunnel_without_its_end_record_resets_the_local_side(how: str) -> None:
    async def main() -> None:
        client_t = FakeTransport(half_close=False)
        est, agent_est = await handshake(client_t, FakeTransport(half_close=False))
        client_t.protocol.data_received(records(agent_est, b"part of a file"))
        if how == "eof before the pipe":
            client_t.protocol.eof_received()
        local = FakeTransport()
        pipe = Pipe(local, client_t, codec_a=est.sealer, codec_b=est.opener, names=("l", "t"))
        pending, eof = est.take_pending()
        pipe.start(b"", pending, eof_b=eof)
        if how == "eof":
            pipe.b.eof_received()
        elif how == "lost":  # a TCP end without TLS close_notify: no eof_received at all
            pipe.b.connection_lost(None)
        elif how == "reset":
            pipe.b.connection_lost(ConnectionResetError(104, "reset by peer"))
        result = pipe.done.result()
        assert result.cut
        assert bytes(local.written) == b"part of a file"
        assert local.aborted and not local.eof_written

    run(main)


def test_a_tunnel_ended_with_its_end_record_closes_the_local_side_cleanly() -> None:
    async def main() -> None:
        client_t = FakeTransport(half_close=False)
        est, agent_est = await handshake(client_t, FakeTransport(half_close=False))
        local = FakeTransport()
        pipe = Pipe(local, client_t, codec_a=est.sealer, codec_b=est.opener, names=("l", "t"))
        pipe.start()
        client_t.protocol.data_received(records(agent_est, b"all of it", end=True))
        pipe.b.connection_lost(None)
        result = pipe.done.result()
        assert not result.cut and not local.aborted
        assert bytes(local.written) == b"all of it" and local.eof_written

    run(main)


def test_a_local_reset_reaches_the_tunnel_as_a_cut() -> None:
    async def main() -> None:
        client_t = FakeTransport(half_close=False)
        est, _ = await handshake(client_t, FakeTransport(half_close=False))
        local = FakeTransport()
        pipe = Pipe(local, client_t, codec_a=est.sealer, codec_b=est.opener, names=("l", "t"))
        pipe.start()
        pipe.a.connection_lost(ConnectionResetError(104, "reset by peer"))
        assert pipe.done.result().cut and client_t.aborted

    run(main)


@pytest.mark.parametrize("runner", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_reset_makes_the_peer_read_econnreset(runner: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        async def main() -> socket.socket:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            peer, _ = server.accept()
            transport.write(b"unsent")
            reset(transport)
            for _ in range(5):  # let the loop close the socket
                await asyncio.sleep(0)
            return peer

        peer = runner(main())
        with peer:
            peer.settimeout(10)
            with pytest.raises(ConnectionResetError):
                while peer.recv(65536):
                    pass


def test_ending_the_input_sends_end_and_drops_later_input() -> None:
    """gw --stdio on SIGHUP: our stream ends in-band; the agent's side may still finish."""

    async def main() -> None:
        client_t, agent_t = FakeTransport(half_close=False), FakeTransport(half_close=False)
        est, agent_est = await handshake(client_t, agent_t)
        local = FakeTransport()
        pipe = Pipe(local, client_t, codec_a=est.sealer, codec_b=est.opener, names=("l", "t"))
        pipe.start()
        pipe.end_input(pipe.a)
        pipe.a.data_received(b"typed after the hang-up")
        _, ended = agent_est.opener.feed(client_t.take())
        assert ended  # END, and nothing after it
        client_t.protocol.data_received(records(agent_est, b"bye", end=True))
        result = pipe.done.result()
        assert not result.cut and bytes(local.written) == b"bye"

    run(main)


def test_data_waiting_for_the_batch_goes_out_before_the_end_of_stream() -> None:
    """A record and, in a later read of the same loop turn, the END record: the data is
    written before the local side's write end is closed, never after or not at all."""

    async def main() -> None:
        client_t = FakeTransport(half_close=False)
        est, agent_est = await handshake(client_t, FakeTransport(half_close=False))
        local = FakeTransport()
        pipe = Pipe(local, client_t, codec_a=est.sealer, codec_b=est.opener, names=("l", "t"))
        pipe.start()
        order: list[str] = []
        local.write_eof = lambda: order.append(f"eof after {bytes(local.written)!r}")  # type: ignore[method-assign]
        pipe.b.data_received(records(agent_est, b"banner"))
        pipe.b.data_received(records(agent_est, b"", end=True))
        assert order == ["eof after b'banner'"]

    run(main)


def test_full_reads_are_batched_up_to_64_kib_and_a_short_read_goes_out_at_once() -> None:
    """A read that filled its buffer (more is waiting) is held for the loop turn until
    64 KiB wait; the short read after held ones flushes them all, in order, in one write.

    64 KiB, not more: a TLS transport encrypts what one write hands it into one object,
    and above glibc's mmap threshold (128 KiB) each such object is a fresh mapping.
    """

    async def main() -> None:
        a_t, b_t = FakeTransport(), FakeTransport()
        pipe = Pipe(a_t, b_t)
        pipe.start()
        assert isinstance(pipe.a, asyncio.BufferedProtocol)
        writes: list[int] = []
        b_t.writelines = lambda parts: writes.append(sum(len(p) for p in parts))  # type: ignore[method-assign]

        def full_read() -> int:
            buf = pipe.a.get_buffer(4096)  # a TLS transport asks for what it decrypted
            buf[:] = b"a" * len(buf)
            pipe.a.buffer_updated(len(buf))
            return len(buf)

        held = 0
        while held + 4096 < aio._BATCH_BYTES:
            held += full_read()
        assert writes == []  # more is waiting: held for this loop turn
        held += full_read()
        assert writes == [held] and held == aio._BATCH_BYTES
        first = full_read()
        buf = pipe.a.get_buffer(4096)
        buf[:5] = b"hello"
        pipe.a.buffer_updated(5)
        assert writes == [held, first + 5]  # the held read and the short one, one write
        await asyncio.sleep(0)
        assert writes == [held, first + 5]

    run(main)


def test_a_whole_frame_goes_to_the_tunnel_at_once() -> None:
    """A full read of plaintext is one 64 KiB frame: nothing to batch it with."""

    async def main() -> None:
        client_t, agent_t = FakeTransport(half_close=False), FakeTransport(half_close=False)
        est, _ = await handshake(client_t, agent_t)
        local = FakeTransport()
        pipe = Pipe(local, client_t, codec_a=est.sealer, codec_b=est.opener)
        pipe.start()
        writes: list[int] = []
        client_t.writelines = lambda parts: writes.append(sum(len(p) for p in parts))  # type: ignore[method-assign]
        buf = pipe.a.get_buffer(-1)
        buf[:] = b"a" * len(buf)
        pipe.a.buffer_updated(len(buf))
        assert writes == [tunnel.FRAME_SIZE]

    run(main)
