"""A virtual FIDO2 card for the vpcd reader: the software authenticator behind the FIDO applet.

What a security key on an NFC reader (or a CCID key) shows PC/SC, after the CTAP 2.1
spec, section 11.3 (ISO 7816-4 APDUs, as python-fido2's ``CtapPcscDevice`` speaks
them): SELECT of the FIDO AID ``A0 00 00 06 47 2F 00 01`` answers ``FIDO_2_0``;
NFCCTAP_MSG (CLA 80, INS 10) carries one CTAP command (command byte + CBOR, chained
with CLA 90 when long), NFCCTAP_GETRESPONSE (INS 11) polls a command still running
(P1 11: cancel it). While the authenticator waits (for a touch), the card answers
status ``91 00`` with the keepalive status byte; the answer (status byte + CBOR) comes
in chunks of at most 256 bytes, the rest by GET RESPONSE (``61 xx``).

The authenticator is a :class:`soft_authenticator.SoftAuthenticator`; each command runs
in a thread of its own, so the card keeps answering polls. Power off, reset and pulling
the card (:meth:`virtual_piv.VpcdLink.remove`) cancel a command still waiting.

Plugs into :class:`virtual_piv.VpcdLink` like the virtual PIV card::

    card = VirtualFidoCard(SoftAuthenticator())
    with VpcdLink(card, port=35964):
        ...
"""

from __future__ import annotations

import threading

from fido2.ctap import STATUS
from fido2.hid import CTAPHID
from soft_authenticator import SoftAuthenticator
from virtual_piv import _atr, sw

AID_FIDO = bytes.fromhex("A0000006472F0001")
ATR = _atr(b"vFIDO-test")
CHUNK = 256
# How long one APDU waits for the authenticator before it answers "still working".
POLL_WAIT = 0.05


class _Running:
    """One CTAP command in its thread."""

    def __init__(self, key: SoftAuthenticator, request: bytes) -> None:
        self.cancel = threading.Event()
        self.status = STATUS.PROCESSING
        self.reply: bytes | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(key, request), name="virtual-fido", daemon=True
        )
        self._thread.start()

    def _run(self, key: SoftAuthenticator, request: bytes) -> None:
        def keepalive(status: STATUS) -> None:
            self.status = status

        try:
            self.reply = key.call(CTAPHID.CBOR, request, self.cancel, keepalive)
        finally:
            self.done.set()


class VirtualFidoCard:
    """The FIDO applet's APDU interpreter over a software authenticator. No I/O."""

    def __init__(self, key: SoftAuthenticator, *, atr: bytes = ATR) -> None:
        self.key = key
        self.atr = atr
        self.selected = False
        self.log: list[str] = []
        """One line per command (INS and SW), for assertions."""
        self._chain = b""
        self._pending = b""
        self._running: _Running | None = None
        self._lock = threading.Lock()

    # -- power --------------------------------------------------------------------------

    def power_on(self) -> None:
        self._clear()

    def power_off(self) -> None:
        self._clear()

    def reset(self) -> None:
        self._clear()

    def _clear(self) -> None:
        with self._lock:
            self.selected = False
            self._chain = b""
            self._pending = b""
            if self._running is not None:
                self._running.cancel.set()
                self._running = None

    # -- APDUs --------------------------------------------------------------------------

    def process(self, apdu: bytes) -> bytes:
        with self._lock:
            try:
                response = self._process(apdu)
            except (ValueError, IndexError):
                response = sw(0x6700)
            self.log.append(f"{apdu[1]:02X} -> {response[-2:].hex().upper()}")
            return response

    def _process(self, apdu: bytes) -> bytes:
        if len(apdu) < 4:
            return sw(0x6700)
        cla, ins, p1, _ = apdu[:4]
        data = _data(apdu)
        if ins == 0xA4:
            self.selected = p1 == 0x04 and data == AID_FIDO
            return b"FIDO_2_0" + sw(0x9000) if self.selected else sw(0x6A82)
        if ins == 0xC0:
            return self._next_chunk()
        if not self.selected:
            return sw(0x6985)
        if ins == 0x10 and cla & 0xEF == 0x80:
            if cla & 0x10:  # chained: more to come
                self._chain += data
                return sw(0x9000)
            request, self._chain = self._chain + data, b""
            if self._running is not None:
                self._running.cancel.set()
            self._running = _Running(self.key, request)
            return self._poll()
        if ins == 0x11 and cla == 0x80:
            if self._running is None:
                return sw(0x6985)
            if p1 == 0x11:
                self._running.cancel.set()
            return self._poll()
        return sw(0x6D00)

    def _poll(self) -> bytes:
        running = self._running
        assert running is not None
        if not running.done.wait(POLL_WAIT):
            return bytes([running.status]) + sw(0x9100)
        self._running = None
        self._pending = running.reply or b""
        return self._next_chunk()

    def _next_chunk(self) -> bytes:
        chunk, self._pending = self._pending[:CHUNK], self._pending[CHUNK:]
        if self._pending:
            return chunk + sw(0x6100 | min(len(self._pending), 255))
        return chunk + sw(0x9000)


def _data(apdu: bytes) -> bytes:
    """The command data of a short or extended APDU (Le ignored)."""
    rest = apdu[4:]
    if len(rest) <= 1:
        return b""
    if rest[0] == 0 and len(rest) >= 3:
        n = int.from_bytes(rest[1:3], "big")
        return rest[3 : 3 + n]
    return rest[1 : 1 + rest[0]]
