"""OCSP (RFC 6960) for the smartcard verifier: ask the CA's responder whether a
certificate is revoked, and trust the answer only once it is proven.

:func:`check` sends one request for one certificate (POST ``application/ocsp-request``
over HTTP to the responder the certificate's AuthorityInfoAccess names, or to the
configured URL) and returns the proven status, or raises :class:`OcspError` with the
audit reason and what went wrong. A response is used only if:

- its status is ``successful`` and it holds a SingleResponse for exactly this
  certificate's CertID (issuer name hash, issuer key hash and serial number);
- it is signed by the issuer itself, or by a delegated responder whose certificate the
  issuer signed, carrying the OCSPSigning extended key usage and valid now (RFC 6960
  section 4.2.2.2); the responder ID names that signer;
- it is fresh: thisUpdate not in the future (beyond :data:`CLOCK_SKEW`) and now before
  nextUpdate, or, without nextUpdate, thisUpdate within ``max_age`` seconds;
- with ``nonce`` set, it echoes the request's nonce (RFC 8954).

Proven answers (good or revoked) are cached per certificate until the earlier of
nextUpdate and ``cache_seconds`` from now (never with ``nonce``: each login then asks).
Blocking: the verifier runs in a worker thread.
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
import time
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    SignatureAlgorithmOID,
)

if TYPE_CHECKING:
    from urllib.request import OpenerDirector

__all__ = [
    "CLOCK_SKEW",
    "OcspError",
    "OcspSettings",
    "Status",
    "check",
    "clear_cache",
    "responder_url",
]

#: How far a responder's clock may run ahead of ours.
CLOCK_SKEW = dt.timedelta(minutes=5)
#: The largest response read (real ones are 1-4 KB; a delegated responder adds a cert).
MAX_RESPONSE_BYTES = 64 * 1024
MAX_CACHED = 4096

UNAVAILABLE = "ocsp unavailable"
INVALID = "ocsp invalid"
STALE = "ocsp stale"
UNKNOWN = "ocsp unknown"


class OcspError(Exception):
    """No proven answer: ``reason`` is the audit reason, ``error`` what went wrong."""

    def __init__(self, reason: str, error: str, url: str | None = None) -> None:
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error
        self.url = url


@dataclass(frozen=True, slots=True)
class OcspSettings:
    url: str | None
    """Responder to ask instead of the one the certificate names."""
    timeout: float
    cache_seconds: float
    max_age: float
    """Without nextUpdate, how old thisUpdate may be (seconds)."""
    nonce: bool


@dataclass(frozen=True, slots=True)
class Status:
    """A proven answer for one certificate."""

    revoked: bool
    url: str
    this_update: dt.datetime
    revocation_time: dt.datetime | None = None
    cached: bool = False


_cache: dict[tuple[bytes, int, str], tuple[dt.datetime, Status]] = {}
_lock = threading.Lock()


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def responder_url(cert: x509.Certificate) -> str | None:
    """The first HTTP OCSP responder the certificate's AuthorityInfoAccess names."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for desc in aia:
        location = desc.access_location
        if (
            desc.access_method == AuthorityInformationAccessOID.OCSP
            and isinstance(location, x509.UniformResourceIdentifier)
            and location.value.lower().startswith("http://")
        ):
            return location.value
    return None


@cache
def _opener() -> OpenerDirector:
    """The HTTP client, made at the first check: urllib.request and http.client are
    imported by a daemon that asks a responder, not by every one with the factor."""
    import urllib.request

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        """A responder's redirect is not followed: the URL is the CA's, or the operator's."""

        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    return urllib.request.build_opener(_NoRedirect)


def _fetch(url: str, body: bytes, timeout: float) -> bytes:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 - only http:// URLs reach here
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/ocsp-request", "Accept": "application/ocsp-response"},
    )
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    try:
        with _opener().open(request, timeout=timeout) as reply:
            while chunk := reply.read(4096):  # each read waits at most ``timeout``
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise OcspError(UNAVAILABLE, "response too large", url)
                if time.monotonic() > deadline:
                    raise OcspError(UNAVAILABLE, f"no full answer within {timeout:g} s", url)
    except urllib.error.HTTPError as exc:
        raise OcspError(UNAVAILABLE, f"HTTP {exc.code} from the responder", url) from None
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused, bad URL
        why = getattr(exc, "reason", None) or exc
        raise OcspError(UNAVAILABLE, f"responder unreachable: {why}"[:200], url) from None
    return b"".join(chunks)


def _verify_signature(
    key: object, signature: bytes, data: bytes, oid: x509.ObjectIdentifier, hash_alg: object
) -> None:
    """Raise InvalidSignature unless ``signature`` over ``data`` verifies with ``key``."""
    if isinstance(key, rsa.RSAPublicKey):
        if oid == SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
            hash_alg, hashes.HashAlgorithm
        ):
            raise InvalidSignature
        key.verify(signature, data, padding.PKCS1v15(), hash_alg)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(hash_alg, hashes.HashAlgorithm):
            raise InvalidSignature
        key.verify(signature, data, ec.ECDSA(hash_alg))
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        key.verify(signature, data)
    elif isinstance(key, dsa.DSAPublicKey) and isinstance(hash_alg, hashes.HashAlgorithm):
        key.verify(signature, data, hash_alg)
    else:
        raise InvalidSignature


def _names_signer(response: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if response.responder_name is not None:
        return response.responder_name == cert.subject
    key_hash = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    return response.responder_key_hash == key_hash


def _signer(
    response: ocsp.OCSPResponse, issuer: x509.Certificate, now: dt.datetime, url: str
) -> x509.Certificate:
    """The issuer, or a delegated responder certificate the issuer authorized."""
    if _names_signer(response, issuer):
        return issuer
    for cert in response.certificates:
        if not _names_signer(response, cert):
            continue
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise OcspError(INVALID, "responder certificate not issued by the CA", url) from None
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            raise OcspError(INVALID, "responder certificate lacks the OCSPSigning usage", url)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise OcspError(INVALID, "responder certificate not valid now", url)
        return cert
    raise OcspError(INVALID, "response signed by neither the CA nor a responder it named", url)


def _single(
    response: ocsp.OCSPResponse, request: ocsp.OCSPRequest, url: str
) -> ocsp.OCSPSingleResponse:
    for single in response.responses:
        if (
            single.serial_number == request.serial_number
            and single.issuer_key_hash == request.issuer_key_hash
            and single.issuer_name_hash == request.issuer_name_hash
        ):
            return single
    raise OcspError(INVALID, "response is for another certificate", url)


def check(
    cert: x509.Certificate, issuer: x509.Certificate, settings: OcspSettings, now: dt.datetime
) -> Status:
    """The proven OCSP status of ``cert`` (issued by ``issuer``); OcspError otherwise."""
    url = settings.url or responder_url(cert)
    if url is None:
        raise OcspError(UNAVAILABLE, "the certificate names no OCSP responder")
    cache_key = (
        x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest,
        cert.serial_number,
        url,
    )
    if not settings.nonce and settings.cache_seconds > 0:
        with _lock:
            hit = _cache.get(cache_key)
        if hit is not None and now < hit[0]:
            cached = hit[1]
            return Status(cached.revoked, url, cached.this_update, cached.revocation_time, True)
    # SHA-1 names the certificate in the CertID (RFC 5019: what every responder knows);
    # it is an identifier here, no signature relies on it.
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())  # noqa: S303
    nonce = secrets.token_bytes(16)
    if settings.nonce:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    request = builder.build()
    data = _fetch(url, request.public_bytes(Encoding.DER), settings.timeout)
    try:
        response = ocsp.load_der_ocsp_response(data)
    except ValueError:
        raise OcspError(UNAVAILABLE, "response is not DER OCSP", url) from None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OcspError(UNAVAILABLE, f"responder says {response.response_status.name}", url)
    try:
        signer = _signer(response, issuer, now, url)
        try:
            _verify_signature(
                signer.public_key(),
                response.signature,
                response.tbs_response_bytes,
                response.signature_algorithm_oid,
                response.signature_hash_algorithm,
            )
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            raise OcspError(INVALID, "response signature does not verify", url) from None
        single = _single(response, request, url)
        if settings.nonce:
            try:
                echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
            except x509.ExtensionNotFound:
                echoed = None
            if echoed != nonce:
                raise OcspError(INVALID, "response does not echo the request's nonce", url)
        status = single.certificate_status
        this_update = single.this_update_utc
        next_update = single.next_update_utc
        revocation_time = single.revocation_time_utc
    except (ValueError, TypeError, x509.DuplicateExtension, UnsupportedAlgorithm) as exc:
        raise OcspError(INVALID, f"malformed response: {exc}"[:200], url) from None
    if this_update > now + CLOCK_SKEW:
        raise OcspError(STALE, f"thisUpdate {this_update.isoformat()} is in the future", url)
    if next_update is not None:
        if now > next_update:
            raise OcspError(STALE, f"nextUpdate {next_update.isoformat()} has passed", url)
        good_until = next_update
    else:
        good_until = this_update + dt.timedelta(seconds=settings.max_age)
        if now > good_until:
            raise OcspError(STALE, f"thisUpdate {this_update.isoformat()} is too old", url)
    if status == ocsp.OCSPCertStatus.UNKNOWN:
        raise OcspError(UNKNOWN, "the responder does not know the certificate", url)
    result = Status(status == ocsp.OCSPCertStatus.REVOKED, url, this_update, revocation_time)
    if not settings.nonce and settings.cache_seconds > 0:
        until = min(good_until, now + dt.timedelta(seconds=settings.cache_seconds))
        with _lock:
            if len(_cache) >= MAX_CACHED:
                _cache.clear()
            _cache[cache_key] = (until, result)
    return result
