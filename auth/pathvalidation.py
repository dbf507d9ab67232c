"""Strict RFC 5280 path validation for the smartcard verifier (``path_validation =
"rfc5280"``), by pyhanko-certvalidator (optional extra ``rfc5280``).

cryptography's verifier applies the Web PKI profile to CA certificates (see
docs/smartcard.md for the chains it refuses that RFC 5280 accepts). This module runs the
path validation algorithm of RFC 5280 section 6.1 instead: the trust anchor is input
(its name and key; its own extensions are not held to a profile), CA certificates need
``cA`` in basicConstraints and keyCertSign where keyUsage is present, path lengths and
name constraints apply, and the policy tree is processed in full (policy mappings,
``requireExplicitPolicy``, ``inhibitPolicyMapping``, ``inhibitAnyPolicy``) with the
initial policy set ``{required_policy}`` and an explicit policy required. A critical
extension the algorithm does not know is refused.

Algorithms: any signature RFC 5280 and its updates define (RSA PKCS#1 v1.5, RSA-PSS with
any salt length, ECDSA, EdDSA) with SHA-2; SHA-1 and MD5 are refused, and RSA keys of
CAs must have at least :data:`MIN_RSA_BITS` bits. Revocation is not checked here (the
verifier checks CRLs or OCSP on the path this returns).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = ["MIN_RSA_BITS", "PathError", "available", "validate"]

#: RFC 5280 sets no minimum; keys below this are factorable today.
MIN_RSA_BITS = 1024


class PathError(Exception):
    """No valid path: ``policy`` tells a policy failure from any other."""

    def __init__(self, error: str, *, policy: bool = False) -> None:
        super().__init__(error)
        self.error = error
        self.policy = policy


def available() -> str | None:
    """None if pyhanko-certvalidator is importable, else why not (one line)."""
    try:
        import pyhanko_certvalidator  # noqa: F401
    except ImportError:
        return "needs pyhanko-certvalidator (pip install 'gatewayd[rfc5280]')"
    return None


def _asn1(cert: x509.Certificate) -> Any:
    from asn1crypto import x509 as asn1_x509

    return asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))


def validate(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    required_policy: x509.ObjectIdentifier,
    now: dt.datetime,
    max_depth: int,
) -> list[x509.Certificate]:
    """The validated path, leaf first and anchor last; PathError if there is none."""
    from pyhanko_certvalidator import CertificateValidator, ValidationContext
    from pyhanko_certvalidator.errors import (
        InvalidCertificateError,
        PathBuildingError,
        PathValidationError,
    )
    from pyhanko_certvalidator.policy_decl import (
        DisallowWeakAlgorithmsPolicy,
        PKIXValidationParams,
    )

    context = ValidationContext(
        trust_roots=[_asn1(c) for c in anchors],
        other_certs=[_asn1(c) for c in intermediates],
        moment=now,
        allow_fetching=False,
        revocation_mode="soft-fail",
        algorithm_usage_policy=DisallowWeakAlgorithmsPolicy(  # type: ignore[no-untyped-call]
            weak_hash_algos={"md2", "md5", "sha1"}, rsa_key_size_threshold=MIN_RSA_BITS
        ),
        time_tolerance=dt.timedelta(0),
    )
    params = PKIXValidationParams(
        user_initial_policy_set=frozenset({required_policy.dotted_string}),
        initial_explicit_policy=True,
    )
    validator = CertificateValidator(_asn1(leaf), validation_context=context, pkix_params=params)
    try:
        path = asyncio.run(validator.async_validate_path())
    except PathBuildingError as exc:
        raise PathError(f"no path to a trust anchor: {exc}"[:300]) from None
    except (PathValidationError, InvalidCertificateError) as exc:
        text = str(exc)
        raise PathError(text[:300], policy="polic" in text.lower()) from None
    certs = [x509.load_der_x509_certificate(c.dump()) for c in path.iter_certs(include_root=True)]
    certs.reverse()
    if len(certs) > max_depth:
        raise PathError(f"path longer than {max_depth} certificates")
    return certs
