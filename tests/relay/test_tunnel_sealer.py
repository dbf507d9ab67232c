"""relay.tunnel.Sealer reuses its full frames, never one a transport still holds."""

from __future__ import annotations

import os

import pytest

from relay import noise, tunnel

KEY = bytes(range(32))


def _pair(cipher: str) -> tuple[tunnel.Sealer, tunnel.Opener]:
    return (
        tunnel.Sealer(noise.CipherState(KEY, cipher)),
        tunnel.Opener(noise.CipherState(KEY, cipher)),
    )


def _seal_full(sealer: tunnel.Sealer, data: bytes) -> bytearray:
    buf = sealer.get_buffer()
    buf[: len(data)] = data
    (frame,), _ = sealer.filled(len(data))
    return frame


@pytest.mark.parametrize("cipher", noise.CIPHERS)
def test_a_frame_still_held_is_never_written_again(cipher: str) -> None:
    sealer, opener = _pair(cipher)
    first_data = os.urandom(tunnel.MAX_RECORD_DATA)
    first = _seal_full(sealer, first_data)
    kept = bytes(first)
    view = memoryview(first)[100:]  # a transport holding a view of it holds it too
    del first
    second = _seal_full(sealer, os.urandom(tunnel.MAX_RECORD_DATA))
    assert bytes(view.obj) == kept  # type: ignore[arg-type]
    assert second is not view.obj
    parts, _ = opener.feed(kept)
    assert b"".join(bytes(p) for p in parts) == first_data


@pytest.mark.parametrize("cipher", noise.CIPHERS)
def test_a_frame_nobody_holds_is_reused_and_every_record_opens(cipher: str) -> None:
    sealer, opener = _pair(cipher)
    sent: list[bytes] = []
    ids = set()
    for _ in range(20):
        data = os.urandom(tunnel.MAX_RECORD_DATA)
        frame = _seal_full(sealer, data)
        ids.add(id(frame))
        assert len(frame) == tunnel.FRAME_SIZE
        parts, _ = opener.feed(frame)  # sent: the transport lets go of it
        sent.append(b"".join(bytes(p) for p in parts))
        assert sent[-1] == data
        del frame
    assert len(ids) == 1  # one frame, reused


def test_short_records_get_fresh_frames() -> None:
    sealer, opener = _pair(noise.AESGCM_CIPHER)
    a = _seal_full(sealer, b"keystroke")
    b = _seal_full(sealer, b"another")
    assert a is not b and len(a) == 2 + 1 + len(b"keystroke") + noise.TAG_LEN
    parts, _ = opener.feed(bytes(a) + bytes(b))
    assert b"".join(bytes(p) for p in parts) == b"keystrokeanother"


def test_many_frames_in_flight_each_stay_intact() -> None:
    sealer, opener = _pair(noise.AESGCM_CIPHER)
    datas = [os.urandom(tunnel.MAX_RECORD_DATA) for _ in range(10)]
    queued = [_seal_full(sealer, d) for d in datas]  # a transport that sends nothing yet
    assert len({id(f) for f in queued}) == len(queued)
    parts, _ = opener.feed(b"".join(queued))
    assert b"".join(bytes(p) for p in parts) == b"".join(datas)
