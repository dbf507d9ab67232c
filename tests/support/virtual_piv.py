"""A virtual PIV smartcard that plugs into pcscd through the vpcd reader driver.

vpcd (package ``vsmartcard-vpcd``) is a PC/SC reader driver that listens on TCP
(``CHANNELID`` in ``/etc/reader.conf.d/vpcd``: 0x8C7B = 35963 for the first reader
"Virtual PCD 00 00", 35964 for the second "Virtual PCD 00 01"). A virtual card is a
TCP *client*: connecting is inserting the card, disconnecting is pulling it out.
pcscd notices either within its polling period (about 0.4 s).

vpcd protocol: every message, both ways, is a 2-byte big-endian length and then the
payload. vpcd sends; the card answers only where noted:

    length 1, payload 0x00   power off                 (no answer)
    length 1, payload 0x01   power on                  (no answer)
    length 1, payload 0x02   reset                     (no answer)
    length 1, payload 0x04   get ATR                   answer: the ATR
    any other length         a command APDU            answer: the response APDU

pcscd asks for the ATR at every presence poll, so the card answers it at any time.

The card (:class:`VirtualPIV`) implements what the smartcard factor and OpenSC's PIV
driver (``opensc-pkcs11.so``, through pcscd) use, after NIST SP 800-73-4 part 2: SELECT
of the PIV application, GET DATA for 5FC105 (PIV Authentication certificate), 5FC10A
(Digital Signature certificate), 5FC102 (CHUID: FASC-N, a GUID from which OpenSC makes
the token's serial number, expiry), 5FC107 (Card Capability Container) and 7E (the
discovery object: the PIV AID, PIN usage policy "PIV PIN only"), VERIFY with
key reference 80 (retry counter, 63Cx, blocking with 6983), GENERAL AUTHENTICATE for
keys 9A and 9C (RSA-2048 raw, algorithm 07; ECC P-256, algorithm 11), command
chaining and GET RESPONSE. Power off and reset clear the PIN-verified state.

Use as a thread from tests::

    card = VirtualPIV(auth_cert, auth_key, pin="123456")
    with VpcdLink(card, port=35963):      # inserted
        ...
    # removed

or as a process: ``python tests/support/virtual_piv.py --cert c.pem --key k.pem``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import signal
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

VPCD_HOST = "127.0.0.1"
VPCD_PORT = 35963

PIV_AID = bytes.fromhex("A000000308000010000100")
OBJ_AUTH_CERT = bytes.fromhex("5FC105")
OBJ_SIGN_CERT = bytes.fromhex("5FC10A")
OBJ_CHUID = bytes.fromhex("5FC102")
OBJ_CCC = bytes.fromhex("5FC107")
OBJ_DISCOVERY = bytes.fromhex("7E")
KEY_AUTH = 0x9A
KEY_SIGN = 0x9C
ALG_RSA_2048 = 0x07
ALG_ECC_P256 = 0x11

CTRL_OFF, CTRL_ON, CTRL_RESET, CTRL_ATR = 0, 1, 2, 4


def _atr(historical: bytes) -> bytes:
    """TS=3B (direct), T0 announcing TD1 and the historical bytes, TD1 = T=1, then TCK."""
    body = bytes([0x80 | len(historical), 0x01]) + historical
    tck = 0
    for b in body:
        tck ^= b
    return b"\x3b" + body + bytes([tck])


DEFAULT_ATR = _atr(b"vPIV-test")


def _tlv(tag: int, value: bytes) -> bytes:
    tag_bytes = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    return tag_bytes + length + value


def _tlvs(data: bytes) -> Iterator[tuple[int, bytes]]:
    i = 0
    while i < len(data):
        tag = data[i]
        i += 1
        if tag & 0x1F == 0x1F:
            tag = (tag << 8) | data[i]
            i += 1
            while data[i - 1] & 0x80:
                tag = (tag << 8) | data[i]
                i += 1
        first = data[i]
        i += 1
        if first < 0x80:
            n = first
        else:
            size = first & 0x7F
            n = int.from_bytes(data[i : i + size], "big")
            i += size
        if i + n > len(data):
            raise ValueError("truncated")
        yield tag, data[i : i + n]
        i += n


def _data_objects(guid: bytes) -> dict[bytes, bytes]:
    """CHUID, CCC and discovery object (SP 800-73-4 part 1, tables 9, 7 and 18)."""
    fasc_n = bytes.fromhex("D4E739DA739CED39CE739D836858210842108421C84210C3EB")  # all-9 test
    chuid = (
        _tlv(0x30, fasc_n) + _tlv(0x34, guid) + _tlv(0x35, b"20991231") + _tlv(0x3E, b"")
        + _tlv(0xFE, b"")
    )  # fmt: skip
    ccc = (
        _tlv(0xF0, bytes([0xA0, 0x00, 0x00, 0x01, 0x16, 0xFF, 0x02]) + guid[:14])
        + _tlv(0xF1, b"\x21") + _tlv(0xF2, b"\x21") + _tlv(0xF3, b"") + _tlv(0xF4, b"\x00")
        + _tlv(0xF5, b"\x10") + _tlv(0xF6, b"") + _tlv(0xF7, b"") + _tlv(0xFA, b"")
        + _tlv(0xFB, b"") + _tlv(0xFC, b"") + _tlv(0xFD, b"") + _tlv(0xFE, b"")
    )  # fmt: skip
    discovery = _tlv(0x7E, _tlv(0x4F, PIV_AID) + _tlv(0x5F2F, b"\x40\x00"))
    return {OBJ_CHUID: chuid, OBJ_CCC: ccc, OBJ_DISCOVERY: discovery}


def sw(code: int) -> bytes:
    return code.to_bytes(2, "big")


class VirtualPIV:
    """The card's state and its APDU interpreter. No I/O; see :class:`VpcdLink`."""

    MAX_CHUNK = 256

    def __init__(
        self,
        auth_cert: x509.Certificate,
        auth_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        sign_cert: x509.Certificate | None = None,
        sign_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
        *,
        pin: str = "123456",
        max_tries: int = 3,
        atr: bytes = DEFAULT_ATR,
        compress: bool = False,
    ) -> None:
        self.atr = atr
        self.pin_block = pin.encode("ascii").ljust(8, b"\xff")
        self.max_tries = max_tries
        self.tries_left = max_tries
        self.verified = False
        self.selected = False
        self.keys: dict[int, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {KEY_AUTH: auth_key}
        self.objects: dict[bytes, bytes] = {OBJ_AUTH_CERT: self._cert_object(auth_cert, compress)}
        # The card's GUID (its serial number for OpenSC): from the certificate, so that
        # every test person's card is a different token.
        self.guid = auth_cert.fingerprint(hashes.SHA256())[:16]
        self.objects.update(_data_objects(self.guid))
        if sign_cert is not None and sign_key is not None:
            self.keys[KEY_SIGN] = sign_key
            self.objects[OBJ_SIGN_CERT] = self._cert_object(sign_cert, compress)
        self.log: list[str] = []
        """One line per command (INS and SW; never the data), for assertions."""
        self._pending = b""
        self._chain: tuple[int, bytes] | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _cert_object(cert: x509.Certificate, compress: bool) -> bytes:
        der = cert.public_bytes(serialization.Encoding.DER)
        if compress:
            der = gzip.compress(der)
        return _tlv(0x70, der) + _tlv(0x71, bytes([0x01 if compress else 0x00])) + _tlv(0xFE, b"")

    @property
    def blocked(self) -> bool:
        return self.tries_left == 0

    # -- power --------------------------------------------------------------------------

    def power_on(self) -> None:
        with self._lock:
            self._clear()

    def power_off(self) -> None:
        with self._lock:
            self._clear()

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self.verified = False
        self.selected = False
        self._pending = b""
        self._chain = None

    # -- APDUs --------------------------------------------------------------------------

    def process(self, apdu: bytes) -> bytes:
        """One command APDU in, one response APDU (data + SW1 SW2) out."""
        with self._lock:
            try:
                response = self._process(apdu)
            except (ValueError, IndexError):
                response = sw(0x6A80)
            self.log.append(
                f"{apdu[1]:02X} -> {response[-2:].hex().upper()}" if len(apdu) > 1 else "? -> 6700"
            )
            return response

    def _process(self, apdu: bytes) -> bytes:
        if len(apdu) < 4:
            return sw(0x6700)
        cla, ins, p1, p2 = apdu[:4]
        data, le = self._body(apdu[4:])
        if ins == 0xC0:
            return self._get_response(le)
        self._pending = b""
        if cla & 0x10:  # command chaining: keep the data, answer 9000
            if self._chain is not None and self._chain[0] != ins:
                self._chain = None
                return sw(0x6883)
            prior = self._chain[1] if self._chain else b""
            self._chain = (ins, prior + data)
            return sw(0x9000)
        if self._chain is not None:
            if self._chain[0] != ins:
                self._chain = None
                return sw(0x6883)
            data = self._chain[1] + data
            self._chain = None
        if ins == 0xA4:
            return self._select(p1, data)
        if not self.selected:
            return sw(0x6985)
        if ins == 0xCB:
            return self._respond(self._get_data(p1, p2, data))
        if ins == 0x20:
            return self._verify(p1, p2, data)
        if ins == 0x87:
            return self._respond(self._general_authenticate(p1, p2, data))
        return sw(0x6D00)

    @staticmethod
    def _body(rest: bytes) -> tuple[bytes, int | None]:
        """Split the APDU body into data and Le (ISO 7816-4 cases 1-4, short and extended)."""
        if not rest:
            return b"", None
        if len(rest) == 1:
            return b"", rest[0] or 256
        if rest[0] == 0 and len(rest) >= 3:  # extended length
            if len(rest) == 3:
                return b"", int.from_bytes(rest[1:3], "big") or 65536
            lc = int.from_bytes(rest[1:3], "big")
            data = rest[3 : 3 + lc]
            tail = rest[3 + lc :]
            if len(data) != lc or len(tail) not in (0, 2):
                raise ValueError("bad extended APDU")
            return data, (int.from_bytes(tail, "big") or 65536) if tail else None
        lc = rest[0]
        data = rest[1 : 1 + lc]
        tail = rest[1 + lc :]
        if len(data) != lc or len(tail) > 1:
            raise ValueError("bad APDU length")
        return data, (tail[0] or 256) if tail else None

    def _respond(self, result: tuple[bytes, int]) -> bytes:
        """Answer with at most 256 bytes; park the rest for GET RESPONSE (61xx)."""
        data, status = result
        if status != 0x9000 or len(data) <= self.MAX_CHUNK:
            return data + sw(status)
        self._pending = data[self.MAX_CHUNK :]
        return data[: self.MAX_CHUNK] + sw(0x6100 | min(len(self._pending), 256) % 256)

    def _get_response(self, le: int | None) -> bytes:
        if not self._pending:
            return sw(0x6985)
        n = min(le or 256, self.MAX_CHUNK, len(self._pending))
        chunk, self._pending = self._pending[:n], self._pending[n:]
        if self._pending:
            return chunk + sw(0x6100 | min(len(self._pending), 256) % 256)
        return chunk + sw(0x9000)

    def _select(self, p1: int, aid: bytes) -> bytes:
        if p1 != 0x04 or len(aid) < 5 or not PIV_AID.startswith(aid):
            self.selected = False
            return sw(0x6A82)
        self.selected = True
        apt = _tlv(0x61, _tlv(0x4F, PIV_AID[5:]) + _tlv(0x79, _tlv(0x4F, PIV_AID[:5])))
        return apt + sw(0x9000)

    def _get_data(self, p1: int, p2: int, data: bytes) -> tuple[bytes, int]:
        if (p1, p2) != (0x3F, 0xFF):
            return b"", 0x6A86
        items = dict(_tlvs(data))
        tag = items.get(0x5C)
        if tag is None:
            return b"", 0x6A80
        obj = self.objects.get(tag)
        if obj is None:
            return b"", 0x6A82
        if tag == OBJ_DISCOVERY:  # the discovery object is its own template (tag 7E)
            return obj, 0x9000
        return _tlv(0x53, obj), 0x9000

    def _verify(self, p1: int, p2: int, data: bytes) -> bytes:
        if p2 != 0x80:
            return sw(0x6A88)
        if p1 == 0xFF and not data:  # reset the security status
            self.verified = False
            return sw(0x9000)
        if p1 != 0x00:
            return sw(0x6A86)
        if self.blocked:
            return sw(0x6983)
        if not data:  # status query
            return sw(0x9000) if self.verified else sw(0x63C0 | self.tries_left)
        if len(data) != 8:
            return sw(0x6A80)
        if data == self.pin_block:
            self.tries_left = self.max_tries
            self.verified = True
            return sw(0x9000)
        self.verified = False
        self.tries_left -= 1
        return sw(0x63C0 | self.tries_left)

    def _general_authenticate(self, alg: int, key_ref: int, data: bytes) -> tuple[bytes, int]:
        key = self.keys.get(key_ref)
        if key is None:
            return b"", 0x6A88
        if isinstance(key, rsa.RSAPrivateKey):
            if alg != ALG_RSA_2048 or key.key_size != 2048:
                return b"", 0x6A86
        elif alg != ALG_ECC_P256:
            return b"", 0x6A86
        if not self.verified:
            return b"", 0x6982
        template = dict(_tlvs(data)).get(0x7C)
        if template is None:
            return b"", 0x6A80
        fields = dict(_tlvs(template))
        challenge = fields.get(0x81)
        if challenge is None or 0x82 not in fields or fields[0x82]:
            return b"", 0x6A80
        if isinstance(key, rsa.RSAPrivateKey):
            numbers = key.private_numbers()
            n = numbers.public_numbers.n
            m = int.from_bytes(challenge, "big")
            if len(challenge) != 256 or m >= n:
                return b"", 0x6A80
            signature = pow(m, numbers.d, n).to_bytes(256, "big")
        else:
            if len(challenge) != 32:
                return b"", 0x6A80
            signature = key.sign(challenge, ec.ECDSA(Prehashed(hashes.SHA256())))
        if key_ref == KEY_SIGN:  # "PIN always" for the signature key
            self.verified = False
        return _tlv(0x7C, _tlv(0x82, signature)), 0x9000


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            _quick_ack(sock)
            chunk = sock.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _quick_ack(sock: socket.socket) -> None:
    """Acknowledge at once (Linux). Without it each APDU exchange with vpcd 3.3 waits
    ~40 ms: Nagle's algorithm on vpcd's side meets delayed ACKs on ours."""
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None:
        sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


class VpcdLink:
    """Connects a :class:`VirtualPIV` to vpcd: :meth:`insert` and :meth:`remove` it."""

    def __init__(self, card: VirtualPIV, host: str = VPCD_HOST, port: int = VPCD_PORT) -> None:
        self.card = card
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def inserted(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def insert(self, timeout: float = 5.0) -> None:
        """Connect to vpcd (the reader notices at its next poll) and serve in a thread."""
        if self.inserted:
            return
        self._sock = socket.create_connection((self.host, self.port), timeout=timeout)
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._thread = threading.Thread(
            target=self._serve, args=(self._sock,), name=f"virtual-piv:{self.port}", daemon=True
        )
        self._thread.start()

    def remove(self, timeout: float = 5.0) -> None:
        """Disconnect from vpcd: for the reader, the card is pulled out."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                header = _recv_exact(sock, 2)
                if header is None:
                    return
                (length,) = struct.unpack(">H", header)
                payload = _recv_exact(sock, length)
                if payload is None:
                    return
                if length == 1:
                    ctrl = payload[0]
                    if ctrl == CTRL_ATR:
                        answer: bytes | None = self.card.atr
                    else:
                        answer = None
                        if ctrl == CTRL_OFF:
                            self.card.power_off()
                        elif ctrl == CTRL_ON:
                            self.card.power_on()
                        elif ctrl == CTRL_RESET:
                            self.card.reset()
                else:
                    answer = self.card.process(payload)
                if answer is not None:
                    sock.sendall(struct.pack(">H", len(answer)) + answer)
        except OSError:
            return
        except BaseException as exc:  # surfaced to the test through .error
            self.error = exc
            raise

    def __enter__(self) -> VpcdLink:
        self.insert()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Virtual PIV card for vpcd")
    parser.add_argument("--cert", type=Path, required=True, help="PEM: PIV Authentication cert")
    parser.add_argument("--key", type=Path, required=True, help="PEM: its private key")
    parser.add_argument("--sign-cert", type=Path, help="PEM: Digital Signature cert (9C)")
    parser.add_argument("--sign-key", type=Path, help="PEM: its private key")
    parser.add_argument("--pin", default="123456")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--host", default=VPCD_HOST)
    parser.add_argument("--port", type=int, default=VPCD_PORT)
    args = parser.parse_args(argv)

    def load_key(path: Path) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        return key

    card = VirtualPIV(
        x509.load_pem_x509_certificate(args.cert.read_bytes()),
        load_key(args.key),
        x509.load_pem_x509_certificate(args.sign_cert.read_bytes()) if args.sign_cert else None,
        load_key(args.sign_key) if args.sign_key else None,
        pin=args.pin,
        max_tries=args.tries,
    )
    link = VpcdLink(card, args.host, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    link.insert()
    print(f"virtual PIV card inserted at {args.host}:{args.port}", flush=True)
    while not stop.wait(0.2):
        if not link.inserted:
            print("vpcd closed the connection", file=sys.stderr)
            return 1
    link.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
