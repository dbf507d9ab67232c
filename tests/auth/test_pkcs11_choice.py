"""The PKCS#11 prover's choice of certificate and its one-line refusals, without a token.

The prover end to end (SoftHSM2, OpenSC) is in tests/integration/test_pkcs11*.py.
"""

from __future__ import annotations

import base64
import datetime as dt

import pki
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from auth.base import AuthContext, ProverOptions, b64e
from auth.pkcs11 import Pkcs11Prover, Wanted
from auth.smartcard import SmartcardVerifier, make_prover
from relay.errors import AuthError, DeviceError


def wanted_for(card_pki: pki.CardPKI) -> Wanted:
    ctx = AuthContext("kari", bytes(32), card_pki.now.timestamp(), "192.0.2.7", None,
                      card_pki.settings())  # fmt: skip
    return Wanted.from_challenge(SmartcardVerifier().begin(ctx).payload)


def self_signed(**extensions: x509.ExtensionType) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    for ext in extensions.values():
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256())


def usage(**flags: bool) -> x509.KeyUsage:
    names = ["digital_signature", "content_commitment", "key_encipherment",
             "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign"]  # fmt: skip
    return x509.KeyUsage(**{n: flags.get(n, False) for n in names},
                         encipher_only=False, decipher_only=False)  # fmt: skip


def test_what_the_policy_accepts(card_pki: pki.CardPKI) -> None:
    wanted = wanted_for(card_pki)
    assert wanted.policy == x509.ObjectIdentifier(pki.POLICY_PERSON_CARD)
    card = card_pki.card(1)
    assert wanted.refusal(card.auth.cert) is None
    assert wanted.refusal(card.sign.cert) == "not for authentication"
    other_policy = card_pki.person(1, policy=pki.POLICY_PERSON_HSM)
    assert wanted.refusal(other_policy.cert) == f"without policy {pki.POLICY_PERSON_CARD}"
    assert wanted.refusal(card_pki.person(1, policy=None).cert) == (
        f"without policy {pki.POLICY_PERSON_CARD}"
    )
    # The issuer's name must be one the gateway trusts.
    assert wanted.refusal(self_signed(ku=usage(digital_signature=True))) == (
        f"without policy {pki.POLICY_PERSON_CARD}"
    )
    assert Wanted().refusal(self_signed(ku=usage(digital_signature=True))) is None
    assert Wanted(None, (b"\x30\x00",)).refusal(self_signed(ku=usage(digital_signature=True))) == (
        "from an issuer the gateway does not trust"
    )
    assert Wanted().refusal(self_signed()) == "not for authentication"
    ca = x509.BasicConstraints(ca=True, path_length=None)
    assert Wanted().refusal(self_signed(ku=usage(digital_signature=True), bc=ca)) == (
        "a CA certificate"
    )
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION])
    assert Wanted().refusal(self_signed(ku=usage(digital_signature=True), eku=eku)) == (
        "not for client authentication"
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"policy": "not an oid"},
        {"issuers": "x"},
        {"issuers": [5]},
        {"issuers": [b64e(b"n")] * 65},
    ],
)
def test_malformed_hints_are_refused(payload: dict[str, object]) -> None:
    with pytest.raises(AuthError, match="malformed smartcard challenge"):
        Wanted.from_challenge(payload)


def test_no_hints_accept_any_issuer(card_pki: pki.CardPKI) -> None:
    wanted = Wanted.from_challenge({"nonce": base64.urlsafe_b64encode(bytes(32)).decode()})
    assert wanted == Wanted()
    assert wanted.refusal(card_pki.untrusted(1).cert) is None


def test_make_prover_picks_pkcs11_by_module() -> None:
    def no_prompt(text: str, secret: bool) -> str:
        raise AssertionError(text)

    options = ProverOptions("kari", no_prompt, {"pkcs11_module": "/x.so", "cert_label": "A"})
    assert isinstance(make_prover(options), Pkcs11Prover)
    assert not isinstance(make_prover(ProverOptions("kari", no_prompt, {})), Pkcs11Prover)


def test_module_that_does_not_load_is_a_device_error() -> None:
    import asyncio

    def no_prompt(text: str, secret: bool) -> str:
        raise AssertionError(text)

    prover = Pkcs11Prover("/nonexistent/module.so", no_prompt)
    nonce = base64.urlsafe_b64encode(bytes(32)).decode().rstrip("=")
    with pytest.raises(DeviceError, match=r"^cannot load the PKCS#11 module /nonexistent/"):
        asyncio.run(prover.respond({"nonce": nonce}, bytes(32)))
    with pytest.raises(AuthError, match="malformed smartcard challenge"):
        asyncio.run(prover.respond({"nonce": "short"}, bytes(32)))
