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

from auth import pathvalidation, smartcard
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
    path_validation: str = "webpki",
    inter_not_after: dt.datetime | None = None,
    tamper: bool = False,
    leaf_policy: str = pki.POLICY_PERSON_CARD,
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
        .not_valid_after(inter_not_after or far_ahead)
    )
    for ext, critical in change(_intermediate_extensions(root, ikey)):
        builder = builder.add_extension(ext, critical=critical)
    inter = pki.CA(ikey, builder.sign(root.key, hashes.SHA256(), rsa_padding=rsa_padding))
    if tamper:  # the last byte of the intermediate's signature flipped
        der = bytearray(inter.cert.public_bytes(serialization.Encoding.DER))
        der[-1] ^= 1
        inter = pki.CA(ikey, x509.load_der_x509_certificate(bytes(der)))
    person_key = ec.generate_private_key(ec.SECP256R1())
    leaf = inter.issue_person(
        1, person_key, usage="auth", policy=leaf_policy,
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
        "path_validation": path_validation,
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


# -- path_validation = "rfc5280": the same chains under RFC 5280 section 6.1 -------------

RFC5280 = {"path_validation": "rfc5280"}
MAPPING_OID = ObjectIdentifier("2.5.29.33")


def policy_mappings(issuer_domain: str, subject_domain: str) -> x509.UnrecognizedExtension:
    """policyMappings with one pair (cryptography has no class for it)."""

    def oid_der(dotted: str) -> bytes:
        parts = [int(p) for p in dotted.split(".")]
        body = bytearray([40 * parts[0] + parts[1]])
        for part in parts[2:]:
            chunk = [part & 0x7F]
            while part > 0x7F:
                part >>= 7
                chunk.append(0x80 | (part & 0x7F))
            body += bytes(reversed(chunk))
        return bytes([6, len(body)]) + body

    pair = oid_der(issuer_domain) + oid_der(subject_domain)
    inner = bytes([0x30, len(pair)]) + pair
    return x509.UnrecognizedExtension(MAPPING_OID, bytes([0x30, len(inner)]) + inner)


def test_rfc5280_mode_accepts_the_baseline_chain(tmp_path: Path) -> None:
    ok, reason, detail = login(tmp_path, **RFC5280)
    assert (ok, reason) == (True, "ok"), detail


@pytest.mark.parametrize(
    ("change", "kw"),
    [
        (lambda exts: exts, {"root_bits": 1024}),
        (
            lambda exts: [
                (e, False if isinstance(e, x509.BasicConstraints) else c) for e, c in exts
            ],
            {},
        ),
        (adding(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False), {}),
        (
            adding(
                x509.PolicyConstraints(require_explicit_policy=0, inhibit_policy_mapping=None),
                True,
            ),
            {},
        ),
        (adding(x509.InhibitAnyPolicy(0), True), {}),
        (adding(policy_mappings("1.2.3.4", "1.2.3.6"), True), {}),
        (
            lambda exts: exts,
            {"rsa_padding": padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=20)},
        ),
        (lambda exts: exts, {"lax_root": True}),
    ],
    ids=[
        "rsa-1024-root",
        "basicConstraints-not-critical",
        "eku-without-clientAuth",
        "policyConstraints-critical",
        "inhibitAnyPolicy-critical",
        "policyMappings-critical",
        "rsa-pss-salt-20",
        "lax-trust-anchor",
    ],
)
def test_rfc5280_mode_accepts_what_webpki_refuses(
    tmp_path: Path, change: Callable[[list[Ext]], list[Ext]], kw: dict[str, Any]
) -> None:
    webpki = login(tmp_path, change, **kw)
    assert webpki[:2] == (False, "untrusted issuer"), webpki
    ok, reason, detail = login(tmp_path, change, **kw, **RFC5280)
    assert (ok, reason) == (True, "ok"), detail


@pytest.mark.parametrize("mode", ["webpki", "rfc5280"])
def test_broken_ca_signature_is_refused_in_both_modes(tmp_path: Path, mode: str) -> None:
    ok, reason, _ = login(tmp_path, tamper=True, path_validation=mode)
    assert (ok, reason) == (False, "untrusted issuer")


@pytest.mark.parametrize("mode", ["webpki", "rfc5280"])
def test_expired_ca_is_refused_in_both_modes(tmp_path: Path, mode: str) -> None:
    expired = dt.datetime.now(dt.UTC) - DAY
    ok, reason, _ = login(tmp_path, inter_not_after=expired, path_validation=mode)
    assert (ok, reason) == (False, "untrusted issuer")


@pytest.mark.parametrize("mode", ["webpki", "rfc5280"])
def test_wrong_leaf_policy_is_refused_in_both_modes(tmp_path: Path, mode: str) -> None:
    ok, reason, _ = login(tmp_path, leaf_policy=pki.POLICY_PERSON_HSM, path_validation=mode)
    assert (ok, reason) == (False, "policy oid missing")


def test_rfc5280_mode_refuses_a_ca_that_does_not_allow_the_policy(tmp_path: Path) -> None:
    def other_policy(exts: list[Ext]) -> list[Ext]:
        return [
            (pki._policies(["1.2.3.4"]), c) if isinstance(e, x509.CertificatePolicies) else (e, c)
            for e, c in exts
        ]

    for mode in ("webpki", "rfc5280"):
        ok, reason, _ = login(tmp_path, other_policy, path_validation=mode)
        assert (ok, reason) == (False, "policy oid missing"), mode


def test_rfc5280_mode_refuses_a_mapping_away_from_the_required_policy(tmp_path: Path) -> None:
    # The intermediate maps the required policy to another one, and the person's
    # certificate carries the required policy itself: in the mapped domain it means
    # something else, so the path is not valid for the required policy.
    mapping = policy_mappings(pki.POLICY_PERSON_CARD, "1.2.3.6")
    ok, reason, detail = login(tmp_path, adding(mapping, False), **RFC5280)
    assert (ok, reason) == (False, "policy oid missing"), detail


@pytest.mark.parametrize("mode", ["webpki", "rfc5280"])
def test_a_ca_without_ca_flag_is_refused_in_both_modes(tmp_path: Path, mode: str) -> None:
    def not_a_ca(exts: list[Ext]) -> list[Ext]:
        return [
            (x509.BasicConstraints(ca=False, path_length=None), c)
            if isinstance(e, x509.BasicConstraints)
            else (e, c)
            for e, c in exts
        ]

    ok, reason, _ = login(tmp_path, not_a_ca, path_validation=mode)
    assert (ok, reason) == (False, "untrusted issuer")


def test_rfc5280_mode_without_pyhanko_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pathvalidation, "available", lambda: "needs pyhanko-certvalidator")
    ok, reason, detail = login(tmp_path, **RFC5280)
    assert (ok, reason) == (False, "settings invalid")
    assert "auth.smartcard.path_validation" in detail["error"]
    assert "pyhanko-certvalidator" in detail["error"]
