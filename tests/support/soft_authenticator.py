"""A software CTAP2 authenticator: a YubiKey stand-in for tests.

:class:`SoftAuthenticator` is a :class:`fido2.ctap.CtapDevice`, so python-fido2's real
``Ctap2`` and ``Fido2Client`` drive it exactly as they drive a USB key. It answers the
``CTAPHID_CBOR`` command at the level of :meth:`CtapDevice.call` (a request is one
command byte plus a CBOR map; a reply is one status byte plus a CBOR map), which is
all the client sees of HID framing once a channel is open, so INIT, packets and
sequence numbers are not modelled.

Implemented (CTAP 2.1, https://fidoalliance.org/specs/fido-v2.1-ps-20210615/):

- authenticatorGetInfo (0x04) - §6.4;
- authenticatorMakeCredential (0x01) - §6.1: ES256 (P-256) keys, non-discoverable,
  ``packed`` self attestation (§8.2, no x5c) or ``none``; excludeList;
- authenticatorGetAssertion (0x02) - §6.2: allowList only (no discoverable keys), the
  ``up`` option, UP/UV flags, a global signature counter;
- authenticatorClientPIN (0x06) - §6.5: getPINRetries, getKeyAgreement, setPIN,
  getPinToken and getPinUvAuthTokenUsingPinWithPermissions with PIN/UV auth protocols
  1 and 2 (retries, and the three-wrong-in-a-row PIN_AUTH_BLOCKED rule).

Knobs for the failure cases a verifier must catch:

- ``pin``: a PIN is set (the key then verifies the user with it); ``pin_supported``:
  the key can have a PIN at all (False: a key that never does UV);
- ``set_uv_flag=False``: a broken key that checks the PIN but never reports UV;
- ``fixed_counter``: always report this signature counter;
- ``pin_retries``: PIN attempts left (CTAP allows at most 8);
- :meth:`clone`: a copy with the same credentials (same private keys) and its own,
  lower counter - what an attacker who extracted the keys would hold;
- ``presence``: ``"ok"`` (the person touches), ``"deny"`` (OPERATION_DENIED),
  ``"timeout"`` (USER_ACTION_TIMEOUT, or with ``wait_for_cancel`` wait for the
  client's cancel and answer KEEPALIVE_CANCEL), ``"skip"`` (sign without the UP flag).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor
from fido2.cose import ES256
from fido2.ctap import STATUS, CtapDevice, CtapError
from fido2.ctap2.pin import PinProtocol, PinProtocolV1, PinProtocolV2
from fido2.hid import CAPABILITY, CTAPHID
from fido2.utils import int2bytes

ERR = CtapError.ERR

# Command bytes (§6) and clientPIN subcommands (§6.5.5).
MAKE_CREDENTIAL = 0x01
GET_ASSERTION = 0x02
GET_INFO = 0x04
CLIENT_PIN = 0x06

PIN_GET_RETRIES = 0x01
PIN_GET_KEY_AGREEMENT = 0x02
PIN_SET = 0x03
PIN_GET_TOKEN_LEGACY = 0x05
PIN_GET_TOKEN_WITH_PERMISSIONS = 0x09

PERMISSION_MC = 0x01
PERMISSION_GA = 0x02

FLAG_UP = 0x01
FLAG_UV = 0x04
FLAG_AT = 0x40

#: A made-up AAGUID so that tests can tell this "model" apart.
SOFT_AAGUID = bytes.fromhex("5f7a1c0e2b9d4c4e8a3f6b1d2c3e4f50")
MAX_PIN_RETRIES = 8
"""CTAP 2.1 §6.5.2.2: authenticators allow at most 8 PIN retries."""
MAX_MSG_SIZE = 1200


class _Fail(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class _Credential:
    rp_id_hash: bytes
    key: ec.EllipticCurvePrivateKey
    user_id: bytes


@dataclass
class _PinState:
    """The key's PIN, retry counters and current pinUvAuthToken (§6.5.2)."""

    pin: str | None
    retries: int = MAX_PIN_RETRIES
    consecutive_failures: int = 0
    token: bytes = field(default_factory=lambda: os.urandom(32))
    permissions: int = 0
    permissions_rp_id: str | None = None


_PROTOCOLS: dict[int, type[PinProtocolV1]] = {1: PinProtocolV1, 2: PinProtocolV2}


# The protocol classes' overrides are untyped; call them through the typed base class.
def _authenticate(proto: PinProtocol, key: bytes, message: bytes) -> bytes:
    return proto.authenticate(key, message)


def _encrypt(proto: PinProtocol, key: bytes, plaintext: bytes) -> bytes:
    return proto.encrypt(key, plaintext)


def _decrypt(proto: PinProtocol, key: bytes, ciphertext: bytes) -> bytes:
    return proto.decrypt(key, ciphertext)


class SoftAuthenticator(CtapDevice):
    """A CTAP2 authenticator in memory. See the module docstring for the knobs."""

    def __init__(
        self,
        *,
        pin: str | None = None,
        pin_supported: bool = True,
        set_uv_flag: bool = True,
        attestation: str = "packed",
        counter: int = 0,
        fixed_counter: int | None = None,
        presence: str = "ok",
        wait_for_cancel: bool = False,
        max_wait: float = 5.0,
        pin_retries: int = MAX_PIN_RETRIES,
        aaguid: bytes = SOFT_AAGUID,
    ) -> None:
        if presence not in ("ok", "deny", "timeout", "skip"):
            raise ValueError(f"unknown presence mode {presence!r}")
        if attestation not in ("packed", "none"):
            raise ValueError(f"unknown attestation format {attestation!r}")
        if pin is not None and not pin_supported:
            raise ValueError("a PIN needs pin_supported=True")
        self.pin_supported = pin_supported
        self.set_uv_flag = set_uv_flag
        self.attestation = attestation
        self.counter = counter
        self.fixed_counter = fixed_counter
        self.presence = presence
        self.wait_for_cancel = wait_for_cancel
        self.max_wait = max_wait
        self.aaguid = aaguid
        self.credentials: dict[bytes, _Credential] = {}
        self._pin = _PinState(pin, retries=pin_retries)
        self._agreement_key = ec.generate_private_key(ec.SECP256R1())
        #: Every command byte received, in order (tests assert on it).
        self.commands: list[int] = []
        #: How many times a touch was asked for.
        self.touches = 0
        #: Set when a wait for touch ended because the client cancelled.
        self.cancel_seen = threading.Event()
        self.closed = False

    # -- CtapDevice -------------------------------------------------------------

    @property
    def capabilities(self) -> int:
        return CAPABILITY.CBOR | CAPABILITY.NMSG

    @classmethod
    def list_devices(cls) -> Iterator[SoftAuthenticator]:
        return iter(())

    def close(self) -> None:
        self.closed = True

    def call(
        self,
        cmd: int,
        data: bytes = b"",
        event: threading.Event | None = None,
        on_keepalive: Callable[[STATUS], None] | None = None,
    ) -> bytes:
        if cmd != CTAPHID.CBOR:
            raise CtapError(ERR.INVALID_COMMAND)
        if not data:
            return bytes([ERR.INVALID_LENGTH])
        if len(data) > MAX_MSG_SIZE:
            return bytes([ERR.REQUEST_TOO_LARGE])
        command = data[0]
        self.commands.append(command)
        try:
            params = cbor.decode(data[1:]) if len(data) > 1 else {}
            if not isinstance(params, Mapping):
                raise _Fail(ERR.CBOR_UNEXPECTED_TYPE)
            handler = {
                GET_INFO: self._get_info,
                MAKE_CREDENTIAL: self._make_credential,
                GET_ASSERTION: self._get_assertion,
                CLIENT_PIN: self._client_pin,
            }.get(command)
            if handler is None:
                raise _Fail(ERR.INVALID_COMMAND)
            reply = handler(params, event, on_keepalive)
        except _Fail as fail:
            return bytes([fail.code])
        except (ValueError, TypeError, KeyError, struct.error):
            return bytes([ERR.INVALID_CBOR])
        return b"\x00" + (cbor.encode(reply) if reply else b"")

    # -- test knobs -------------------------------------------------------------

    def clone(self, *, counter: int = 0) -> SoftAuthenticator:
        """A second key holding the same credentials and PIN, with its own ``counter``."""
        twin = SoftAuthenticator(
            pin=self._pin.pin,
            pin_supported=self.pin_supported,
            set_uv_flag=self.set_uv_flag,
            attestation=self.attestation,
            counter=counter,
            aaguid=self.aaguid,
        )
        twin.credentials = dict(self.credentials)
        return twin

    @property
    def pin_retries(self) -> int:
        """PIN attempts left; set it to put the key one wrong PIN from blocking."""
        return self._pin.retries

    @pin_retries.setter
    def pin_retries(self, value: int) -> None:
        self._pin.retries = value

    # -- helpers ----------------------------------------------------------------

    def _next_counter(self) -> int:
        if self.fixed_counter is not None:
            return self.fixed_counter
        self.counter += 1
        return self.counter

    def _user_presence(
        self, event: threading.Event | None, on_keepalive: Callable[[STATUS], None] | None
    ) -> bool:
        """Ask for a touch; True if the UP flag may be set, else raise the key's error."""
        self.touches += 1
        if on_keepalive is not None:
            on_keepalive(STATUS.UPNEEDED)
        if self.presence == "ok":
            return True
        if self.presence == "skip":
            return False
        if self.presence == "deny":
            raise _Fail(ERR.OPERATION_DENIED)
        if self.wait_for_cancel and event is not None and event.wait(self.max_wait):
            self.cancel_seen.set()
            raise _Fail(ERR.KEEPALIVE_CANCEL)
        raise _Fail(ERR.USER_ACTION_TIMEOUT)

    def _check_pin_auth(
        self,
        params: Mapping[int, Any],
        param_key: int,
        client_data_hash: bytes,
        permission: int,
        rp_id: str,
    ) -> bool:
        """Verify pinUvAuthParam (§6.1.2 step 11); True if the user is verified."""
        pin_auth = params.get(param_key)
        if pin_auth is None:
            return False
        if len(pin_auth) == 0:  # §6.1.2 step 1: the platform's "touch to select" probe
            raise _Fail(ERR.PIN_INVALID if self._pin.pin is not None else ERR.PIN_NOT_SET)
        version = params.get(param_key + 1)
        if version is None:
            raise _Fail(ERR.MISSING_PARAMETER)
        proto = _PROTOCOLS.get(version)
        if proto is None or not self.pin_supported:
            raise _Fail(ERR.INVALID_PARAMETER)
        expected = _authenticate(proto(), self._pin.token, client_data_hash)
        if not hmac.compare_digest(expected, pin_auth):
            raise _Fail(ERR.PIN_AUTH_INVALID)
        if not self._pin.permissions & permission:
            raise _Fail(ERR.PIN_AUTH_INVALID)
        if self._pin.permissions_rp_id not in (None, rp_id):
            raise _Fail(ERR.PIN_AUTH_INVALID)
        self._pin.permissions_rp_id = rp_id  # §6.5.5.7: the token binds to the first RP
        return True

    def _auth_data(
        self, rp_id_hash: bytes, flags: int, counter: int, attested: bytes = b""
    ) -> bytes:
        return rp_id_hash + struct.pack(">BI", flags, counter) + attested

    # -- authenticatorGetInfo ---------------------------------------------------

    def _get_info(self, params: Mapping[int, Any], *_: Any) -> dict[int, Any]:
        options: dict[str, bool] = {"rk": False, "up": True, "plat": False}
        info: dict[int, Any] = {
            1: ["FIDO_2_0", "FIDO_2_1"],
            3: self.aaguid,
            5: MAX_MSG_SIZE,
            7: 8,  # maxCredentialCountInList
            8: 128,  # maxCredentialIdLength
            10: [{"alg": -7, "type": "public-key"}],
        }
        if self.pin_supported:
            options["clientPin"] = self._pin.pin is not None
            options["pinUvAuthToken"] = True
            info[6] = [2, 1]
        info[4] = options
        return info

    # -- authenticatorMakeCredential --------------------------------------------

    def _make_credential(
        self,
        params: Mapping[int, Any],
        event: threading.Event | None,
        on_keepalive: Callable[[STATUS], None] | None,
    ) -> dict[int, Any]:
        try:
            client_data_hash, rp, user, algs = params[1], params[2], params[3], params[4]
        except KeyError:
            raise _Fail(ERR.MISSING_PARAMETER) from None
        rp_id = rp["id"]
        if not any(p.get("alg") == -7 and p.get("type") == "public-key" for p in algs):
            raise _Fail(ERR.UNSUPPORTED_ALGORITHM)
        options = params.get(7) or {}
        if options.get("rk") or options.get("uv"):
            raise _Fail(ERR.UNSUPPORTED_OPTION)
        verified = self._check_pin_auth(params, 8, client_data_hash, PERMISSION_MC, rp_id)
        if self._pin.pin is not None and not verified:
            raise _Fail(ERR.PUAT_REQUIRED)  # §6.1.2 step 6: no makeCredUvNotRqd here
        rp_id_hash = hashlib.sha256(rp_id.encode()).digest()
        excluded = any(
            (c := self.credentials.get(d["id"])) is not None and c.rp_id_hash == rp_id_hash
            for d in params.get(5) or []
        )
        present = self._user_presence(event, on_keepalive)
        if excluded:
            raise _Fail(ERR.CREDENTIAL_EXCLUDED)

        key = ec.generate_private_key(ec.SECP256R1())
        cred_id = os.urandom(48)
        self.credentials[cred_id] = _Credential(rp_id_hash, key, user["id"])
        numbers = key.public_key().public_numbers()
        cose = {1: 2, 3: -7, -1: 1, -2: int2bytes(numbers.x, 32), -3: int2bytes(numbers.y, 32)}
        attested = self.aaguid + struct.pack(">H", len(cred_id)) + cred_id + cbor.encode(cose)
        flags = FLAG_AT | (FLAG_UP if present else 0)
        if verified and self.set_uv_flag:
            flags |= FLAG_UV
        auth_data = self._auth_data(rp_id_hash, flags, self._next_counter(), attested)
        if self.attestation == "none":
            return {1: "none", 2: auth_data, 3: {}}
        signature = key.sign(auth_data + client_data_hash, ec.ECDSA(hashes.SHA256()))
        return {1: "packed", 2: auth_data, 3: {"alg": -7, "sig": signature}}

    # -- authenticatorGetAssertion ----------------------------------------------

    def _get_assertion(
        self,
        params: Mapping[int, Any],
        event: threading.Event | None,
        on_keepalive: Callable[[STATUS], None] | None,
    ) -> dict[int, Any]:
        try:
            rp_id, client_data_hash = params[1], params[2]
        except KeyError:
            raise _Fail(ERR.MISSING_PARAMETER) from None
        options = params.get(5) or {}
        if options.get("uv") or options.get("rk"):
            raise _Fail(ERR.UNSUPPORTED_OPTION)
        want_up = options.get("up", True)
        verified = self._check_pin_auth(params, 6, client_data_hash, PERMISSION_GA, rp_id)
        rp_id_hash = hashlib.sha256(rp_id.encode()).digest()
        matches = [
            (d["id"], c)
            for d in params.get(3) or []
            if (c := self.credentials.get(d["id"])) is not None and c.rp_id_hash == rp_id_hash
        ]
        present = self._user_presence(event, on_keepalive) if want_up else False
        if not matches:
            raise _Fail(ERR.NO_CREDENTIALS)
        cred_id, cred = matches[0]
        flags = (FLAG_UP if present else 0) | (FLAG_UV if verified and self.set_uv_flag else 0)
        auth_data = self._auth_data(rp_id_hash, flags, self._next_counter())
        signature = cred.key.sign(auth_data + client_data_hash, ec.ECDSA(hashes.SHA256()))
        return {1: {"id": cred_id, "type": "public-key"}, 2: auth_data, 3: signature}

    # -- authenticatorClientPIN -------------------------------------------------

    def _shared_secret(self, proto: PinProtocolV1, peer: Mapping[int, Any]) -> bytes:
        peer_key = ES256(peer)
        public = ec.EllipticCurvePublicNumbers(
            int.from_bytes(peer_key[-2], "big"), int.from_bytes(peer_key[-3], "big"), ec.SECP256R1()
        ).public_key()
        z = self._agreement_key.exchange(ec.ECDH(), public)
        return proto.kdf(z)

    def _client_pin(self, params: Mapping[int, Any], *_: Any) -> dict[int, Any]:
        if not self.pin_supported:
            raise _Fail(ERR.INVALID_COMMAND)
        sub = params.get(2)
        if sub == PIN_GET_RETRIES:
            return {3: self._pin.retries}
        proto_cls = _PROTOCOLS.get(params.get(1, 0))
        if proto_cls is None:
            raise _Fail(ERR.INVALID_PARAMETER)
        proto = proto_cls()
        if sub == PIN_GET_KEY_AGREEMENT:
            numbers = self._agreement_key.public_key().public_numbers()
            return {
                1: {1: 2, 3: -25, -1: 1, -2: int2bytes(numbers.x, 32), -3: int2bytes(numbers.y, 32)}
            }
        if sub == PIN_SET:
            return self._set_pin(proto, params)
        if sub in (PIN_GET_TOKEN_LEGACY, PIN_GET_TOKEN_WITH_PERMISSIONS):
            return self._get_token(
                proto, params, with_permissions=sub == PIN_GET_TOKEN_WITH_PERMISSIONS
            )
        raise _Fail(ERR.INVALID_SUBCOMMAND)

    def _set_pin(self, proto: PinProtocolV1, params: Mapping[int, Any]) -> dict[int, Any]:
        if self._pin.pin is not None:
            raise _Fail(ERR.NOT_ALLOWED)
        if 3 not in params or 4 not in params or 5 not in params:
            raise _Fail(ERR.MISSING_PARAMETER)
        shared = self._shared_secret(proto, params[3])
        if not hmac.compare_digest(_authenticate(proto, shared, params[5]), params[4]):
            raise _Fail(ERR.PIN_AUTH_INVALID)
        padded = _decrypt(proto, shared, params[5])
        pin = padded.rstrip(b"\x00").decode()
        if len(pin) < 4:
            raise _Fail(ERR.PIN_POLICY_VIOLATION)
        self._pin.pin = pin
        self._pin.retries = MAX_PIN_RETRIES
        return {}

    def _get_token(
        self, proto: PinProtocolV1, params: Mapping[int, Any], *, with_permissions: bool
    ) -> dict[int, Any]:
        if 3 not in params or 6 not in params:
            raise _Fail(ERR.MISSING_PARAMETER)
        permissions = params.get(9, 0) if with_permissions else PERMISSION_MC | PERMISSION_GA
        if with_permissions and not permissions:
            raise _Fail(ERR.MISSING_PARAMETER)
        if self._pin.pin is None:
            raise _Fail(ERR.PIN_NOT_SET)
        if self._pin.retries == 0:
            raise _Fail(ERR.PIN_BLOCKED)
        shared = self._shared_secret(proto, params[3])
        self._pin.retries -= 1
        pin_hash = _decrypt(proto, shared, params[6])[:16]
        if not hmac.compare_digest(pin_hash, hashlib.sha256(self._pin.pin.encode()).digest()[:16]):
            self._agreement_key = ec.generate_private_key(ec.SECP256R1())  # §6.5.5.5 step 6
            self._pin.consecutive_failures += 1
            if self._pin.retries == 0:
                raise _Fail(ERR.PIN_BLOCKED)
            if self._pin.consecutive_failures >= 3:
                raise _Fail(ERR.PIN_AUTH_BLOCKED)
            raise _Fail(ERR.PIN_INVALID)
        self._pin.retries = MAX_PIN_RETRIES
        self._pin.consecutive_failures = 0
        self._pin.token = os.urandom(32)
        self._pin.permissions = permissions
        self._pin.permissions_rp_id = params.get(10)
        return {2: _encrypt(proto, shared, self._pin.token)}
