"""The FIDO2 factor: a security key (a YubiKey, or any CTAP2 authenticator) proves the user.

Theory of operation
===================

The gateway is a WebAuthn relying party (RP) whose id is ``settings["rp_id"]``; ``gw`` is
the WebAuthn client, talking CTAP2 to the key through python-fido2's ``Fido2Client``.
Verification follows W3C WebAuthn Level 2, §7.1 (registration) and §7.2 (assertion),
done here with python-fido2's parsers and COSE keys rather than ``Fido2Server``, so
that every failure gets its own audit reason and the signature counter is checked.

Channel binding
---------------

The gateway never sends a WebAuthn challenge. It sends a fresh 32-byte ``nonce``, and
each side derives the challenge from that nonce and from *its own* view of the TLS
channel, ``cb`` (RFC 9266 ``tls-exporter``, :attr:`auth.base.AuthContext.channel_binding`)::

    login:         challenge = SHA-256(b"gw-fido2-v1\\x00"          || nonce || cb)
    registration:  challenge = SHA-256(b"gw-fido2-register-v1\\x00" || nonce || cb)

The nonce is exactly 32 bytes, so the concatenation is unambiguous; the two labels keep
a login proof from ever counting as a registration and back. The key signs
``authenticatorData || SHA-256(clientDataJSON)`` and ``clientDataJSON`` carries the
challenge, so an assertion made on one TLS connection fails on any other (another
``cb``), and an assertion made for one challenge fails on any later one (another
nonce). The verifier is stateless: its state holds the nonce and the gateway must use
each state once; the signature counter catches an assertion replayed against the same
state after the record was updated.

Wire formats
------------

JSON objects; binary values are base64url without padding (:func:`auth.base.b64e`).

Login challenge (:meth:`Fido2Verifier.begin` payload, gateway -> ``gw``)::

    {"v": 1, "rp_id": str, "origin": str, "nonce": b64 (32 bytes),
     "allow": [b64 credential id, ...],
     "user_verification": "required" | "preferred" | "discouraged",
     "timeout": seconds (number)}

Login response (:meth:`Fido2Prover.respond`, ``gw`` -> gateway)::

    {"credential_id": b64, "client_data_json": b64, "authenticator_data": b64,
     "signature": b64, "user_handle": b64 (only when the key returned one)}

Registration payload (:func:`registration_begin`, gateway -> ``gw``)::

    {"v": 1, "rp_id": str, "rp_name": str, "origin": str, "user_id": b64,
     "user_name": str, "nonce": b64 (32 bytes), "exclude": [b64 credential id, ...],
     "user_verification": str, "timeout": seconds}

Registration response (:func:`register`, ``gw`` -> gateway)::

    {"credential_id": b64, "client_data_json": b64, "attestation_object": b64,
     "name": str (optional, the person's label for the key)}

Credential record
-----------------

:attr:`auth.base.AuthContext.credential`, a JSON object the gateway stores encrypted::

    {"credentials": [{"id": b64 credential id,
                      "public_key": b64 (COSE_Key, CBOR-encoded),
                      "sign_count": int, "name": str, "added": float (POSIX),
                      "aaguid": hex (32 digits), "attestation": "packed" | "none" | ...,
                      "last_used": float (after the first login)}, ...]}

A user may hold up to :data:`MAX_CREDENTIALS` keys. A record's ``sign_count`` is the
key's counter at registration; the gateway keeps each key's later counter outside the
record (:attr:`auth.base.AuthContext.counters`, by key id), and the verifier uses the
larger. A successful login never returns a record: it reports
:attr:`auth.base.Outcome.counter` = ``(key id, new count)``, which the gateway stores
only if the stored count is still lower and the key still registered, so a login
parked at the key cannot undo a key added or removed meanwhile, nor can two logins
with one assertion both pass. A key that keeps no counter reports 0 (the gateway
then only checks that the key is still registered).

Login checks, in order (every failure is a rejection with its own reason)
-------------------------------------------------------------------------

1. the user has a registered key; the response is well-formed (sizes bounded);
2. the credential id is one of the user's keys;
3. the signature verifies with that key's public key (so everything below is what
   the key itself said);
4. ``clientDataJSON``: type ``webauthn.get``, the challenge derived from the state's
   nonce and *this* connection's channel binding, the configured origin, not cross-origin;
5. ``authenticatorData``: SHA-256 of the configured RP id, user presence (UP) set, user
   verification (UV) set when the policy is ``required``;
6. the signature counter grew, unless both stored and received counters are zero
   (WebAuthn §7.2 step 21): otherwise reject as a cloned key.

Settings (``[auth.fido2]``)
---------------------------

``rp_id`` (required: the gateway's DNS name, e.g. ``"gateway.example.org"``),
``rp_name`` (default: ``rp_id``), ``user_verification`` (``"required"``,
``"preferred"`` (default) or ``"discouraged"``), ``origin`` (default
``"https://" + rp_id``), ``timeout`` (seconds to wait for the person, default 60).
Unknown keys are refused, so a misspelt ``user_verification`` cannot silently weaken
the policy. See :func:`parse_settings`.

Prover options (``ProverOptions.values``)
-----------------------------------------

``fido2_device``: a ready :class:`fido2.ctap.CtapDevice` (tests pass a software
authenticator); without it the prover finds the key (:func:`open_device`): USB HID
keys and keys over PC/SC (python-fido2's ``CtapPcscDevice``: a key on an NFC reader, a
CCID key; needs pyscard and pcscd, and is skipped without them).
``fido2_device_name``: use the key whose name (a USB key's product and path, a PC/SC
key's reader) contains this, case-insensitively (``--fido2-device NAME``).
``fido2_choose``: ``callable(list of names) -> index`` that asks the person which of
several keys to use; absent (scripts), several keys are refused with their list.
``notify``: ``callable(str)`` that shows "Touch your security key". ``fido2_pin``: the
PIN for unattended use (otherwise ``prompt("Security key PIN: ", True)`` asks, and only
when the key needs user verification). ``fido2_rp_id``: if set, refuse a challenge for
another relying party.

Errors on the client side are :class:`relay.errors.AuthError` with a message for the
person; those that are a local problem rather than a refusal (no key plugged in, a
blocked PIN, a key without the PIN the policy needs, python-fido2 not installed) are
its subclass :class:`relay.errors.DeviceError`, which ``gw`` exits 4 for.

``"preferred"`` and keys without a PIN: python-fido2 treats ``preferred`` as
``required`` when a key *could* verify the user but has no PIN set (Yubico/python-fido2
#148, #162), which would lock such keys out. The gateway's ``preferred`` means "accept
without UV", so the prover asks such a key with ``discouraged`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from relay.errors import AuthError, ConfigError, DeviceError

from .base import (
    JSON,
    AuthContext,
    Challenge,
    Factor,
    Outcome,
    Prompt,
    Prover,
    ProverOptions,
    Verifier,
    b64d,
    b64e,
)

if TYPE_CHECKING:
    from fido2 import cbor
    from fido2.attestation.base import Attestation, InvalidAttestation, UnsupportedType
    from fido2.client import (
        ClientError,
        DefaultClientDataCollector,
        Fido2Client,
        PinRequiredError,
        UserInteraction,
    )
    from fido2.cose import CoseKey, UnsupportedKey
    from fido2.ctap import CtapDevice, CtapError
    from fido2.ctap2.base import Ctap2, Info
    from fido2.ctap2.pin import ClientPin
    from fido2.rpid import verify_rp_id
    from fido2.webauthn import (
        AttestationConveyancePreference,
        AuthenticationResponse,
        AuthenticatorData,
        AuthenticatorSelectionCriteria,
        PublicKeyCredentialCreationOptions,
        PublicKeyCredentialDescriptor,
        PublicKeyCredentialParameters,
        PublicKeyCredentialRequestOptions,
        PublicKeyCredentialRpEntity,
        PublicKeyCredentialType,
        PublicKeyCredentialUserEntity,
        RegistrationResponse,
        ResidentKeyRequirement,
        UserVerificationRequirement,
    )

__all__ = [
    "FACTOR",
    "Fido2Prover",
    "Fido2Settings",
    "Fido2Verifier",
    "list_credentials",
    "login_challenge",
    "open_device",
    "parse_settings",
    "register",
    "registration_begin",
    "registration_challenge",
    "registration_complete",
    "remove_credential",
]

NAME: Final = "fido2"
WIRE_VERSION: Final = 1

LOGIN_LABEL: Final = b"gw-fido2-v1\x00"
REGISTER_LABEL: Final = b"gw-fido2-register-v1\x00"
NONCE_LEN: Final = 32
"""Bytes of fresh randomness per challenge: a 256-bit value is never repeated."""

USER_VERIFICATION: Final = ("required", "preferred", "discouraged")
DEFAULT_USER_VERIFICATION: Final = "preferred"
DEFAULT_TIMEOUT: Final = 60.0
"""Seconds a person gets to type a PIN and touch the key; browsers use 60-300 s."""
MAX_TIMEOUT: Final = 600.0
"""Beyond ten minutes nobody is at the key; a larger value is a typo."""

MAX_CREDENTIALS: Final = 16
"""Keys per user. People hold a handful; the bound keeps every login's allow list small."""
MAX_CREDENTIAL_ID: Final = 1023
"""WebAuthn Level 2 §5.10.3: credential ids are at most 1023 bytes."""
MAX_CLIENT_DATA: Final = 4096
"""Our clientDataJSON is about 200 bytes; 4 KiB leaves room for any client's extra fields."""
MAX_AUTHENTICATOR_DATA: Final = 4096
"""37 bytes plus extensions for an assertion; attested data adds id and key (< 2 KiB)."""
MAX_SIGNATURE: Final = 1024
"""The largest we accept is RS256 with a 4096-bit key: 512 bytes."""
MAX_ATTESTATION_OBJECT: Final = 16384
"""Room for an attestation certificate chain (a YubiKey sends one ~800-byte cert)."""
MAX_USER_ID: Final = 64
"""WebAuthn Level 2 §5.4.3: a user handle is at most 64 bytes."""
MAX_NAME: Final = 64
"""Characters in a key's display name, enough for "YubiKey 5C NFC (blue, spare)"."""

#: Algorithms offered at registration (COSE ids), in order of preference:
#: ES256, EdDSA, ES384, RS256. All are what CTAP2 keys implement and fido2 verifies.
ALGORITHMS: Final = (-7, -8, -35, -257)

_RP_ID = re.compile(
    r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_SETTINGS_KEYS: Final = frozenset({"rp_id", "rp_name", "user_verification", "origin", "timeout"})
_INSTALL_HINT: Final = "the FIDO2 factor needs python-fido2: pip install 'gatewayd[fido2]'"

_T = TypeVar("_T")


#: Why python-fido2 cannot be imported (None: it can, or it was not tried yet).
_FIDO2_MISSING: ImportError | None = None
_fido2_tried = False
_fido2_lock = threading.Lock()


def _load_fido2() -> ImportError | None:
    """Import python-fido2 into this module's names on first use; why it cannot be, or None.

    The library costs a process 7 MiB of memory; a daemon that only parses
    ``[auth.fido2]`` (every start with the default modes) or serves logins without a
    security key never loads it. Every path that uses its names goes through
    :func:`_require_fido2` first.
    """
    global _FIDO2_MISSING, _fido2_tried
    global \
        cbor, \
        Attestation, \
        InvalidAttestation, \
        UnsupportedType, \
        ClientError, \
        DefaultClientDataCollector, \
        Fido2Client, \
        PinRequiredError, \
        UserInteraction, \
        CoseKey, \
        UnsupportedKey, \
        CtapDevice, \
        CtapError, \
        Ctap2, \
        Info, \
        ClientPin, \
        verify_rp_id, \
        AttestationConveyancePreference, \
        AuthenticatorData, \
        AuthenticatorSelectionCriteria, \
        PublicKeyCredentialCreationOptions, \
        PublicKeyCredentialDescriptor, \
        PublicKeyCredentialParameters, \
        PublicKeyCredentialRequestOptions, \
        PublicKeyCredentialRpEntity, \
        PublicKeyCredentialType, \
        PublicKeyCredentialUserEntity, \
        ResidentKeyRequirement, \
        UserVerificationRequirement
    with _fido2_lock:
        if _fido2_tried:
            return _FIDO2_MISSING
        try:
            from fido2 import cbor
            from fido2.attestation.base import Attestation, InvalidAttestation, UnsupportedType
            from fido2.client import (
                ClientError,
                DefaultClientDataCollector,
                Fido2Client,
                PinRequiredError,
                UserInteraction,
            )
            from fido2.cose import CoseKey, UnsupportedKey
            from fido2.ctap import CtapDevice, CtapError
            from fido2.ctap2.base import Ctap2, Info
            from fido2.ctap2.pin import ClientPin
            from fido2.rpid import verify_rp_id
            from fido2.webauthn import (
                AttestationConveyancePreference,
                AuthenticatorData,
                AuthenticatorSelectionCriteria,
                PublicKeyCredentialCreationOptions,
                PublicKeyCredentialDescriptor,
                PublicKeyCredentialParameters,
                PublicKeyCredentialRequestOptions,
                PublicKeyCredentialRpEntity,
                PublicKeyCredentialType,
                PublicKeyCredentialUserEntity,
                ResidentKeyRequirement,
                UserVerificationRequirement,
            )
        except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
            _FIDO2_MISSING = exc
        _fido2_tried = True
        return _FIDO2_MISSING


def _require_fido2(error: type[Exception] = DeviceError) -> None:
    """Raise ``error`` with an install hint when python-fido2 is not importable."""
    if _load_fido2() is not None:
        if error is ConfigError:
            raise ConfigError("auth.fido2", _INSTALL_HINT) from _FIDO2_MISSING
        raise error(f"{_INSTALL_HINT} ({_FIDO2_MISSING})") from _FIDO2_MISSING


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Fido2Settings:
    """The ``[auth.fido2]`` table, validated."""

    rp_id: str
    """Relying-party id: the gateway's DNS name. Keys scope credentials to it."""
    rp_name: str
    """Shown by some keys and platforms at registration."""
    user_verification: str
    """``required``: a PIN (or biometric) every login; ``preferred``: if the key has one;
    ``discouraged``: touch only."""
    origin: str
    """The origin written into clientDataJSON; must be valid for ``rp_id``."""
    timeout: float
    """Seconds the client waits for PIN and touch."""


def _check_rp_id(rp_id: object, key: str) -> str:
    if not isinstance(rp_id, str) or not _RP_ID.match(rp_id):
        raise ConfigError(
            key, f"must be a lower-case DNS name such as 'gateway.example.org', not {rp_id!r}"
        )
    return rp_id


def _check_user_verification(value: object, key: str) -> str:
    if value not in USER_VERIFICATION:
        raise ConfigError(key, f"must be one of {', '.join(USER_VERIFICATION)}, not {value!r}")
    return str(value)


def _check_timeout(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(key, f"must be a number of seconds, not {value!r}")
    if not 0 < value <= MAX_TIMEOUT:
        raise ConfigError(key, f"must be more than 0 and at most {MAX_TIMEOUT:g} seconds")
    return float(value)


def _check_origin(origin: object, rp_id: str, key: str) -> str:
    if not isinstance(origin, str) or not origin:
        raise ConfigError(key, f"must be an origin such as 'https://{rp_id}'")
    # https://RP_ID is valid by WebAuthn's own rule: only another origin needs the library
    # (and its public-suffix list, 1.4 MiB), so that a default config does not load it.
    if origin != f"https://{rp_id}" and _load_fido2() is None and not verify_rp_id(rp_id, origin):
        raise ConfigError(key, f"{origin!r} is not a valid origin for rp_id {rp_id!r}")
    return origin


def parse_settings(settings: Mapping[str, Any], *, prefix: str = "auth.fido2") -> Fido2Settings:
    """Validate the ``[auth.fido2]`` table; raise :class:`ConfigError` naming the key at fault."""
    unknown = sorted(set(settings) - _SETTINGS_KEYS)
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_SETTINGS_KEYS))})"
        )
    if "rp_id" not in settings:
        raise ConfigError(f"{prefix}.rp_id", "required (the gateway's DNS name)")
    rp_id = _check_rp_id(settings["rp_id"], f"{prefix}.rp_id")
    rp_name = settings.get("rp_name", rp_id)
    if not isinstance(rp_name, str) or not rp_name or len(rp_name) > MAX_NAME:
        raise ConfigError(
            f"{prefix}.rp_name", f"must be a non-empty string of at most {MAX_NAME} characters"
        )
    return Fido2Settings(
        rp_id=rp_id,
        rp_name=rp_name,
        user_verification=_check_user_verification(
            settings.get("user_verification", DEFAULT_USER_VERIFICATION),
            f"{prefix}.user_verification",
        ),
        origin=_check_origin(settings.get("origin", f"https://{rp_id}"), rp_id, f"{prefix}.origin"),
        timeout=_check_timeout(settings.get("timeout", DEFAULT_TIMEOUT), f"{prefix}.timeout"),
    )


# ------------------------------------------------------------------ challenge binding


def _derive(label: bytes, nonce: bytes, channel_binding: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise AuthError(f"FIDO2 nonce must be {NONCE_LEN} bytes, not {len(nonce)}")
    if not channel_binding:
        raise AuthError(
            "no TLS channel binding: refusing a FIDO2 proof that is not bound to the connection"
        )
    return hashlib.sha256(label + nonce + channel_binding).digest()


def login_challenge(nonce: bytes, channel_binding: bytes) -> bytes:
    """The WebAuthn challenge of a login: ``SHA-256(b"gw-fido2-v1\\0" || nonce || cb)``."""
    return _derive(LOGIN_LABEL, nonce, channel_binding)


def registration_challenge(nonce: bytes, channel_binding: bytes) -> bytes:
    """A registration's challenge: ``SHA-256(b"gw-fido2-register-v1\\0" || nonce || cb)``."""
    return _derive(REGISTER_LABEL, nonce, channel_binding)


# ------------------------------------------------------------------ credential record


@dataclass(frozen=True, slots=True)
class _Stored:
    """One registered key, parsed from the record."""

    id: bytes
    public_key: CoseKey
    sign_count: int
    name: str
    aaguid: str
    index: int


def _entries(record: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    if record is None:
        return []
    if not isinstance(record, Mapping):
        raise ValueError("credential record is not an object")
    creds = record.get("credentials", [])
    if not isinstance(creds, list) or not all(isinstance(c, Mapping) for c in creds):
        raise ValueError("credential record's 'credentials' is not a list of objects")
    return list(creds)


def _parse_stored(
    record: Mapping[str, Any] | None, counters: Mapping[str, int] | None = None
) -> list[_Stored]:
    """Parse every key of a record; ``ValueError`` if the record is corrupt.

    ``counters`` are the gateway's later signature counters by key id."""
    counters = counters or {}
    out = []
    for i, entry in enumerate(_entries(record)):
        try:
            cose = cbor.decode(b64d(entry["public_key"]))
            if not isinstance(cose, Mapping):
                raise ValueError("public_key is not a COSE map")
            key = CoseKey.parse(cose)
            count = entry.get("sign_count", 0)
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < 2**32:
                raise ValueError("sign_count is not a 32-bit counter")
            later = counters.get(str(entry["id"]), 0)
            if isinstance(later, int) and not isinstance(later, bool):
                count = max(count, later)
            out.append(
                _Stored(
                    id=b64d(entry["id"], max_len=MAX_CREDENTIAL_ID),
                    public_key=key,
                    sign_count=count,
                    name=str(entry.get("name", "")),
                    aaguid=str(entry.get("aaguid", "")),
                    index=i,
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"credentials[{i}]: {exc}") from exc
    return out


def list_credentials(record: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The user's keys for display: id, name, added, last_used, aaguid... (no key material)."""
    fields = ("id", "name", "added", "last_used", "aaguid", "attestation", "sign_count")
    return [{k: e[k] for k in fields if k in e} for e in _entries(record)]


def remove_credential(record: Mapping[str, Any] | None, key_id: str) -> dict[str, Any]:
    """Return a copy of ``record`` without the key ``key_id``.

    ``key_id`` is the key's id as :func:`list_credentials` shows it, or an unambiguous
    prefix of at least 8 characters. Raise :class:`AuthError` if it matches no key or
    several.
    """
    entries = _entries(record)
    matches = [i for i, e in enumerate(entries) if e.get("id") == key_id]
    if not matches and len(key_id) >= 8:
        matches = [i for i, e in enumerate(entries) if str(e.get("id", "")).startswith(key_id)]
    if not matches:
        raise AuthError(f"no security key with id {key_id!r} is registered for this user")
    if len(matches) > 1:
        raise AuthError(f"key id prefix {key_id!r} matches {len(matches)} keys; give more of it")
    kept = [dict(e) for i, e in enumerate(entries) if i != matches[0]]
    return {**(dict(record) if record else {}), "credentials": kept}


def _clean_name(name: object) -> str | None:
    if not isinstance(name, str):
        return None
    name = name[: MAX_NAME * 4]
    cleaned = " ".join("".join(ch if ch.isprintable() else " " for ch in name).split())
    return cleaned[:MAX_NAME] or None


# ----------------------------------------------------------------------- verifier


class _Rejected(Exception):
    """Internal: one check failed. ``complete()`` turns it into ``Outcome.reject``."""

    def __init__(self, reason: str, **detail: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _field(response: Mapping[str, Any], name: str, max_len: int) -> bytes:
    if name not in response:
        raise _Rejected("malformed response", error=f"missing {name}")
    try:
        value = b64d(response[name], max_len=max_len)
    except ValueError as exc:
        raise _Rejected("malformed response", error=f"{name}: {exc}") from exc
    if not value or len(value) > max_len:
        raise _Rejected("malformed response", error=f"{name}: empty or longer than {max_len} bytes")
    return value


@dataclass(frozen=True, slots=True)
class _ClientData:
    """The members of clientDataJSON that are checked (WebAuthn Level 2 §5.8.1)."""

    type: str
    challenge: bytes
    origin: str
    cross_origin: bool


def _client_data(raw: bytes, expected_type: str) -> _ClientData:
    """Parse clientDataJSON ourselves, checking every type first.

    python-fido2's ``CollectedClientData`` is not used for untrusted input: it passes a
    non-string ``challenge`` to ``bytes()``, which allocates that many bytes.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _Rejected("malformed response", error="clientDataJSON is not JSON") from exc
    if not isinstance(doc, dict):
        raise _Rejected("malformed response", error="clientDataJSON is not an object")
    kind, challenge, origin = doc.get("type"), doc.get("challenge"), doc.get("origin")
    cross_origin = doc.get("crossOrigin", False)
    if not (
        isinstance(kind, str)
        and isinstance(challenge, str)
        and isinstance(origin, str)
        and isinstance(cross_origin, bool)
    ):
        raise _Rejected("malformed response", error="clientDataJSON members have wrong types")
    try:
        challenge_bytes = b64d(challenge, max_len=64)
    except ValueError as exc:
        raise _Rejected("malformed response", error="clientDataJSON challenge") from exc
    if kind != expected_type:
        raise _Rejected("wrong clientDataJSON type", type=kind[:40], expected=expected_type)
    return _ClientData(kind, challenge_bytes, origin, cross_origin)


def _verify_signature(key: CoseKey, message: bytes, signature: bytes) -> bool:
    try:
        key.verify(message, signature)
    except Exception:  # InvalidSignature, or a bad key/encoding: all "not verified"
        return False
    return True


class Fido2Verifier(Verifier):
    """Gateway side: check an assertion made by one of the user's registered keys."""

    name = NAME

    def __init__(self) -> None:
        _require_fido2(ConfigError)

    def begin(self, ctx: AuthContext) -> Challenge:
        settings = parse_settings(ctx.settings)
        try:
            allow = [b64e(c.id) for c in _parse_stored(ctx.credential)]
        except ValueError:
            allow = []  # complete() rejects with the reason; the peer learns nothing more
        nonce = os.urandom(NONCE_LEN)
        challenge = login_challenge(nonce, ctx.channel_binding)
        payload: JSON = {
            "v": WIRE_VERSION,
            "rp_id": settings.rp_id,
            "origin": settings.origin,
            "nonce": b64e(nonce),
            "allow": allow,
            "user_verification": settings.user_verification,
            "timeout": settings.timeout,
        }
        state: JSON = {"v": WIRE_VERSION, "nonce": b64e(nonce), "challenge": b64e(challenge)}
        return Challenge(payload=payload, state=state)

    def complete(self, ctx: AuthContext, state: JSON, response: JSON) -> Outcome:
        settings = parse_settings(ctx.settings)  # a config error is local: let it raise
        try:
            return self._check(ctx, settings, state, response)
        except _Rejected as rejected:
            return Outcome.reject(rejected.reason, detail=rejected.detail)
        except Exception as exc:  # remote input never raises out of complete()
            return Outcome.reject(
                "malformed response", detail={"error": f"{type(exc).__name__}: {exc}"[:200]}
            )

    def _check(
        self, ctx: AuthContext, settings: Fido2Settings, state: JSON, response: JSON
    ) -> Outcome:
        # The state is ours, but only ever trust it as far as its shape is checked.
        try:
            if state.get("v") != WIRE_VERSION:
                raise ValueError("wrong version")
            nonce = b64d(state["nonce"])
            state_challenge = b64d(state["challenge"])
        except (AttributeError, KeyError, ValueError) as exc:
            raise _Rejected("invalid verifier state", error=str(exc)) from exc

        try:
            stored = _parse_stored(ctx.credential, ctx.counters)
        except ValueError as exc:
            raise _Rejected("stored FIDO2 credential record is invalid", error=str(exc)) from exc
        if not stored:
            raise _Rejected("no FIDO2 security key registered for this user")

        if not isinstance(response, Mapping):
            raise _Rejected("malformed response", error="not an object")
        credential_id = _field(response, "credential_id", MAX_CREDENTIAL_ID)
        client_data_raw = _field(response, "client_data_json", MAX_CLIENT_DATA)
        auth_data_raw = _field(response, "authenticator_data", MAX_AUTHENTICATOR_DATA)
        signature = _field(response, "signature", MAX_SIGNATURE)

        # §7.2 steps 5-6: the credential must be one of this user's.
        key = next((c for c in stored if hmac.compare_digest(c.id, credential_id)), None)
        if key is None:
            raise _Rejected(
                "unknown credential (this key is not registered for the user)",
                key_id=b64e(credential_id),
            )
        who = {"key_id": b64e(key.id), "key_name": key.name}

        try:
            auth_data = AuthenticatorData(auth_data_raw)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as exc:
            # AttributeError: attested credential data whose COSE key is not a map.
            raise _Rejected(
                "malformed response", error=f"authenticatorData: {type(exc).__name__}", **who
            ) from exc

        # §7.2 step 20, done early: everything checked after this is what the key signed.
        if not _verify_signature(
            key.public_key, auth_data_raw + hashlib.sha256(client_data_raw).digest(), signature
        ):
            raise _Rejected("invalid signature", **who)

        # §7.2 steps 11-14: clientDataJSON.
        client_data = _client_data(client_data_raw, "webauthn.get")
        try:
            expected = login_challenge(nonce, ctx.channel_binding)
        except AuthError as exc:
            raise _Rejected(str(exc), **who) from exc
        if not hmac.compare_digest(state_challenge, expected):
            raise _Rejected("TLS channel changed between challenge and response", **who)
        if not hmac.compare_digest(client_data.challenge, expected):
            raise _Rejected(
                "challenge mismatch (stale, replayed, or bound to another TLS channel)", **who
            )
        if client_data.origin != settings.origin:
            raise _Rejected(
                "origin mismatch", origin=client_data.origin[:200], expected=settings.origin, **who
            )
        if client_data.cross_origin is not False:
            raise _Rejected("cross-origin assertion", **who)

        # §7.2 steps 15-17: authenticatorData.
        if not hmac.compare_digest(
            auth_data.rp_id_hash, hashlib.sha256(settings.rp_id.encode()).digest()
        ):
            raise _Rejected("relying party id mismatch", **who)
        if not auth_data.is_user_present():
            raise _Rejected("user presence flag not set", **who)
        user_verified = auth_data.is_user_verified()
        if settings.user_verification == "required" and not user_verified:
            raise _Rejected("user verification required but not performed", **who)

        # §7.2 step 21: the signature counter.
        received = auth_data.counter
        if (received or key.sign_count) and received <= key.sign_count:
            raise _Rejected(
                "signature counter did not increase (cloned key?)",
                stored_sign_count=key.sign_count,
                received_sign_count=received,
                aaguid=key.aaguid,
                **who,
            )

        return Outcome.accept(
            detail={
                **who,
                "sign_count": received,
                "user_verified": user_verified,
                "aaguid": key.aaguid,
            },
            # 0: a key that keeps no counter; the gateway then only checks it is still there.
            counter=(b64e(key.id), received),
        )


# ------------------------------------------------------------------- registration


def _existing_ids(existing: Mapping[str, Any] | Sequence[Any] | None) -> list[str]:
    """Credential ids (b64) from a record, a list of record entries or a list of ids."""
    if existing is None:
        return []
    if isinstance(existing, str | bytes):
        raise TypeError("existing_credentials must be a record or a list, not a string")
    if isinstance(existing, Mapping):
        items: Iterable[Any] = _entries(existing)
    else:
        items = existing
    ids = []
    for item in items:
        value = item.get("id") if isinstance(item, Mapping) else item
        if not isinstance(value, str):
            raise TypeError(f"existing credential {item!r} has no id")
        ids.append(value)
    return ids


def registration_begin(
    rp_id: str,
    rp_name: str,
    user_id: bytes | str,
    user_name: str,
    existing_credentials: Mapping[str, Any] | Sequence[Any] | None,
    channel_binding: bytes,
    user_verification: str = DEFAULT_USER_VERIFICATION,
    *,
    origin: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[JSON, JSON]:
    """Start registering a key: return the payload for ``gw`` and the state to keep.

    ``user_id`` is the WebAuthn user handle (1-64 bytes; a str is UTF-8 encoded; do not
    put personal data in it). ``existing_credentials`` is the user's record (or its
    ``credentials`` list, or a list of key ids): those keys are excluded, so a key is
    never registered twice. ``channel_binding`` is the registering connection's.
    Raise :class:`AuthError` if the user already has :data:`MAX_CREDENTIALS` keys,
    :class:`ConfigError` for bad RP parameters.
    """
    _require_fido2()
    rp_id = _check_rp_id(rp_id, "auth.fido2.rp_id")
    user_verification = _check_user_verification(user_verification, "auth.fido2.user_verification")
    origin = _check_origin(
        origin if origin is not None else f"https://{rp_id}", rp_id, "auth.fido2.origin"
    )
    timeout = _check_timeout(timeout, "auth.fido2.timeout")
    handle = user_id.encode() if isinstance(user_id, str) else bytes(user_id)
    if not 1 <= len(handle) <= MAX_USER_ID:
        raise ValueError(f"user_id must be 1 to {MAX_USER_ID} bytes")
    exclude = _existing_ids(existing_credentials)
    if len(exclude) >= MAX_CREDENTIALS:
        raise AuthError(
            f"this user already has {len(exclude)} security keys (the limit); remove one first"
        )
    nonce = os.urandom(NONCE_LEN)
    challenge = registration_challenge(nonce, channel_binding)
    payload: JSON = {
        "v": WIRE_VERSION,
        "rp_id": rp_id,
        "rp_name": rp_name,
        "origin": origin,
        "user_id": b64e(handle),
        "user_name": user_name,
        "nonce": b64e(nonce),
        "exclude": exclude,
        "user_verification": user_verification,
        "timeout": timeout,
    }
    state: JSON = {
        "v": WIRE_VERSION,
        "kind": "fido2-register",
        "challenge": b64e(challenge),
        "rp_id": rp_id,
        "origin": origin,
        "user_verification": user_verification,
    }
    return payload, state


def _attestation_object(raw: bytes) -> tuple[str, AuthenticatorData, Mapping[str, Any]]:
    """Parse an attestation object (WebAuthn Level 2 §6.5) into fmt, authData, attStmt.

    Parsed here, not by python-fido2's ``AttestationObject``, which would hand a
    non-bytes ``authData`` (say a large integer) to ``bytes()``.
    """
    try:
        obj = cbor.decode(raw)
    except (ValueError, KeyError, TypeError, IndexError, struct.error, RecursionError) as exc:
        raise _Rejected("malformed response", error="attestationObject is not CBOR") from exc
    if not isinstance(obj, Mapping):
        raise _Rejected("malformed response", error="attestationObject is not a map")
    fmt, auth_data, statement = obj.get("fmt"), obj.get("authData"), obj.get("attStmt")
    if not (
        isinstance(fmt, str) and isinstance(auth_data, bytes) and isinstance(statement, Mapping)
    ):
        raise _Rejected("malformed response", error="attestationObject members have wrong types")
    try:
        parsed = AuthenticatorData(auth_data)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as exc:
        raise _Rejected("malformed response", error="authData: " + type(exc).__name__) from exc
    return fmt, parsed, statement


def _check_public_key(key: CoseKey) -> None:
    """Refuse a credential public key that could never verify a signature.

    Loading it into ``cryptography`` checks lengths, that an EC point is on its
    curve, and so on; otherwise a malformed key would be stored and fail every login.
    """
    try:
        if key.ALGORITHM in (-7, -35):  # ES256, ES384: EC2 keys (RFC 9053 §7.1.1)
            crv, curve, size = {-7: (1, ec.SECP256R1(), 32), -35: (2, ec.SECP384R1(), 48)}[
                key.ALGORITHM
            ]
            x, y = key[-2], key[-3]
            if key.get(1) != 2 or key.get(-1) != crv or len(x) != size or len(y) != size:
                raise ValueError("not an EC2 key on the algorithm's curve")
            ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        elif key.ALGORITHM == -8:  # EdDSA: an OKP key on Ed25519 (RFC 9053 §7.2)
            if key.get(1) != 1 or key.get(-1) != 6:
                raise ValueError("not an Ed25519 OKP key")
            ed25519.Ed25519PublicKey.from_public_bytes(key[-2])
        elif key.ALGORITHM == -257:  # RS256 (RFC 8230 §4)
            n, e = int.from_bytes(key[-1], "big"), int.from_bytes(key[-2], "big")
            if n.bit_length() < 2048:
                raise ValueError("RSA key shorter than 2048 bits")
            rsa.RSAPublicNumbers(e, n).public_key()
        else:
            raise ValueError("algorithm not offered")
    except (ValueError, KeyError, TypeError, UnsupportedAlgorithm) as exc:
        raise _Rejected("invalid credential public key", error=str(exc)[:100]) from exc


def _verify_attestation(
    fmt: str, statement: Mapping[str, Any], auth_data: AuthenticatorData, client_data_hash: bytes
) -> bool:
    """Check the attestation statement's own signature; False if its format is unknown.

    Only consistency is checked (the statement was made by the key that made this
    credential, or by a certificate the statement carries); no vendor root is trusted.
    """
    if fmt == "none":
        if statement:
            raise _Rejected("invalid attestation statement", fmt="none")
        return False
    try:
        Attestation.for_type(fmt)().verify(statement, auth_data, client_data_hash)
    except UnsupportedType:
        return False
    except (
        InvalidAttestation,
        NotImplementedError,
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        AttributeError,
        UnsupportedAlgorithm,
    ) as exc:
        raise _Rejected(
            "invalid attestation statement", fmt=fmt[:40], error=type(exc).__name__
        ) from exc
    return True


def registration_complete(
    state: JSON,
    response: JSON,
    credential_record: Mapping[str, Any] | None,
    *,
    name: str | None = None,
    now: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check ``gw``'s registration response; return ``(new_record, key_info)``.

    ``new_record`` is ``credential_record`` with the new key appended (persist it);
    ``key_info`` describes the key for the audit log and the admin (id, name, aaguid,
    attestation, attestation_verified, user_verified, sign_count, added). ``name``
    labels the key (else the response's ``name``, else "security key N"); ``now``
    stamps ``added`` (default: the current time). Raise :class:`AuthError` with the
    reason when the response does not check out; malformed input never raises anything else.
    """
    _require_fido2()
    try:
        return _registration_complete(state, response, credential_record, name, now)
    except _Rejected as rejected:
        detail = ", ".join(f"{k}={v}" for k, v in rejected.detail.items())
        raise AuthError(
            f"FIDO2 registration rejected: {rejected.reason}" + (f" ({detail})" if detail else "")
        ) from None
    except AuthError:
        raise
    except Exception as exc:  # remote input never raises anything but AuthError
        raise AuthError(
            f"FIDO2 registration rejected: malformed response ({type(exc).__name__})"
        ) from None


def _registration_complete(
    state: JSON,
    response: JSON,
    record: Mapping[str, Any] | None,
    name: str | None,
    now: float | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    if (
        not isinstance(state, Mapping)
        or state.get("kind") != "fido2-register"
        or state.get("v") != WIRE_VERSION
    ):
        raise _Rejected("invalid registration state")
    rp_id, origin, uv = state["rp_id"], state["origin"], state["user_verification"]
    challenge = b64d(state["challenge"])

    if not isinstance(response, Mapping):
        raise _Rejected("malformed response", error="not an object")
    credential_id = _field(response, "credential_id", MAX_CREDENTIAL_ID)
    client_data_raw = _field(response, "client_data_json", MAX_CLIENT_DATA)
    att_raw = _field(response, "attestation_object", MAX_ATTESTATION_OBJECT)

    # §7.1 steps 5-10: clientDataJSON.
    client_data = _client_data(client_data_raw, "webauthn.create")
    if not hmac.compare_digest(client_data.challenge, challenge):
        raise _Rejected("challenge mismatch (stale, replayed, or bound to another TLS channel)")
    if client_data.origin != origin:
        raise _Rejected("origin mismatch", origin=client_data.origin[:200], expected=origin)

    # §7.1 steps 12-17: attestation object and authenticator data.
    fmt, auth_data, statement = _attestation_object(att_raw)
    if not hmac.compare_digest(auth_data.rp_id_hash, hashlib.sha256(rp_id.encode()).digest()):
        raise _Rejected("relying party id mismatch")
    if not auth_data.is_user_present():
        raise _Rejected("user presence flag not set")
    if uv == "required" and not auth_data.is_user_verified():
        raise _Rejected("user verification required but not performed")
    cred = auth_data.credential_data
    if cred is None:
        raise _Rejected("malformed response", error="no attested credential data")
    if not hmac.compare_digest(cred.credential_id, credential_id):
        raise _Rejected("malformed response", error="credential_id differs from the attested one")
    if len(cred.credential_id) > MAX_CREDENTIAL_ID:
        raise _Rejected("malformed response", error="credential id too long")
    public_key = cred.public_key
    if isinstance(public_key, UnsupportedKey) or public_key.ALGORITHM not in ALGORITHMS:
        raise _Rejected("unsupported key algorithm", alg=str(public_key.get(3))[:20])
    _check_public_key(public_key)
    verified = _verify_attestation(
        fmt, statement, auth_data, hashlib.sha256(client_data_raw).digest()
    )

    entries = _entries(record)
    new_id = b64e(cred.credential_id)
    if any(e.get("id") == new_id for e in entries):
        raise _Rejected("this security key is already registered for the user", key_id=new_id)
    if len(entries) >= MAX_CREDENTIALS:
        raise _Rejected(f"the user already has {len(entries)} security keys (the limit)")

    label = (
        _clean_name(name) or _clean_name(response.get("name")) or f"security key {len(entries) + 1}"
    )
    entry: dict[str, Any] = {
        "id": new_id,
        "public_key": b64e(cbor.encode(dict(public_key))),
        "sign_count": auth_data.counter,
        "name": label,
        "added": time.time() if now is None else now,
        "aaguid": bytes(cred.aaguid).hex(),
        "attestation": fmt,
    }
    new_record = {**(dict(record) if record else {}), "credentials": [*map(dict, entries), entry]}
    info = {
        "id": new_id,
        "name": label,
        "aaguid": entry["aaguid"],
        "attestation": fmt,
        "attestation_verified": verified,
        "user_verified": auth_data.is_user_verified(),
        "sign_count": auth_data.counter,
        "added": entry["added"],
    }
    return new_record, info


# --------------------------------------------------------------------- client side


@dataclass(frozen=True, slots=True)
class _Request:
    """A gateway payload (login or registration), checked."""

    rp_id: str
    origin: str
    nonce: bytes
    credential_ids: tuple[bytes, ...]
    user_verification: str
    timeout: float


def _parse_request(payload: Mapping[str, Any], ids_key: str) -> _Request:
    try:
        if not isinstance(payload, Mapping) or payload.get("v") != WIRE_VERSION:
            raise ValueError("unsupported version")
        rp_id = _check_rp_id(payload["rp_id"], "rp_id")
        origin = payload.get("origin", f"https://{rp_id}")
        if not isinstance(origin, str):
            raise ValueError("origin is not a string")
        ids = payload.get(ids_key, [])
        if not isinstance(ids, list) or len(ids) > MAX_CREDENTIALS:
            raise ValueError(f"{ids_key} is not a list of at most {MAX_CREDENTIALS} ids")
        return _Request(
            rp_id=rp_id,
            origin=origin,
            nonce=b64d(payload["nonce"], max_len=NONCE_LEN),
            credential_ids=tuple(b64d(i, max_len=MAX_CREDENTIAL_ID) for i in ids),
            user_verification=_check_user_verification(
                payload.get("user_verification", DEFAULT_USER_VERIFICATION), "user_verification"
            ),
            timeout=_check_timeout(payload.get("timeout", DEFAULT_TIMEOUT), "timeout"),
        )
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise AuthError(f"the gateway sent a malformed FIDO2 request: {exc}") from None


def _make_interaction(
    prompt: Prompt, notify: Callable[[str], None] | None, pin: str | None
) -> UserInteraction:
    """python-fido2's callbacks, run in the worker thread: touch notice and PIN prompt."""

    class Interaction(UserInteraction):
        def prompt_up(self) -> None:
            if notify is not None:
                notify("Touch your security key")

        def request_pin(self, permissions: ClientPin.PERMISSION, rp_id: str | None) -> str | None:
            return pin if pin else (prompt("Security key PIN: ", True) or None)

        def request_uv(self, permissions: ClientPin.PERMISSION, rp_id: str | None) -> bool:
            if notify is not None:
                notify("Verify yourself on your security key")
            return True

    return Interaction()


def _uv_configured(info: Info) -> bool:
    return any(info.options.get(k) for k in ("uv", "clientPin", "bioEnroll"))


def _effective_uv(client: Fido2Client, requested: str) -> UserVerificationRequirement:
    # See the module docstring: python-fido2 fails "preferred" on a key without a PIN.
    if requested == "preferred" and not _uv_configured(client.info):
        requested = "discouraged"
    return UserVerificationRequirement(requested)


def _pin_retries(device: CtapDevice) -> int | None:
    try:
        return ClientPin(Ctap2(device)).get_pin_retries()[0]
    except Exception:  # only to improve a message
        return None


_NO_PIN_MESSAGE: Final = (
    "the gateway requires user verification, but this security key has no PIN set; "
    "set one (for a YubiKey: ykman fido access change-pin) and try again"
)


def _ctap_error(code: int, device: CtapDevice) -> AuthError:
    err = CtapError.ERR
    if code == err.NO_CREDENTIALS:
        return AuthError(
            "this security key is not registered for your account (wrong key?); "
            "use the key you registered, or ask your administrator to register this one"
        )
    if code == err.CREDENTIAL_EXCLUDED:
        return AuthError("this security key is already registered for your account")
    if code in (err.KEEPALIVE_CANCEL, err.ACTION_TIMEOUT, err.USER_ACTION_TIMEOUT):
        return AuthError("timed out waiting for you to touch the security key")
    if code == err.OPERATION_DENIED:
        return AuthError("the security key refused the request (touch denied)")
    if code == err.PIN_INVALID:
        left = _pin_retries(device)
        if left == 0:
            return DeviceError(
                "wrong PIN; the security key's PIN is now blocked and the key must be reset"
            )
        more = (
            f" ({left} attempt{'s' if left != 1 else ''} left before the key locks)"
            if left is not None
            else ""
        )
        return AuthError(f"wrong PIN for the security key{more}")
    if code == err.PIN_BLOCKED:
        return DeviceError(
            "the security key's PIN is blocked after too many wrong attempts; "
            "the key must be reset (which erases its credentials) and registered again"
        )
    if code == err.PIN_AUTH_BLOCKED:
        return DeviceError(
            "too many wrong PINs in a row: unplug the security key, plug it in again and retry"
        )
    if code == err.PIN_NOT_SET:
        return DeviceError(_NO_PIN_MESSAGE)
    if code == err.PIN_POLICY_VIOLATION:
        return AuthError("the PIN does not meet the security key's PIN policy")
    if code == err.UV_BLOCKED:
        return DeviceError("the security key's built-in user verification is blocked; use its PIN")
    if code == err.UNSUPPORTED_ALGORITHM:
        return DeviceError("the security key supports none of the gateway's signature algorithms")
    return AuthError(f"security key error: {CtapError(code).code}")


def _client_error(exc: ClientError, device: CtapDevice) -> AuthError:
    cause = exc.cause
    if isinstance(cause, CtapError):
        return _ctap_error(cause.code, device)
    code = exc.code
    if code == ClientError.ERR.TIMEOUT:
        return AuthError("timed out waiting for you to touch the security key")
    if code == ClientError.ERR.DEVICE_INELIGIBLE:
        return _ctap_error(CtapError.ERR.NO_CREDENTIALS, device)
    if code == ClientError.ERR.CONFIGURATION_UNSUPPORTED:
        if "verification" in str(cause):
            return DeviceError(_NO_PIN_MESSAGE)
        return AuthError(f"this security key cannot do what the gateway asks: {cause}")
    if code == ClientError.ERR.BAD_REQUEST:
        return AuthError(f"the FIDO2 request was refused: {cause or 'bad request'}")
    return AuthError(f"security key error: {cause or code.name}")


def _guarded(device: CtapDevice, work: Callable[[], _T]) -> _T:
    """Run blocking key work; turn every failure into an :class:`AuthError` with a clear message."""
    try:
        return work()
    except AuthError:
        raise
    except PinRequiredError as exc:
        raise AuthError("this security key needs its PIN, and none was entered") from exc
    except ClientError as exc:
        raise _client_error(exc, device) from exc
    except CtapError as exc:
        raise _ctap_error(exc.code, device) from exc
    except OSError as exc:
        raise DeviceError(f"lost contact with the security key: {exc}") from exc
    except Exception as exc:  # gw shows a message, never a traceback
        if type(exc).__name__ == "CardConnectionException":  # pyscard: key left the reader
            raise DeviceError(
                "the security key left the reader during login: hold it there and try again"
            ) from exc
        raise AuthError(f"security key error: {type(exc).__name__}: {exc}") from exc


def _hid_devices() -> list[tuple[str, CtapDevice]]:
    """USB security keys, with a name for each (blocking)."""
    try:
        from fido2.hid import CtapHidDevice
    except Exception as exc:  # python-fido2 raises a bare Exception on odd platforms
        raise DeviceError(f"cannot use USB security keys on this system: {exc}") from exc
    try:
        devices: list[CtapDevice] = list(CtapHidDevice.list_devices())
    except Exception as exc:  # OSError, or a device that does not answer INIT
        raise DeviceError(f"cannot open the security key: {exc}") from exc
    named = []
    for i, device in enumerate(devices, 1):
        product = getattr(device, "product_name", None) or "USB security key"
        path = getattr(getattr(device, "descriptor", None), "path", None) or f"#{i}"
        named.append((f"{product} ({path})", device))
    return named


def _pcsc_devices() -> list[tuple[str, CtapDevice]]:
    """Security keys over PC/SC (NFC readers, CCID), named by their reader (blocking).

    Nothing when pyscard is not installed or no PC/SC service runs: USB keys still work.
    """
    try:
        from fido2.pcsc import CtapPcscDevice
    except Exception:  # pyscard (or libpcsclite under it) missing
        return []
    try:
        devices = list(CtapPcscDevice.list_devices())
    except Exception:  # no pcscd, no readers: no key there
        return []
    return [(str(getattr(d, "_name", "") or repr(d)), d) for d in devices]


def _close_all(devices: list[tuple[str, CtapDevice]]) -> None:
    for _, device in devices:
        with contextlib.suppress(Exception):
            device.close()


def _open_device(
    name: str | None = None, choose: Callable[[list[str]], int] | None = None
) -> CtapDevice:
    found = _hid_devices() + _pcsc_devices()
    if name is not None:
        hits = [d for d in found if name.casefold() in d[0].casefold()]
        listed = ", ".join(repr(n) for n, _ in found) or "none"
        if len(hits) != 1:
            _close_all(found)
            if not hits:
                raise DeviceError(f"no security key named {name!r} (found: {listed})")
            raise DeviceError(f"{name!r} matches several security keys ({listed}): be precise")
        _close_all([d for d in found if d is not hits[0]])
        return hits[0][1]
    if not found:
        raise DeviceError(
            "no security key found: plug in your YubiKey (or put it on the NFC reader) and "
            "try again (on Linux, your account also needs access to /dev/hidraw*, "
            "e.g. through the udev rules of libfido2)"
        )
    if len(found) == 1:
        return found[0][1]
    names = [n for n, _ in found]
    if choose is not None:
        try:
            index = choose(names)
        except BaseException:
            _close_all(found)
            raise
        if 0 <= index < len(found):
            _close_all([d for i, d in enumerate(found) if i != index])
            return found[index][1]
    _close_all(found)
    listed = ", ".join(repr(n) for n in names)
    raise DeviceError(
        f"{len(found)} security keys are plugged in ({listed}): choose one with --fido2-device NAME"
    )


def open_device(
    name: str | None = None, choose: Callable[[list[str]], int] | None = None
) -> CtapDevice:
    """The security key to use (blocking: call it through ``asyncio.to_thread``).

    USB HID keys and keys over PC/SC; ``name`` picks one by a part of its name, and
    ``choose`` (given the names, returns an index) asks the person when there are
    several; without it several keys are refused with their names. Raise
    :class:`DeviceError` saying why not: python-fido2 missing, no key, several keys, no
    access to the device. ``gw fido2 register`` opens the key with this before it
    contacts the gateway, so a missing key costs no registration attempt.
    """
    _require_fido2()
    return _open_device(name, choose)


async def _in_thread(work: Callable[[threading.Event], _T]) -> _T:
    """Run blocking key work in a thread; cancelling the task cancels the key's wait."""
    cancel = threading.Event()
    try:
        return await asyncio.to_thread(work, cancel)
    except asyncio.CancelledError:
        cancel.set()
        raise


def _check_device(device: object) -> CtapDevice:
    if not isinstance(device, CtapDevice):
        raise TypeError(
            f"fido2_device must be a fido2.ctap.CtapDevice, not {type(device).__name__}"
        )
    return device


class Fido2Prover(Prover):
    """``gw`` side: ask the security key for an assertion bound to this TLS channel."""

    name = NAME

    def __init__(self, options: ProverOptions) -> None:
        _require_fido2()
        device = options.values.get("fido2_device")
        self._device: CtapDevice | None = None if device is None else _check_device(device)
        self._owned: CtapDevice | None = None
        self._prompt = options.prompt
        self._notify: Callable[[str], None] | None = options.values.get("notify")
        self._pin: str | None = options.values.get("fido2_pin")
        self._rp_id: str | None = options.values.get("fido2_rp_id")
        self._device_name: str | None = options.values.get("fido2_device_name")
        self._choose: Callable[[list[str]], int] | None = options.values.get("fido2_choose")

    async def respond(self, challenge: JSON, channel_binding: bytes) -> JSON:
        request = _parse_request(challenge, "allow")
        if self._rp_id is not None and request.rp_id != self._rp_id:
            raise AuthError(
                f"the gateway asked for a FIDO2 login to {request.rp_id!r}, "
                f"expected {self._rp_id!r}"
            )
        if not request.credential_ids:
            raise AuthError(
                "no security key is registered for your account; ask your administrator"
            )
        webauthn_challenge = login_challenge(request.nonce, channel_binding)
        if self._device is None and self._device_name is None and windows_webauthn():
            windows: AuthenticationResponse = await _in_thread(
                lambda cancel: _windows_assertion(request, webauthn_challenge, cancel)
            )
            return _assertion_json(windows)
        device = await self._get_device()
        interaction = _make_interaction(self._prompt, self._notify, self._pin)

        def work(cancel: threading.Event) -> AuthenticationResponse:
            def ask() -> AuthenticationResponse:
                client = Fido2Client(
                    device, DefaultClientDataCollector(request.origin), interaction
                )
                options = PublicKeyCredentialRequestOptions(
                    challenge=webauthn_challenge,
                    timeout=int(request.timeout * 1000),
                    rp_id=request.rp_id,
                    allow_credentials=[
                        PublicKeyCredentialDescriptor(type=PublicKeyCredentialType.PUBLIC_KEY, id=i)
                        for i in request.credential_ids
                    ],
                    user_verification=_effective_uv(client, request.user_verification),
                )
                return client.get_assertion(options, cancel).get_response(0)

            return _guarded(device, ask)

        return _assertion_json(await _in_thread(work))

    async def _get_device(self) -> CtapDevice:
        if self._device is None:
            self._owned = self._device = await asyncio.to_thread(
                _open_device, self._device_name, self._choose
            )
        return self._device

    async def aclose(self) -> None:
        owned, self._owned = self._owned, None
        if owned is not None:
            self._device = None
            owned.close()


async def register(
    device: CtapDevice | None,
    payload: Mapping[str, Any],
    channel_binding: bytes,
    prompt: Prompt,
    origin: str | None = None,
    *,
    notify: Callable[[str], None] | None = None,
    name: str | None = None,
    pin: str | None = None,
    device_name: str | None = None,
) -> JSON:
    """Client side of registration: make a credential on ``device`` for ``payload``.

    ``device`` None opens the one USB key plugged in. ``channel_binding`` is this
    client's TLS connection's; ``origin`` overrides the payload's (the gateway checks
    it against its own). ``prompt`` asks for the PIN when the key needs it; ``notify``
    shows "Touch your security key"; ``name`` is sent as the key's label. Raise
    :class:`AuthError` with a clear message on every failure.
    """
    _require_fido2()
    request = _parse_request(payload, "exclude")
    try:
        user_id = b64d(payload["user_id"], max_len=MAX_USER_ID)
        user_name, rp_name = payload["user_name"], payload.get("rp_name", request.rp_id)
        if not isinstance(user_name, str) or not isinstance(rp_name, str) or not user_id:
            raise ValueError("user_name, rp_name or user_id has the wrong type")
    except (KeyError, ValueError) as exc:
        raise AuthError(f"the gateway sent a malformed FIDO2 registration request: {exc}") from None
    webauthn_challenge = registration_challenge(request.nonce, channel_binding)
    windows = device is None and device_name is None and windows_webauthn()
    owned = None
    if windows:
        key: CtapDevice | None = None
    elif device is None:
        owned = key = await asyncio.to_thread(_open_device, device_name)
    else:
        key = _check_device(device)
    interaction = _make_interaction(prompt, notify, pin)

    def work(cancel: threading.Event) -> RegistrationResponse:
        def make() -> RegistrationResponse:
            client: Any = (
                _windows_client(origin or request.origin)
                if key is None
                else Fido2Client(
                    key, DefaultClientDataCollector(origin or request.origin), interaction
                )
            )
            uv = (
                UserVerificationRequirement(request.user_verification)
                if key is None
                else _effective_uv(client, request.user_verification)
            )
            options = PublicKeyCredentialCreationOptions(
                rp=PublicKeyCredentialRpEntity(id=request.rp_id, name=rp_name),
                user=PublicKeyCredentialUserEntity(
                    id=user_id, name=user_name, display_name=user_name
                ),
                challenge=webauthn_challenge,
                pub_key_cred_params=[
                    PublicKeyCredentialParameters(type=PublicKeyCredentialType.PUBLIC_KEY, alg=alg)
                    for alg in ALGORITHMS
                ],
                timeout=int(request.timeout * 1000),
                exclude_credentials=[
                    PublicKeyCredentialDescriptor(type=PublicKeyCredentialType.PUBLIC_KEY, id=i)
                    for i in request.credential_ids
                ],
                authenticator_selection=AuthenticatorSelectionCriteria(
                    resident_key=ResidentKeyRequirement.DISCOURAGED, user_verification=uv
                ),
                attestation=AttestationConveyancePreference.DIRECT,
            )
            made: RegistrationResponse = client.make_credential(options, cancel)
            return made

        if key is None:  # pragma: no cover - Windows' WebAuthn API
            try:
                return make()
            except ClientError as exc:
                raise _windows_error(exc) from None
        return _guarded(key, make)

    try:
        result = await _in_thread(work)
    finally:
        if owned is not None:
            owned.close()
    out: JSON = {
        "credential_id": b64e(result.raw_id),
        "client_data_json": b64e(bytes(result.response.client_data)),
        "attestation_object": b64e(bytes(result.response.attestation_object)),
    }
    label = _clean_name(name)
    if label:
        out["name"] = label
    return out


def _assertion_json(result: AuthenticationResponse) -> JSON:
    out: JSON = {
        "credential_id": b64e(result.raw_id),
        "client_data_json": b64e(bytes(result.response.client_data)),
        "authenticator_data": b64e(bytes(result.response.authenticator_data)),
        "signature": b64e(result.response.signature),
    }
    if result.response.user_handle:
        out["user_handle"] = b64e(result.response.user_handle)
    return out


# -- Windows: the platform's WebAuthn API ------------------------------------------------
# Windows 10 (1903) and later let only administrators talk to a security key over USB
# HID; everyone else goes through the WebAuthn API (webauthn.dll), which shows its own
# dialog for the PIN and the touch. python-fido2's WindowsClient speaks to it; the client
# data (with the challenge bound to this TLS channel) is made here as on any platform.
# Untested under Wine (which has no webauthn.dll): only on real Windows.


def windows_webauthn() -> bool:
    """True when logins must go through Windows' WebAuthn API: on Windows, where the
    API is there and gw does not run as administrator, and no --fido2-device was named."""
    if sys.platform != "win32":
        return False
    try:
        import ctypes

        from fido2.client.windows import WindowsClient
    except ImportError:  # pragma: no cover - python-fido2 ships it for Windows
        return False
    windll: Any = getattr(ctypes, "windll")  # noqa: B009 - absent from POSIX stubs
    return bool(WindowsClient.is_available()) and not windll.shell32.IsUserAnAdmin()


def _windows_client(origin: str) -> Any:  # pragma: no cover - Windows only
    from fido2.client.windows import WindowsClient

    return WindowsClient(DefaultClientDataCollector(origin))


def _windows_error(exc: ClientError) -> AuthError:  # pragma: no cover - Windows only
    if exc.code == ClientError.ERR.TIMEOUT:
        return AuthError("timed out waiting for you to touch the security key")
    return AuthError(f"Windows' security key dialog failed: {exc.cause or exc.code.name}")


def _windows_assertion(
    request: _Request, challenge: bytes, cancel: threading.Event
) -> AuthenticationResponse:  # pragma: no cover - Windows only
    client = _windows_client(request.origin)
    options = PublicKeyCredentialRequestOptions(
        challenge=challenge,
        timeout=int(request.timeout * 1000),
        rp_id=request.rp_id,
        allow_credentials=[
            PublicKeyCredentialDescriptor(type=PublicKeyCredentialType.PUBLIC_KEY, id=i)
            for i in request.credential_ids
        ],
        user_verification=UserVerificationRequirement(request.user_verification),
    )
    try:
        response: AuthenticationResponse = client.get_assertion(options, cancel).get_response(0)
    except ClientError as exc:
        raise _windows_error(exc) from None
    return response


def _make_prover(options: ProverOptions) -> Prover:
    return Fido2Prover(options)


FACTOR = Factor(
    name=NAME,
    verifier=Fido2Verifier,
    prover=_make_prover,
    description="FIDO2 security key (YubiKey): touch, PIN where required, bound to the TLS channel",
)
