"""The smartcard factor through a PKCS#11 module: any vendor's middleware, OpenSC, an HSM.

``gw connect --smartcard --pkcs11-module PATH`` (or ``GW_PKCS11_MODULE``) proves the
login with :class:`Pkcs11Prover` instead of speaking PIV over PC/SC itself; the gateway
side is the same :class:`auth.smartcard.SmartcardVerifier`, and the signed bytes are the
same :func:`auth.smartcard.to_be_signed` (domain prefix, nonce, TLS channel binding).

Finding the certificate
=======================

The gateway's challenge names what its policy accepts (see :mod:`auth.smartcard`):
``policy`` (the required certificate policy OID) and ``issuers`` (the DER subject names
of the CAs it trusts, base64url). The prover reads every X.509 certificate object on
every token the module shows (public objects, before any PIN) and keeps those that
could pass: key usage with digitalSignature, not a CA, an extended key usage (if any)
allowing clientAuth, the required policy, an issuer the gateway trusts. Exactly one:
that one. Several: those valid now, if any is (a renewed card that still holds its
expired certificate needs no choice). None: "no suitable certificate" (with what was
seen). Still several: they are listed, and ``--cert-label`` (``values["cert_label"]``)
picks one by its PKCS#11 label.

Then the PIN is asked (never echoed, never kept past the ``C_Login`` call), the private
key with the certificate's ``CKA_ID`` is found in a logged-in session, and the
SHA-256 digest of the message is signed on the token:

* RSA: ``CKM_RSA_PKCS`` over the DigestInfo (``rsa-pkcs1-sha256``); a token or key that
  does not offer it signs with ``CKM_RSA_PKCS_PSS`` (SHA-256, MGF1-SHA-256, 32-byte
  salt: ``rsa-pss-sha256``).
* EC P-256: ``CKM_ECDSA`` over the digest; the raw ``r || s`` is sent as DER
  (``ecdsa-p256-sha256``).

The signature is checked against the certificate before it leaves. The session is
closed right after signing, which logs the token out.

Errors are one line each (:class:`relay.errors.DeviceError` for local problems, which
send nothing; :class:`relay.errors.AuthError` otherwise): the module cannot be loaded,
no token, wrong PIN (with "1 try left" / "few tries left" where the token's flags say so),
PIN locked, no suitable certificate, several suitable ones. Once the certificate is
known, a prover that stops tells the gateway why (``declined``, see "Giving up" in
:mod:`auth.smartcard`) so the audit has the person and the reason.

Removal
=======

PKCS#11 has no portable removal event a client can wait on without a thread of its
own, so :meth:`Pkcs11Prover.wait_for_removal` polls: the token must still be present
in its slot with the same serial number and label. A slot without the token, a
different token, or any error from the module (the middleware lost the card, its
storage is gone) counts as removed: fail closed.

python-pkcs11 is an optional dependency (``pip install 'gatewayd[smartcard]'``),
imported only when a PKCS#11 login starts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.errors import AuthError, DeviceError
from relay.text import printable

from .base import JSON, Prompt, Prover, b64d, b64e
from .smartcard import (
    ALG_ECDSA_P256_SHA256,
    ALG_RSA_PKCS1_SHA256,
    ALG_RSA_PSS_SHA256,
    MALFORMED_X509,
    NAME,
    NONCE_LEN,
    to_be_signed,
)

__all__ = ["Pkcs11Prover", "Wanted", "make_pkcs11_prover"]

PKCS11_MISSING = (
    "smartcards through a PKCS#11 module need python-pkcs11: pip install 'gatewayd[pkcs11]'"
)

# SHA-256 DigestInfo prefix (RFC 8017 section 9.2, note 1).
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

# Many certificates on one token would be odd; this bounds what a token can make us parse.
MAX_CERTIFICATES = 64


@dataclass(frozen=True, slots=True)
class Wanted:
    """What the gateway's policy accepts, from its challenge (empty: anything)."""

    policy: x509.ObjectIdentifier | None = None
    issuers: tuple[bytes, ...] = ()
    """DER subject names of the CAs the gateway trusts."""

    @classmethod
    def from_challenge(cls, challenge: Mapping[str, Any]) -> Wanted:
        policy = challenge.get("policy")
        issuers = challenge.get("issuers", [])
        try:
            oid = x509.ObjectIdentifier(policy) if isinstance(policy, str) else None
            if not isinstance(issuers, list) or len(issuers) > 64:
                raise ValueError("issuers")
            names = tuple(b64d(i, max_len=4096) for i in issuers)
        except ValueError:
            raise AuthError("the gateway sent a malformed smartcard challenge") from None
        return cls(oid, names)

    def refusal(self, cert: x509.Certificate) -> str | None:
        """Why the gateway would refuse ``cert`` for a login; None if it may pass."""
        try:
            ext = cert.extensions
            key_usage = _ext(ext, x509.KeyUsage)
            eku = _ext(ext, x509.ExtendedKeyUsage)
            basic = _ext(ext, x509.BasicConstraints)
            policies = _ext(ext, x509.CertificatePolicies)
            issuer = cert.issuer.public_bytes()
        except MALFORMED_X509:
            return "unreadable"
        if key_usage is None or not key_usage.digital_signature:
            return "not for authentication"
        if basic is not None and basic.ca:
            return "a CA certificate"
        if eku is not None and not (
            ExtendedKeyUsageOID.CLIENT_AUTH in eku
            or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku
        ):
            return "not for client authentication"
        if self.policy is not None and (
            policies is None or self.policy not in [p.policy_identifier for p in policies]
        ):
            return f"without policy {self.policy.dotted_string}"
        if self.issuers and issuer not in self.issuers:
            return "from an issuer the gateway does not trust"
        return None


def _ext(extensions: x509.Extensions, kind: type[x509.ExtensionType]) -> Any:
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


@dataclass(frozen=True, slots=True)
class _Found:
    """A certificate object on a token."""

    slot_id: int
    slot_description: str
    token_label: str
    token_serial: bytes
    label: str
    key_id: bytes
    der: bytes
    cert: x509.Certificate

    def describe(self) -> str:
        holder, issuer = _holder(self.cert), _cn(self.cert.issuer)
        return f"{self.label!r} on {self.token_label!r} ({holder}, issuer {issuer})"


def _cn(name: x509.Name) -> str:
    """The common name, made safe for a terminal (a card chose it)."""
    names = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else name.rfc4514_string()
    text = value if isinstance(value, str) else value.decode("utf-8", "replace")
    return printable(text, 64)


def _holder(cert: x509.Certificate) -> str:
    return _cn(cert.subject)


def _pkcs11() -> ModuleType:
    try:
        # Optional dependency, imported here on purpose so the gateway never needs it.
        import pkcs11
    except ImportError as exc:
        raise DeviceError(PKCS11_MISSING) from exc
    return pkcs11


class Pkcs11Prover(Prover):
    """Client side of the smartcard factor through the PKCS#11 module at ``module``.

    ``prompt`` asks for the PIN (``secret=True``, on the event loop thread); ``label``
    picks among several suitable certificates; ``now`` is the clock used to refuse an
    expired certificate before asking for the PIN.
    """

    name: ClassVar[str] = NAME

    def __init__(
        self,
        module: str,
        prompt: Prompt,
        label: str | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._module = module
        self._prompt = prompt
        self._label = label
        self._now = now
        self._lib: Any = None
        self._used: _Found | None = None
        self.reader: str | None = None
        """The slot (reader) of the token the last successful login used."""

    # -- the login ----------------------------------------------------------------------

    async def respond(self, challenge: JSON, channel_binding: bytes) -> JSON:
        try:
            nonce = b64d(challenge.get("nonce"), max_len=NONCE_LEN)
        except (ValueError, AttributeError):
            nonce = b""
        if len(nonce) != NONCE_LEN:
            raise AuthError("the gateway sent a malformed smartcard challenge")
        message = to_be_signed(nonce, channel_binding)
        wanted = Wanted.from_challenge(challenge)
        found = await asyncio.to_thread(self._choose, wanted)
        stage = "certificate"
        try:
            self._check_validity(found.cert)
            stage = "pin"
            token = printable(found.token_label, 64)
            text = f"PIN for the smartcard of {_holder(found.cert)} ({token})"
            text += await asyncio.to_thread(self._tries_text, found)
            pin = self._prompt(text + ": ", True)
            if not pin:
                raise PinRefused("no PIN was entered")
            stage = "login"
            algorithm, signature = await asyncio.to_thread(self._sign, found, pin, message)
            del pin
        except AuthError as exc:
            exc.payload = _declined(exc, stage, found.cert, found.der, self._now())
            raise
        self._used = found
        self.reader = found.slot_description or found.token_label
        return {
            "certificate": b64e(found.der),
            "chain": [],
            "algorithm": algorithm,
            "signature": b64e(signature),
        }

    def _load(self) -> Any:
        if self._lib is None:
            pkcs11 = _pkcs11()
            try:
                self._lib = pkcs11.lib(self._module)
            except pkcs11.PKCS11Error as exc:
                detail = str(exc).split(": ", 1)[-1].strip() or type(exc).__name__
                raise DeviceError(
                    f"cannot load the PKCS#11 module {self._module}: {detail}"
                ) from None
        return self._lib

    def _tokens(self) -> list[tuple[Any, Any]]:
        """(slot, token) of every initialised token present."""
        pkcs11 = _pkcs11()
        lib = self._load()
        try:
            slots = lib.get_slots(token_present=True)
        except pkcs11.PKCS11Error as exc:
            raise DeviceError(f"the PKCS#11 module failed: {_error(exc)}") from None
        tokens = []
        for slot in slots:
            try:
                token = slot.get_token()
                if token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
                    tokens.append((slot, token))
            except pkcs11.PKCS11Error:
                continue  # a slot the module cannot read now: not a usable token
        if not tokens:
            raise DeviceError(
                f"no smartcard found by the PKCS#11 module {self._module}: insert your card"
            )
        return tokens

    def _certificates(self) -> list[_Found]:
        pkcs11 = _pkcs11()
        attr = pkcs11.Attribute
        found: list[_Found] = []
        for slot, token in self._tokens():
            try:
                with token.open() as session:
                    objects = session.get_objects(
                        {
                            attr.CLASS: pkcs11.ObjectClass.CERTIFICATE,
                            attr.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
                        }
                    )
                    for obj in objects:
                        if len(found) >= MAX_CERTIFICATES:
                            break
                        values = obj.get_attributes([attr.VALUE, attr.ID, attr.LABEL])
                        der = bytes(values.get(attr.VALUE) or b"")
                        try:
                            cert = x509.load_der_x509_certificate(der)
                            cert.subject, cert.issuer  # noqa: B018 - parsed lazily
                        except MALFORMED_X509:
                            continue  # not one the gateway could read either
                        found.append(
                            _Found(
                                slot_id=int(slot.slot_id),
                                slot_description=str(slot.slot_description).strip(),
                                token_label=str(token.label),
                                token_serial=bytes(token.serial),
                                label=str(values.get(attr.LABEL) or ""),
                                key_id=bytes(values.get(attr.ID) or b""),
                                der=der,
                                cert=cert,
                            )
                        )
            except pkcs11.PKCS11Error as exc:
                raise DeviceError(
                    f"cannot read the smartcard {token.label!r}: {_error(exc)}"
                ) from None
        return sorted(found, key=lambda f: (f.token_label, f.label, f.slot_id, f.key_id))

    def _choose(self, wanted: Wanted) -> _Found:
        seen = self._certificates()
        suitable = [f for f in seen if wanted.refusal(f.cert) is None]
        if self._label is not None:
            named = [f for f in suitable if f.label == self._label]
            if len(named) == 1:
                return named[0]
            labels = ", ".join(repr(f.label) for f in suitable) or "none"
            if not named:
                raise DeviceError(
                    f"no suitable certificate labelled {self._label!r} (suitable: {labels})"
                )
            raise DeviceError(f"several suitable certificates are labelled {self._label!r}")
        if len(suitable) == 1:
            return suitable[0]
        # A renewed card may still hold its expired certificate: of several, only the
        # ones valid now count (if any is).
        now = dt.datetime.fromtimestamp(self._now(), dt.UTC)
        valid = [
            f for f in suitable if f.cert.not_valid_before_utc <= now <= f.cert.not_valid_after_utc
        ]
        if valid:
            suitable = valid
        if len(suitable) == 1:
            return suitable[0]
        if suitable:
            listed = "; ".join(f.describe() for f in suitable)
            raise DeviceError(
                f"several suitable certificates on the smartcard: {listed}: "
                "choose one with --cert-label"
            )
        if not seen:
            raise DeviceError("no certificate on the smartcard")
        why = "; ".join(f"{f.describe()}: {wanted.refusal(f.cert)}" for f in seen)
        raise DeviceError(f"no suitable certificate on the smartcard for this gateway ({why})")

    def _check_validity(self, cert: x509.Certificate) -> None:
        now = dt.datetime.fromtimestamp(self._now(), dt.UTC)
        if now > cert.not_valid_after_utc:
            raise AuthError(
                f"the certificate on your smartcard expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d}: order a new card"
            )
        if now < cert.not_valid_before_utc:
            raise AuthError(
                f"the certificate on your smartcard is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )

    def _token(self, found: _Found) -> Any:
        """The token ``found`` came from, still in its slot; DeviceError if it left."""
        pkcs11 = _pkcs11()
        try:
            for slot in self._load().get_slots(token_present=True):
                if int(slot.slot_id) != found.slot_id:
                    continue
                token = slot.get_token()
                if bytes(token.serial) == found.token_serial and token.label == found.token_label:
                    return token
        except pkcs11.PKCS11Error:
            pass
        raise DeviceError("the smartcard was removed during login: try again")

    def _pin_state(self, found: _Found) -> str:
        """What the token's flags say of its PIN: "locked", "final", "low" or ""."""
        pkcs11 = _pkcs11()
        flags = self._token(found).flags
        if flags & pkcs11.TokenFlag.USER_PIN_LOCKED:
            return "locked"
        if flags & pkcs11.TokenFlag.USER_PIN_FINAL_TRY:
            return "final"
        if flags & pkcs11.TokenFlag.USER_PIN_COUNT_LOW:
            return "low"
        return ""

    def _tries_text(self, found: _Found) -> str:
        state = self._pin_state(found)
        if state == "locked":
            raise PinLocked(_locked(found))
        return {"final": ", 1 try left", "low": ", few tries left"}.get(state, "")

    def _sign(self, found: _Found, pin: str, message: bytes) -> tuple[str, bytes]:
        pkcs11 = _pkcs11()
        token = self._token(found)
        try:
            with token.open(user_pin=pin) as session:
                key = _private_key(pkcs11, session, found)
                return _sign_with(pkcs11, token, key, found.cert, message)
        except pkcs11.PinIncorrect:
            try:
                state = self._pin_state(found)
            except DeviceError:
                state = ""
            raise WrongPin(state) from None
        except pkcs11.PinLocked:
            raise PinLocked(_locked(found)) from None
        except (pkcs11.PinLenRange, pkcs11.PinInvalid):
            raise PinRefused(
                "the PIN has a length or characters the smartcard does not accept"
            ) from None
        except (pkcs11.TokenNotPresent, pkcs11.DeviceRemoved, pkcs11.SessionHandleInvalid):
            raise DeviceError("the smartcard was removed during login: try again") from None
        except pkcs11.PKCS11Error as exc:
            raise DeviceError(f"the smartcard failed to sign: {_error(exc)}") from None

    # -- while the session lasts ----------------------------------------------------------

    async def wait_for_removal(
        self, poll: float = 0.5, on_present: Callable[[], None] | None = None
    ) -> None:
        """Return once the token of the last login is gone from its slot (or unreadable).

        ``on_present`` is called after each poll that still saw it (the session's
        ``card_present`` heartbeat).
        """
        found = self._used
        if found is None:
            return
        while True:
            try:
                await asyncio.to_thread(self._token, found)
            except DeviceError:
                return
            if on_present is not None:
                on_present()
            await asyncio.sleep(poll)


class WrongPin(AuthError):
    """The token refused the PIN."""

    def __init__(self, state: str) -> None:
        after = {
            "final": ": 1 try left before the card is locked",
            "low": ": few tries left before the card is locked",
            "locked": ": the card's PIN is now locked",
        }
        super().__init__("wrong PIN" + after.get(state, ""))
        self.tries_left = {"final": 1, "locked": 0}.get(state)
        """As far as the token says (PKCS#11 flags tell only the last try and locked)."""


class PinLocked(DeviceError):
    """The token's PIN is locked (its PUK or the issuer unblocks it)."""


class PinRefused(AuthError):
    """The token did not take the PIN for its form (length, characters)."""


def _locked(found: _Found) -> str:
    return (
        f"the PIN of the smartcard {found.token_label!r} is locked: "
        "unblock it with its PUK (or ask the card's issuer)"
    )


def _error(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _private_key(pkcs11: ModuleType, session: Any, found: _Found) -> Any:
    try:
        return session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, id=found.key_id)
    except pkcs11.NoSuchKey:
        raise AuthError(
            f"the smartcard has no private key for the certificate {found.label!r}"
        ) from None
    except pkcs11.MultipleObjectsReturned:
        raise AuthError(
            f"the smartcard has several private keys for the certificate {found.label!r}"
        ) from None


def _sign_with(
    pkcs11: ModuleType, token: Any, key: Any, cert: x509.Certificate, message: bytes
) -> tuple[str, bytes]:
    """Sign ``message`` with ``key`` on the token; check it against ``cert``."""
    try:
        public = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise AuthError("the smartcard's certificate holds an unreadable public key") from None
    digest = hashlib.sha256(message).digest()
    mechanism = pkcs11.Mechanism
    refused = (pkcs11.MechanismInvalid, pkcs11.MechanismParamInvalid, pkcs11.FunctionNotSupported)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            offered = token.slot.get_mechanisms()
            if mechanism.RSA_PKCS in offered:
                try:
                    signature = key.sign(_SHA256_DIGEST_INFO + digest, mechanism=mechanism.RSA_PKCS)
                    public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
                    return ALG_RSA_PKCS1_SHA256, signature
                except pkcs11.PKCS11Error:
                    # The key may be limited to PSS (CKA_ALLOWED_MECHANISMS): try that.
                    if mechanism.RSA_PKCS_PSS not in offered:
                        raise
            if mechanism.RSA_PKCS_PSS not in offered:
                raise AuthError("the smartcard offers neither RSA PKCS#1 v1.5 nor PSS signing")
            signature = key.sign(
                digest,
                mechanism=mechanism.RSA_PKCS_PSS,
                mechanism_param=(mechanism.SHA256, pkcs11.MGF.SHA256, 32),
            )
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            public.verify(signature, message, pss, hashes.SHA256())
            return ALG_RSA_PSS_SHA256, signature
        if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
            raw = key.sign(digest, mechanism=mechanism.ECDSA)
            if len(raw) != 64:
                raise AuthError("the smartcard sent a malformed ECDSA signature")
            r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
            signature = encode_dss_signature(r, s)
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            return ALG_ECDSA_P256_SHA256, signature
    except InvalidSignature:
        raise AuthError("the smartcard's signature does not match its certificate") from None
    except refused:
        raise AuthError("the smartcard refuses to sign with this key") from None
    raise AuthError("the smartcard's key type is not supported (need RSA or ECC P-256)")


def _declined(exc: AuthError, stage: str, cert: x509.Certificate, der: bytes, now: float) -> JSON:
    """The ``auth_response`` of a prover that stops after choosing the certificate."""
    payload: JSON = {"certificate": b64e(der)}
    if isinstance(exc, PinLocked):
        reason = "card blocked"
    elif isinstance(exc, WrongPin):
        reason = "wrong pin"
        if exc.tries_left is not None:
            payload["tries_left"] = exc.tries_left
    elif stage == "certificate":
        expired = now > cert.not_valid_after_utc.timestamp()
        reason = "certificate expired" if expired else "certificate not yet valid"
    elif isinstance(exc, PinRefused) or (stage == "pin" and not isinstance(exc, DeviceError)):
        reason = "pin not verified"
    else:
        reason = "card error"
    payload["declined"] = reason
    return payload


def make_pkcs11_prover(module: str, prompt: Prompt, label: str | None) -> Pkcs11Prover:
    """The prover ``gw connect --smartcard --pkcs11-module PATH`` uses."""
    return Pkcs11Prover(module, prompt, label)
