"""PKI smartcard factor ("smartcard"): a PIV card signs a channel-bound challenge.

Theory of operation
===================

The gateway sends a fresh 32-byte nonce. ``gw connect`` opens the person's card
(PC/SC, PIV application), asks for the PIN (checked by the card; it never leaves the
machine), and has the card sign, with the PIV Authentication key (slot 9A)::

    to_be_signed = b"gw-smartcard-v1\\x00" || nonce (32 bytes) || channel_binding

where ``channel_binding`` is the RFC 9266 ``tls-exporter`` value of the client's own
TLS connection (its length is implied: it is everything after the nonce). A proof
captured on one connection therefore fails on any other, and the domain-separation
prefix keeps the card's signature from being reusable as any other kind of signature.

Signature schemes (named by ``algorithm`` in the response):

``rsa-pkcs1-sha256``
    RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 section 8.2). The host builds the
    EMSA-PKCS1-v1_5 block around the SHA-256 DigestInfo and the card applies the raw
    RSA private-key operation (GENERAL AUTHENTICATE, algorithm 07 for RSA-2048, 05 for
    RSA-3072, 16 for RSA-4096).
``rsa-pss-sha256``
    RSASSA-PSS with SHA-256, MGF1 with SHA-256 and a 32-byte salt (RFC 8017 section
    8.1), for tokens whose keys sign only PSS (the PKCS#11 prover, :mod:`auth.pkcs11`).
``ecdsa-p256-sha256``
    ECDSA over P-256 with SHA-256; the card signs the 32-byte SHA-256 digest
    (algorithm 11) and returns the DER ``Ecdsa-Sig-Value``, which is sent as is.

Wire payloads (binary values are :func:`auth.base.b64e`, base64url without padding)::

    challenge  {"nonce": b64e(32 random bytes),
                "policy": "2.16.578.1.26.1.3.1",    # the required policy OID and the
                "issuers": [b64e(DER name), ...]}   # CAs trusted (hints for choosing
                                                    # a certificate; absent while the
                                                    # settings are unusable)
    response   {"certificate": b64e(DER of the slot 9A certificate),
                "chain": [b64e(DER), ...],          # extra intermediates, may be []
                "algorithm": "rsa-pkcs1-sha256" | "rsa-pss-sha256" |
                             "ecdsa-p256-sha256",
                "signature": b64e(signature)}

Gateway checks, in this order; the first failure is the audit reason
(:attr:`Outcome.reason`), and once the certificate parses, :attr:`Outcome.detail`
carries its ``subject``, ``issuer``, ``serial`` and ``sha256`` fingerprint:

====================================== ==================================================
``not enrolled``                       no stored credential with a ``cert_serial``
``malformed state``                    the gateway's kept state lacks the 32-byte nonce
``settings invalid``                   ``[auth.smartcard]`` files unreadable or bad
``malformed response``                 missing/ill-typed fields, bad base64 or DER,
                                       unknown algorithm, too many or too large certs
``certificate not yet valid``          notBefore in the future
``certificate expired``                notAfter in the past
``not an authentication certificate``  key usage lacks digitalSignature (a
                                       non-repudiation/signing certificate), an
                                       extended key usage without clientAuth, or a CA
``unsupported critical extension``     a critical extension this code does not know
``untrusted issuer``                   no valid path to a trust anchor (detail ``error``)
``crl missing``                        no usable CRL covering a certificate in the path
                                       from its issuer (detail ``crls_not_used``)
``crl stale``                          a newest covering CRL is past its nextUpdate
``ocsp unavailable``                   (``revocation = "ocsp"``) no responder named, not
                                       reachable, an HTTP error, not OCSP, or an
                                       unsuccessful status (detail ``ocsp_error``,
                                       ``ocsp_url``, ``checked``)
``ocsp invalid``                       the answer is not signed by the issuer or a
                                       responder it authorized, is for another
                                       certificate, or lacks the nonce
``ocsp stale``                         past its nextUpdate, or thisUpdate in the future
``ocsp unknown``                       the responder does not know the certificate
``certificate revoked``                the certificate or an intermediate is listed
                                       (by OCSP: ``revoked_by: ocsp``)
``policy oid missing``                 the required policy is not in the certificate, or
                                       an intermediate allows neither it nor anyPolicy
``subject field missing``              the subject lacks the configured field
``certificate of another person``      the field's value (or the pinned issuer) is not
                                       the user's
``unsupported key``                    not RSA 2048-4096 or ECC P-256
``bad signature``                      the signature does not verify over this nonce and
                                       this channel binding, or does not fit the key
``verification error``                 anything unforeseen while checking (fail closed)
``wrong pin``, ``card blocked``,       reported by a prover that gave up after reading
``pin not verified``, ``card error``   the certificate (see below), when the checks of
                                       its certificate pass; detail ``reported_by``
====================================== ==================================================

Giving up
---------

A prover that stops after reading the card's certificate (the certificate has expired,
the PIN was wrong, the card is blocked) still answers, so that the gateway can audit
who tried and why; the login fails either way::

    response   {"declined": "wrong pin" | "card blocked" | "pin not verified" |
                            "certificate expired" | "certificate not yet valid" |
                            "card error",
                "certificate": b64e(DER),            # the card's slot 9A certificate
                "tries_left": 2}                     # with "wrong pin"

The gateway runs every check but the signature on that certificate: a reason it finds
itself (``certificate expired``, ``certificate revoked``...) wins; otherwise the audit
reason is the client's, with ``reported_by: client``. Client side, the prover raises
the :class:`AuthError` for the person with :attr:`AuthError.payload` set to that
response (:func:`relay.client.open_session` sends it). Problems before the certificate
is read (no reader, no card, no pyscard, no pcscd) are :class:`DeviceError`, with
nothing sent: ``gw`` exits 4 and the gateway audits that the client gave up.

Revocation fails closed: every certificate in the validated path below the trust
anchor needs a CRL from its issuer among ``crl_files`` whose scope covers it, signed
by that issuer and not past its nextUpdate. The IssuingDistributionPoint scope is
honoured (RFC 5280 section 6.3.3): a partitioned CRL covers only certificates whose
CRLDistributionPoints name its partition; onlyContainsUserCerts/onlyContainsCACerts
narrow it. Of each scope the newest CRL counts; a certificate listed by any of them is
revoked, and every one must be fresh, so a newer CRL of another partition never clears
a certificate the full CRL lists. Delta CRLs, indirect CRLs and CRLs of some reasons
only are never used (the ``crl missing`` record names each CRL not used and why).
With ``revocation = "ocsp"`` each certificate is checked by OCSP instead
(:mod:`auth.ocsp`), with ``"ocsp-then-crl"`` by OCSP where the responder gives a
proven answer and by the CRLs otherwise (``ocsp_not_used`` says why); a successful
login's ``revocation`` detail lists what decided, leaf first (``ocsp``, ``ocsp
(cached)``, ``crl``).

Settings (``[auth.smartcard]``, paths absolute)
-----------------------------------------------

``trust_anchors``    list of PEM (or DER) files with the root CA certificates. Required.
``intermediates``    list of PEM files with intermediate CA certificates. Optional.
``crl_files``        list of CRL files, PEM or DER, one per CA at least. Required.
``required_policy``  certificate policy OID the certificate must carry (the assurance
                     level); default ``2.16.578.1.26.1.3.1``, person certificate,
                     level high, key on a smartcard. The central-HSM person variant
                     ``...3.6`` and enterprise certificates ``...3.2``/``...3.5`` do not
                     pass.
``subject_field``    subject attribute that identifies the person, by name
                     (``serialNumber``, ``commonName``, ``emailAddress``, ...) or dotted
                     OID; default ``serialNumber`` (2.5.4.5).
``revocation``       ``crl`` (default), ``ocsp`` or ``ocsp-then-crl``; ``crl_files`` is
                     optional with ``ocsp``.
``ocsp_url``         http:// responder asked instead of the certificate's AIA one.
``ocsp_timeout``     seconds (0.1-60, default 5); ``ocsp_cache_seconds`` (0-86400,
                     default 300); ``ocsp_max_age`` (thisUpdate age allowed without
                     nextUpdate, default 3600); ``ocsp_nonce`` (default false).
``path_validation``  ``webpki`` (default: cryptography's verifier, Web PKI profile for
                     CAs) or ``rfc5280`` (:mod:`auth.pathvalidation`, RFC 5280 section
                     6.1 with the policy tree; needs pyhanko-certvalidator).

The files are parsed once and cached under their paths and modification times, so a
replaced CRL file is picked up at the next login; :func:`reload` (called by the gateway
on SIGHUP) drops the cache.

The stored credential of an employee is ``{"cert_serial": "UN:NO-9578-4050-..."}``,
optionally with ``"issuer"`` (the issuing CA's RFC 4514 name) to pin the issuer too.
:func:`credential_from_certificate` makes it from the person's certificate
(``gw admin user add --cert-file``, ``gw admin user set-cert``).

Client side
-----------

:func:`make_prover` builds a :class:`SmartcardProver` from ``ProverOptions``:
``values["smartcard_reader"]`` names the reader (exact name, or a unique
case-insensitive part of it); None or absent means the first reader with a card.
The prover is handed a :data:`CardConnector` (:func:`pcsc_connector` in production);
pyscard is imported only there, so importing this module never needs it. All blocking
card calls run in :func:`asyncio.to_thread`. After a login the prover's
:attr:`SmartcardProver.reader` names the reader used; pass it to
:func:`wait_for_removal` to end tunnels when the card is pulled.

PIV commands used (NIST SP 800-73-4 part 2): SELECT the PIV application
``A0 00 00 03 08 00 00 10 00 01 00``; GET DATA ``5FC105`` (PIV Authentication
certificate); VERIFY with key reference ``80`` (empty to read the retry counter, then
with the PIN padded with ``FF`` to 8 bytes); GENERAL AUTHENTICATE with key reference
``9A``. The card session runs inside a PC/SC transaction and ends with a card reset so
that the PIN-verified state does not outlive the login.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, NoReturn, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from relay.errors import AuthError, ConfigError, DeviceError

from . import ocsp as ocsp_mod
from . import pathvalidation
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

__all__ = [
    "ALG_ECDSA_P256_SHA256",
    "ALG_RSA_PKCS1_SHA256",
    "DEFAULT_REQUIRED_POLICY",
    "DEFAULT_SUBJECT_FIELD",
    "DOMAIN",
    "FACTOR",
    "CardConnector",
    "CardPort",
    "PinBlocked",
    "PivCard",
    "SmartcardProver",
    "SmartcardSettings",
    "SmartcardVerifier",
    "WrongPin",
    "check_settings",
    "credential_from_certificate",
    "load_settings",
    "make_prover",
    "pcsc_connector",
    "reload",
    "sign_with_card",
    "to_be_signed",
    "wait_for_removal",
]

NAME = "smartcard"

DOMAIN = b"gw-smartcard-v1\x00"
"""Domain-separation prefix of what the card signs."""

NONCE_LEN = 32

ALG_RSA_PKCS1_SHA256 = "rsa-pkcs1-sha256"
ALG_ECDSA_P256_SHA256 = "ecdsa-p256-sha256"
ALG_RSA_PSS_SHA256 = "rsa-pss-sha256"
ALGORITHMS = (ALG_RSA_PKCS1_SHA256, ALG_RSA_PSS_SHA256, ALG_ECDSA_P256_SHA256)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)

DEFAULT_REQUIRED_POLICY = "2.16.578.1.26.1.3.1"
DEFAULT_SUBJECT_FIELD = "serialNumber"
SETTINGS_KEY = "auth.smartcard"

REVOCATION_CRL = "crl"
REVOCATION_OCSP = "ocsp"
REVOCATION_OCSP_THEN_CRL = "ocsp-then-crl"
REVOCATIONS = (REVOCATION_CRL, REVOCATION_OCSP, REVOCATION_OCSP_THEN_CRL)
PATH_WEBPKI = "webpki"
PATH_RFC5280 = "rfc5280"
PATH_VALIDATIONS = (PATH_WEBPKI, PATH_RFC5280)
_SETTINGS_KEYS = frozenset(
    {
        "trust_anchors",
        "intermediates",
        "crl_files",
        "required_policy",
        "subject_field",
        "revocation",
        "ocsp_url",
        "ocsp_timeout",
        "ocsp_cache_seconds",
        "ocsp_max_age",
        "ocsp_nonce",
        "path_validation",
    }
)

#: Why a prover stopped after reading the card's certificate (``declined`` in its last
#: ``auth_response``); see "Giving up" in the module docstring.
DECLINED_REASONS = frozenset(
    {
        "certificate expired",
        "certificate not yet valid",
        "wrong pin",
        "card blocked",
        "pin not verified",
        "card error",
    }
)

# National person certificates are 1.5-2.5 KB; 16 KiB leaves room for long names and
# extensions while bounding what one login can make the gateway parse.
MAX_CERT_BYTES = 16 * 1024
# Real paths have one or two intermediates; four is generous and bounds chain building.
MAX_CHAIN = 4
# An RSA-4096 signature is 512 bytes, a DER ECDSA P-256 signature at most 72.
MAX_SIGNATURE_BYTES = 512
# Depth of the path (leaf + intermediates + anchor) accepted by the path builder.
MAX_PATH_DEPTH = 6
# Settings cache entries kept (one per distinct [auth.smartcard] table in practice).
MAX_CACHED_SETTINGS = 8

ANY_POLICY = x509.ObjectIdentifier("2.5.29.32.0")

SUBJECT_FIELDS: dict[str, x509.ObjectIdentifier] = {
    "serialNumber": NameOID.SERIAL_NUMBER,
    "commonName": NameOID.COMMON_NAME,
    "emailAddress": NameOID.EMAIL_ADDRESS,
    "givenName": NameOID.GIVEN_NAME,
    "surname": NameOID.SURNAME,
    "uid": NameOID.USER_ID,
    "organizationIdentifier": NameOID.ORGANIZATION_IDENTIFIER,
}

# Extensions this module understands when they are critical on the leaf; anything
# else critical is refused (RFC 5280 section 4.2).
_KNOWN_CRITICAL = {
    x509.KeyUsage,
    x509.BasicConstraints,
    x509.ExtendedKeyUsage,
    x509.CertificatePolicies,
    x509.SubjectAlternativeName,
    x509.PolicyConstraints,
    x509.InhibitAnyPolicy,
    x509.NameConstraints,
}


def to_be_signed(nonce: bytes, channel_binding: bytes) -> bytes:
    """The exact bytes the card signs (see the module docstring)."""
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes")
    return DOMAIN + nonce + channel_binding


# ---------------------------------------------------------------------------------------
# Settings: parsed once, cached under file paths and mtimes
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmartcardSettings:
    """The parsed ``[auth.smartcard]`` table."""

    trust_anchors: tuple[x509.Certificate, ...]
    """Root CA certificates."""
    intermediates: tuple[x509.Certificate, ...]
    """Configured intermediate CA certificates (the client may send more)."""
    crls: tuple[x509.CertificateRevocationList, ...]
    """Every CRL from ``crl_files``."""
    required_policy: x509.ObjectIdentifier
    """Policy OID the certificate must carry."""
    subject_field: x509.ObjectIdentifier
    """Subject attribute that identifies the person."""
    store: Store
    """Trust store built from :attr:`trust_anchors`."""
    revocation: str
    """``crl``, ``ocsp`` or ``ocsp-then-crl``."""
    ocsp: ocsp_mod.OcspSettings
    """The ``ocsp_*`` settings."""
    path_validation: str
    """``webpki`` (cryptography's verifier) or ``rfc5280`` (:mod:`auth.pathvalidation`)."""


_cache: dict[tuple[Any, ...], SmartcardSettings] = {}
_cache_lock = threading.Lock()


def reload() -> None:
    """Forget cached settings so that the next login re-reads every file (SIGHUP)."""
    with _cache_lock:
        _cache.clear()
    ocsp_mod.clear_cache()


def _paths(settings: Mapping[str, Any], key: str, *, required: bool) -> tuple[str, ...]:
    value = settings.get(key)
    if value is None:
        value = []
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{SETTINGS_KEY}.{key}", "must be a list of file paths")
    if required and not value:
        raise ConfigError(f"{SETTINGS_KEY}.{key}", "must name at least one file")
    return tuple(value)


def _oid(text: object, key: str) -> x509.ObjectIdentifier:
    if not isinstance(text, str):
        raise ConfigError(f"{SETTINGS_KEY}.{key}", "must be a string")
    try:
        return x509.ObjectIdentifier(text)
    except ValueError as exc:
        raise ConfigError(f"{SETTINGS_KEY}.{key}", f"not an OID: {text!r}") from exc


def _choice(settings: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = settings.get(key, choices[0])
    if value not in choices:
        raise ConfigError(f"{SETTINGS_KEY}.{key}", f"must be one of {', '.join(choices)}")
    return str(value)


def _seconds(
    settings: Mapping[str, Any], key: str, default: float, low: float, high: float
) -> float:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(
            f"{SETTINGS_KEY}.{key}", f"must be a number of seconds from {low} to {high}"
        )
    return float(value)


def _ocsp_settings(settings: Mapping[str, Any]) -> ocsp_mod.OcspSettings:
    url = settings.get("ocsp_url")
    if url is not None and (
        not isinstance(url, str) or not url.lower().startswith("http://") or len(url) > 2000
    ):
        raise ConfigError(f"{SETTINGS_KEY}.ocsp_url", "must be an http:// URL")
    nonce = settings.get("ocsp_nonce", False)
    if not isinstance(nonce, bool):
        raise ConfigError(f"{SETTINGS_KEY}.ocsp_nonce", "must be true or false")
    return ocsp_mod.OcspSettings(
        url=url,
        timeout=_seconds(settings, "ocsp_timeout", 5.0, 0.1, 60),
        cache_seconds=_seconds(settings, "ocsp_cache_seconds", 300.0, 0, 86400),
        max_age=_seconds(settings, "ocsp_max_age", 3600.0, 60, 7 * 86400),
        nonce=nonce,
    )


def _subject_field(text: object) -> x509.ObjectIdentifier:
    if isinstance(text, str) and text in SUBJECT_FIELDS:
        return SUBJECT_FIELDS[text]
    if isinstance(text, str) and text[:1].isdigit():
        return _oid(text, "subject_field")
    raise ConfigError(
        f"{SETTINGS_KEY}.subject_field",
        f"unknown field {text!r}: use one of {', '.join(SUBJECT_FIELDS)} or a dotted OID",
    )


def _stamp(path: str, key: str) -> tuple[str, int, int]:
    try:
        st = Path(path).stat()
    except OSError as exc:
        raise ConfigError(f"{SETTINGS_KEY}.{key}", f"cannot read {path}: {exc.strerror}") from exc
    return (path, st.st_mtime_ns, st.st_size)


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{SETTINGS_KEY}.{key}", f"cannot read {path}: {exc.strerror}") from exc


def _pem_blocks(data: bytes, label: bytes) -> list[bytes]:
    begin, end = b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
    blocks, pos = [], 0
    while (start := data.find(begin, pos)) >= 0:
        stop = data.find(end, start)
        if stop < 0:
            break
        pos = stop + len(end)
        blocks.append(data[start:pos] + b"\n")
    return blocks


def _load_certs(path: str, key: str) -> list[x509.Certificate]:
    data = _read(path, key)
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except MALFORMED_X509 as exc:
        raise ConfigError(f"{SETTINGS_KEY}.{key}", f"{path}: not a certificate file") from exc
    return certs


def _load_crls(path: str) -> list[x509.CertificateRevocationList]:
    data = _read(path, "crl_files")
    try:
        if b"-----BEGIN" in data:
            blocks = _pem_blocks(data, b"X509 CRL")
            if not blocks:
                raise ValueError("no CRL in PEM file")
            crls = [x509.load_pem_x509_crl(block) for block in blocks]
        else:
            crls = [x509.load_der_x509_crl(data)]
        for crl in crls:  # parsed lazily: a malformed CRL is a config error, not a failed login
            crl.issuer, crl.extensions, crl.last_update_utc, crl.next_update_utc  # noqa: B018
            for entry in crl:
                entry.serial_number, entry.revocation_date_utc  # noqa: B018
        return crls
    except MALFORMED_X509 as exc:
        raise ConfigError(f"{SETTINGS_KEY}.crl_files", f"{path}: not a CRL file") from exc


def _check_keys(settings: Mapping[str, Any]) -> None:
    unknown = sorted(set(settings) - _SETTINGS_KEYS)
    if unknown:  # a mistyped revocation or path_validation must not pass unnoticed
        raise ConfigError(
            f"{SETTINGS_KEY}.{unknown[0]}",
            f"unknown key (known: {', '.join(sorted(_SETTINGS_KEYS))})",
        )


def load_settings(settings: Mapping[str, Any]) -> SmartcardSettings:
    """Parse (or fetch from the cache) the ``[auth.smartcard]`` table.

    Raises :class:`relay.errors.ConfigError` naming the key at fault; use it from
    ``gatewayd check-config`` too.
    """
    _check_keys(settings)
    anchors = _paths(settings, "trust_anchors", required=True)
    inters = _paths(settings, "intermediates", required=False)
    revocation = _choice(settings, "revocation", REVOCATIONS)
    crls = _paths(settings, "crl_files", required=revocation != REVOCATION_OCSP)
    ocsp_settings = _ocsp_settings(settings)
    path_validation = _choice(settings, "path_validation", PATH_VALIDATIONS)
    if path_validation == PATH_RFC5280 and (missing := pathvalidation.available()):
        raise ConfigError(f"{SETTINGS_KEY}.path_validation", missing)
    policy_text = settings.get("required_policy", DEFAULT_REQUIRED_POLICY)
    field_text = settings.get("subject_field", DEFAULT_SUBJECT_FIELD)
    cache_key = (
        tuple(_stamp(p, "trust_anchors") for p in anchors),
        tuple(_stamp(p, "intermediates") for p in inters),
        tuple(_stamp(p, "crl_files") for p in crls),
        str(policy_text),
        str(field_text),
        revocation,
        ocsp_settings,
        path_validation,
    )
    with _cache_lock:
        cached = _cache.get(cache_key)
    if cached is not None:
        return cached
    anchor_certs = tuple(c for p in anchors for c in _load_certs(p, "trust_anchors"))
    parsed = SmartcardSettings(
        trust_anchors=anchor_certs,
        intermediates=tuple(c for p in inters for c in _load_certs(p, "intermediates")),
        crls=tuple(crl for p in crls for crl in _load_crls(p)),
        required_policy=_oid(policy_text, "required_policy"),
        subject_field=_subject_field(field_text),
        store=Store(list(anchor_certs)),
        revocation=revocation,
        ocsp=ocsp_settings,
        path_validation=path_validation,
    )
    with _cache_lock:
        if len(_cache) >= MAX_CACHED_SETTINGS:
            _cache.clear()
        _cache[cache_key] = parsed
    return parsed


def check_settings(settings: Mapping[str, Any]) -> str | None:
    """Read every file of ``[auth.smartcard]``; ConfigError naming the key if one is unusable.

    A table that names neither trust anchors nor CRLs (as ``gatewayd init`` writes it,
    before the operator has the national CA's files) is not an error but a warning:
    smartcard logins fail (``settings invalid``) until it is filled in. So is a CRL that
    is never used (a delta or indirect CRL, one of some reasons only): the warning
    names each file and why.
    """
    _check_keys(settings)
    if not settings.get("trust_anchors") and not settings.get("crl_files"):
        return (
            f"{SETTINGS_KEY} names no trust_anchors or crl_files yet: "
            "smartcard logins fail until it does"
        )
    load_settings(settings)
    unused = [
        f"{path} ({why})"
        for path in _paths(settings, "crl_files", required=False)
        for crl in _load_crls(path)
        if (why := _crl_refusal(crl)) is not None
    ]
    if unused:
        return f"{SETTINGS_KEY}.crl_files: never used for revocation: {', '.join(unused)}"
    return None


# ---------------------------------------------------------------------------------------
# Enrolment (gw admin user add --cert-file, user set-cert)
# ---------------------------------------------------------------------------------------


def credential_from_certificate(
    data: bytes, subject_field: object = DEFAULT_SUBJECT_FIELD
) -> dict[str, str]:
    """The stored credential for the person a certificate (PEM or DER) names.

    ``{"cert_serial": <the subject_field value>, "issuer": <issuer, RFC 4514>}``; the
    issuer pins the issuing CA, so a look-alike certificate from another CA with the
    same person number does not pass. Raises ValueError saying what is wrong with the
    certificate, ConfigError if ``subject_field`` is not a known field.
    """
    oid = _subject_field(subject_field)
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
            if len(certs) != 1:
                raise ValueError(f"expected one certificate, found {len(certs)}")
            cert = certs[0]
        else:
            cert = x509.load_der_x509_certificate(data)
        cert.subject  # noqa: B018 - parsed lazily
    except MALFORMED_X509 as exc:
        raise ValueError(f"not an X.509 certificate ({exc})") from None
    values = cert.subject.get_attributes_for_oid(oid)
    if len(values) != 1:
        name = next((k for k, v in SUBJECT_FIELDS.items() if v == oid), oid.dotted_string)
        raise ValueError(
            f"the certificate's subject has {len(values) or 'no'} {name} ({_name(cert.subject)})"
        )
    value = values[0].value
    text = value if isinstance(value, str) else value.decode("utf-8", "replace")
    return {"cert_serial": text, "issuer": _name(cert.issuer)}


# ---------------------------------------------------------------------------------------
# Verifier (gateway side)
# ---------------------------------------------------------------------------------------


class _Reject(Exception):
    """Internal control flow of :meth:`SmartcardVerifier.complete`; never escapes it."""

    def __init__(self, reason: str, **detail: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class _Response:
    leaf: x509.Certificate
    chain: list[x509.Certificate]
    algorithm: str
    signature: bytes


#: What cryptography raises for malformed X.509 (certificates, CRLs), not only ValueError
#: (TypeError: a name attribute whose string type its OID does not allow).
MALFORMED_X509 = (
    ValueError,
    TypeError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


def _der_certificate(der: bytes) -> x509.Certificate:
    """Load a client's DER certificate; one of MALFORMED_X509 if it or its names do not parse.

    cryptography parses the names lazily: checked here, a bad one is a malformed
    response with this reason instead of an exception deep in a later check.
    """
    cert = x509.load_der_x509_certificate(der)
    cert.subject, cert.issuer  # noqa: B018
    return cert


def _parse_response(response: object) -> _Response:
    if not isinstance(response, Mapping):
        raise _Reject("malformed response", error="response is not an object")
    try:
        leaf_der = b64d(response.get("certificate"), max_len=MAX_CERT_BYTES)
        chain_raw = response.get("chain", [])
        if not isinstance(chain_raw, list) or len(chain_raw) > MAX_CHAIN:
            raise ValueError(f"chain must be a list of at most {MAX_CHAIN} certificates")
        chain_der = [b64d(c, max_len=MAX_CERT_BYTES) for c in chain_raw]
        signature = b64d(response.get("signature"), max_len=MAX_SIGNATURE_BYTES)
    except ValueError as exc:
        raise _Reject("malformed response", error=str(exc)) from None
    algorithm = response.get("algorithm")
    if algorithm not in ALGORITHMS:
        raise _Reject("malformed response", error="unknown algorithm")
    if not signature:
        raise _Reject("malformed response", error="empty signature")
    try:
        leaf = _der_certificate(leaf_der)
        chain = [_der_certificate(der) for der in chain_der]
    except MALFORMED_X509:
        raise _Reject("malformed response", error="certificate is not DER X.509") from None
    return _Response(leaf, chain, str(algorithm), signature)


def _name(name: x509.Name) -> str:
    try:
        return name.rfc4514_string()
    except ValueError:  # pragma: no cover - undecodable attribute values
        return repr(name)


def _describe(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": _name(cert.subject),
        "issuer": _name(cert.issuer),
        "serial": format(cert.serial_number, "x"),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_dates(cert: x509.Certificate, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise _Reject("certificate not yet valid", not_before=cert.not_valid_before_utc.isoformat())
    if now > cert.not_valid_after_utc:
        raise _Reject("certificate expired", not_after=cert.not_valid_after_utc.isoformat())


def _check_usage(cert: x509.Certificate) -> None:
    try:
        key_usage = _extension(cert, x509.KeyUsage)
        eku = _extension(cert, x509.ExtendedKeyUsage)
        constraints = _extension(cert, x509.BasicConstraints)
        extensions = list(cert.extensions)
    except MALFORMED_X509 as exc:
        raise _Reject("malformed response", error=f"bad extension: {exc}") from None
    if key_usage is None or not key_usage.digital_signature:
        raise _Reject(
            "not an authentication certificate",
            key_usage="missing" if key_usage is None else _usage_names(key_usage),
        )
    if constraints is not None and constraints.ca:
        raise _Reject("not an authentication certificate", error="a CA certificate")
    if eku is not None and not (
        ExtendedKeyUsageOID.CLIENT_AUTH in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku
    ):
        raise _Reject(
            "not an authentication certificate",
            extended_key_usage=[oid.dotted_string for oid in eku],
        )
    for ext in extensions:
        if ext.critical and type(ext.value) not in _KNOWN_CRITICAL:
            raise _Reject("unsupported critical extension", oid=ext.oid.dotted_string)


def _usage_names(key_usage: x509.KeyUsage) -> list[str]:
    names = []
    for name in (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    ):
        if getattr(key_usage, name):
            names.append(name)
    return names


def _validate_path(
    cfg: SmartcardSettings,
    leaf: x509.Certificate,
    sent: list[x509.Certificate],
    now: dt.datetime,
) -> list[x509.Certificate]:
    """Build and check the path to a trust anchor; return it, leaf first, anchor last."""
    if cfg.path_validation == PATH_RFC5280:
        try:
            return pathvalidation.validate(
                leaf, [*sent, *cfg.intermediates], cfg.trust_anchors,
                cfg.required_policy, now, MAX_PATH_DEPTH,
            )  # fmt: skip
        except pathvalidation.PathError as exc:
            if exc.policy:
                raise _Reject(
                    "policy oid missing", required_policy=cfg.required_policy.dotted_string,
                    error=exc.error,
                ) from None  # fmt: skip
            raise _Reject("untrusted issuer", error=exc.error) from None
    verifier = (
        PolicyBuilder()
        .store(cfg.store)
        .time(now)
        .max_chain_depth(MAX_PATH_DEPTH)
        .extension_policies(
            # CAs get the full RFC 5280/Web PKI profile (basicConstraints, keyUsage
            # keyCertSign, ...), except that certificatePolicies may be critical (RFC
            # 5280 4.2.1.4 allows it, and _check_policy processes them). The leaf's
            # extensions are checked here instead, since the Web PKI client profile
            # wants a subjectAltName that person certificates need not have.
            # docs/smartcard.md lists the chains this refuses that RFC 5280 accepts.
            ca_policy=ExtensionPolicy.webpki_defaults_ca().may_be_present(
                x509.CertificatePolicies, Criticality.AGNOSTIC, None
            ),
            ee_policy=ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, [*sent, *cfg.intermediates])
    except VerificationError as exc:
        raise _Reject("untrusted issuer", error=str(exc)[:300]) from None
    return list(verified.chain)


def _crl_refusal(crl: x509.CertificateRevocationList) -> str | None:
    """Why this CRL is never used (None: it is, for the certificates in its scope).

    A delta CRL lists only changes since a base CRL, an indirect CRL may speak for
    other issuers, a CRL of some reasons only cannot clear a certificate: none of them
    can say that a certificate is *not* revoked, so none is used.
    """
    for ext in crl.extensions:
        value = ext.value
        if isinstance(value, x509.DeltaCRLIndicator):
            return "delta CRL"
        if isinstance(value, x509.IssuingDistributionPoint):
            if value.indirect_crl:
                return "indirect CRL"
            if value.only_some_reasons is not None:
                return "some reasons only"
            if value.only_contains_attribute_certs:
                return "attribute certificates only"
        elif ext.critical and not isinstance(value, x509.CRLNumber):
            return f"unsupported critical extension {ext.oid.dotted_string}"
    return None


def _dp_names(
    full_name: Any, relative_name: x509.RelativeDistinguishedName | None, issuer: x509.Name
) -> set[x509.GeneralName]:
    """The names of a distribution point (a relative name is relative to the CRL issuer)."""
    if full_name:
        return set(full_name)
    if relative_name is not None:
        return {x509.DirectoryName(x509.Name([*issuer.rdns, relative_name]))}
    return set()


def _crl_scope_miss(
    crl: x509.CertificateRevocationList, cert: x509.Certificate, is_ca: bool
) -> str | None:
    """Why this CRL's scope does not cover ``cert`` (None: it covers it).

    RFC 5280 section 6.3.3 (b): a CRL without an IssuingDistributionPoint covers every
    certificate of its issuer. One with a distribution point name is a partition and
    covers only certificates whose CRLDistributionPoints name that distribution point
    (by name, or by cRLIssuer where the point has no name); onlyContainsUserCerts and
    onlyContainsCACerts narrow the scope further.
    """
    try:
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return None
    if is_ca and idp.only_contains_user_certs:
        return "only end-entity certificates"
    if not is_ca and idp.only_contains_ca_certs:
        return "only CA certificates"
    partition = _dp_names(idp.full_name, idp.relative_name, crl.issuer)
    if not partition:
        return None
    points = _extension(cert, x509.CRLDistributionPoints) or []
    for point in points:
        names = _dp_names(point.full_name, point.relative_name, cert.issuer)
        if not names and point.crl_issuer:
            names = set(point.crl_issuer)
        if names & partition:
            return None
    return "a partition the certificate does not name"


def _check_revocation(
    cfg: SmartcardSettings, path: list[x509.Certificate], now: dt.datetime, detail: dict[str, Any]
) -> None:
    """Every certificate below the anchor must be proven not revoked (fail closed).

    By its issuer's CRLs (:func:`_check_crls`), by OCSP (:mod:`auth.ocsp`), or by OCSP
    where the responder gives a proven answer and by CRLs where it does not
    (``ocsp-then-crl``; why OCSP was not used goes to the ``ocsp_not_used`` detail). A
    proven ``revoked`` is final. On success ``revocation`` lists what decided, leaf first.
    """
    used: list[str] = []
    for depth, cert in enumerate(path[:-1]):
        issuer = path[depth + 1]
        if cfg.revocation == REVOCATION_CRL:
            _check_crls(cfg, cert, issuer, depth > 0, now)
            used.append("crl")
            continue
        try:
            status = ocsp_mod.check(cert, issuer, cfg.ocsp, now)
        except ocsp_mod.OcspError as exc:
            if cfg.revocation == REVOCATION_OCSP:
                raise _Reject(
                    exc.reason, ocsp_error=exc.error, ocsp_url=exc.url, checked=_name(cert.subject)
                ) from None
            detail.setdefault("ocsp_not_used", []).append(
                f"{_name(cert.subject)}: {exc.reason}: {exc.error}"[:300]
            )
            _check_crls(cfg, cert, issuer, depth > 0, now)
            used.append("crl")
            continue
        if status.revoked:
            when = status.revocation_time
            raise _Reject(
                "certificate revoked",
                revoked=_name(cert.subject),
                revoked_serial=format(cert.serial_number, "x"),
                revocation_date=when.isoformat() if when else None,
                revoked_by="ocsp",
                ocsp_url=status.url,
            )
        used.append("ocsp (cached)" if status.cached else "ocsp")
    detail["revocation"] = used


def _check_crls(
    cfg: SmartcardSettings,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    is_ca: bool,
    now: dt.datetime,
) -> None:
    """``cert`` needs a fresh CRL from its issuer (fail closed).

    Only CRLs whose scope covers the certificate count (:func:`_crl_scope_miss`), and
    every scope counts on its own: of each scope (full, or one partition) the newest
    CRL is taken; the certificate is revoked if any of them lists it, and every one of
    them must be fresh. A newer CRL of another partition, or a delta CRL, can therefore
    never clear a certificate that a full CRL lists.
    """
    newest: dict[Any, x509.CertificateRevocationList] = {}
    not_used: list[str] = []
    for crl in cfg.crls:
        if crl.issuer != issuer.subject:
            continue
        why = _crl_refusal(crl) or _crl_scope_miss(crl, cert, is_ca)
        if why is None:
            try:
                valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
            except (ValueError, TypeError):
                valid = False
            if not valid:
                why = "signature does not verify with the issuer's key"
        if why is not None:
            not_used.append(f"CRL of {crl.last_update_utc.isoformat()}: {why}")
            continue
        try:
            scope: Any = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
        except x509.ExtensionNotFound:
            scope = None
        best = newest.get(scope)
        if best is None or crl.last_update_utc > best.last_update_utc:
            newest[scope] = crl
    if not newest:
        detail: dict[str, Any] = {"crl_issuer": _name(issuer.subject)}
        if not_used:
            detail["crls_not_used"] = not_used[:10]
        raise _Reject("crl missing", **detail)
    for crl in newest.values():
        next_update = crl.next_update_utc
        if next_update is None or now > next_update:
            raise _Reject(
                "crl stale",
                crl_issuer=_name(issuer.subject),
                next_update=next_update.isoformat() if next_update else None,
            )
    for crl in newest.values():
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            raise _Reject(
                "certificate revoked",
                revoked=_name(cert.subject),
                revoked_serial=format(cert.serial_number, "x"),
                revocation_date=entry.revocation_date_utc.isoformat(),
            )


def _policies(cert: x509.Certificate) -> list[x509.ObjectIdentifier] | None:
    policies = _extension(cert, x509.CertificatePolicies)
    if policies is None:
        return None
    return [info.policy_identifier for info in policies]


def _check_policy(cfg: SmartcardSettings, path: list[x509.Certificate]) -> None:
    required = cfg.required_policy
    leaf_policies = _policies(path[0]) or []
    if required not in leaf_policies:
        raise _Reject(
            "policy oid missing",
            required_policy=required.dotted_string,
            policies=[oid.dotted_string for oid in leaf_policies],
        )
    if cfg.path_validation == PATH_RFC5280:
        return  # the RFC 5280 policy tree of the path allowed it (auth/pathvalidation.py)
    for ca in path[1:-1]:  # intermediates must allow the policy; the anchor need not
        ca_policies = _policies(ca) or []
        if required not in ca_policies and ANY_POLICY not in ca_policies:
            raise _Reject(
                "policy oid missing",
                required_policy=required.dotted_string,
                ca=_name(ca.subject),
            )


def _check_identity(
    cfg: SmartcardSettings, leaf: x509.Certificate, credential: Mapping[str, Any]
) -> str:
    values = leaf.subject.get_attributes_for_oid(cfg.subject_field)
    if len(values) != 1:
        raise _Reject("subject field missing", subject_field=cfg.subject_field.dotted_string)
    value = values[0].value
    value = value if isinstance(value, str) else value.decode("utf-8", "replace")
    if not secrets.compare_digest(value.encode(), str(credential["cert_serial"]).encode()):
        raise _Reject("certificate of another person", cert_value=value)
    pinned = credential.get("issuer")
    if pinned is not None and pinned != _name(leaf.issuer):
        raise _Reject("certificate of another person", pinned_issuer=str(pinned))
    return value


def _check_signature(
    leaf: x509.Certificate, algorithm: str, signature: bytes, message: bytes
) -> None:
    try:
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise _Reject("unsupported key", key="unreadable") from None
    if isinstance(key, rsa.RSAPublicKey):
        if not 2048 <= key.key_size <= 4096:
            raise _Reject("unsupported key", key=f"rsa-{key.key_size}")
        if algorithm not in (ALG_RSA_PKCS1_SHA256, ALG_RSA_PSS_SHA256):
            raise _Reject("bad signature", error="algorithm does not fit an RSA key")
        pad = _PSS if algorithm == ALG_RSA_PSS_SHA256 else padding.PKCS1v15()
        try:
            key.verify(signature, message, pad, hashes.SHA256())
        except InvalidSignature:
            raise _Reject("bad signature") from None
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise _Reject("unsupported key", key=f"ec-{key.curve.name}")
        if algorithm != ALG_ECDSA_P256_SHA256:
            raise _Reject("bad signature", error="algorithm does not fit a P-256 key")
        try:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise _Reject("bad signature") from None
    else:
        raise _Reject("unsupported key", key=type(key).__name__)


def _check_certificate(
    cfg: SmartcardSettings,
    leaf: x509.Certificate,
    chain: list[x509.Certificate],
    now: dt.datetime,
    credential: Mapping[str, Any],
    detail: dict[str, Any],
) -> str:
    """Every check but the signature, in the documented order; returns the person."""
    _check_dates(leaf, now)
    _check_usage(leaf)
    path = _validate_path(cfg, leaf, chain, now)
    _check_revocation(cfg, path, now, detail)
    _check_policy(cfg, path)
    return _check_identity(cfg, leaf, credential)


def _check_declined(
    cfg: SmartcardSettings,
    response: Mapping[str, Any],
    credential: Mapping[str, Any],
    now: dt.datetime,
    detail: dict[str, Any],
) -> NoReturn:
    """A prover that gave up says why; its certificate is still checked.

    The reason the gateway finds itself (expired, revoked, another person's card...)
    wins over the client's; otherwise the client's reason is the audit reason, with
    ``reported_by: client``.
    """
    reason = response.get("declined")
    if reason not in DECLINED_REASONS:
        raise _Reject("malformed response", error="unknown declined reason")
    detail["reported_by"] = "client"
    tries = response.get("tries_left")
    if isinstance(tries, int) and not isinstance(tries, bool) and 0 <= tries <= 15:
        detail["tries_left"] = tries
    if "certificate" in response:
        try:
            der = b64d(response.get("certificate"), max_len=MAX_CERT_BYTES)
            leaf = _der_certificate(der)
        except MALFORMED_X509:
            raise _Reject("malformed response", error="certificate is not DER X.509") from None
        detail.update(_describe(leaf))
        _check_certificate(cfg, leaf, [], now, credential, detail)
    raise _Reject(str(reason))


def _wanted(settings: Mapping[str, Any]) -> JSON:
    """What the policy accepts, for a client choosing among several certificates.

    The required policy OID and the subject names of the configured CAs: public facts
    (a TLS server names its acceptable CAs the same way). Nothing while the settings
    are unusable (the login fails with ``settings invalid`` anyway).
    """
    try:
        cfg = load_settings(settings)
    except ConfigError:
        return {}
    cas = (*cfg.trust_anchors, *cfg.intermediates)
    names = list(dict.fromkeys(b64e(ca.subject.public_bytes()) for ca in cas))
    return {"policy": cfg.required_policy.dotted_string, "issuers": names}


class SmartcardVerifier(Verifier):
    """Gateway side: check the certificate path, revocation, policy, identity, signature."""

    name: ClassVar[str] = NAME

    def begin(self, ctx: AuthContext) -> Challenge:
        nonce = b64e(secrets.token_bytes(NONCE_LEN))
        return Challenge(payload={"nonce": nonce, **_wanted(ctx.settings)}, state={"nonce": nonce})

    def complete(self, ctx: AuthContext, state: JSON, response: JSON) -> Outcome:
        detail: dict[str, Any] = {}
        try:
            return self._complete(ctx, state, response, detail)
        except _Reject as rej:
            return Outcome.reject(rej.reason, detail={**detail, **rej.detail})
        except Exception as exc:  # fail closed on anything unforeseen
            # Hostile DER can reach corners of the X.509 stack that raise something
            # other than ValueError; the login fails, the gateway carries on.
            error = type(exc).__name__
            return Outcome.reject("verification error", detail={**detail, "error": error})

    def _complete(
        self, ctx: AuthContext, state: JSON, response: JSON, detail: dict[str, Any]
    ) -> Outcome:
        credential = ctx.credential
        if credential is None or not isinstance(credential.get("cert_serial"), str):
            raise _Reject("not enrolled")
        try:
            nonce = b64d(state.get("nonce"), max_len=NONCE_LEN)
        except (ValueError, AttributeError):
            nonce = b""
        if len(nonce) != NONCE_LEN:
            raise _Reject("malformed state")
        try:
            cfg = load_settings(ctx.settings)
        except ConfigError as exc:
            raise _Reject("settings invalid", error=str(exc)) from None
        now = dt.datetime.fromtimestamp(ctx.now, dt.UTC)
        if isinstance(response, Mapping) and "declined" in response:
            _check_declined(cfg, response, credential, now, detail)
        parsed = _parse_response(response)
        leaf = parsed.leaf
        detail.update(_describe(leaf))
        person = _check_certificate(cfg, leaf, parsed.chain, now, credential, detail)
        _check_signature(
            leaf, parsed.algorithm, parsed.signature, to_be_signed(nonce, ctx.channel_binding)
        )
        return Outcome.accept(
            detail={
                **detail,
                "person": person,
                "policy": cfg.required_policy.dotted_string,
                "algorithm": parsed.algorithm,
            }
        )


# ---------------------------------------------------------------------------------------
# PIV over a card port (client side, synchronous: run it in a thread)
# ---------------------------------------------------------------------------------------


class CardPort(Protocol):
    """One open connection to a card: a PC/SC handle in production, a fake in tests."""

    @property
    def reader(self) -> str:
        """The name of the reader the card sits in."""
        ...

    def transmit(self, apdu: bytes) -> tuple[bytes, int]:
        """Send one command APDU; return the response data and the status word."""
        ...

    def close(self) -> None:
        """Reset the card (dropping its PIN state) and release the connection."""
        ...


CardConnector = Callable[[], CardPort]
"""Opens the card; raises :class:`AuthError` with a message for the person at the client."""

PIV_AID = bytes.fromhex("A000000308000010000100")
PIN_KEY_REF = 0x80
KEY_PIV_AUTH = 0x9A
OBJ_PIV_AUTH_CERT = bytes.fromhex("5FC105")
OBJ_DIGITAL_SIGNATURE_CERT = bytes.fromhex("5FC10A")

ALG_PIV_RSA_3072 = 0x05
ALG_PIV_RSA_2048 = 0x07
ALG_PIV_RSA_4096 = 0x16
ALG_PIV_ECC_P256 = 0x11
_RSA_ALGS = {2048: ALG_PIV_RSA_2048, 3072: ALG_PIV_RSA_3072, 4096: ALG_PIV_RSA_4096}

SW_OK = 0x9000
SW_BLOCKED = 0x6983
SW_SECURITY_NOT_SATISFIED = 0x6982
SW_NOT_FOUND = 0x6A82

# DER of DigestInfo{sha256, NULL} without the digest (RFC 8017 section 9.2, note 1).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

# Bound on one response assembled from GET RESPONSE pieces (a compressed certificate
# object is far smaller); stops a misbehaving card from looping us forever.
MAX_RESPONSE_BYTES = 64 * 1024
# Largest certificate accepted after decompression.
MAX_CARD_CERT_BYTES = MAX_CERT_BYTES


def _apdu(cla: int, ins: int, p1: int, p2: int, data: bytes = b"", le: int | None = None) -> bytes:
    """A short command APDU (ISO 7816-4 section 5.1); ``le=0`` means 256."""
    out = bytes([cla, ins, p1, p2])
    if data:
        if len(data) > 255:
            raise ValueError("short APDU data is at most 255 bytes")
        out += bytes([len(data)]) + data
    if le is not None:
        out += bytes([le & 0xFF])
    return out


def _tlv(tag: int, value: bytes) -> bytes:
    """BER-TLV with a definite length (the tag is written as its big-endian bytes)."""
    tag_bytes = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    return tag_bytes + length + value


def _tlv_items(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Parse concatenated BER-TLVs; raise ValueError on truncation."""
    i = 0
    while i < len(data):
        tag = data[i]
        i += 1
        if tag & 0x1F == 0x1F:
            while True:
                if i >= len(data):
                    raise ValueError("truncated tag")
                tag = (tag << 8) | data[i]
                i += 1
                if not data[i - 1] & 0x80:
                    break
        if i >= len(data):
            raise ValueError("truncated length")
        first = data[i]
        i += 1
        if first < 0x80:
            length = first
        elif first in (0x81, 0x82, 0x83):
            size = first & 0x7F
            if i + size > len(data):
                raise ValueError("truncated length")
            length = int.from_bytes(data[i : i + size], "big")
            i += size
        else:
            raise ValueError("unsupported length encoding")
        if i + length > len(data):
            raise ValueError("truncated value")
        yield tag, data[i : i + length]
        i += length


def _tlv_get(data: bytes, tag: int) -> bytes | None:
    for t, value in _tlv_items(data):
        if t == tag:
            return value
    return None


def _rsa_block(digest: bytes, modulus_len: int) -> bytes:
    """EMSA-PKCS1-v1_5 encoding of a SHA-256 digest (RFC 8017 section 9.2)."""
    t = SHA256_DIGEST_INFO + digest
    return b"\x00\x01" + b"\xff" * (modulus_len - len(t) - 3) + b"\x00" + t


def _sw_text(sw: int) -> str:
    return f"{sw:04X}"


class PivCard:
    """The PIV commands this factor needs, over a :class:`CardPort`. Synchronous."""

    def __init__(self, port: CardPort) -> None:
        self.port = port

    def exchange(self, apdu: bytes) -> tuple[bytes, int]:
        """Transmit, following ``61xx`` (GET RESPONSE) and ``6Cxx`` (wrong Le)."""
        data, sw = self.port.transmit(apdu)
        if sw >> 8 == 0x6C:
            data, sw = self.port.transmit(apdu[:-1] + bytes([sw & 0xFF]))
        out = bytearray(data)
        while sw >> 8 == 0x61:
            if len(out) > MAX_RESPONSE_BYTES:
                raise AuthError("the smartcard sent an oversized response")
            data, sw = self.port.transmit(_apdu(0x00, 0xC0, 0x00, 0x00, le=sw & 0xFF))
            out += data
        return bytes(out), sw

    def exchange_chained(
        self, cla: int, ins: int, p1: int, p2: int, data: bytes
    ) -> tuple[bytes, int]:
        """Send ``data`` with command chaining (ISO 7816-4 section 5.1.1, CLA bit 0x10)."""
        chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
        for chunk in chunks[:-1]:
            _, sw = self.port.transmit(_apdu(cla | 0x10, ins, p1, p2, chunk))
            if sw != SW_OK:
                return b"", sw
        return self.exchange(_apdu(cla, ins, p1, p2, chunks[-1], le=0))

    def select(self) -> None:
        _, sw = self.exchange(_apdu(0x00, 0xA4, 0x04, 0x00, PIV_AID, le=0))
        if sw != SW_OK:
            raise AuthError(
                f"the card in the reader is not a PIV smartcard (SELECT answered {_sw_text(sw)})"
            )

    def read_object(self, tag: bytes) -> bytes | None:
        """GET DATA for a PIV data object; None if the card does not have it."""
        data, sw = self.exchange(_apdu(0x00, 0xCB, 0x3F, 0xFF, _tlv(0x5C, tag), le=0))
        if sw == SW_NOT_FOUND:
            return None
        if sw != SW_OK:
            raise AuthError(f"the smartcard refused to read its certificate ({_sw_text(sw)})")
        try:
            return _tlv_get(data, 0x53)
        except ValueError:
            raise AuthError("the smartcard sent a malformed data object") from None

    def read_certificate(self, tag: bytes = OBJ_PIV_AUTH_CERT) -> bytes:
        """The DER certificate in a PIV certificate object (SP 800-73-4 part 1, table 10)."""
        obj = self.read_object(tag)
        if obj is None:
            raise AuthError("the smartcard has no authentication certificate (PIV slot 9A)")
        try:
            cert = _tlv_get(obj, 0x70)
            info = _tlv_get(obj, 0x71)
        except ValueError:
            cert = None
            info = None
        if cert is None:
            raise AuthError("the smartcard sent a malformed certificate object")
        if info and info[0] & 0x01:  # CertInfo bit 0: gzip-compressed
            try:
                inflater = zlib.decompressobj(wbits=31)
                cert = inflater.decompress(cert, MAX_CARD_CERT_BYTES)
            except zlib.error:
                raise AuthError("the smartcard's compressed certificate is corrupt") from None
        return cert

    def pin_tries_left(self) -> int | None:
        """The PIN retry counter (VERIFY without data); None if the card does not say."""
        _, sw = self.exchange(_apdu(0x00, 0x20, 0x00, PIN_KEY_REF))
        if sw == SW_BLOCKED:
            raise PinBlocked(_BLOCKED)
        if sw & 0xFFF0 == 0x63C0:
            if sw & 0x0F == 0:
                raise PinBlocked(_BLOCKED)
            return sw & 0x0F
        return None

    def verify_pin(self, pin: str) -> None:
        """VERIFY the PIN (key reference 80); raise AuthError saying what went wrong."""
        if not pin:
            raise AuthError("no PIN entered")
        if not (pin.isascii() and pin.isprintable() and 6 <= len(pin) <= 8):
            raise AuthError("a smartcard PIN is 6 to 8 characters (digits)")
        block = pin.encode("ascii").ljust(8, b"\xff")
        _, sw = self.exchange(_apdu(0x00, 0x20, 0x00, PIN_KEY_REF, block))
        if sw == SW_OK:
            return
        if sw == SW_BLOCKED or sw == 0x63C0:
            raise PinBlocked(_BLOCKED)
        if sw & 0xFFF0 == 0x63C0:
            left = sw & 0x0F
            plural = "try" if left == 1 else "tries"
            raise WrongPin(f"wrong PIN: {left} {plural} left before the card is blocked", left)
        raise AuthError(f"the smartcard refused the PIN check ({_sw_text(sw)})")

    def general_authenticate(self, algorithm: int, key_ref: int, challenge: bytes) -> bytes:
        """GENERAL AUTHENTICATE: the card's private-key operation on ``challenge``."""
        template = _tlv(0x7C, _tlv(0x82, b"") + _tlv(0x81, challenge))
        data, sw = self.exchange_chained(0x00, 0x87, algorithm, key_ref, template)
        if sw == SW_SECURITY_NOT_SATISFIED:
            raise AuthError("the smartcard did not accept the PIN for signing")
        if sw != SW_OK:
            raise AuthError(f"the smartcard refused to sign ({_sw_text(sw)})")
        try:
            outer = _tlv_get(data, 0x7C)
            signature = _tlv_get(outer, 0x82) if outer is not None else None
        except ValueError:
            signature = None
        if not signature:
            raise AuthError("the smartcard sent a malformed signature")
        return signature


_BLOCKED = (
    "the smartcard is blocked (too many wrong PINs): ask your organisation's card "
    "administrator to unblock it with the PUK"
)


class WrongPin(AuthError):
    """The card refused the PIN; ``tries_left`` before it blocks."""

    def __init__(self, message: str, tries_left: int) -> None:
        super().__init__(message)
        self.tries_left = tries_left


class PinBlocked(DeviceError):
    """The card's PIN is blocked (the PUK unblocks it): a local problem, not a refusal."""


def sign_with_card(card: PivCard, cert: x509.Certificate, message: bytes) -> tuple[str, bytes]:
    """Sign ``message`` with the slot 9A key; return (algorithm name, signature).

    The signature is checked against the certificate before it leaves, so a card whose
    key does not match its certificate fails here with a clear message.
    """
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise AuthError("the smartcard's certificate holds an unreadable public key") from None
    digest = hashlib.sha256(message).digest()
    try:
        if isinstance(key, rsa.RSAPublicKey) and key.key_size in _RSA_ALGS:
            size = key.key_size // 8
            raw = card.general_authenticate(
                _RSA_ALGS[key.key_size], KEY_PIV_AUTH, _rsa_block(digest, size)
            )
            signature = raw.rjust(size, b"\x00")
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            return ALG_RSA_PKCS1_SHA256, signature
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            signature = card.general_authenticate(ALG_PIV_ECC_P256, KEY_PIV_AUTH, digest)
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            return ALG_ECDSA_P256_SHA256, signature
    except InvalidSignature:
        raise AuthError("the smartcard's signature does not match its certificate") from None
    raise AuthError("the smartcard's key type is not supported (need RSA-2048 or ECC P-256)")


# ---------------------------------------------------------------------------------------
# PC/SC through pyscard (imported lazily)
# ---------------------------------------------------------------------------------------

PYSCARD_MISSING = (
    "the smartcard factor needs pyscard: pip install 'gatewayd[smartcard]' "
    "(pyscard needs the PC/SC library libpcsclite and a running pcscd; on Debian/Ubuntu: "
    "apt install pcscd libpcsclite1)"
)


def _pyscard() -> ModuleType:
    try:
        # Optional dependency, imported here on purpose so the gateway never needs it.
        import smartcard.scard as scard
    except ImportError as exc:  # pyscard missing, or libpcsclite missing under it
        raise DeviceError(PYSCARD_MISSING) from exc
    module: ModuleType = scard
    return module


def _no_service(scard: ModuleType, hresult: int) -> AuthError:
    if hresult == scard.SCARD_E_NO_SERVICE:
        return DeviceError(
            "the PC/SC service is not running: start pcscd (e.g. systemctl start pcscd.socket)"
        )
    return DeviceError(f"PC/SC failed: {scard.SCardGetErrorMessage(hresult)}")


class PcscPort:
    """A :class:`CardPort` over a PC/SC card handle (inside a transaction)."""

    def __init__(
        self, scard: ModuleType, context: int, card: int, protocol: int, reader: str
    ) -> None:
        self._scard = scard
        self._context = context
        self._card = card
        self._protocol = protocol
        self._reader = reader
        self._closed = False

    @property
    def reader(self) -> str:
        return self._reader

    def transmit(self, apdu: bytes) -> tuple[bytes, int]:
        scard = self._scard
        hresult, response = scard.SCardTransmit(self._card, self._protocol, list(apdu))
        if hresult != scard.SCARD_S_SUCCESS:
            removed = {
                scard.SCARD_W_REMOVED_CARD,
                scard.SCARD_E_NO_SMARTCARD,
                scard.SCARD_E_READER_UNAVAILABLE,
                scard.SCARD_W_RESET_CARD,
            }
            if hresult in removed:
                raise DeviceError("the smartcard was removed or reset during login: try again")
            raise DeviceError(
                f"smartcard communication failed: {scard.SCardGetErrorMessage(hresult)}"
            )
        if len(response) < 2:
            raise AuthError("the smartcard sent a truncated response")
        raw = bytes(response)
        return raw[:-2], int.from_bytes(raw[-2:], "big")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        scard = self._scard
        scard.SCardEndTransaction(self._card, scard.SCARD_LEAVE_CARD)
        scard.SCardDisconnect(self._card, scard.SCARD_RESET_CARD)
        scard.SCardReleaseContext(self._context)


def _match_reader(wanted: str, names: list[str]) -> str:
    if wanted in names:
        return wanted
    hits = [n for n in names if wanted.casefold() in n.casefold()]
    if len(hits) == 1:
        return hits[0]
    listed = ", ".join(names)
    if not hits:
        raise DeviceError(f"no card reader named {wanted!r} (readers: {listed})")
    raise DeviceError(f"{wanted!r} matches several card readers ({', '.join(hits)}): be precise")


def _list_readers(scard: ModuleType, context: int) -> list[str]:
    hresult, names = scard.SCardListReaders(context, [])
    if hresult == scard.SCARD_E_NO_READERS_AVAILABLE or (
        hresult == scard.SCARD_S_SUCCESS and not names
    ):
        raise DeviceError("no smartcard reader found: connect your card reader")
    if hresult != scard.SCARD_S_SUCCESS:
        raise _no_service(scard, hresult)
    return [str(n) for n in names]


def pcsc_connector(reader: str | None = None) -> CardConnector:
    """A :data:`CardConnector` for the PC/SC reader ``reader`` (None: first with a card)."""

    def connect() -> CardPort:
        scard = _pyscard()
        hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hresult != scard.SCARD_S_SUCCESS:
            raise _no_service(scard, hresult)
        try:
            names = _list_readers(scard, context)
            candidates = [_match_reader(reader, names)] if reader is not None else names
            for name in candidates:
                hresult, card, protocol = scard.SCardConnect(
                    context,
                    name,
                    scard.SCARD_SHARE_SHARED,
                    scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
                )
                if hresult == scard.SCARD_S_SUCCESS:
                    scard.SCardBeginTransaction(card)
                    return PcscPort(scard, context, card, int(protocol), name)
                absent = {
                    scard.SCARD_E_NO_SMARTCARD,
                    scard.SCARD_W_REMOVED_CARD,
                    scard.SCARD_W_UNPOWERED_CARD,
                    scard.SCARD_W_UNRESPONSIVE_CARD,
                }
                if hresult not in absent and reader is not None:
                    raise DeviceError(
                        f"cannot use the card in {name}: {scard.SCardGetErrorMessage(hresult)}"
                    )
            if reader is not None:
                raise DeviceError(f"no smartcard in the reader {candidates[0]!r}: insert your card")
            raise DeviceError(f"no smartcard in any reader ({', '.join(names)}): insert your card")
        except BaseException:
            scard.SCardReleaseContext(context)
            raise

    return connect


async def wait_for_removal(
    reader_name: str, poll: float = 0.5, on_present: Callable[[], None] | None = None
) -> None:
    """Return once the card in ``reader_name`` is gone.

    "Gone" means: no card in the reader, a different card (PC/SC's per-reader event
    counter moved: the card was pulled and put back between two polls), the reader
    itself unplugged, or the PC/SC service unreachable (fail closed). Polls every
    ``poll`` seconds; each poll is one non-blocking ``SCardGetStatusChange`` in a
    worker thread, and ``on_present`` (if given) is called after each poll that saw the
    same card still there (the session's ``card_present`` heartbeat hangs on it). Cancel
    the task to stop watching.

    ``gw connect`` runs this next to its tunnels and closes them when it returns::

        watcher = asyncio.create_task(wait_for_removal(prover.reader))

    Raises :class:`AuthError` only if pyscard cannot be imported.
    """
    scard = _pyscard()
    hresult, context = await asyncio.to_thread(scard.SCardEstablishContext, scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        return
    try:
        first: int | None = None
        while True:
            events = await asyncio.to_thread(_card_events, scard, context, reader_name)
            if events is None:
                return
            if first is None:
                first = events
            elif events != first:
                return
            if on_present is not None:
                on_present()
            await asyncio.sleep(poll)
    finally:
        await asyncio.to_thread(scard.SCardReleaseContext, context)


def _card_events(scard: ModuleType, context: int, reader_name: str) -> int | None:
    """The reader's card event counter if a card is present, else None."""
    hresult, states = scard.SCardGetStatusChange(
        context, 0, [(reader_name, scard.SCARD_STATE_UNAWARE)]
    )
    if hresult != scard.SCARD_S_SUCCESS or not states:
        return None
    state = int(states[0][1])
    gone = scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_UNAVAILABLE | scard.SCARD_STATE_EMPTY
    if state & gone or not state & scard.SCARD_STATE_PRESENT:
        return None
    return (state >> 16) & 0xFFFF


# ---------------------------------------------------------------------------------------
# Prover (client side)
# ---------------------------------------------------------------------------------------


def _holder(cert: x509.Certificate) -> str:
    """The card holder's common name, made safe for a terminal (the card chose it)."""
    from relay.text import printable

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else _name(cert.subject)
    return printable(value if isinstance(value, str) else value.decode("utf-8", "replace"), 64)


class SmartcardProver(Prover):
    """Client side: the PIV card signs the channel-bound challenge.

    ``connect`` opens the card (see :func:`pcsc_connector`); ``prompt`` asks for the
    PIN (called with ``secret=True``, on the event loop thread, since it talks to the
    terminal); ``now`` is the clock used to refuse an expired card before asking for
    the PIN.
    """

    name: ClassVar[str] = NAME

    def __init__(
        self, connect: CardConnector, prompt: Prompt, now: Callable[[], float] = time.time
    ) -> None:
        self._connect = connect
        self._prompt = prompt
        self._now = now
        self.reader: str | None = None
        """The reader the last successful login used (for :func:`wait_for_removal`)."""

    async def respond(self, challenge: JSON, channel_binding: bytes) -> JSON:
        try:
            nonce = b64d(challenge.get("nonce"), max_len=NONCE_LEN)
        except (ValueError, AttributeError):
            nonce = b""
        if len(nonce) != NONCE_LEN:
            raise AuthError("the gateway sent a malformed smartcard challenge")
        message = to_be_signed(nonce, channel_binding)

        port = await asyncio.to_thread(self._connect)
        try:
            card = PivCard(port)
            der = await asyncio.to_thread(self._read_certificate, card)
            cert = self._load_certificate(der)
            stage = "certificate"
            try:
                self._check_validity(cert)
                stage = "pin"
                tries = await asyncio.to_thread(card.pin_tries_left)
                text = f"PIN for the smartcard of {_holder(cert)} ({port.reader})"
                if tries is not None and tries < 3:
                    text += f", {tries} {'try' if tries == 1 else 'tries'} left"
                pin = self._prompt(text + ": ", True)
                await asyncio.to_thread(card.verify_pin, pin)
                stage = "signing"
                algorithm, signature = await asyncio.to_thread(sign_with_card, card, cert, message)
            except AuthError as exc:
                # Once the certificate is known, tell the gateway why this login stops
                # here, so that its audit record has the person and the reason.
                exc.payload = _declined(exc, stage, cert, der, self._now())
                raise
        finally:
            await asyncio.to_thread(port.close)
        self.reader = port.reader
        return {
            "certificate": b64e(der),
            "chain": [],
            "algorithm": algorithm,
            "signature": b64e(signature),
        }

    @staticmethod
    def _read_certificate(card: PivCard) -> bytes:
        card.select()
        return card.read_certificate(OBJ_PIV_AUTH_CERT)

    @staticmethod
    def _load_certificate(der: bytes) -> x509.Certificate:
        try:
            cert = x509.load_der_x509_certificate(der)
            cert.subject  # noqa: B018 - parsed lazily: a bad name fails here, not mid-login
        except MALFORMED_X509:
            raise AuthError("the smartcard's certificate cannot be read") from None
        return cert

    def _check_validity(self, cert: x509.Certificate) -> None:
        """Refuse an expired card before asking for its PIN."""
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


def _declined(exc: AuthError, stage: str, cert: x509.Certificate, der: bytes, now: float) -> JSON:
    """The ``auth_response`` of a prover that stops after reading the certificate."""
    payload: JSON = {"certificate": b64e(der)}
    if isinstance(exc, PinBlocked):
        reason = "card blocked"
    elif isinstance(exc, WrongPin):
        reason = "wrong pin"
        payload["tries_left"] = exc.tries_left
    elif stage == "certificate":
        expired = now > cert.not_valid_after_utc.timestamp()
        reason = "certificate expired" if expired else "certificate not yet valid"
    elif stage == "pin" and not isinstance(exc, DeviceError):
        reason = "pin not verified"
    else:
        reason = "card error"
    payload["declined"] = reason
    return payload


def make_prover(options: ProverOptions) -> Prover:
    """The prover factory: ``options.values["smartcard_reader"]`` picks the reader;
    ``values["pkcs11_module"]`` (a path) signs through that PKCS#11 module instead
    (:mod:`auth.pkcs11`), ``values["cert_label"]`` naming the certificate."""
    module = options.values.get("pkcs11_module")
    if module:
        from .pkcs11 import make_pkcs11_prover

        label = options.values.get("cert_label")
        return make_pkcs11_prover(str(module), options.prompt, label and str(label))
    reader = options.values.get("smartcard_reader")
    if reader is not None and not isinstance(reader, str):
        raise AuthError("smartcard_reader must be a reader name")
    return SmartcardProver(pcsc_connector(reader or None), options.prompt)


FACTOR = Factor(
    name=NAME,
    verifier=SmartcardVerifier,
    prover=make_prover,
    description="PKI smartcard (PIV): the card signs a TLS-channel-bound challenge; the "
    "gateway checks path, CRL, policy OID and the person's subject serialNumber",
    check_settings=check_settings,
    reload=lambda _settings: reload(),
)
