"""relay.noise with AESGCM (spec 12.4): the published vector, interop, the nonce layout.

The second cipher of the end-to-end layer, ``Noise_IK_25519_AESGCM_BLAKE2s`` (and the
hybrid ``Noise_IKpsk2_25519_AESGCM_BLAKE2s``): checked against the cacophony vector,
against the independent ``noiseprotocol`` package, and, for the one place it differs
from ChaChaPoly besides the primitive (the nonce: 32 zero bits then the counter
*big*-endian), against ``cryptography``'s AES-GCM directly.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from noise.connection import Keypair, NoiseConnection

from relay.errors import NoiseError
from relay.noise import (
    AESGCM_CIPHER,
    CHACHAPOLY,
    CIPHERS,
    MAX_NONCE,
    MAX_PLAINTEXT,
    CipherState,
    HandshakeState,
    NoiseStream,
    generate_kem_keypair,
    generate_keypair,
    protocol_name,
)

# Cacophony vector "Noise_IK_25519_AESGCM_BLAKE2s" (no PSKs), from the same file and
# commit as the ChaChaPoly one of test_noise.py (github.com/mcginty/snow,
# tests/vectors/cacophony.txt, aabed3159deec0a0dfe3d5601c43322d84700c94): the same keys,
# prologue and payloads; messages alternate initiator, responder, ...
PROLOGUE = bytes.fromhex("4a6f686e2047616c74")
INIT_STATIC = bytes.fromhex("e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1")
INIT_EPHEMERAL = bytes.fromhex("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a")
RESP_STATIC = bytes.fromhex("4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893")
RESP_PUBLIC = bytes.fromhex("31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62")
RESP_EPHEMERAL = bytes.fromhex("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b")
HANDSHAKE_HASH = bytes.fromhex("af51ccef548b5277ae7120c78750de6ad146ead3565b67ae43551ca4dfa962a3")
MESSAGES = [
    (
        "4c756477696720766f6e204d69736573",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944"
        "fc16af5edc066c93c77be147f8e6785cd6bd7b27e0f660d02a6a566ceb61b22a"
        "f4d0dcc8560bce79b2a1fb55f68bc34017319936516ae9ce0862fe172c77a883"
        "f241700cb26d145dc8f8c9fe80a29008",
    ),
    (
        "4d757272617920526f746862617264",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843"
        "19679a2f2fae0ee3700b9d1f532eb77fcf485567e810eaf95b2f9eeca858fe",
    ),
    ("462e20412e20486179656b", "daf849a4f4bd8b0276f120b017b9dfdbc9ed667ee98316e95de1cc"),
    ("4361726c204d656e676572", "cdf2321b9584498d0ce313cb0c995c3ee2d679c1f3c22576ff1e90"),
    (
        "4a65616e2d426170746973746520536179",
        "abc41aa7b17f5d7c5b8454c203668718a15020b72729f1243490ab54150338293a",
    ),
    (
        "457567656e2042f6686d20766f6e2042617765726b",
        "59bafe529215e376187e06fcfb6772d6ca7f0946877e77aafb4a90a5fc6c4cf82344d5c949",
    ),
]


def _messages() -> list[tuple[bytes, bytes]]:
    return [(bytes.fromhex(p), bytes.fromhex(c)) for p, c in MESSAGES]


def _vector_pair() -> tuple[HandshakeState, HandshakeState]:
    initiator = HandshakeState.initiator(
        INIT_STATIC, RESP_PUBLIC, PROLOGUE, ephemeral_private=INIT_EPHEMERAL, cipher="AESGCM"
    )
    responder = HandshakeState.responder(
        RESP_STATIC, PROLOGUE, ephemeral_private=RESP_EPHEMERAL, cipher="AESGCM"
    )
    return initiator, responder


def test_protocol_names() -> None:
    assert CIPHERS == ("AESGCM", "ChaChaPoly")
    assert protocol_name("AESGCM") == b"Noise_IK_25519_AESGCM_BLAKE2s"
    assert protocol_name("AESGCM", hybrid=True) == b"Noise_IKpsk2_25519_AESGCM_BLAKE2s"
    assert protocol_name() == b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
    with pytest.raises(NoiseError, match="unknown cipher"):
        protocol_name("AES128GCM")
    with pytest.raises(NoiseError, match="unknown cipher"):
        CipherState(cipher="Plaintext")
    _, public = generate_keypair()
    with pytest.raises(NoiseError, match="unknown cipher"):
        HandshakeState.initiator(INIT_STATIC, public, cipher="None")


def test_vector_handshake_and_transport() -> None:
    initiator, responder = _vector_pair()
    (p1, c1), (p2, c2), *transport = _messages()
    assert initiator.protocol == "Noise_IK_25519_AESGCM_BLAKE2s"
    assert initiator.write_message(p1) == c1
    assert responder.read_message(c1) == p1
    assert responder.write_message(p2) == c2
    assert initiator.read_message(c2) == p2
    assert initiator.handshake_hash == responder.handshake_hash == HANDSHAKE_HASH
    i_send, i_recv = initiator.split()
    r_send, r_recv = responder.split()
    assert i_send.cipher == r_recv.cipher == AESGCM_CIPHER
    for index, (payload, ciphertext) in enumerate(transport):
        if index % 2 == 0:
            assert i_send.encrypt_with_ad(b"", payload) == ciphertext
            assert r_recv.decrypt_with_ad(b"", ciphertext) == payload
        else:
            assert r_send.encrypt_with_ad(b"", payload) == ciphertext
            assert i_recv.decrypt_with_ad(b"", ciphertext) == payload


def test_vector_through_encrypt_into_and_noise_stream() -> None:
    """The data path's zero-copy form gives the vector's bytes too."""
    initiator, responder = _vector_pair()
    (p1, _), (p2, _), *transport = _messages()
    responder.read_message(initiator.write_message(p1))
    initiator.read_message(responder.write_message(p2))
    i_send, _ = initiator.split()
    r_stream = NoiseStream(*responder.split())
    payload, ciphertext = transport[0]
    out = bytearray(len(payload) + 16)
    i_send.encrypt_into(memoryview(payload), out)
    assert bytes(out) == ciphertext
    assert r_stream.receive_data(len(out).to_bytes(2, "big") + out) == payload


# -- the nonce layout, against cryptography directly ------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 255, 2**32 - 1, 2**32 + 5, 2**63 + 7, MAX_NONCE - 1])
def test_aesgcm_nonce_is_32_zero_bits_then_the_counter_big_endian(n: int) -> None:
    key, plaintext, ad = os.urandom(32), os.urandom(40), b"associated"
    state = CipherState(key, "AESGCM")
    state.set_nonce(n)
    nonce = b"\x00" * 4 + n.to_bytes(8, "big")
    assert state.encrypt_with_ad(ad, plaintext) == AESGCM(key).encrypt(nonce, plaintext, ad)
    assert state.nonce == n + 1
    if n:  # the little-endian layout of ChaChaPoly gives another ciphertext
        little = b"\x00" * 4 + n.to_bytes(8, "little")
        state.set_nonce(n)
        assert state.encrypt_with_ad(ad, plaintext) != AESGCM(key).encrypt(little, plaintext, ad)


@pytest.mark.parametrize("n", [1, 2**32 + 5])
def test_chachapoly_nonce_stays_little_endian(n: int) -> None:
    key, plaintext = os.urandom(32), os.urandom(40)
    state = CipherState(key)
    state.set_nonce(n)
    nonce = b"\x00" * 4 + n.to_bytes(8, "little")
    assert state.encrypt_with_ad(b"", plaintext) == ChaCha20Poly1305(key).encrypt(
        nonce, plaintext, b""
    )


def test_aesgcm_rekey_is_the_spec_default() -> None:
    """REKEY(k) = ENCRYPT(k, 2^64-1, zerolen, zeros)[:32], nonce big-endian (4.2, 12.4)."""
    key = os.urandom(32)
    state = CipherState(key, "AESGCM")
    state.set_nonce(9)
    state.rekey()
    new_key = AESGCM(key).encrypt(b"\x00" * 4 + b"\xff" * 8, bytes(32), b"")[:32]
    assert state.nonce == 9
    nonce = b"\x00" * 4 + (9).to_bytes(8, "big")
    assert state.encrypt_with_ad(b"", b"after") == AESGCM(new_key).encrypt(nonce, b"after", b"")


def test_aesgcm_nonce_exhaustion_and_limits() -> None:
    state = CipherState(os.urandom(32), "AESGCM")
    state.set_nonce(MAX_NONCE)
    with pytest.raises(NoiseError, match="nonce exhausted"):
        state.encrypt_with_ad(b"", b"x")
    with pytest.raises(NoiseError, match="exceeds"):
        CipherState(os.urandom(32), "AESGCM").encrypt_with_ad(b"", bytes(MAX_PLAINTEXT + 1))


# -- interop with the independent noiseprotocol package ---------------------------------------


def _theirs(initiator: bool, static: bytes, remote: bytes | None) -> NoiseConnection:
    conn = NoiseConnection.from_name(b"Noise_IK_25519_AESGCM_BLAKE2s")
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static)
    if remote is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote)
    conn.set_prologue(b"gw-e2e-v1\x00s")
    conn.start_handshake()
    return conn


TRANSPORT = [b"x", bytes(range(256)) * 40, b"\xff" * MAX_PLAINTEXT]


def test_interop_both_ways() -> None:
    i_static, _ = generate_keypair()
    r_static, r_public = generate_keypair()
    # Our initiator, their responder.
    ours = HandshakeState.initiator(i_static, r_public, b"gw-e2e-v1\x00s", cipher="AESGCM")
    theirs = _theirs(False, r_static, None)
    assert theirs.read_message(ours.write_message(b"hello")) == b"hello"
    assert ours.read_message(bytes(theirs.write_message(b"back"))) == b"back"
    assert ours.handshake_hash == theirs.get_handshake_hash()
    send, receive = ours.split()
    for message in TRANSPORT:
        assert theirs.decrypt(send.encrypt_with_ad(b"", message)) == message
        assert receive.decrypt_with_ad(b"", theirs.encrypt(message)) == message
    # Their initiator, our responder.
    theirs = _theirs(True, i_static, r_public)
    ours = HandshakeState.responder(r_static, b"gw-e2e-v1\x00s", cipher="AESGCM")
    assert ours.read_message(bytes(theirs.write_message(b"hi"))) == b"hi"
    assert theirs.read_message(ours.write_message(b"yo")) == b"yo"
    assert ours.handshake_hash == theirs.get_handshake_hash()


# -- the cipher is bound into the handshake ---------------------------------------------------


@pytest.mark.parametrize(("mine", "yours"), [("AESGCM", CHACHAPOLY), (CHACHAPOLY, "AESGCM")])
@pytest.mark.parametrize("hybrid", [False, True])
def test_two_sides_with_different_ciphers_never_agree(mine: str, yours: str, hybrid: bool) -> None:
    i_static, _ = generate_keypair()
    r_static, r_public = generate_keypair()
    seed, kem_public = generate_kem_keypair() if hybrid else (None, None)
    initiator = HandshakeState.initiator(
        i_static, r_public, b"p", remote_kem_static=kem_public, cipher=mine
    )
    responder = HandshakeState.responder(r_static, b"p", kem_static_seed=seed, cipher=yours)
    with pytest.raises(NoiseError, match="decryption failed"):
        responder.read_message(initiator.write_message(b"payload"))


def test_hybrid_handshake_under_aesgcm() -> None:
    i_static, i_public = generate_keypair()
    r_static, r_public = generate_keypair()
    seed, kem_public = generate_kem_keypair()
    initiator = HandshakeState.initiator(
        i_static, r_public, b"p", remote_kem_static=kem_public, cipher="AESGCM"
    )
    responder = HandshakeState.responder(r_static, b"p", kem_static_seed=seed, cipher="AESGCM")
    assert responder.read_message(initiator.write_message(b"one")) == b"one"
    assert initiator.read_message(responder.write_message(b"two")) == b"two"
    assert initiator.hybrid and initiator.protocol == "Noise_IKpsk2_25519_AESGCM_BLAKE2s"
    assert responder.remote_static == i_public
    assert initiator.handshake_hash == responder.handshake_hash
    i_send, i_recv = initiator.split()
    r_send, r_recv = responder.split()
    assert r_recv.decrypt_with_ad(b"", i_send.encrypt_with_ad(b"", b"up")) == b"up"
    assert i_recv.decrypt_with_ad(b"", r_send.encrypt_with_ad(b"", b"down")) == b"down"
    assert i_send.cipher == r_send.cipher == AESGCM_CIPHER
