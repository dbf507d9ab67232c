"""relay.noise: published vectors, interop with ``noiseprotocol``, misuse and tampering."""

from __future__ import annotations

import ast
import hashlib
import itertools
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

import relay.noise
from relay.errors import NoiseError
from relay.noise import (
    MAX_MESSAGE,
    MAX_PLAINTEXT,
    PROTOCOL_NAME,
    CipherState,
    FrameReader,
    HandshakeState,
    NoiseStream,
    frame,
    generate_keypair,
    public_key,
    short_auth_string,
)

# -- published test vector ----------------------------------------------------------------------

# Cacophony vector "Noise_IK_25519_ChaChaPoly_BLAKE2s" (no PSKs), as shipped in
# github.com/mcginty/snow, tests/vectors/cacophony.txt, commit
# aabed3159deec0a0dfe3d5601c43322d84700c94. (An older revision of that file, commit
# 62fbfae2c84b644a0432ce497a4a47e4fa139a2d, has the same messages but a different
# handshake_hash, 7c9d1ae2...; the value below is the one the independent
# ``noiseprotocol`` package also computes.) Messages alternate initiator, responder, ...
VECTOR = {
    "prologue": "4a6f686e2047616c74",
    "init_static": "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
    "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    "init_remote_static": "31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62",
    "resp_static": "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
    "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
    "handshake_hash": "48f3cb8bc9319da4ba1e9933991b1c4ed4034f1f126a76d3a1fbcfd7f94248d4",
    "messages": [
        (
            "4c756477696720766f6e204d69736573",
            "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944"
            "0b03ddc7aac5123d06a1b23b71670e32e76c28239a7ca4ac8f784de7e44c1adb"
            "fc6e83fef7352a58d9d56157400c0a737b1d171ce368229c7b752ac25b8faf4e"
            "ca690f6d896f543be02c996ab2b86b76",
        ),
        (
            "4d757272617920526f746862617264",
            "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843"
            "d9b5a8927f0ac9655ef76833bc7e5561f42e691ac8404efd6fbd6308b6a27c",
        ),
        (
            "462e20412e20486179656b",
            "2c256ed08fcd08c2980f954ee4beaccb61c9581340f5dd2fd1cf3b",
        ),
        (
            "4361726c204d656e676572",
            "d6033f70eee20945c7c9dba304e397ee3b284ff5e00fd9efb095d3",
        ),
        (
            "4a65616e2d426170746973746520536179",
            "a9c068ca5d8babf72560652d8e851adbfac35c8a66e810d560863173e96adf4cfe",
        ),
        (
            "457567656e2042f6686d20766f6e2042617765726b",
            "2a09d8f459e5927e40fdd2eddc99bdafb04e13a26f145cb5cfe9e6ba34c94331ebc17d5156",
        ),
    ],
}


def _h(key: str) -> bytes:
    value = VECTOR[key]
    assert isinstance(value, str)
    return bytes.fromhex(value)


def _vector_messages() -> list[tuple[bytes, bytes]]:
    messages = VECTOR["messages"]
    assert isinstance(messages, list)
    return [(bytes.fromhex(p), bytes.fromhex(c)) for p, c in messages]


def _vector_pair() -> tuple[HandshakeState, HandshakeState]:
    initiator = HandshakeState.initiator(
        _h("init_static"),
        _h("init_remote_static"),
        _h("prologue"),
        ephemeral_private=_h("init_ephemeral"),
    )
    responder = HandshakeState.responder(
        _h("resp_static"), _h("prologue"), ephemeral_private=_h("resp_ephemeral")
    )
    return initiator, responder


def test_vector_keys_are_consistent() -> None:
    assert public_key(_h("resp_static")) == _h("init_remote_static")


def test_vector_handshake_and_transport() -> None:
    initiator, responder = _vector_pair()
    (p1, c1), (p2, c2), *transport = _vector_messages()

    assert initiator.write_message(p1) == c1
    assert responder.read_message(c1) == p1
    assert responder.remote_static == public_key(_h("init_static"))
    assert not responder.complete
    assert responder.write_message(p2) == c2
    assert initiator.read_message(c2) == p2

    assert initiator.complete and responder.complete
    assert initiator.handshake_hash == _h("handshake_hash")
    assert responder.handshake_hash == _h("handshake_hash")

    i_send, i_recv = initiator.split()
    r_send, r_recv = responder.split()
    for index, (payload, ciphertext) in enumerate(transport):
        if index % 2 == 0:  # initiator -> responder
            assert i_send.encrypt_with_ad(b"", payload) == ciphertext
            assert r_recv.decrypt_with_ad(b"", ciphertext) == payload
        else:
            assert r_send.encrypt_with_ad(b"", payload) == ciphertext
            assert i_recv.decrypt_with_ad(b"", ciphertext) == payload


def test_vector_through_noise_stream() -> None:
    """NoiseStream frames are exactly the vector's transport messages behind a length."""
    initiator, responder = _vector_pair()
    (p1, _), (p2, _), *transport = _vector_messages()
    responder.read_message(initiator.write_message(p1))
    initiator.read_message(responder.write_message(p2))
    i_stream = NoiseStream(*initiator.split())
    r_stream = NoiseStream(*responder.split())
    for index, (payload, ciphertext) in enumerate(transport):
        sender, receiver = (i_stream, r_stream) if index % 2 == 0 else (r_stream, i_stream)
        wire = sender.encrypt(payload)
        assert wire == len(ciphertext).to_bytes(2, "big") + ciphertext
        assert receiver.receive_data(wire) == payload


def test_constants() -> None:
    assert PROTOCOL_NAME == b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
    assert MAX_MESSAGE == 65535
    assert MAX_PLAINTEXT == 65519


def test_generate_keypair() -> None:
    private, public = generate_keypair()
    assert len(private) == 32 and len(public) == 32
    assert public_key(private) == public
    assert generate_keypair()[0] != private


def test_module_is_sans_io() -> None:
    tree = ast.parse(Path(relay.noise.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "ssl", "time", "selectors"}


# -- helpers ------------------------------------------------------------------------------------


def _handshake(
    prologue: bytes = b"",
) -> tuple[HandshakeState, HandshakeState, bytes, bytes]:
    i_static, _ = generate_keypair()
    r_static, r_public = generate_keypair()
    initiator = HandshakeState.initiator(i_static, r_public, prologue)
    responder = HandshakeState.responder(r_static, prologue)
    return initiator, responder, i_static, r_static


def _completed() -> tuple[HandshakeState, HandshakeState]:
    initiator, responder, _, _ = _handshake()
    responder.read_message(initiator.write_message(b"hello"))
    initiator.read_message(responder.write_message(b"welcome"))
    return initiator, responder


def _streams() -> tuple[NoiseStream, NoiseStream]:
    initiator, responder = _completed()
    return NoiseStream(*initiator.split()), NoiseStream(*responder.split())


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def test_round_trip_and_identities() -> None:
    initiator, responder, i_static, r_static = _handshake(b"gw/1")
    assert initiator.remote_static == public_key(r_static)
    assert responder.remote_static is None
    m1 = initiator.write_message(b"")
    assert len(m1) == 96
    assert responder.read_message(m1) == b""
    assert responder.remote_static == public_key(i_static)
    m2 = responder.write_message(b"payload")
    assert len(m2) == 48 + 7
    assert initiator.read_message(m2) == b"payload"
    assert initiator.handshake_hash == responder.handshake_hash
    assert short_auth_string(initiator.handshake_hash) == short_auth_string(
        responder.handshake_hash
    )
    i_send, i_recv = initiator.split()
    r_send, r_recv = responder.split()
    assert initiator.split() == (i_send, i_recv)  # same objects: no second nonce sequence
    assert r_recv.decrypt_with_ad(b"", i_send.encrypt_with_ad(b"", b"up")) == b"up"
    assert i_recv.decrypt_with_ad(b"", r_send.encrypt_with_ad(b"", b"down")) == b"down"


def test_fresh_ephemerals_give_fresh_sessions() -> None:
    i_static, _ = generate_keypair()
    _, r_public = generate_keypair()
    first = HandshakeState.initiator(i_static, r_public).write_message()
    second = HandshakeState.initiator(i_static, r_public).write_message()
    assert first[:32] != second[:32]


# -- interop with the independent noiseprotocol package -----------------------------------------


def _theirs(
    initiator: bool, static: bytes, remote_static: bytes | None, prologue: bytes
) -> NoiseConnection:
    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static)
    if remote_static is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_static)
    conn.set_prologue(prologue)
    conn.start_handshake()
    return conn


TRANSPORT = [b"", b"x", b"hello over the tunnel", bytes(range(256)) * 40, b"\xff" * MAX_PLAINTEXT]


@pytest.mark.parametrize("prologue", [b"", b"gw-relay/1 session 42"])
def test_interop_our_initiator_their_responder(prologue: bytes) -> None:
    i_static, i_public = generate_keypair()
    r_static, r_public = generate_keypair()
    ours = HandshakeState.initiator(i_static, r_public, prologue)
    theirs = _theirs(False, r_static, None, prologue)

    assert theirs.read_message(ours.write_message(b"client hello")) == b"client hello"
    assert theirs.noise_protocol.handshake_state.rs.public_bytes == i_public
    assert ours.read_message(bytes(theirs.write_message(b"server hello"))) == b"server hello"
    assert theirs.handshake_finished and ours.complete
    assert ours.handshake_hash == theirs.get_handshake_hash()

    send, receive = ours.split()
    for message in TRANSPORT:
        assert theirs.decrypt(send.encrypt_with_ad(b"", message)) == message
        assert receive.decrypt_with_ad(b"", theirs.encrypt(message)) == message


@pytest.mark.parametrize("prologue", [b"", b"gw-relay/1 session 42"])
def test_interop_their_initiator_our_responder(prologue: bytes) -> None:
    i_static, i_public = generate_keypair()
    r_static, r_public = generate_keypair()
    theirs = _theirs(True, i_static, r_public, prologue)
    ours = HandshakeState.responder(r_static, prologue)

    assert ours.read_message(bytes(theirs.write_message(b"client hello"))) == b"client hello"
    assert ours.remote_static == i_public
    assert theirs.read_message(ours.write_message(b"server hello")) == b"server hello"
    assert theirs.handshake_finished and ours.complete
    assert ours.handshake_hash == theirs.get_handshake_hash()

    send, receive = ours.split()
    for message in TRANSPORT:
        assert theirs.decrypt(send.encrypt_with_ad(b"", message)) == message
        assert receive.decrypt_with_ad(b"", theirs.encrypt(message)) == message


def test_interop_prologue_mismatch_fails() -> None:
    i_static, _ = generate_keypair()
    r_static, r_public = generate_keypair()
    theirs = _theirs(True, i_static, r_public, b"one")
    ours = HandshakeState.responder(r_static, b"two")
    with pytest.raises(NoiseError):
        ours.read_message(bytes(theirs.write_message(b"")))


# -- tampering and misuse -----------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 31, 32, 63, 64, 79, 80, 95, 100])
def test_tampered_message_1(index: int) -> None:
    initiator, responder, _, _ = _handshake()
    m1 = initiator.write_message(b"abcdef")
    with pytest.raises(NoiseError):
        responder.read_message(_flip(m1, index))
    assert responder.remote_static is None
    assert not responder.complete
    with pytest.raises(NoiseError):  # a failed handshake stays failed
        responder.read_message(m1)
    with pytest.raises(NoiseError):
        responder.write_message(b"")


@pytest.mark.parametrize("index", [0, 31, 32, 47, 50])
def test_tampered_message_2(index: int) -> None:
    initiator, responder, _, _ = _handshake()
    responder.read_message(initiator.write_message(b""))
    m2 = responder.write_message(b"abc")
    with pytest.raises(NoiseError):
        initiator.read_message(_flip(m2, index))
    assert not initiator.complete
    with pytest.raises(NoiseError):
        initiator.read_message(m2)
    with pytest.raises(NoiseError):
        initiator.split()


def test_wrong_responder_static_key() -> None:
    i_static, _ = generate_keypair()
    _, expected_public = generate_keypair()
    actual_static, _ = generate_keypair()
    initiator = HandshakeState.initiator(i_static, expected_public)
    responder = HandshakeState.responder(actual_static)
    with pytest.raises(NoiseError):
        responder.read_message(initiator.write_message(b"secret"))
    assert responder.remote_static is None


def test_message_2_from_another_session() -> None:
    """A message 2 produced for a different message 1 does not verify."""
    initiator, responder, _, _ = _handshake()
    responder.read_message(initiator.write_message(b""))
    other_i, other_r, _, _ = _handshake()
    other_r.read_message(other_i.write_message(b""))
    with pytest.raises(NoiseError):
        initiator.read_message(other_r.write_message(b""))


def test_prologue_mismatch() -> None:
    i_static, _ = generate_keypair()
    r_static, r_public = generate_keypair()
    initiator = HandshakeState.initiator(i_static, r_public, b"v1")
    responder = HandshakeState.responder(r_static, b"v2")
    with pytest.raises(NoiseError):
        responder.read_message(initiator.write_message(b""))


@pytest.mark.parametrize("length", [0, 1, 95])
def test_short_message_1(length: int) -> None:
    initiator, responder, _, _ = _handshake()
    m1 = initiator.write_message(b"")
    with pytest.raises(NoiseError, match="bad length"):
        responder.read_message(m1[:length])


def test_short_message_2() -> None:
    initiator, responder, _, _ = _handshake()
    responder.read_message(initiator.write_message(b""))
    m2 = responder.write_message(b"")
    with pytest.raises(NoiseError, match="bad length"):
        initiator.read_message(m2[:47])


def test_oversized_handshake_messages() -> None:
    initiator, responder, _, _ = _handshake()
    with pytest.raises(NoiseError, match="too long"):
        initiator.write_message(bytes(MAX_MESSAGE - 95))
    initiator2, responder2, _, _ = _handshake()
    m1 = initiator2.write_message(bytes(MAX_MESSAGE - 96))
    assert len(m1) == MAX_MESSAGE
    assert responder2.read_message(m1) == bytes(MAX_MESSAGE - 96)
    with pytest.raises(NoiseError, match="bad length"):
        responder.read_message(bytes(MAX_MESSAGE + 1))


def test_out_of_turn_calls() -> None:
    initiator, responder, _, _ = _handshake()
    with pytest.raises(NoiseError, match="turn"):
        initiator.read_message(bytes(96))
    with pytest.raises(NoiseError, match="turn"):
        responder.write_message(b"")
    m1 = initiator.write_message(b"")
    with pytest.raises(NoiseError, match="turn"):
        initiator.write_message(b"")
    responder.read_message(m1)
    with pytest.raises(NoiseError, match="turn"):
        responder.read_message(m1)


def test_use_before_complete() -> None:
    initiator, responder, _, _ = _handshake()
    for state in (initiator, responder):
        assert not state.complete
        with pytest.raises(NoiseError):
            state.split()
        with pytest.raises(NoiseError):
            _ = state.handshake_hash
    responder.read_message(initiator.write_message(b""))
    with pytest.raises(NoiseError):
        responder.split()
    with pytest.raises(NoiseError):
        NoiseStream(CipherState(), CipherState())
    with pytest.raises(NoiseError):
        NoiseStream(CipherState(bytes(32)), CipherState())


def test_use_after_complete() -> None:
    initiator, responder = _completed()
    with pytest.raises(NoiseError, match="complete"):
        initiator.write_message(b"")
    with pytest.raises(NoiseError, match="complete"):
        responder.read_message(bytes(48))


def test_bad_key_lengths() -> None:
    private, public = generate_keypair()
    with pytest.raises(NoiseError):
        HandshakeState.initiator(private[:31], public)
    with pytest.raises(NoiseError):
        HandshakeState.initiator(private, public + b"\x00")
    with pytest.raises(NoiseError):
        HandshakeState.responder(b"")
    with pytest.raises(NoiseError):
        public_key(b"short")
    with pytest.raises(NoiseError):
        CipherState(bytes(16))


def test_low_order_remote_static_rejected() -> None:
    private, _ = generate_keypair()
    initiator = HandshakeState.initiator(private, bytes(32))  # the all-zero (low-order) point
    with pytest.raises(NoiseError):
        initiator.write_message(b"")


def test_low_order_ephemeral_rejected() -> None:
    initiator, responder, _, _ = _handshake()
    m1 = bytearray(initiator.write_message(b""))
    m1[:32] = bytes(32)
    with pytest.raises(NoiseError):
        responder.read_message(bytes(m1))


# -- CipherState ---------------------------------------------------------------------------------


def test_cipher_state_without_key_is_identity() -> None:
    state = CipherState()
    assert not state.has_key()
    assert state.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert state.decrypt_with_ad(b"ad", b"plain") == b"plain"


def test_cipher_state_nonce_encoding() -> None:
    """Spec 12.3: 32 zero bits then the little-endian counter, checked against the AEAD."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    key = bytes(range(32))
    state = CipherState(key)
    state.set_nonce(0x0102030405060708)
    nonce = b"\x00\x00\x00\x00" + bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert state.encrypt_with_ad(b"ad", b"msg") == ChaCha20Poly1305(key).encrypt(
        nonce, b"msg", b"ad"
    )
    assert state.nonce == 0x0102030405060709


def test_replayed_and_reordered_transport_messages() -> None:
    initiator, responder = _completed()
    send, _ = initiator.split()
    _, receive = responder.split()
    first = send.encrypt_with_ad(b"", b"one")
    second = send.encrypt_with_ad(b"", b"two")
    with pytest.raises(NoiseError):  # reordered
        receive.decrypt_with_ad(b"", second)
    assert receive.nonce == 0  # a failure does not advance the nonce (spec 5.1)
    assert receive.decrypt_with_ad(b"", first) == b"one"
    with pytest.raises(NoiseError):  # replayed
        receive.decrypt_with_ad(b"", first)
    assert receive.decrypt_with_ad(b"", second) == b"two"


def test_wrong_associated_data() -> None:
    state = CipherState(bytes(32))
    ciphertext = state.encrypt_with_ad(b"a", b"data")
    with pytest.raises(NoiseError):
        CipherState(bytes(32)).decrypt_with_ad(b"b", ciphertext)


def test_nonce_exhaustion() -> None:
    key = bytes(32)
    send, receive = CipherState(key), CipherState(key)
    send.set_nonce(2**64 - 2)
    receive.set_nonce(2**64 - 2)
    last = send.encrypt_with_ad(b"", b"last")
    assert receive.decrypt_with_ad(b"", last) == b"last"
    with pytest.raises(NoiseError, match="nonce"):
        send.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(NoiseError, match="nonce"):
        receive.decrypt_with_ad(b"", last)
    with pytest.raises(NoiseError):
        send.set_nonce(2**64)
    with pytest.raises(NoiseError):
        send.set_nonce(-1)


def test_cipher_state_length_limits() -> None:
    state = CipherState(bytes(32))
    assert len(state.encrypt_with_ad(b"", bytes(MAX_PLAINTEXT))) == MAX_MESSAGE
    with pytest.raises(NoiseError):
        state.encrypt_with_ad(b"", bytes(MAX_PLAINTEXT + 1))
    with pytest.raises(NoiseError):
        state.decrypt_with_ad(b"", bytes(MAX_MESSAGE + 1))
    with pytest.raises(NoiseError):
        state.decrypt_with_ad(b"", bytes(15))


def test_rekey_both_sides() -> None:
    send, receive = CipherState(bytes(32)), CipherState(bytes(32))
    before = send.encrypt_with_ad(b"", b"a")
    assert receive.decrypt_with_ad(b"", before) == b"a"
    send.rekey()
    receive.rekey()
    assert send.nonce == receive.nonce == 1
    after = send.encrypt_with_ad(b"", b"a")
    assert receive.decrypt_with_ad(b"", after) == b"a"
    with pytest.raises(NoiseError):
        CipherState().rekey()


# -- NoiseStream ---------------------------------------------------------------------------------


def test_stream_empty_and_chunking() -> None:
    client, server = _streams()
    assert client.encrypt(b"") == b""
    data = bytes(range(256)) * (2 * MAX_PLAINTEXT // 256 + 3)
    wire = client.encrypt(data)
    lengths = []
    pos = 0
    while pos < len(wire):
        length = int.from_bytes(wire[pos : pos + 2], "big")
        lengths.append(length)
        pos += 2 + length
    assert lengths == [MAX_MESSAGE, MAX_MESSAGE, len(data) - 2 * MAX_PLAINTEXT + 16]
    assert server.receive_data(wire) == data
    assert server.bytes_buffered == 0


def test_stream_byte_at_a_time_and_trailing_data() -> None:
    key = bytes(range(32))
    messages = [b"first", b"", b"second" * 1000, bytes(70000)]
    sender = NoiseStream(CipherState(key), CipherState(bytes(32)))
    wire = b"".join(sender.encrypt(m) for m in messages)
    tail = sender.encrypt(b"tail message")
    expected = b"".join(messages)

    def receiver() -> NoiseStream:  # each starts at nonce 0 with the sender's key
        return NoiseStream(CipherState(bytes(32)), CipherState(key))

    whole = receiver()
    assert whole.receive_data(wire) == expected

    one_by_one = receiver()
    got = bytearray()
    for i in range(len(wire)):
        got += one_by_one.receive_data(wire[i : i + 1])
    assert bytes(got) == expected
    assert one_by_one.bytes_buffered == 0

    trailing = receiver()
    assert trailing.receive_data(wire + tail[:7]) == expected
    assert trailing.bytes_buffered == 7
    assert trailing.receive_data(tail[7:]) == b"tail message"
    assert trailing.bytes_buffered == 0


def test_stream_replayed_frame() -> None:
    client, server = _streams()
    wire = client.encrypt(b"once")
    assert server.receive_data(wire) == b"once"
    with pytest.raises(NoiseError):
        server.receive_data(wire)
    with pytest.raises(NoiseError, match="failed"):  # the stream stays broken
        server.receive_data(client.encrypt(b"next"))


def test_stream_reordered_frames() -> None:
    client, server = _streams()
    first, second = client.encrypt(b"1"), client.encrypt(b"2")
    with pytest.raises(NoiseError):
        server.receive_data(second + first)


def test_stream_truncated_frame() -> None:
    client, server = _streams()
    wire = client.encrypt(b"hello")
    cut = (len(wire) - 3).to_bytes(2, "big") + wire[2:-1]  # length fixed up, tag cut short
    with pytest.raises(NoiseError):
        server.receive_data(cut)


def test_stream_frame_shorter_than_tag() -> None:
    _, server = _streams()
    with pytest.raises(NoiseError, match="shorter than a tag"):
        server.receive_data(b"\x00\x0f" + bytes(15))
    _, server = _streams()
    with pytest.raises(NoiseError):
        server.receive_data(b"\x00\x00")


def test_stream_tampered_frame() -> None:
    client, server = _streams()
    wire = client.encrypt(b"payload")
    with pytest.raises(NoiseError):
        server.receive_data(_flip(wire, 5))


def test_stream_lost_bytes_desynchronise() -> None:
    client, server = _streams()
    wire = client.encrypt(b"a" * 100) + client.encrypt(b"b" * 100)
    with pytest.raises(NoiseError):
        server.receive_data(wire[:50] + wire[51:])


def test_stream_large_volume_compacts() -> None:
    client, server = _streams()
    data = bytes(range(251)) * 4000  # ~1 MB, several frames
    wire = client.encrypt(data)
    got = bytearray()
    for start in range(0, len(wire), 1000):
        got += server.receive_data(wire[start : start + 1000])
        assert server.bytes_buffered < MAX_MESSAGE + 2
    assert bytes(got) == data


# -- framing of handshake messages --------------------------------------------------------------


def test_frame_and_reader() -> None:
    assert frame(b"") == b"\x00\x00"
    assert frame(b"abc") == b"\x00\x03abc"
    with pytest.raises(NoiseError):
        frame(bytes(MAX_MESSAGE + 1))
    reader = FrameReader()
    assert reader.next_message() is None
    wire = frame(b"one") + frame(b"") + frame(b"three")
    reader.receive_data(wire[:1])
    assert reader.next_message() is None
    reader.receive_data(wire[1:4])
    assert reader.next_message() is None
    reader.receive_data(wire[4:])
    assert reader.next_message() == b"one"
    assert reader.next_message() == b""
    assert reader.next_message() == b"three"
    assert reader.next_message() is None
    assert reader.take_remaining() == b""


def test_frame_reader_oversized_length() -> None:
    reader = FrameReader(max_message=512)
    reader.receive_data(b"\x02\x01")
    with pytest.raises(NoiseError, match="limit"):
        reader.next_message()
    with pytest.raises(NoiseError):
        FrameReader(max_message=MAX_MESSAGE + 1)


def test_handshake_over_a_byte_stream() -> None:
    """Handshake frames, then transport data in the same read, split by FrameReader."""
    initiator, responder, _, _ = _handshake(b"stream")
    server_reader = FrameReader(max_message=1024)
    server_reader.receive_data(frame(initiator.write_message(b"hi")))
    message = server_reader.next_message()
    assert message is not None
    assert responder.read_message(message) == b"hi"
    to_client = frame(responder.write_message(b"ok"))
    server = NoiseStream(*responder.split())
    to_client += server.encrypt(b"early data")

    client_reader = FrameReader()
    for i in range(len(to_client)):  # one byte at a time
        client_reader.receive_data(to_client[i : i + 1])
    message = client_reader.next_message()
    assert message is not None
    assert initiator.read_message(message) == b"ok"
    client = NoiseStream(*initiator.split())
    assert client.receive_data(client_reader.take_remaining()) == b"early data"
    assert client_reader.take_remaining() == b""


# -- short authentication string ----------------------------------------------------------------


def test_short_auth_string() -> None:
    handshake_hash = _h("handshake_hash")
    sas = short_auth_string(handshake_hash)
    assert re.fullmatch(r"\d{4}-\d{4}-\d{4}", sas)
    digest = hashlib.blake2s(b"gw-sas-v1" + handshake_hash).digest()
    digits = f"{int.from_bytes(digest, 'big') % 10**12:012d}"
    assert sas == f"{digits[:4]}-{digits[4:8]}-{digits[8:]}"
    assert short_auth_string(_flip(handshake_hash, 0)) != sas
    with pytest.raises(NoiseError):
        short_auth_string(b"")


# -- properties ----------------------------------------------------------------------------------


def _stream_pair_from_key(key: bytes) -> tuple[NoiseStream, NoiseStream]:
    return (
        NoiseStream(CipherState(key), CipherState(bytes(32))),
        NoiseStream(CipherState(bytes(32)), CipherState(key)),
    )


@settings(deadline=None, max_examples=200)
@given(
    key=st.binary(min_size=32, max_size=32),
    messages=st.lists(st.binary(max_size=3000), max_size=8),
    big=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=200_000), max_size=30),
)
def test_property_random_chunking(
    key: bytes, messages: list[bytes], big: bool, cuts: list[int]
) -> None:
    if big:
        messages = [*messages, bytes(range(256)) * 300]  # over MAX_PLAINTEXT: two frames
    sender, receiver = _stream_pair_from_key(key)
    wire = b"".join(sender.encrypt(m) for m in messages)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    got = bytearray()
    for start, end in itertools.pairwise(points):
        got += receiver.receive_data(wire[start:end])
    assert bytes(got) == b"".join(messages)
    assert receiver.bytes_buffered == 0


@settings(deadline=None)
@given(
    messages=st.lists(st.binary(max_size=600), max_size=10),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
def test_property_frame_reader_chunking(messages: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frame(m) for m in messages) + b"\x00"  # one trailing byte
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    reader = FrameReader()
    got: list[bytes] = []
    for start, end in itertools.pairwise(points):
        reader.receive_data(wire[start:end])
        while (message := reader.next_message()) is not None:
            got.append(message)
    assert got == messages
    assert reader.take_remaining() == b"\x00"
