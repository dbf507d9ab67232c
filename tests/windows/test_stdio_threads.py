"""gw connect --stdio on Windows: standard input and output through threads
(relay/stdio.py), checked here on pipes with the behaviour the tunnel's pipe relies on."""

from __future__ import annotations

import asyncio
import os

from relay.stdio import ThreadReadTransport, ThreadWriteTransport


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.events: list[str] = []
        self.changed = asyncio.Event()

    def _note(self, what: str) -> None:
        self.events.append(what)
        self.changed.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._note("made")

    def data_received(self, data: bytes) -> None:
        self.data += data
        self._note("data")

    def eof_received(self) -> bool | None:
        self._note("eof")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._note(f"lost {exc}")

    def pause_writing(self) -> None:
        self._note("pause")

    def resume_writing(self) -> None:
        self._note("resume")

    async def until(self, check: object) -> None:
        while not check():  # type: ignore[operator]
            self.changed.clear()
            await self.changed.wait()


def test_input_is_held_while_paused_and_its_end_reported_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        proto = Recorder()
        transport = ThreadReadTransport(loop, proto, r)
        transport.pause_reading()  # as PausedProtocol does before the tunnel opens
        os.write(w, b"first")
        os.close(w)
        await proto.until(lambda: "made" in proto.events)
        while not transport._held:  # the thread has read "first" (and holds the end)
            await asyncio.sleep(0)
        assert proto.data == b"" and "eof" not in proto.events  # nothing reached it
        transport.resume_reading()
        await proto.until(lambda: "eof" in proto.events)
        assert proto.data == b"first" and proto.events.count("eof") == 1
        assert not any(e.startswith("lost") for e in proto.events)
        transport.close()
        await proto.until(lambda: "lost None" in proto.events)
        os.close(r)

    asyncio.run(main())


def test_output_is_flushed_then_ended_with_flow_control() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        proto = Recorder()
        transport = ThreadWriteTransport(loop, proto, w)
        transport.set_write_buffer_limits(high=1024)
        payload = os.urandom(1024 * 1024)  # far more than the pipe holds: writing blocks
        transport.write(payload)
        assert "pause" in proto.events
        transport.close()  # flush first, then the reader sees the end

        def read_all() -> bytes:
            chunks = []
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
            return b"".join(chunks)

        got = await loop.run_in_executor(None, read_all)
        await proto.until(lambda: "lost None" in proto.events)
        assert got == payload
        assert "resume" in proto.events
        os.close(r)

    asyncio.run(main())


def test_abort_drops_what_is_buffered_and_ends_the_output() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        proto = Recorder()
        transport = ThreadWriteTransport(loop, proto, w)
        transport.abort()
        transport.write(b"after the abort")
        got = await loop.run_in_executor(None, os.read, r, 100)
        await proto.until(lambda: "lost None" in proto.events)
        assert got == b""
        os.close(r)

    asyncio.run(main())
