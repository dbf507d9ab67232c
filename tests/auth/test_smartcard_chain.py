"""Which CA chains the smartcard verifier accepts where RFC 5280 and the Web PKI differ.

The path is built and checked by cryptography's verifier with its Web PKI profile for
CAs (auth/smartcard.py, ``_validate_path``); policies, revocation and the leaf are the
verifier's own checks. Each case here is an intermediate CA (or root) that RFC 5280
path validation accepts, with the verdict this gateway gives, so that a change in
either is seen; docs/smartcard.md lists them for operators of a national CA chain.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pki
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from auth import smartcard
from auth.base import AuthContext, b64e
from auth.smartcard import SmartcardVerifier, to_be_signed

DAY = dt.timedelta(days=1)
CHANNEL = bytes(range(32))
Ext = tuple[x509.ExtensionType, bool]


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    smartcard.reload()


def _intermediate_extensions(root: pki.CA, key: rsa.RSAPrivateKey) -> list[Ext]:
    return [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (pki._ca_key_usage(), True),
        (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), False),
        (pki._policies([pki.POLICY_PERSON_CARD]), False),
    ]


def login(
    tmp_path: Path,
    change: Callable[[list[Ext]], list[Ext]] = lambda exts: exts,
    *,
    root_bits: int = 2048,
    lax_root: bool = False,
    rsa_padding: padding.AsymmetricPadding | None = None,
) -> tuple[bool, str, dict[str, Any]]:
    """A person's login through a root and an intermediate built with ``change``."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    long_ago, far_ahead = now - 365 * DAY, now + 3650 * DAY
    root = pki.new_root("National Root CA", long_ago, far_ahead)
    if root_bits != 2048 or lax_root:  # the same root with a shorter key, or lax
        key = rsa.generate_private_key(public_exponent=65537, key_size=root_bits)
        builder = (
            x509.CertificateBuilder()
            .subject_name(root.name)
            .issuer_name(root.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(long_ago)
            .not_valid_after(far_ahead)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=not lax_root)
        )
        if not lax_root:
            builder = builder.add_extension(pki._ca_key_usage(), critical=True)
        root = pki.CA(key, builder.sign(key, hashes.SHA256()))
    ikey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    builder = (
        x509.CertificateBuilder()
        .subject_name(pki._ca_name("National Person High CA"))
        .issuer_name(root.name)
        .public_key(ikey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(long_ago)
        .not_valid_after(far_ahead)
    )
    for ext, critical in change(_intermediate_extensions(root, ikey)):
        builder = builder.add_extension(ext, critical=critical)
    inter = pki.CA(ikey, builder.sign(root.key, hashes.SHA256(), rsa_padding=rsa_padding))
    person_key = ec.generate_private_key(ec.SECP256R1())
    leaf = inter.issue_person(
        1, person_key, usage="auth", policy=pki.POLICY_PERSON_CARD,
        not_before=now - DAY, not_after=now + 365 * DAY,
    )  # fmt: skip

    def write(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)

    der = serialization.Encoding.DER
    table = {
        "trust_anchors": [write("root.pem", root.pem)],
        "intermediates": [write("inter.pem", inter.pem)],
        "crl_files": [
            write("root.crl", root.crl(now - DAY, now + DAY).public_bytes(der)),
            write("inter.crl", inter.crl(now - DAY, now + DAY).public_bytes(der)),
        ],
    }
    ctx = AuthContext("kari", CHANNEL, now.timestamp(), "192.0.2.7",
                      {"cert_serial": pki.person_id(1)}, table)  # fmt: skip
    verifier = SmartcardVerifier()
    challenge = verifier.begin(ctx)
    nonce = base64.urlsafe_b64decode(challenge.payload["nonce"] + "=")
    signature = person_key.sign(to_be_signed(nonce, CHANNEL), ec.ECDSA(hashes.SHA256()))
    response = {
        "certificate": b64e(leaf.der),
        "chain": [],
        "algorithm": "ecdsa-p256-sha256",
        "signature": b64e(signature),
    }
    outcome = verifier.complete(ctx, challenge.state, response)
    return outcome.ok, outcome.reason, dict(outcome.detail)


def critical(kind: type[x509.ExtensionType]) -> Callable[[list[Ext]], list[Ext]]:
    return lambda exts: [(e, c or isinstance(e, kind)) for e, c in exts]


def adding(ext: x509.ExtensionType, is_critical: bool) -> Callable[[list[Ext]], list[Ext]]:
    return lambda exts: [*exts, (ext, is_critical)]


def test_baseline_chain_is_accepted(tmp_path: Path) -> None:
    assert login(tmp_path)[:2] == (True, "ok")


# -- accepted: RFC 5280 allows them, and this verifier understands them -------------------


def test_critical_certificate_policies_on_a_ca(tmp_path: Path) -> None:
    # RFC 5280 4.2.1.4: the extension MAY be critical. The verifier processes the
    # policies itself (required_policy), so a CA marking them critical is accepted.
    assert login(tmp_path, critical(x509.CertificatePolicies))[:2] == (True, "ok")


def test_keyusage_not_critical_and_no_key_identifiers(tmp_path: Path) -> None:
    def plain(exts: list[Ext]) -> list[Ext]:
        keep = (x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier)
        return [(e, False if isinstance(e, x509.KeyUsage) else c) for e, c in exts
                if not isinstance(e, keep)]  # fmt: skip

    assert login(tmp_path, plain)[:2] == (True, "ok")


def test_any_extended_key_usage_on_a_ca(tmp_path: Path) -> None:
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])
    assert login(tmp_path, adding(eku, False))[:2] == (True, "ok")


# -- refused: Web PKI rules (or limits of cryptography) that RFC 5280 does not have ------


def refused(result: tuple[bool, str, dict[str, Any]], error: str) -> None:
    ok, reason, detail = result
    assert (ok, reason) == (False, "untrusted issuer")
    assert error in detail["error"], detail["error"]


def test_rsa_key_under_2048_bits(tmp_path: Path) -> None:
    refused(login(tmp_path, root_bits=1024), "RSA key is too weak")


def test_basic_constraints_not_critical_on_a_ca(tmp_path: Path) -> None:
    def lax(exts: list[Ext]) -> list[Ext]:
        return [(e, False if isinstance(e, x509.BasicConstraints) else c) for e, c in exts]

    refused(login(tmp_path, lax), "incorrect criticality")


def test_ca_extended_key_usage_without_client_auth(tmp_path: Path) -> None:
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION])
    refused(login(tmp_path, adding(eku, False)), "Neither EKU nor anyEKU could be found")


@pytest.mark.parametrize(
    "ext",
    [
        x509.PolicyConstraints(require_explicit_policy=0, inhibit_policy_mapping=None),
        x509.InhibitAnyPolicy(0),
        x509.UnrecognizedExtension(  # policyMappings {1.2.3.4 -> 1.2.3.6}
            ObjectIdentifier("2.5.29.33"), bytes.fromhex("300c300a06032a030406032a0306")
        ),
    ],
    ids=["policyConstraints", "inhibitAnyPolicy", "policyMappings"],
)
def test_critical_policy_processing_extensions_on_a_ca(
    tmp_path: Path, ext: x509.ExtensionType
) -> None:
    refused(login(tmp_path, adding(ext, True)), "unaccounted-for critical extensions")


def test_rsa_pss_signature_with_another_salt_length(tmp_path: Path) -> None:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=20)
    refused(login(tmp_path, rsa_padding=pss), "Forbidden signature algorithm")


def test_trust_anchor_is_held_to_the_ca_profile_too(tmp_path: Path) -> None:
    # RFC 5280 6.1.1 (d) takes the anchor's name and key as input; cryptography also
    # checks the anchor certificate's extensions (here: basicConstraints not critical,
    # no keyUsage).
    refused(login(tmp_path, lax_root=True), "incorrect criticality")
