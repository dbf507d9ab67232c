"""The end-to-end layer: a Noise IK session between ``gw connect`` and the agent.

Inside a spliced tunnel the client (initiator) and the agent (responder) run
``Noise_IK_25519_ChaChaPoly_BLAKE2s``, or, when the agent has an ML-KEM-768 key,
the hybrid ``Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s`` with ML-KEM tokens (see
:mod:`relay.noise`); an agent with that key answers only the hybrid handshake.
Either runs with AES-256-GCM instead (``..._AESGCM_BLAKE2s``) when the agent offers
it: the agent lists its ciphers when it connects, the gateway passes the list on with
the session, the client names its choice with each tunnel and the gateway passes that
on with the dial request; the agent answers only the cipher so named, and only one it
runs. The cipher is in the protocol name, the first input of the handshake hash, so
a gateway that changes the choice on its way only makes the handshake fail. The
client knows the agent's static key(s) in advance (enrolled at the gateway, pinned
on first use by the client); the agent learns the client's static key from message
1 and checks it against the key the gateway announced with the dial request. The
prologue binds the handshake to the gateway session id, so a handshake recorded in
one session fails in another; :class:`ReplayGuard` refuses a first message seen
before, in any session.

After the handshake every Noise transport message carries one record: one type
byte then data. ``0x00`` is data, ``0x01`` means the sender's stream ended (a TCP
half-close travels end to end). Each transport message is framed with a 2-byte
length (Noise spec section 13).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import sys
from collections.abc import Mapping, Sequence

from . import noise
from .errors import GatewayError, NoiseError, TunnelCut

PROLOGUE = b"gw-e2e-v1\x00"
#: Environment variable that narrows the end-to-end ciphers (see :func:`local_ciphers`).
CIPHERS_ENV = "GW_E2E_CIPHERS"
RECORD_DATA = 0x00
RECORD_END = 0x01
#: Bytes of one full record on the wire (length, type, data, tag): 64 KiB, exactly four
#: full TLS records, so that no record ends in a runt TLS record of a byte or two.
FRAME_SIZE = 1 << 16
#: Largest data slice per record: a frame minus the length, the type byte and the tag.
MAX_RECORD_DATA = FRAME_SIZE - 2 - 1 - noise.TAG_LEN
#: Room for this many frames in an Opener's receive buffer.
_RECEIVE_FRAMES = 5
#: Full frames a Sealer keeps for reuse (more in flight at once get fresh ones).
_KEPT_FRAMES = 4
#: How long each side waits for the other's handshake message.
HANDSHAKE_TIMEOUT = 15.0
#: Most tunnel bytes held between the end of the handshake and the pipe's start.
HOLD_MAX = 256 * 1024


def prologue(session_id: str) -> bytes:
    return PROLOGUE + session_id.encode()


def local_ciphers(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The end-to-end ciphers this end runs, the preferred first.

    All of :data:`relay.noise.CIPHERS`, or those ``GW_E2E_CIPHERS`` lists (comma
    separated, e.g. ``ChaChaPoly`` on a processor without AES instructions, where
    ChaCha20-Poly1305 is the faster); ChaChaPoly is always run, last if unlisted,
    since every agent and client runs it. GatewayError names a cipher it does not know.
    """
    value = environ.get(CIPHERS_ENV, "").strip()
    if not value:
        return noise.CIPHERS
    listed = [name.strip() for name in value.split(",") if name.strip()]
    for name in listed:
        if name not in noise.CIPHERS:
            raise GatewayError(
                f"{CIPHERS_ENV}: unknown cipher {name[:40]!r} (known: {', '.join(noise.CIPHERS)})"
            )
    if noise.CHACHAPOLY not in listed:
        listed.append(noise.CHACHAPOLY)
    return tuple(dict.fromkeys(listed))


def choose_cipher(offered: Sequence[str], ours: Sequence[str] = noise.CIPHERS) -> str:
    """The cipher a client runs with an agent that offers ``offered``: the first of
    ``ours`` it lists, else ChaChaPoly (which every agent runs, said or not)."""
    for cipher in ours:
        if cipher in offered:
            return cipher
    return noise.CHACHAPOLY


def session_sas(session_id: str, client_key: bytes, agent_key: bytes) -> str:
    """The short authentication string of a session, shown before any tunnel exists.

    Both ends derive it from the session id and the two static keys *as each of
    them was told by the gateway*: the client its own key and the agent's key from
    the session, the agent its own key and the client's from the approval request.
    The agent's key is its whole key (X25519, then its ML-KEM-768 key if it has one),
    so a swapped or withheld ML-KEM key changes the code too.
    A gateway that swapped a key to sit in the middle makes the two strings differ,
    which the person approving sees when the vendor reads theirs out. Every tunnel's
    Noise IK handshake then proves possession of exactly those keys.
    """
    digest = hashlib.blake2s(
        b"gw-session-sas-v1\x00" + session_id.encode() + client_key + agent_key
    ).digest()
    return noise.short_auth_string(digest)


class ReplayGuard:
    """The ephemeral keys of the first handshake messages an agent answered.

    A recorded first message sent again (to learn from the agent's answer, or to
    make it open a connection to its target once more) is refused: each genuine one
    carries a fresh ephemeral key. The oldest are forgotten past ``limit``.
    """

    def __init__(self, limit: int = 1 << 16) -> None:
        self.limit = limit
        self._seen: dict[bytes, None] = {}

    def check(self, message: bytes) -> None:
        """NoiseError if this first message's ephemeral key was seen before."""
        if bytes(message[: noise.DH_LEN]) in self._seen:
            raise NoiseError("a replayed first handshake message (its ephemeral key was seen)")

    def remember(self, message: bytes) -> None:
        """Remember an answered first message (after it verified)."""
        self._seen[bytes(message[: noise.DH_LEN])] = None
        while len(self._seen) > self.limit:
            del self._seen[next(iter(self._seen))]


class Sealer:
    """Codec for bytes from the local side: plaintext in, framed Noise records out.

    Each record is one buffer (length, then ciphertext), so it goes out in whole TLS
    records. :meth:`get_buffer` and :meth:`filled` let the transport read straight into
    the plaintext buffer (asyncio's BufferedProtocol). A full record's ciphertext goes
    into one of a few frames kept for reuse, taken only when nothing but this sealer
    refers to it any more (the transport sent it or copied it); otherwise, and for a
    shorter record, into a fresh frame: nothing a transport holds is written again.
    """

    def __init__(self, cipher: noise.CipherState) -> None:
        self.cipher = cipher
        self._plain = bytearray(1 + MAX_RECORD_DATA)
        self._plain[0] = RECORD_DATA
        self._view = memoryview(self._plain)
        self._frames: list[bytearray] = []

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next read of plaintext goes (at most one record's data)."""
        return self._view[1:]

    def filled(self, n: int) -> tuple[list[bytearray], bool]:
        """The framed record of the ``n`` bytes just read into :meth:`get_buffer`."""
        return [self._seal(n)], False

    def _seal(self, n: int) -> bytearray:
        size = 1 + n + noise.TAG_LEN
        frame = self._full_frame() if n == MAX_RECORD_DATA else bytearray(2 + size)
        frame[0] = size >> 8
        frame[1] = size & 0xFF
        self.cipher.encrypt_into(self._view[: 1 + n], memoryview(frame)[2:])
        return frame

    def _full_frame(self) -> bytearray:
        """A FRAME_SIZE frame nobody else holds: a kept one if free, else a new one."""
        for frame in self._frames:
            # Three references: the list, ``frame`` and getrefcount's argument. Any
            # other (the frame, or a view of it, queued in a transport) and it is taken.
            if sys.getrefcount(frame) <= 3:
                return frame
        frame = bytearray(FRAME_SIZE)
        if len(self._frames) < _KEPT_FRAMES:
            self._frames.append(frame)
        return frame

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[list[bytearray], bool]:
        out: list[bytearray] = []
        with memoryview(data) as view:
            for i in range(0, len(view), MAX_RECORD_DATA):
                piece = view[i : i + MAX_RECORD_DATA]
                self._view[1 : 1 + len(piece)] = piece
                out.append(self._seal(len(piece)))
        return out, False

    def end(self) -> bytes | None:
        return noise.frame(self.cipher.encrypt_with_ad(b"", bytes([RECORD_END])))


class Opener:
    """Codec for bytes from the tunnel: framed Noise records in, plaintext out.

    Records are decrypted where they arrived: :meth:`get_buffer` hands the transport
    (asyncio's BufferedProtocol; TLS decrypts straight into it) the free end of one
    receive buffer, and :meth:`filled` decrypts every whole record in it; only the
    start of a record that has not fully arrived is moved to the front.
    """

    def __init__(self, cipher: noise.CipherState) -> None:
        self.cipher = cipher
        self.ended = False
        self._buf = bytearray(_RECEIVE_FRAMES * FRAME_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not yet decrypted
        self._end = 0  # end of the bytes received

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """The free end of the receive buffer, room for at least one whole frame."""
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < FRAME_SIZE + 1:
            partial = bytes(self._view[self._start : self._end])
            self._view[: len(partial)] = partial
            self._start, self._end = 0, len(partial)
        return self._view[self._end :]

    def filled(self, n: int) -> tuple[list[memoryview], bool]:
        """Plaintext of every record completed by the ``n`` bytes just received."""
        self._end += n
        buf, view, pos, end = self._buf, self._view, self._start, self._end
        out: list[memoryview] = []
        decrypt = self.cipher.decrypt_with_ad
        while end - pos >= 2:
            stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
            if stop > end:
                break
            record = decrypt(b"", view[pos + 2 : stop])
            pos = stop
            if self.ended or not record:
                raise NoiseError("record after end of stream or empty record")
            if record[0] == RECORD_DATA:
                if len(record) > 1:
                    out.append(memoryview(record)[1:])
            elif record[0] == RECORD_END:
                self.ended = True
            else:
                raise NoiseError(f"unknown record type {record[0]}")
        self._start = pos
        return out, self.ended

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[list[memoryview], bool]:
        out: list[memoryview] = []
        with memoryview(data) as view:
            while True:
                space = self.get_buffer()
                k = min(len(space), len(view))
                space[:k] = view[:k]
                more, ended = self.filled(k)
                out += more
                view = view[k:]
                if not view:
                    return out, ended

    def end(self) -> bytes | None:
        """The tunnel ended: cleanly only after the peer's END record."""
        if not self.ended:
            raise TunnelCut("the tunnel ended without the end-to-end end-of-stream record")
        return None


class _HandshakeReader(asyncio.Protocol):
    """Collects length-framed handshake messages from a raw transport.

    It stays the transport's protocol after the handshake, until the pipe takes the
    transport over, and keeps whatever arrives meanwhile: a service that speaks first
    (an ssh server's banner) may send its first record in the same instant as the
    handshake's last message. Past :data:`HOLD_MAX` bytes it pauses the transport.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.frames = noise.FrameReader()
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False
        self.held = 0

    def data_received(self, data: bytes) -> None:
        self.frames.receive_data(data)
        self.held += len(data)
        if self.held > HOLD_MAX:
            with contextlib.suppress(AttributeError, RuntimeError):
                self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self.lost = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read_message(self, timeout: float) -> bytes:
        async with asyncio.timeout(timeout):
            while (msg := self.frames.next_message()) is None:
                if self.lost:
                    raise NoiseError("tunnel closed during the end-to-end handshake")
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter
        self.held = 0
        return msg


class Established:
    """A finished handshake: codecs for the pipe and what to show the person."""

    def __init__(self, hs: noise.HandshakeState, reader: _HandshakeReader) -> None:
        send, receive = hs.split()
        self.sealer = Sealer(send)
        self.opener = Opener(receive)
        self._reader = reader
        self.handshake_hash = hs.handshake_hash
        self.sas = noise.short_auth_string(hs.handshake_hash)
        self.remote_static = hs.remote_static
        #: True for the hybrid (X25519 + ML-KEM-768) handshake.
        self.hybrid = hs.hybrid
        #: ``"AESGCM"`` or ``"ChaChaPoly"``, and the whole Noise protocol name.
        self.cipher = hs.cipher
        self.protocol = hs.protocol

    @property
    def leftover(self) -> bytes:
        """The tunnel bytes that arrived past the handshake so far (left in place)."""
        frames = self._reader.frames
        data = frames.take_remaining()
        frames.receive_data(data)
        return data

    def take_pending(self) -> tuple[bytes, bool]:
        """Take what arrived past the handshake until now, and whether the tunnel ended.

        Call it right before the pipe takes the transport over (with no ``await``
        in between): the transport keeps delivering to the handshake reader until then.
        """
        return self._reader.frames.take_remaining(), self._reader.lost


def _take(transport: asyncio.Transport, leftover: bytes) -> _HandshakeReader:
    reader = _HandshakeReader(transport)
    transport.set_protocol(reader)
    if leftover:
        reader.data_received(leftover)
    return reader


async def initiate(
    transport: asyncio.Transport,
    leftover: bytes,
    *,
    static_private: bytes,
    agent_key: bytes,
    session_id: str,
    agent_kem_key: bytes | None = None,
    cipher: str = noise.CHACHAPOLY,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> Established:
    """Client side: run Noise IK towards the agent whose static key is ``agent_key``;
    the hybrid handshake when its ML-KEM-768 key ``agent_kem_key`` is given; with
    ``cipher`` (the one named to the gateway for this tunnel)."""
    reader = _take(transport, leftover)
    hs = noise.HandshakeState.initiator(
        static_private,
        agent_key,
        prologue(session_id),
        remote_kem_static=agent_kem_key,
        cipher=cipher,
    )
    transport.write(noise.frame(hs.write_message()))
    try:
        hs.read_message(await reader.read_message(timeout))
    except TimeoutError as exc:
        raise NoiseError("the agent did not answer the end-to-end handshake") from exc
    return Established(hs, reader)


async def respond(
    transport: asyncio.Transport,
    leftover: bytes,
    *,
    static_private: bytes,
    expected_client_key: bytes,
    session_id: str,
    kem_seed: bytes | None = None,
    replay: ReplayGuard | None = None,
    cipher: str = noise.CHACHAPOLY,
    ciphers: tuple[str, ...] = noise.CIPHERS,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> Established:
    """Agent side: accept Noise IK only from the client key the gateway announced.

    With the agent's ML-KEM-768 seed ``kem_seed`` only the hybrid handshake is
    answered; ``replay`` refuses a first message answered before. Only ``cipher``
    (the client's choice, as the dial request names it) is answered, and only if it
    is one of this agent's ``ciphers``.
    """
    reader = _take(transport, leftover)
    if cipher not in ciphers:
        raise NoiseError(
            f"the client named cipher {cipher[:40]!r}; this agent runs {', '.join(ciphers)}"
        )
    hs = noise.HandshakeState.responder(
        static_private, prologue(session_id), kem_static_seed=kem_seed, cipher=cipher
    )
    try:
        first = await reader.read_message(timeout)
    except TimeoutError as exc:
        raise NoiseError("the client did not start the end-to-end handshake") from exc
    if kem_seed is not None and len(first) < noise.HYBRID_MSG1_MIN:
        raise NoiseError(
            "the client ran the classic handshake; this agent answers only the hybrid "
            "(X25519 + ML-KEM-768) one (a downgrade, or a gw too old)"
        )
    if replay is not None:
        replay.check(first)
    hs.read_message(first)
    remote = hs.remote_static or b""
    if not hmac.compare_digest(remote, expected_client_key):
        raise NoiseError("the client's key is not the one the gateway authorised")
    if replay is not None:
        replay.remember(first)
    transport.write(noise.frame(hs.write_message()))
    return Established(hs, reader)
