"""Noise_IK_25519_ChaChaPoly_BLAKE2s, after the Noise Protocol Framework, revision 34.

https://noiseprotocol.org/noise.html -- section numbers in comments refer to it.

Only the IK pattern (7.5) with X25519 (12.1), ChaChaPoly (12.3) or AESGCM (12.4) and
BLAKE2s (12.7) is implemented, on ``cryptography`` primitives. The module is sans-I/O:
it never touches a socket or a clock; callers move the bytes.

The cipher is part of the protocol name (``Noise_IK_25519_AESGCM_BLAKE2s``), which is
the first input of the handshake hash: two sides that run different ciphers never
complete a handshake with each other.

The hybrid handshake (X25519 + ML-KEM-768, FIPS 203) is IK with the ``psk2``
modifier (spec 9): ``Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s``, whose psk is not
shared in advance but made inside the handshake from two ML-KEM-768 shared secrets,
as PQNoise (Angel et al., CCS 2022) and Rosenpass do with KEM tokens:

    <- s, skem-public                 (the responder's X25519 and ML-KEM keys, known)
    ...
    -> e, es, s, ss, skem, ekem       skem: EncryptAndHash(Encaps(rs_kem).ciphertext)
                                      ekem: EncryptAndHash(a fresh ML-KEM public key)
    <- e, ee, se, ekem-ct, psk        ekem-ct: EncryptAndHash(Encaps(ekem).ciphertext)
                                      psk = HASH("gw-hybrid-psk-v1" || ss_static || ss_eph)

The transport keys depend on every X25519 result and on both ML-KEM secrets: an
attacker must break X25519 *and* ML-KEM-768. ``ss_static`` authenticates the
responder post-quantum (only the holder of its ML-KEM key decapsulates it); ``ss_eph``
keeps recorded tunnels secret after a later theft of the responder's static keys
(forward secrecy against an attacker with a quantum computer).

Every failure raises :class:`relay.errors.NoiseError`. A :class:`HandshakeState` or
:class:`NoiseStream` that raised on input from the peer is dead: later calls raise too.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from typing import Final

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from relay.errors import NoiseError

__all__ = [
    "AESGCM_CIPHER",
    "CHACHAPOLY",
    "CIPHERS",
    "HYBRID_MSG1_MIN",
    "HYBRID_PROTOCOL_NAME",
    "KEM_PUBLIC_LEN",
    "MAX_MESSAGE",
    "MAX_PLAINTEXT",
    "PROTOCOL_NAME",
    "CipherState",
    "FrameReader",
    "HandshakeState",
    "NoiseStream",
    "fingerprint",
    "frame",
    "generate_kem_keypair",
    "generate_keypair",
    "hybrid_key",
    "kem_public_key",
    "parse_fingerprint",
    "protocol_name",
    "public_key",
    "short_auth_string",
    "split_key",
]

PROTOCOL_NAME: Final = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
HYBRID_PROTOCOL_NAME: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
#: The cipher names of spec 12.3 and 12.4, as they appear in protocol names.
CHACHAPOLY: Final = "ChaChaPoly"
AESGCM_CIPHER: Final = "AESGCM"
#: Every cipher this module runs, the preferred first: AES-256-GCM costs about a quarter
#: of ChaCha20-Poly1305's CPU per byte on a processor with AES instructions.
CIPHERS: Final = (AESGCM_CIPHER, CHACHAPOLY)
MAX_MESSAGE: Final = 65535  # spec 3: a Noise message is at most 65535 bytes
TAG_LEN: Final = 16  # spec 4.2: ENCRYPT appends a 16-byte authentication tag
MAX_PLAINTEXT: Final = MAX_MESSAGE - TAG_LEN
DH_LEN: Final = 32  # spec 12.1: DHLEN for 25519
HASH_LEN: Final = 32  # spec 12.7: HASHLEN for BLAKE2s
KEY_LEN: Final = 32  # spec 4.2: cipher keys are 32 bytes
MAX_NONCE: Final = 2**64 - 1  # spec 5.1: reserved; reaching it is an error
KEM_PUBLIC_LEN: Final = 1184  # FIPS 203 table 3: ML-KEM-768 encapsulation key
KEM_CIPHERTEXT_LEN: Final = 1088  # FIPS 203 table 3: ML-KEM-768 ciphertext
KEM_SEED_LEN: Final = 64  # FIPS 203 6.1: the seed (d, z) a decapsulation key comes from

_LENGTH_PREFIX: Final = 2  # spec 13: 2-byte big-endian length field on a stream
_COMPACT_AT: Final = 1 << 16  # drop consumed buffer bytes once this many pile up
_SAS_LABEL: Final = b"gw-sas-v1"
_PSK_LABEL: Final = b"gw-hybrid-psk-v1"
_FINGERPRINT_PREFIX: Final = "SHA256:"

_Bytes = bytes | bytearray | memoryview


# -- spec 4: crypto functions ------------------------------------------------------------------


def generate_keypair() -> tuple[bytes, bytes]:
    """Return a fresh X25519 key pair as raw ``(private, public)``, 32 bytes each (spec 4.1)."""
    key = X25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def public_key(private: bytes) -> bytes:
    """Return the raw X25519 public key of a raw 32-byte private key."""
    return _private_key(private).public_key().public_bytes_raw()


def _private_key(private: bytes) -> X25519PrivateKey:
    if len(private) != DH_LEN:
        raise NoiseError(f"X25519 private key must be {DH_LEN} bytes, got {len(private)}")
    return X25519PrivateKey.from_private_bytes(private)


def _public_key(public: bytes) -> X25519PublicKey:
    if len(public) != DH_LEN:
        raise NoiseError(f"X25519 public key must be {DH_LEN} bytes, got {len(public)}")
    return X25519PublicKey.from_public_bytes(public)


def _dh(private: X25519PrivateKey, public: X25519PublicKey) -> bytes:
    """DH() of spec 4.1 / 12.1. A low-order peer key signals an error (allowed by 4.1)."""
    try:
        return private.exchange(public)
    except ValueError as exc:  # all-zero shared secret
        raise NoiseError("X25519 produced an all-zero shared secret") from exc


_NO_KEM = (
    "this build of the cryptography package has no ML-KEM-768 (it needs cryptography 47 "
    "or later on a backend with ML-KEM, such as OpenSSL 3.5+)"
)


def generate_kem_keypair() -> tuple[bytes, bytes]:
    """A fresh ML-KEM-768 key pair: ``(seed, public)``, 64 and 1184 bytes (FIPS 203)."""
    try:
        key = MLKEM768PrivateKey.generate()
    except UnsupportedAlgorithm:
        raise NoiseError(_NO_KEM) from None
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def kem_public_key(seed: bytes) -> bytes:
    """The ML-KEM-768 encapsulation key of a 64-byte seed."""
    return _kem_private(seed).public_key().public_bytes_raw()


def _kem_private(seed: bytes) -> MLKEM768PrivateKey:
    if len(seed) != KEM_SEED_LEN:
        raise NoiseError(f"ML-KEM-768 seed must be {KEM_SEED_LEN} bytes, got {len(seed)}")
    try:
        return MLKEM768PrivateKey.from_seed_bytes(seed)
    except UnsupportedAlgorithm:
        raise NoiseError(_NO_KEM) from None


def _kem_public(public: bytes) -> MLKEM768PublicKey:
    if len(public) != KEM_PUBLIC_LEN:
        raise NoiseError(f"ML-KEM-768 public key must be {KEM_PUBLIC_LEN} bytes, got {len(public)}")
    try:  # FIPS 203 7.2: the modulus check of the encapsulation key
        return MLKEM768PublicKey.from_public_bytes(public)
    except UnsupportedAlgorithm:
        raise NoiseError(_NO_KEM) from None
    except ValueError as exc:
        raise NoiseError(f"not an ML-KEM-768 public key: {exc}") from None


# A tunnel's handshake needs the same static keys each time: built once per process
# (an ML-KEM-768 key from its seed costs about as much as the rest of a handshake).


@functools.lru_cache(maxsize=4)
def _static_key(private: bytes) -> tuple[X25519PrivateKey, bytes]:
    """This side's static X25519 key and its public key."""
    key = _private_key(private)
    return key, key.public_key().public_bytes_raw()


@functools.lru_cache(maxsize=4)
def _static_kem(seed: bytes) -> tuple[MLKEM768PrivateKey, bytes]:
    """This responder's static ML-KEM-768 key and its public key."""
    key = _kem_private(seed)
    return key, key.public_key().public_bytes_raw()


@functools.lru_cache(maxsize=64)
def _remote_static_kem(public: bytes) -> MLKEM768PublicKey:
    """A responder's static ML-KEM-768 public key, checked (FIPS 203 7.2) once."""
    return _kem_public(public)


def _decapsulate(key: MLKEM768PrivateKey, ciphertext: bytes) -> bytes:
    """Decaps; a wrong ciphertext gives a wrong secret (implicit rejection, FIPS 203 6.3)."""
    if len(ciphertext) != KEM_CIPHERTEXT_LEN:
        raise NoiseError(f"ML-KEM-768 ciphertext must be {KEM_CIPHERTEXT_LEN} bytes")
    return key.decapsulate(ciphertext)


def _hash(data: bytes) -> bytes:
    """HASH() of spec 4.3: BLAKE2s with a 32-byte digest (spec 12.7)."""
    digest = hashes.Hash(hashes.BLAKE2s(HASH_LEN))
    digest.update(data)
    return digest.finalize()


def _hmac_hash(key: bytes, data: bytes) -> bytes:
    """HMAC-HASH() of spec 4.3 (RFC 2104 over BLAKE2s)."""
    mac = hmac.HMAC(key, hashes.BLAKE2s(HASH_LEN))
    mac.update(data)
    return mac.finalize()


def _hkdf2(chaining_key: bytes, input_key_material: bytes) -> tuple[bytes, bytes]:
    """HKDF() of spec 4.3 with num_outputs = 2."""
    temp_key = _hmac_hash(chaining_key, input_key_material)
    output1 = _hmac_hash(temp_key, b"\x01")
    output2 = _hmac_hash(temp_key, output1 + b"\x02")
    return output1, output2


def _hkdf3(chaining_key: bytes, input_key_material: bytes) -> tuple[bytes, bytes, bytes]:
    """HKDF() of spec 4.3 with num_outputs = 3."""
    temp_key = _hmac_hash(chaining_key, input_key_material)
    output1 = _hmac_hash(temp_key, b"\x01")
    output2 = _hmac_hash(temp_key, output1 + b"\x02")
    output3 = _hmac_hash(temp_key, output2 + b"\x03")
    return output1, output2, output3


def protocol_name(cipher: str = CHACHAPOLY, *, hybrid: bool = False) -> bytes:
    """The Noise protocol name of the IK (or hybrid IKpsk2) handshake with ``cipher``."""
    if cipher not in CIPHERS:
        raise NoiseError(f"unknown cipher {cipher[:40]!r} (known: {', '.join(CIPHERS)})")
    pattern = "IKpsk2" if hybrid else "IK"
    return f"Noise_{pattern}_25519_{cipher}_BLAKE2s".encode()


# -- spec 5.1: CipherState ----------------------------------------------------------------------


class CipherState:
    """A key ``k`` and a nonce ``n`` (spec 5.1), encrypting with ChaChaPoly (spec 12.3)
    or, with ``cipher="AESGCM"``, AES-256-GCM (spec 12.4).

    Without a key, ``encrypt_with_ad``/``decrypt_with_ad`` return their input unchanged,
    as the spec requires during the handshake.
    """

    __slots__ = ("_aead", "_big_endian", "_cipher", "_key", "_n")

    def __init__(self, key: bytes | None = None, cipher: str = CHACHAPOLY) -> None:
        if cipher not in CIPHERS:
            raise NoiseError(f"unknown cipher {cipher[:40]!r} (known: {', '.join(CIPHERS)})")
        self._cipher = cipher
        # Spec 12.4: AESGCM's nonce counter is big-endian, ChaChaPoly's little-endian.
        self._big_endian = cipher == AESGCM_CIPHER
        self._key: bytes | None = None
        self._aead: ChaCha20Poly1305 | AESGCM | None = None
        self._n = 0
        if key is not None:
            self.initialize_key(key)

    @property
    def cipher(self) -> str:
        """``"ChaChaPoly"`` or ``"AESGCM"``, as in the protocol name."""
        return self._cipher

    def initialize_key(self, key: bytes) -> None:
        """InitializeKey(key): set ``k`` and reset ``n`` to zero."""
        if len(key) != KEY_LEN:
            raise NoiseError(f"cipher key must be {KEY_LEN} bytes, got {len(key)}")
        self._key = bytes(key)
        # One object per key, reused per message.
        self._aead = AESGCM(self._key) if self._big_endian else ChaCha20Poly1305(self._key)
        self._n = 0

    def has_key(self) -> bool:
        """HasKey(): true once a key is set."""
        return self._aead is not None

    def set_nonce(self, nonce: int) -> None:
        """SetNonce(nonce): for out-of-order transport (spec 11.4); use with care."""
        if not 0 <= nonce <= MAX_NONCE:
            raise NoiseError(f"nonce out of range: {nonce}")
        self._n = nonce

    @property
    def nonce(self) -> int:
        """The nonce the next encryption or decryption will use."""
        return self._n

    def _nonce_bytes(self) -> bytes:
        if self._n >= MAX_NONCE:  # spec 5.1: 2^64-1 is reserved
            raise NoiseError("nonce exhausted; the session must end or rekey")
        return self._encode_nonce(self._n)

    def _encode_nonce(self, n: int) -> bytes:
        # 32 zero bits, then the 64-bit counter: big-endian for AESGCM (spec 12.4),
        # little-endian for ChaChaPoly (spec 12.3).
        if self._big_endian:
            return n.to_bytes(12, "big")
        return (n << 32).to_bytes(12, "little")

    def encrypt_with_ad(self, ad: bytes, plaintext: _Bytes) -> bytes:
        """EncryptWithAd(ad, plaintext): ENCRYPT(k, n++, ad, plaintext), or plaintext if no key."""
        if len(plaintext) > MAX_PLAINTEXT:
            raise NoiseError(f"plaintext of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT}")
        if self._aead is None:
            return bytes(plaintext)
        ciphertext = self._aead.encrypt(self._nonce_bytes(), plaintext, ad)
        self._n += 1
        return ciphertext

    def encrypt_into(self, plaintext: _Bytes, out: bytearray | memoryview) -> None:
        """EncryptWithAd(b"", plaintext) written into ``out`` (exactly its length + tag).

        The data path's form: no new object per record. ``out`` must not overlap
        ``plaintext``. Needs a key (transport messages only).
        """
        if len(plaintext) > MAX_PLAINTEXT:
            raise NoiseError(f"plaintext of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT}")
        if self._aead is None:
            raise NoiseError("encrypt_into needs a CipherState with a key")
        self._aead.encrypt_into(self._nonce_bytes(), plaintext, b"", out)
        self._n += 1

    def decrypt_with_ad(self, ad: bytes, ciphertext: _Bytes) -> bytes:
        """DecryptWithAd(ad, ciphertext): DECRYPT(k, n++, ad, ciphertext), or it if no key.

        On failure ``n`` is not advanced (spec 5.1) and NoiseError is raised.
        """
        if len(ciphertext) > MAX_MESSAGE:
            raise NoiseError(f"ciphertext of {len(ciphertext)} bytes exceeds {MAX_MESSAGE}")
        if self._aead is None:
            return bytes(ciphertext)
        if len(ciphertext) < TAG_LEN:
            raise NoiseError(f"ciphertext of {len(ciphertext)} bytes is shorter than a tag")
        try:
            plaintext = self._aead.decrypt(self._nonce_bytes(), ciphertext, ad)
        except InvalidTag:
            raise NoiseError("decryption failed: bad key, nonce, data or tag") from None
        self._n += 1
        return plaintext

    def rekey(self) -> None:
        """Rekey(): k = REKEY(k), the default of spec 4.2 (see 11.3); ``n`` is kept."""
        if self._aead is None:
            raise NoiseError("cannot rekey a CipherState without a key")
        key = self._aead.encrypt(self._encode_nonce(MAX_NONCE), bytes(KEY_LEN), b"")[:KEY_LEN]
        n = self._n
        self.initialize_key(key)
        self._n = n


# -- spec 5.2: SymmetricState -------------------------------------------------------------------


class _SymmetricState:
    """Chaining key ``ck`` and handshake hash ``h`` around a CipherState (spec 5.2)."""

    __slots__ = ("_cipher", "ck", "h")

    def __init__(self, protocol_name: bytes, cipher: str = CHACHAPOLY) -> None:
        # InitializeSymmetric(): the name is hashed if longer than HASHLEN, else zero-padded.
        if len(protocol_name) <= HASH_LEN:
            self.h = protocol_name.ljust(HASH_LEN, b"\x00")
        else:
            self.h = _hash(protocol_name)
        self.ck = self.h
        self._cipher = CipherState(cipher=cipher)

    def mix_key(self, input_key_material: bytes) -> None:
        """MixKey(): ck, temp_k = HKDF(ck, ikm, 2); InitializeKey(temp_k)."""
        self.ck, temp_k = _hkdf2(self.ck, input_key_material)
        self._cipher.initialize_key(temp_k[:KEY_LEN])

    def mix_hash(self, data: bytes) -> None:
        """MixHash(): h = HASH(h || data)."""
        self.h = _hash(self.h + data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        """MixKeyAndHash(): the ``psk`` token (spec 5.2, 9.2)."""
        self.ck, temp_h, temp_k = _hkdf3(self.ck, input_key_material)
        self.mix_hash(temp_h)
        self._cipher.initialize_key(temp_k[:KEY_LEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """EncryptAndHash(): encrypt with ad = h, then mix the ciphertext into h."""
        ciphertext = self._cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """DecryptAndHash(): decrypt with ad = h, then mix the ciphertext into h."""
        plaintext = self._cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """Split(): two CipherStates from HKDF(ck, zerolen, 2); c1 carries initiator traffic."""
        temp_k1, temp_k2 = _hkdf2(self.ck, b"")
        cipher = self._cipher.cipher
        return CipherState(temp_k1[:KEY_LEN], cipher), CipherState(temp_k2[:KEY_LEN], cipher)


# -- spec 5.3 + 7.5: HandshakeState for IK ------------------------------------------------------

# IK (spec 7.5):
#   <- s
#   ...
#   -> e, es, s, ss
#   <- e, ee, se
# IKpsk2 with ML-KEM tokens (the hybrid handshake, see the module's docstring):
#   <- s, skem-public
#   ...
#   -> e, es, s, ss, skem, ekem
#   <- e, ee, se, ekem-ct, psk
_MSG1_OVERHEAD: Final = DH_LEN + (DH_LEN + TAG_LEN) + TAG_LEN  # e, enc(s), payload tag
_MSG2_OVERHEAD: Final = DH_LEN + TAG_LEN  # e, payload tag
_HYBRID_MSG1_OVERHEAD: Final = (
    _MSG1_OVERHEAD + (KEM_CIPHERTEXT_LEN + TAG_LEN) + (KEM_PUBLIC_LEN + TAG_LEN)
)
_HYBRID_MSG2_OVERHEAD: Final = _MSG2_OVERHEAD + KEM_CIPHERTEXT_LEN + TAG_LEN
#: The shortest first message of the hybrid handshake (a shorter one is classic IK).
HYBRID_MSG1_MIN: Final = _HYBRID_MSG1_OVERHEAD


class HandshakeState:
    """One IK handshake (spec 5.3 with the pattern of 7.5), for one side.

    The initiator calls ``write_message`` then ``read_message``; the responder calls
    ``read_message`` then ``write_message``. After that ``complete`` is true and
    ``split()`` gives the transport CipherStates. A HandshakeState is single-use.

    With the responder's ML-KEM-768 key (``remote_kem_static`` at the initiator,
    ``kem_static_seed`` at the responder) the handshake is the hybrid one,
    ``Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s`` with ML-KEM tokens; a classic and a
    hybrid side never complete a handshake with each other. ``cipher="AESGCM"`` runs
    the same patterns with AES-256-GCM (``Noise_IK_25519_AESGCM_BLAKE2s``); both sides
    must name the same cipher.

    Payload security (spec 7.7): the message-1 payload can be replayed, and whoever
    later steals the responder's static key can read it; keep it free of secrets.
    """

    __slots__ = (
        "_e",
        "_ekem",
        "_failed",
        "_initiator",
        "_kem_s",
        "_kem_secret",
        "_protocol",
        "_re",
        "_rekem",
        "_rs",
        "_rs_kem",
        "_s",
        "_s_public",
        "_split",
        "_ss",
        "_step",
    )

    def __init__(
        self,
        initiator: bool,
        static_private: bytes,
        remote_static: bytes | None,
        prologue: bytes,
        ephemeral_private: bytes | None,
        *,
        kem_static_seed: bytes | None = None,
        remote_kem_static: bytes | None = None,
        cipher: str = CHACHAPOLY,
    ) -> None:
        """Initialize() of spec 5.3; use :meth:`initiator` or :meth:`responder` instead."""
        self._initiator = initiator
        self._s, self._s_public = _static_key(bytes(static_private))
        self._e = None if ephemeral_private is None else _private_key(ephemeral_private)
        self._rs = None if remote_static is None else _public_key(remote_static)
        self._re: X25519PublicKey | None = None
        #: Hybrid only: the responder's ML-KEM key (its seed at the responder, its
        #: public key at the initiator), the initiator's ephemeral ML-KEM key and the
        #: one the responder received, and the static ML-KEM secret between messages.
        kem_public = b""
        self._kem_s: MLKEM768PrivateKey | None = None
        if kem_static_seed is not None:
            self._kem_s, kem_public = _static_kem(bytes(kem_static_seed))
        self._rs_kem = None
        if remote_kem_static is not None:
            self._rs_kem = _remote_static_kem(bytes(remote_kem_static))
        self._ekem: MLKEM768PrivateKey | None = None
        self._rekem: MLKEM768PublicKey | None = None
        self._kem_secret = b""
        hybrid = self._kem_s is not None or self._rs_kem is not None
        self._protocol = protocol_name(cipher, hybrid=hybrid)
        self._ss = _SymmetricState(self._protocol, cipher)
        self._ss.mix_hash(prologue)
        # Pre-message "<- s" (spec 7.1): both sides hash the responder's static key(s).
        if initiator:
            if self._rs is None:
                raise NoiseError("IK initiator needs the responder's static key")
            self._ss.mix_hash(self._rs.public_bytes_raw())
            if self._rs_kem is not None:
                self._ss.mix_hash(self._rs_kem.public_bytes_raw())
        else:
            self._ss.mix_hash(self._s_public)
            if self._kem_s is not None:
                self._ss.mix_hash(kem_public)
        self._step = 0  # messages processed so far: 0, 1, then 2 = complete
        self._failed = False
        self._split: tuple[CipherState, CipherState] | None = None

    @classmethod
    def initiator(
        cls,
        static_private: bytes,
        remote_static: bytes,
        prologue: bytes = b"",
        *,
        remote_kem_static: bytes | None = None,
        ephemeral_private: bytes | None = None,
        cipher: str = CHACHAPOLY,
    ) -> HandshakeState:
        """Start an IK handshake as initiator, knowing the responder's static public key.

        With ``remote_kem_static`` (the responder's ML-KEM-768 public key) it is the
        hybrid handshake. ``cipher`` is ``"ChaChaPoly"`` or ``"AESGCM"``.
        ``ephemeral_private`` is for test vectors only; leave it out.
        """
        return cls(
            True,
            static_private,
            remote_static,
            prologue,
            ephemeral_private,
            remote_kem_static=remote_kem_static,
            cipher=cipher,
        )

    @classmethod
    def responder(
        cls,
        static_private: bytes,
        prologue: bytes = b"",
        *,
        kem_static_seed: bytes | None = None,
        ephemeral_private: bytes | None = None,
        cipher: str = CHACHAPOLY,
    ) -> HandshakeState:
        """Start an IK handshake as responder; the initiator's key arrives in message 1.

        With ``kem_static_seed`` (the responder's ML-KEM-768 seed) it is the hybrid
        handshake. ``cipher`` must be the initiator's: a message 1 made with another
        fails to verify. ``ephemeral_private`` is for test vectors only; leave it out.
        """
        return cls(
            False,
            static_private,
            None,
            prologue,
            ephemeral_private,
            kem_static_seed=kem_static_seed,
            cipher=cipher,
        )

    @property
    def hybrid(self) -> bool:
        """True for the hybrid (X25519 + ML-KEM-768) handshake."""
        return self._kem_s is not None or self._rs_kem is not None

    @property
    def cipher(self) -> str:
        """The cipher of this handshake and of its transport messages."""
        return self._ss._cipher.cipher

    @property
    def protocol(self) -> str:
        """The full Noise protocol name, e.g. ``Noise_IKpsk2_25519_AESGCM_BLAKE2s``."""
        return self._protocol.decode()

    @property
    def complete(self) -> bool:
        """True once both handshake messages have been processed successfully."""
        return self._split is not None

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key: given (initiator) or learned from message 1."""
        return None if self._rs is None else self._rs.public_bytes_raw()

    @property
    def handshake_hash(self) -> bytes:
        """The final ``h`` (spec 11.2, channel binding); only once complete."""
        if self._split is None:
            raise NoiseError("handshake hash is only defined once the handshake is complete")
        return self._ss.h

    def split(self) -> tuple[CipherState, CipherState]:
        """Return ``(send, receive)`` CipherStates for this side; only once complete.

        Repeated calls return the same two objects, never a second set with fresh nonces.
        """
        if self._split is None:
            raise NoiseError("split() before the handshake is complete")
        return self._split

    def _check_turn(self, writing: bool) -> _SymmetricState:
        if self._failed:
            raise NoiseError("handshake already failed")
        if self._split is not None:
            raise NoiseError("handshake already complete")
        # Message 1 goes initiator -> responder, message 2 the other way.
        initiator_turn = self._step == 0
        if writing != (initiator_turn == self._initiator):
            raise NoiseError("not this side's turn to " + ("write" if writing else "read"))
        return self._ss

    def _overhead(self) -> int:
        if self.hybrid:
            return _HYBRID_MSG1_OVERHEAD if self._step == 0 else _HYBRID_MSG2_OVERHEAD
        return _MSG1_OVERHEAD if self._step == 0 else _MSG2_OVERHEAD

    def _mix_e(self, ss: _SymmetricState, e_pub: bytes) -> None:
        """Token "e": MixHash, and in a psk handshake MixKey too (spec 9.2)."""
        ss.mix_hash(e_pub)
        if self.hybrid:
            ss.mix_key(e_pub)

    def _psk(self, ephemeral_secret: bytes) -> bytes:
        """The psk of the hybrid handshake, from the two ML-KEM-768 shared secrets."""
        return _hash(_PSK_LABEL + self._kem_secret + ephemeral_secret)

    def write_message(self, payload: bytes = b"") -> bytes:
        """WriteMessage(payload) of spec 5.3: return the next handshake message."""
        ss = self._check_turn(writing=True)
        if len(payload) + self._overhead() > MAX_MESSAGE:
            raise NoiseError(f"handshake payload of {len(payload)} bytes is too long")
        try:
            if self._e is None:
                self._e = X25519PrivateKey.generate()
            e_pub = self._e.public_key().public_bytes_raw()
            self._mix_e(ss, e_pub)  # token "e"
            if self._step == 0:  # -> e, es, s, ss [, skem, ekem]
                assert self._rs is not None
                ss.mix_key(_dh(self._e, self._rs))  # "es": initiator uses DH(e, rs)
                enc_s = ss.encrypt_and_hash(self._s_public)  # "s"
                ss.mix_key(_dh(self._s, self._rs))  # "ss"
                parts = [e_pub, enc_s]
                if self._rs_kem is not None:
                    self._kem_secret, kem_ct = self._rs_kem.encapsulate()
                    parts.append(ss.encrypt_and_hash(kem_ct))  # "skem"
                    self._ekem = MLKEM768PrivateKey.generate()
                    ekem_pub = self._ekem.public_key().public_bytes_raw()
                    parts.append(ss.encrypt_and_hash(ekem_pub))  # "ekem"
                message = b"".join([*parts, ss.encrypt_and_hash(payload)])
            else:  # <- e, ee, se [, ekem-ct, psk]
                assert self._re is not None and self._rs is not None
                ss.mix_key(_dh(self._e, self._re))  # "ee"
                ss.mix_key(_dh(self._e, self._rs))  # "se": responder uses DH(e, rs)
                parts = [e_pub]
                if self._rekem is not None:
                    ephemeral_secret, kem_ct = self._rekem.encapsulate()
                    parts.append(ss.encrypt_and_hash(kem_ct))  # "ekem-ct"
                    ss.mix_key_and_hash(self._psk(ephemeral_secret))  # "psk"
                message = b"".join([*parts, ss.encrypt_and_hash(payload)])
        except BaseException:
            self._failed = True
            raise
        self._advance(ss)
        return message

    def read_message(self, message: bytes) -> bytes:
        """ReadMessage(message) of spec 5.3: verify a handshake message, return its payload."""
        ss = self._check_turn(writing=False)
        overhead = self._overhead()
        if not overhead <= len(message) <= MAX_MESSAGE:
            self._failed = True
            raise NoiseError(f"handshake message {self._step + 1} has bad length {len(message)}")
        message = bytes(message)
        try:
            re = _public_key(message[:DH_LEN])
            self._mix_e(ss, message[:DH_LEN])  # token "e"
            if self._step == 0:  # -> e, es, s, ss [, skem, ekem]
                ss.mix_key(_dh(self._s, re))  # "es": responder uses DH(s, re)
                at = DH_LEN + DH_LEN + TAG_LEN
                rs = _public_key(ss.decrypt_and_hash(message[DH_LEN:at]))  # "s"
                ss.mix_key(_dh(self._s, rs))  # "ss"
                if self._kem_s is not None:
                    end = at + KEM_CIPHERTEXT_LEN + TAG_LEN
                    kem_ct = ss.decrypt_and_hash(message[at:end])  # "skem"
                    self._kem_secret = _decapsulate(self._kem_s, kem_ct)
                    at, end = end, end + KEM_PUBLIC_LEN + TAG_LEN
                    self._rekem = _kem_public(ss.decrypt_and_hash(message[at:end]))  # "ekem"
                    at = end
                payload = ss.decrypt_and_hash(message[at:])
                self._rs = rs  # only now authenticated
            else:  # <- e, ee, se [, ekem-ct, psk]
                assert self._e is not None
                ss.mix_key(_dh(self._e, re))  # "ee"
                ss.mix_key(_dh(self._s, re))  # "se": initiator uses DH(s, re)
                at = DH_LEN
                if self._ekem is not None:
                    at = DH_LEN + KEM_CIPHERTEXT_LEN + TAG_LEN
                    kem_ct = ss.decrypt_and_hash(message[DH_LEN:at])  # "ekem-ct"
                    ss.mix_key_and_hash(self._psk(_decapsulate(self._ekem, kem_ct)))  # "psk"
                payload = ss.decrypt_and_hash(message[at:])
        except BaseException:
            self._failed = True
            raise
        self._re = re
        self._advance(ss)
        return payload

    def _advance(self, ss: _SymmetricState) -> None:
        self._step += 1
        if self._step == 2:  # last message: Split() (spec 5.3)
            c1, c2 = ss.split()
            self._split = (c1, c2) if self._initiator else (c2, c1)
            # Ephemeral private keys and the KEM secret are no longer needed.
            self._e = None
            self._ekem = None
            self._kem_secret = b""


# -- spec 13: framing on a byte stream ----------------------------------------------------------


def frame(message: bytes) -> bytes:
    """Prefix ``message`` with its 2-byte big-endian length (spec 13)."""
    if len(message) > MAX_MESSAGE:
        raise NoiseError(f"message of {len(message)} bytes exceeds {MAX_MESSAGE}")
    return len(message).to_bytes(_LENGTH_PREFIX, "big") + message


class _StreamBuffer:
    """A bytearray consumed from the front by offset, compacted now and then."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: _Bytes) -> None:
        if self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
        elif self.pos >= _COMPACT_AT and self.pos * 2 >= len(self.buf):
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def pending(self) -> int:
        return len(self.buf) - self.pos

    def peek_length(self) -> int | None:
        """The length prefix of the next frame, or None if not all 2 bytes are here."""
        if len(self.buf) - self.pos < _LENGTH_PREFIX:
            return None
        return (self.buf[self.pos] << 8) | self.buf[self.pos + 1]

    def take_rest(self) -> bytes:
        rest = bytes(self.buf[self.pos :])
        self.buf.clear()
        self.pos = 0
        return rest


class FrameReader:
    """Pulls whole 2-byte-length-prefixed messages out of a byte stream (for the handshake).

    ``max_message`` bounds the announced length; a larger one raises NoiseError.
    """

    __slots__ = ("_buffer", "_max")

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        if not 0 <= max_message <= MAX_MESSAGE:
            raise NoiseError(f"max_message must be within 0..{MAX_MESSAGE}")
        self._max = max_message
        self._buffer = _StreamBuffer()

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the stream."""
        self._buffer.feed(data)

    def next_message(self) -> bytes | None:
        """Return the next whole message, or None if it has not fully arrived."""
        b = self._buffer
        length = b.peek_length()
        if length is None:
            return None
        if length > self._max:
            raise NoiseError(f"frame announces {length} bytes, limit is {self._max}")
        start = b.pos + _LENGTH_PREFIX
        end = start + length
        if end > len(b.buf):
            return None
        b.pos = end
        with memoryview(b.buf) as view:  # one copy, not a slice and then a copy
            return bytes(view[start:end])

    def take_remaining(self) -> bytes:
        """Return and drop the bytes after the messages taken so far (e.g. early transport data)."""
        return self._buffer.take_rest()


class NoiseStream:
    """Transport framing on a byte stream: each Noise message as length(2) + ciphertext.

    Sans-I/O: ``encrypt`` returns bytes to send, ``receive_data`` takes bytes received.
    """

    __slots__ = ("_broken", "_buffer", "_recv", "_send")

    def __init__(self, send: CipherState, receive: CipherState) -> None:
        if not (send.has_key() and receive.has_key()):
            raise NoiseError("NoiseStream needs keyed CipherStates (from a complete handshake)")
        self._send = send
        self._recv = receive
        self._buffer = _StreamBuffer()
        self._broken = False

    @property
    def bytes_buffered(self) -> int:
        """Received bytes not yet decrypted (a partial frame)."""
        return self._buffer.pending()

    def encrypt(self, data: bytes) -> bytes:
        """Encrypt ``data`` as frames of at most MAX_PLAINTEXT plaintext each; b"" for b""."""
        if not data:
            return b""
        if len(data) <= MAX_PLAINTEXT:
            ciphertext = self._send.encrypt_with_ad(b"", data)
            return len(ciphertext).to_bytes(_LENGTH_PREFIX, "big") + ciphertext
        parts: list[bytes] = []
        encrypt = self._send.encrypt_with_ad
        with memoryview(data) as view:
            for start in range(0, len(view), MAX_PLAINTEXT):
                ciphertext = encrypt(b"", view[start : start + MAX_PLAINTEXT])
                parts.append(len(ciphertext).to_bytes(_LENGTH_PREFIX, "big"))
                parts.append(ciphertext)
        return b"".join(parts)

    def receive_data(self, data: bytes) -> bytes:
        """Feed received bytes; return the plaintext of every frame completed (maybe b"").

        A bad frame raises NoiseError and breaks the stream; plaintext from earlier
        frames of the same call is discarded with it.
        """
        if self._broken:
            raise NoiseError("stream already failed")
        b = self._buffer
        b.feed(data)
        out: list[bytes] = []
        decrypt = self._recv.decrypt_with_ad
        buf = b.buf
        pos = b.pos
        end_of_data = len(buf)
        try:
            with memoryview(buf) as view:
                while end_of_data - pos >= _LENGTH_PREFIX:
                    length = (buf[pos] << 8) | buf[pos + 1]
                    if length < TAG_LEN:
                        raise NoiseError(f"frame of {length} bytes is shorter than a tag")
                    end = pos + _LENGTH_PREFIX + length
                    if end > end_of_data:
                        break
                    out.append(decrypt(b"", view[pos + _LENGTH_PREFIX : end]))
                    pos = end
        except BaseException:
            self._broken = True
            raise
        b.pos = pos
        return b"".join(out)


# -- short authentication string ----------------------------------------------------------------


def short_auth_string(handshake_hash: bytes) -> str:
    """Twelve decimal digits as ``"dddd-dddd-dddd"``, equal at both ends of one handshake.

    Derived as BLAKE2s(b"gw-sas-v1" || handshake_hash), read as a big-endian integer,
    modulo 10**12 (the bias from 2**256 is negligible).
    """
    if len(handshake_hash) != HASH_LEN:
        raise NoiseError(f"handshake hash must be {HASH_LEN} bytes, got {len(handshake_hash)}")
    number = int.from_bytes(_hash(_SAS_LABEL + handshake_hash), "big") % 10**12
    digits = f"{number:012d}"
    return f"{digits[0:4]}-{digits[4:8]}-{digits[8:12]}"


# -- key fingerprints -----------------------------------------------------------------------------


def fingerprint(public: bytes) -> str:
    """A static public key's fingerprint, as OpenSSH writes them: ``SHA256:`` then base64.

    The base64 (standard alphabet, no ``=`` padding) of the SHA-256 of the raw 32-byte
    key; for reading out over the phone or pasting into ``gw connect --agent-key``.
    An agent with the hybrid handshake has one key of 1216 bytes: its X25519 key then
    its ML-KEM-768 key, so one fingerprint covers both (see :func:`hybrid_key`).
    """
    if len(public) not in (DH_LEN, DH_LEN + KEM_PUBLIC_LEN):
        raise NoiseError(
            f"an agent key is {DH_LEN} (X25519) or {DH_LEN + KEM_PUBLIC_LEN} "
            f"(X25519 + ML-KEM-768) bytes, got {len(public)}"
        )
    digest = hashlib.sha256(public).digest()
    return _FINGERPRINT_PREFIX + base64.b64encode(digest).decode().rstrip("=")


def hybrid_key(x25519: bytes, kem: bytes | None) -> bytes:
    """An agent's whole static key: X25519 then ML-KEM-768 (just X25519 without one)."""
    if len(x25519) != DH_LEN:
        raise NoiseError(f"X25519 public key must be {DH_LEN} bytes, got {len(x25519)}")
    if kem is None:
        return x25519
    _kem_public(kem)
    return x25519 + kem


def split_key(key: bytes) -> tuple[bytes, bytes | None]:
    """The inverse of :func:`hybrid_key`: ``(x25519, ml_kem or None)``."""
    if len(key) == DH_LEN:
        return key, None
    if len(key) == DH_LEN + KEM_PUBLIC_LEN:
        return key[:DH_LEN], key[DH_LEN:]
    raise NoiseError(f"an agent key of {len(key)} bytes is neither X25519 nor hybrid")


def parse_fingerprint(text: str) -> str:
    """Check and normalise a fingerprint typed by a person; ValueError says what is wrong."""
    text = text.strip()
    if not text.startswith(_FINGERPRINT_PREFIX):
        raise ValueError(f"a key fingerprint starts with {_FINGERPRINT_PREFIX} (got {text[:20]!r})")
    body = text[len(_FINGERPRINT_PREFIX) :].rstrip("=")
    try:
        digest = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the fingerprint after SHA256: is not base64") from None
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError("the fingerprint after SHA256: is not 32 bytes of SHA-256")
    return _FINGERPRINT_PREFIX + base64.b64encode(digest).decode().rstrip("=")
