"""The smartcard verifier asking a real OCSP responder on loopback (auth/ocsp.py).

The responder (tests/support/ocsp_responder.py) is an HTTP server thread answering with
responses built by cryptography's OCSPResponseBuilder for the test PKI's CAs; here it
also misbehaves in each way the verifier must refuse. No sleeps: the verifier's clock is
the test PKI's.
"""

from __future__ import annotations

import base64
import datetime as dt
import socket
from collections.abc import Iterator
from typing import Any

import ocsp_responder
import pki
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from auth import smartcard
from auth.base import AuthContext, Outcome, b64e
from auth.smartcard import SmartcardVerifier, to_be_signed
from relay.errors import ConfigError

CHANNEL = bytes(range(32))


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    smartcard.reload()


@pytest.fixture(scope="module")
def responder(card_pki: pki.CardPKI) -> Iterator[ocsp_responder.OcspResponder]:
    with ocsp_responder.running([card_pki.root, card_pki.intermediate]) as running:
        yield running


@pytest.fixture(autouse=True)
def _normal(responder: ocsp_responder.OcspResponder) -> None:
    responder.behaviour = "normal"
    responder.signer = None


def login(card_pki: pki.CardPKI, cert: pki.Issued, table: dict[str, Any], person: int) -> Outcome:
    ctx = AuthContext("kari", CHANNEL, card_pki.now.timestamp(), "192.0.2.7",
                      {"cert_serial": pki.person_id(person)}, table)  # fmt: skip
    verifier = SmartcardVerifier()
    challenge = verifier.begin(ctx)
    nonce = base64.urlsafe_b64decode(challenge.payload["nonce"] + "=")
    key: Any = cert.key
    signature = key.sign(to_be_signed(nonce, CHANNEL), padding.PKCS1v15(), hashes.SHA256())
    response = {
        "certificate": b64e(cert.der),
        "chain": [],
        "algorithm": "rsa-pkcs1-sha256",
        "signature": b64e(signature),
    }
    return verifier.complete(ctx, challenge.state, response)


def ocsp_table(
    card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder, **extra: Any
) -> dict[str, Any]:
    extra.setdefault("revocation", "ocsp")
    extra.setdefault("ocsp_url", responder.url)
    return card_pki.settings(crls=extra["revocation"] != "ocsp", **extra)


# -- proven answers -------------------------------------------------------------------------


def test_good(card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder) -> None:
    before = responder.requests
    outcome = login(card_pki, card_pki.person(301), ocsp_table(card_pki, responder), 301)
    assert (outcome.ok, outcome.reason) == (True, "ok"), outcome
    assert outcome.detail["revocation"] == ["ocsp", "ocsp"]  # the person's and the CA's
    assert responder.requests == before + 2


def test_revoked(card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder) -> None:
    cert = card_pki.person(302)
    card_pki.revoke(cert)
    outcome = login(card_pki, cert, ocsp_table(card_pki, responder), 302)
    assert (outcome.ok, outcome.reason) == (False, "certificate revoked")
    assert outcome.detail["revoked_by"] == "ocsp"
    assert outcome.detail["revoked_serial"] == format(cert.cert.serial_number, "x")


def test_revoked_intermediate(card_pki: pki.CardPKI) -> None:
    # Its own PKI: revoking the session PKI's intermediate would fail every other test.
    import tempfile
    from pathlib import Path

    other = pki.CardPKI(Path(tempfile.mkdtemp(prefix="ocsp-pki-")))
    other.root.revoke(other.intermediate.cert, other.now - dt.timedelta(days=1))
    with ocsp_responder.running([other.root, other.intermediate]) as running:
        outcome = login(other, other.person(1), ocsp_table(other, running), 1)
    assert (outcome.ok, outcome.reason) == (False, "certificate revoked")
    assert "Test Person High CA G1" in outcome.detail["revoked"]


def test_unknown(card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder) -> None:
    cert = card_pki.person(303)
    responder.unknown.add(cert.cert.serial_number)
    outcome = login(card_pki, cert, ocsp_table(card_pki, responder), 303)
    assert (outcome.ok, outcome.reason) == (False, "ocsp unknown")
    assert outcome.detail["ocsp_url"] == responder.url


def test_delegated_responder(
    card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder
) -> None:
    # Only the intermediate's answers come from the delegate: the root's are refused
    # (the delegate is not the root's), so the root's certificate uses its CRL.
    responder.signer = ocsp_responder.delegated_responder(card_pki.intermediate)
    table = ocsp_table(card_pki, responder, revocation="ocsp-then-crl")
    outcome = login(card_pki, card_pki.person(304), table, 304)
    assert (outcome.ok, outcome.reason) == (True, "ok"), outcome
    assert outcome.detail["revocation"] == ["ocsp", "crl"]
    assert "not issued by the CA" in outcome.detail["ocsp_not_used"][0]


def test_delegated_responder_without_ocsp_signing(
    card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder
) -> None:
    responder.signer = ocsp_responder.delegated_responder(card_pki.intermediate, ocsp_signing=False)
    outcome = login(card_pki, card_pki.person(305), ocsp_table(card_pki, responder), 305)
    assert (outcome.ok, outcome.reason) == (False, "ocsp invalid")
    assert "OCSPSigning" in outcome.detail["ocsp_error"]


def test_delegate_of_another_ca(
    card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder
) -> None:
    responder.signer = ocsp_responder.delegated_responder(card_pki.rogue_intermediate)
    outcome = login(card_pki, card_pki.person(306), ocsp_table(card_pki, responder), 306)
    assert (outcome.ok, outcome.reason) == (False, "ocsp invalid")
    assert "not issued by the CA" in outcome.detail["ocsp_error"]


# -- no proven answer: refused (fail closed) -------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "reason", "error"),
    [
        ("wrong key", "ocsp invalid", "signature does not verify"),
        ("other certificate", "ocsp invalid", "another certificate"),
        ("stale", "ocsp stale", "nextUpdate"),
        ("future", "ocsp stale", "in the future"),
        ("try later", "ocsp unavailable", "TRY_LATER"),
        ("garbage", "ocsp unavailable", "not DER OCSP"),
        ("http 500", "ocsp unavailable", "HTTP 500"),
        ("redirect", "ocsp unavailable", "HTTP 302"),
    ],
)
def test_bad_answers_are_refused(
    card_pki: pki.CardPKI,
    responder: ocsp_responder.OcspResponder,
    behaviour: str,
    reason: str,
    error: str,
) -> None:
    responder.behaviour = behaviour
    outcome = login(card_pki, card_pki.person(310), ocsp_table(card_pki, responder), 310)
    assert (outcome.ok, outcome.reason) == (False, reason), outcome
    assert error in outcome.detail["ocsp_error"]


def test_responder_down(card_pki: pki.CardPKI) -> None:
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}/ocsp"
        table = card_pki.settings(crls=False, revocation="ocsp", ocsp_url=url, ocsp_timeout=2)
        outcome = login(card_pki, card_pki.person(311), table, 311)
    assert (outcome.ok, outcome.reason) == (False, "ocsp unavailable")
    assert "unreachable" in outcome.detail["ocsp_error"]


def test_responder_that_does_not_answer(
    card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder
) -> None:
    responder.behaviour = "silent"
    responder.release.clear()
    try:
        table = ocsp_table(card_pki, responder, ocsp_timeout=0.2)
        outcome = login(card_pki, card_pki.person(314), table, 314)
    finally:
        responder.release.set()
    assert (outcome.ok, outcome.reason) == (False, "ocsp unavailable")
    assert "timed out" in outcome.detail["ocsp_error"]


def test_no_responder_named(card_pki: pki.CardPKI) -> None:
    # The test PKI's certificates carry no AuthorityInfoAccess, and no URL is configured.
    table = card_pki.settings(crls=False, revocation="ocsp")
    outcome = login(card_pki, card_pki.person(312), table, 312)
    assert (outcome.ok, outcome.reason) == (False, "ocsp unavailable")
    assert outcome.detail["ocsp_error"] == "the certificate names no OCSP responder"


def test_responder_from_the_certificates_aia(
    card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder
) -> None:
    ca = card_pki.intermediate
    key = card_pki.key(313, "auth", "rsa")
    base = card_pki.person(313).cert
    builder = ca._builder(base.subject, key.public_key(), base.not_valid_before_utc,
                          base.not_valid_after_utc)  # fmt: skip
    for ext in base.extensions:
        if not isinstance(ext.value, x509.SubjectKeyIdentifier | x509.AuthorityKeyIdentifier):
            builder = builder.add_extension(ext.value, ext.critical)
    aia = x509.AuthorityInformationAccess(
        [x509.AccessDescription(x509.AuthorityInformationAccessOID.OCSP,
                                x509.UniformResourceIdentifier(responder.url))]
    )  # fmt: skip
    cert = pki.Issued(builder.add_extension(aia, False).sign(ca.key, hashes.SHA256()), key)
    table = card_pki.settings(revocation="ocsp-then-crl")
    before = responder.requests
    outcome = login(card_pki, cert, table, 313)
    assert (outcome.ok, outcome.reason) == (True, "ok"), outcome
    # The person's certificate by OCSP at its AIA; the intermediate names no responder.
    assert outcome.detail["revocation"] == ["ocsp", "crl"]
    assert responder.requests == before + 1


# -- ocsp-then-crl, nonce, cache --------------------------------------------------------------


def test_fallback_to_crl_still_fails_closed(
    card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder
) -> None:
    cert = card_pki.person(320)
    card_pki.revoke(cert)
    responder.behaviour = "http 500"
    table = ocsp_table(card_pki, responder, revocation="ocsp-then-crl")
    outcome = login(card_pki, cert, table, 320)
    assert (outcome.ok, outcome.reason) == (False, "certificate revoked")  # by the CRL
    assert "HTTP 500" in outcome.detail["ocsp_not_used"][0]
    stale = ocsp_table(card_pki, responder, revocation="ocsp-then-crl", stale=True)
    outcome = login(card_pki, card_pki.person(321), stale, 321)
    assert (outcome.ok, outcome.reason) == (False, "crl stale")


def test_ocsp_revoked_wins_over_a_crl_that_does_not_list_it_yet(
    card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder
) -> None:
    cert = card_pki.person(322)
    table = ocsp_table(card_pki, responder, revocation="ocsp-then-crl")  # CRL written now
    card_pki.revoke(cert)  # revoked after the CRL was issued: only OCSP knows
    outcome = login(card_pki, cert, table, 322)
    assert (outcome.ok, outcome.reason) == (False, "certificate revoked")
    assert outcome.detail["revoked_by"] == "ocsp"


def test_nonce(card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder) -> None:
    table = ocsp_table(card_pki, responder, ocsp_nonce=True)
    assert login(card_pki, card_pki.person(330), table, 330).ok
    before = responder.requests
    assert login(card_pki, card_pki.person(330), table, 330).ok
    assert responder.requests == before + 2  # never from the cache
    responder.behaviour = "no echo"
    outcome = login(card_pki, card_pki.person(331), table, 331)
    assert (outcome.ok, outcome.reason) == (False, "ocsp invalid")
    assert "nonce" in outcome.detail["ocsp_error"]


def test_cache(card_pki: pki.CardPKI, responder: ocsp_responder.OcspResponder) -> None:
    cert = card_pki.person(340)
    table = ocsp_table(card_pki, responder, ocsp_cache_seconds=600)
    assert login(card_pki, cert, table, 340).ok
    before = responder.requests
    responder.behaviour = "http 500"  # cached answers need no responder
    outcome = login(card_pki, cert, table, 340)
    assert outcome.ok, outcome
    assert outcome.detail["revocation"] == ["ocsp (cached)", "ocsp (cached)"]
    assert responder.requests == before
    smartcard.reload()  # SIGHUP forgets them
    assert login(card_pki, cert, table, 340).reason == "ocsp unavailable"
    no_cache = ocsp_table(card_pki, responder, ocsp_cache_seconds=0)
    responder.behaviour = "normal"
    assert login(card_pki, cert, no_cache, 340).ok
    assert login(card_pki, cert, no_cache, 340).detail["revocation"] == ["ocsp", "ocsp"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("revocation", "ocsp-only"),
        ("ocsp_url", "https://ocsp.example/"),
        ("ocsp_url", "file:///etc/passwd"),
        ("ocsp_timeout", 0),
        ("ocsp_timeout", "5"),
        ("ocsp_cache_seconds", -1),
        ("ocsp_nonce", "yes"),
        ("path_validation", "strict"),
        ("revocaton", "ocsp"),
    ],
)
def test_bad_settings(card_pki: pki.CardPKI, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"auth.smartcard.{key}"):
        smartcard.load_settings(card_pki.settings(**{key: value}))


def test_crl_files_optional_with_ocsp_only(card_pki: pki.CardPKI) -> None:
    smartcard.load_settings(card_pki.settings(crls=False, revocation="ocsp"))
    with pytest.raises(ConfigError, match="crl_files"):
        smartcard.load_settings(card_pki.settings(crls=False, revocation="ocsp-then-crl"))
