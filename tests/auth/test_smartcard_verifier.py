"""The smartcard verifier on its own: no pcscd, no sockets, no sleeps.

Signatures are made here with the test keys the way the card makes them (PKCS#1 v1.5
over SHA-256 for RSA, DER ECDSA over the SHA-256 digest for P-256).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pki
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auth import registry, smartcard
from auth.base import AuthContext, Outcome, b64e
from auth.smartcard import FACTOR, SmartcardVerifier, to_be_signed

CHANNEL = bytes(range(32))
"""A fake RFC 9266 tls-exporter value."""
OTHER_CHANNEL = bytes(range(1, 33))

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    smartcard.reload()


def sign(issued: pki.Issued, message: bytes) -> tuple[str, bytes]:
    key = issued.key
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa-pkcs1-sha256", key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return "ecdsa-p256-sha256", key.sign(message, ec.ECDSA(hashes.SHA256()))


def context(
    card_pki: pki.CardPKI,
    settings_table: dict[str, Any],
    credential: dict[str, Any] | None,
    *,
    channel: bytes = CHANNEL,
    now: dt.datetime | None = None,
) -> AuthContext:
    return AuthContext(
        user="kari",
        channel_binding=channel,
        now=(now or card_pki.now).timestamp(),
        source="192.0.2.7",
        credential=credential,
        settings=settings_table,
    )


def login(
    card_pki: pki.CardPKI,
    cert: pki.Issued,
    *,
    person: int = 1,
    settings_table: dict[str, Any] | None = None,
    credential: dict[str, Any] | None = None,
    chain: list[x509.Certificate] | None = None,
    signer: pki.Issued | None = None,
    sign_channel: bytes = CHANNEL,
    verify_channel: bytes = CHANNEL,
    sign_nonce: bytes | None = None,
    algorithm: str | None = None,
) -> Outcome:
    """One begin/complete round with a prover that does what the card does."""
    table = settings_table if settings_table is not None else card_pki.settings()
    cred = credential if credential is not None else {"cert_serial": pki.person_id(person)}
    ctx = context(card_pki, table, cred, channel=verify_channel)
    verifier = SmartcardVerifier()
    challenge = verifier.begin(ctx)
    nonce = base64.urlsafe_b64decode(challenge.payload["nonce"] + "=")
    alg, signature = sign(signer or cert, to_be_signed(sign_nonce or nonce, sign_channel))
    response = {
        "certificate": b64e(cert.der),
        "chain": [b64e(c.public_bytes(serialization.Encoding.DER)) for c in chain or []],
        "algorithm": algorithm or alg,
        "signature": b64e(signature),
    }
    return verifier.complete(ctx, challenge.state, response)


KEY_TYPES = ["rsa", "ec"]


# -- the good path --------------------------------------------------------------------


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_good_certificate_is_accepted(card_pki: pki.CardPKI, key_type: pki.KeyType) -> None:
    card = card_pki.card(1, key_type)
    outcome = login(card_pki, card.auth, credential=card.credential)
    assert outcome.ok, outcome
    assert outcome.reason == "ok"
    assert outcome.detail["person"] == pki.person_id(1)
    assert outcome.detail["policy"] == pki.POLICY_PERSON_CARD
    assert "Nordmann Kari1" in outcome.detail["subject"]
    assert "Test Person High CA G1" in outcome.detail["issuer"]
    assert outcome.counter is None and outcome.rehash is None


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_intermediate_sent_by_the_client(card_pki: pki.CardPKI, key_type: pki.KeyType) -> None:
    table = card_pki.settings(configured_intermediates=False)
    cert = card_pki.person(1, key_type)
    assert login(card_pki, cert, settings_table=table, chain=[card_pki.intermediate.cert]).ok
    outcome = login(card_pki, cert, settings_table=table)
    assert outcome.reason == "untrusted issuer"


def test_challenge_format() -> None:
    verifier = SmartcardVerifier()
    ctx = AuthContext("kari", CHANNEL, 0.0, "192.0.2.7", None)
    a, b = verifier.begin(ctx), verifier.begin(ctx)
    assert set(a.payload) == {"nonce"}
    assert len(base64.urlsafe_b64decode(a.payload["nonce"] + "=")) == 32
    assert a.state == a.payload
    assert a.payload != b.payload


def test_to_be_signed_layout() -> None:
    nonce = bytes([0xAA]) * 32
    assert to_be_signed(nonce, b"\x01\x02") == b"gw-smartcard-v1\x00" + nonce + b"\x01\x02"
    with pytest.raises(ValueError):
        to_be_signed(b"short", CHANNEL)


def test_subject_field_setting(card_pki: pki.CardPKI) -> None:
    table = card_pki.settings(subject_field="commonName")
    cert = card_pki.person(1)
    assert login(
        card_pki, cert, settings_table=table, credential={"cert_serial": "Nordmann Kari1"}
    ).ok
    table = card_pki.settings(subject_field="2.5.4.5")
    assert login(card_pki, cert, settings_table=table).ok


def test_required_policy_setting(card_pki: pki.CardPKI) -> None:
    table = card_pki.settings(required_policy=pki.POLICY_PERSON_HSM)
    hsm = card_pki.person(1, policy=pki.POLICY_PERSON_HSM)
    assert login(card_pki, hsm, settings_table=table).ok
    assert login(card_pki, card_pki.person(1), settings_table=table).reason == "policy oid missing"


def test_pinned_issuer(card_pki: pki.CardPKI) -> None:
    cert = card_pki.person(1)
    issuer = cert.cert.issuer.rfc4514_string()
    good = {"cert_serial": pki.person_id(1), "issuer": issuer}
    assert login(card_pki, cert, credential=good).ok
    bad = {"cert_serial": pki.person_id(1), "issuer": "CN=Other CA,C=NO"}
    assert login(card_pki, cert, credential=bad).reason == "certificate of another person"


# -- certificate rejections -----------------------------------------------------------


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_expired(card_pki: pki.CardPKI, key_type: pki.KeyType) -> None:
    outcome = login(card_pki, card_pki.person(1, key_type, expired=True))
    assert (outcome.ok, outcome.reason) == (False, "certificate expired")
    assert "not_after" in outcome.detail


def test_not_yet_valid(card_pki: pki.CardPKI) -> None:
    outcome = login(card_pki, card_pki.person(1, not_yet_valid=True))
    assert outcome.reason == "certificate not yet valid"


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_revoked(card_pki: pki.CardPKI, key_type: pki.KeyType) -> None:
    cert = card_pki.person(1, key_type)
    card_pki.revoke(cert)
    outcome = login(card_pki, cert)
    assert (outcome.ok, outcome.reason) == (False, "certificate revoked")
    assert outcome.detail["revoked_serial"] == format(cert.cert.serial_number, "x")
    # The same person's next certificate is fine.
    assert login(card_pki, card_pki.person(1, key_type)).ok


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_stale_crl_fails_closed(card_pki: pki.CardPKI, key_type: pki.KeyType) -> None:
    cert = card_pki.person(1, key_type)
    outcome = login(card_pki, cert, settings_table=card_pki.settings(stale=True))
    assert (outcome.ok, outcome.reason) == (False, "crl stale")
    assert "Test Person High CA G1" in outcome.detail["crl_issuer"]
    assert outcome.detail["next_update"]


def test_stale_root_crl_fails_closed(card_pki: pki.CardPKI) -> None:
    outcome = login(card_pki, card_pki.person(1), settings_table=card_pki.settings(root_stale=True))
    assert outcome.reason == "crl stale"
    assert "Test Root CA G1" in outcome.detail["crl_issuer"]


def test_missing_crl_fails_closed(card_pki: pki.CardPKI) -> None:
    table = card_pki.settings()
    table["crl_files"] = [p for p in table["crl_files"] if p.endswith(".pem")]  # root's only
    outcome = login(card_pki, card_pki.person(1), settings_table=table)
    assert outcome.reason == "crl missing"
    assert "Test Person High CA G1" in outcome.detail["crl_issuer"]


def test_crl_from_the_rogue_ca_is_not_used(card_pki: pki.CardPKI) -> None:
    """A CRL with the right issuer name but the wrong signature counts as missing."""
    table = card_pki.settings()
    forged = card_pki.rogue_intermediate.crl(card_pki.now - pki.DAY, card_pki.now + pki.DAY)
    path = card_pki.files / "forged.crl.pem"
    path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    table["crl_files"] = [table["crl_files"][1], str(path)]
    assert login(card_pki, card_pki.person(1), settings_table=table).reason == "crl missing"


# -- partitioned, scoped, delta and indirect CRLs (RFC 5280 sections 5.2.4-5.2.5, 6.3.3) --

PART_1 = "http://crl.test/person-ca/part1.crl"
PART_2 = "http://crl.test/person-ca/part2.crl"


def _with_crl(
    card_pki: pki.CardPKI, name: str, *, newer: bool = True, **crl: Any
) -> dict[str, Any]:
    """The usual table (full CRLs of both CAs) plus one more CRL of the person CA."""
    table = card_pki.settings()
    hour = dt.timedelta(hours=1)
    this_update = card_pki.now - (hour / 2 if newer else 2 * hour)
    extra = card_pki.intermediate.crl(this_update, card_pki.now + pki.DAY, number=2, **crl)
    table["crl_files"].append(str(card_pki.write_crl(name, extra)))
    return table


@pytest.mark.parametrize("crl_dps", [None, [PART_1]], ids=["no-cdp", "cdp-part1"])
def test_newer_empty_partition_crl_does_not_clear_a_revoked_card(
    card_pki: pki.CardPKI, crl_dps: list[str] | None
) -> None:
    """The attack: the full CRL lists the card; a newer, empty CRL of another partition
    was added. It covers other certificates, not this one: still revoked."""
    cert = card_pki.person(1, crl_dps=crl_dps)
    card_pki.revoke(cert)
    table = _with_crl(card_pki, "part2.crl", idp=pki.partition(PART_2), listed=False)
    outcome = login(card_pki, cert, settings_table=table)
    assert (outcome.ok, outcome.reason) == (False, "certificate revoked")


def test_partition_crl_that_covers_the_card_counts(card_pki: pki.CardPKI) -> None:
    """A newer CRL of the card's own partition is authoritative for it, as is the full
    CRL: a card listed in either is revoked; a card listed in neither passes."""
    cert = card_pki.person(1, crl_dps=[PART_1])
    card_pki.revoke(cert)
    table = _with_crl(card_pki, "part1.crl", idp=pki.partition(PART_1), listed=False)
    assert login(card_pki, cert, settings_table=table).reason == "certificate revoked"
    table = _with_crl(card_pki, "part1.crl", idp=pki.partition(PART_1))
    assert login(card_pki, cert, settings_table=table).reason == "certificate revoked"
    good = card_pki.person(1, crl_dps=[PART_1])
    assert login(card_pki, good, settings_table=table).ok


def test_partition_crl_alone_covers_only_its_partition(card_pki: pki.CardPKI) -> None:
    """Without the full CRL: a card of partition 1 is checked by partition 1's CRL; a card
    without a distribution point, or of partition 2, has no CRL that covers it."""
    table = card_pki.settings()
    crl = card_pki.intermediate.crl(
        card_pki.now - pki.DAY, card_pki.now + pki.DAY, idp=pki.partition(PART_1)
    )
    table["crl_files"] = [table["crl_files"][1], str(card_pki.write_crl("part1.crl", crl))]
    assert login(card_pki, card_pki.person(1, crl_dps=[PART_1]), settings_table=table).ok
    for crl_dps in (None, [PART_2]):
        outcome = login(card_pki, card_pki.person(1, crl_dps=crl_dps), settings_table=table)
        assert outcome.reason == "crl missing"
        (why,) = outcome.detail["crls_not_used"]
        assert "a partition the certificate does not name" in why


@pytest.mark.parametrize(
    ("crl", "why"),
    [
        ({"idp": pki.partition(None, only_ca=True), "listed": False}, "only CA certificates"),
        ({"delta_of": 1, "listed": False}, "delta CRL"),
        ({"idp": pki.partition(None, indirect=True), "listed": False}, "indirect CRL"),
        (
            {
                "idp": pki.partition(None, reasons=frozenset({x509.ReasonFlags.superseded})),
                "listed": False,
            },
            "some reasons only",
        ),
    ],
    ids=["only-ca", "delta", "indirect", "some-reasons"],
)
def test_crl_of_another_scope_does_not_clear_a_revoked_card(
    card_pki: pki.CardPKI, crl: dict[str, Any], why: str
) -> None:
    cert = card_pki.person(1)
    card_pki.revoke(cert)
    table = _with_crl(card_pki, "scoped.crl", **crl)
    assert login(card_pki, cert, settings_table=table).reason == "certificate revoked"
    # Alone, it is no CRL for the card: missing, and the detail says why it was not used.
    table["crl_files"] = [table["crl_files"][1], table["crl_files"][2]]
    outcome = login(card_pki, card_pki.person(1), settings_table=table)
    assert outcome.reason == "crl missing"
    assert why in outcome.detail["crls_not_used"][0]


def test_only_user_certs_crl_covers_the_card(card_pki: pki.CardPKI) -> None:
    cert = card_pki.person(1)
    card_pki.revoke(cert)
    table = card_pki.settings()
    scoped = card_pki.intermediate.crl(
        card_pki.now - pki.DAY, card_pki.now + pki.DAY, idp=pki.partition(None, only_user=True)
    )
    table["crl_files"] = [table["crl_files"][1], str(card_pki.write_crl("users.crl", scoped))]
    assert login(card_pki, cert, settings_table=table).reason == "certificate revoked"
    assert login(card_pki, card_pki.person(1), settings_table=table).ok


def test_check_settings_names_crls_that_are_never_used(card_pki: pki.CardPKI) -> None:
    assert smartcard.check_settings(card_pki.settings()) is None
    table = _with_crl(card_pki, "delta.crl", delta_of=1)
    warning = smartcard.check_settings(table)
    assert warning == (
        f"auth.smartcard.crl_files: never used for revocation: {table['crl_files'][2]} (delta CRL)"
    )
    # A partition is used (for its own certificates): no warning.
    assert smartcard.check_settings(_with_crl(card_pki, "p.crl", idp=pki.partition(PART_1))) is None


def test_stale_full_crl_next_to_a_fresh_partition_fails_closed(card_pki: pki.CardPKI) -> None:
    table = card_pki.settings(stale=True)
    fresh = card_pki.intermediate.crl(
        card_pki.now - pki.DAY, card_pki.now + pki.DAY, idp=pki.partition(PART_1)
    )
    table["crl_files"].append(str(card_pki.write_crl("part1.crl", fresh)))
    outcome = login(card_pki, card_pki.person(1, crl_dps=[PART_1]), settings_table=table)
    assert outcome.reason == "crl stale"


@pytest.mark.parametrize(
    "policy",
    [pki.POLICY_PERSON_HSM, pki.POLICY_ENTERPRISE, pki.POLICY_ENTERPRISE_HSM, None],
    ids=["person-hsm-1.3.6", "enterprise-1.3.2", "enterprise-hsm-1.3.5", "no-policy"],
)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_wrong_policy(card_pki: pki.CardPKI, policy: str | None, key_type: pki.KeyType) -> None:
    outcome = login(card_pki, card_pki.person(1, key_type, policy=policy))
    assert (outcome.ok, outcome.reason) == (False, "policy oid missing")
    assert outcome.detail["required_policy"] == pki.POLICY_PERSON_CARD


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_untrusted_issuer(card_pki: pki.CardPKI, key_type: pki.KeyType) -> None:
    """A look-alike chain (same CA names, other keys) is refused, and audited by name."""
    forged = card_pki.untrusted(1, key_type)
    outcome = login(card_pki, forged, chain=[card_pki.rogue_intermediate.cert])
    assert (outcome.ok, outcome.reason) == (False, "untrusted issuer")
    assert outcome.detail["subject"] == forged.cert.subject.rfc4514_string()
    assert outcome.detail["issuer"] == forged.cert.issuer.rfc4514_string()
    assert outcome.detail["error"]


def test_self_signed_certificate(card_pki: pki.CardPKI) -> None:
    stranger = pki.new_root("Nordmann Kari1", card_pki.now - pki.DAY, card_pki.now + pki.DAY)
    me = pki.Issued(stranger.cert, stranger.key)
    outcome = login(card_pki, me)
    assert outcome.reason in {"not an authentication certificate", "untrusted issuer"}
    assert not outcome.ok


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_certificate_of_another_person(card_pki: pki.CardPKI, key_type: pki.KeyType) -> None:
    someone_else = card_pki.person(2, key_type)
    outcome = login(card_pki, someone_else, person=1)
    assert (outcome.ok, outcome.reason) == (False, "certificate of another person")
    assert outcome.detail["cert_value"] == pki.person_id(2)


def test_lookalike_subject_serial(card_pki: pki.CardPKI) -> None:
    cert = card_pki.person(1, subject_serial=pki.person_id(1) + "0")
    assert login(card_pki, cert).reason == "certificate of another person"


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_signing_certificate_is_not_for_authentication(
    card_pki: pki.CardPKI, key_type: pki.KeyType
) -> None:
    card = card_pki.card(1, key_type)
    outcome = login(card_pki, card.sign)
    assert (outcome.ok, outcome.reason) == (False, "not an authentication certificate")
    assert outcome.detail["key_usage"] == ["content_commitment"]


def test_not_enrolled(card_pki: pki.CardPKI) -> None:
    cert = card_pki.person(1)
    verifier = SmartcardVerifier()
    for credential in (None, {}, {"cert_serial": 42}):
        ctx = context(card_pki, card_pki.settings(), credential)
        outcome = verifier.complete(ctx, verifier.begin(ctx).state, {"certificate": b64e(cert.der)})
        assert outcome.reason == "not enrolled"


# -- signature rejections -------------------------------------------------------------


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_signature_by_another_key(card_pki: pki.CardPKI, key_type: pki.KeyType) -> None:
    cert = card_pki.person(1, key_type)
    thief = card_pki.person(2, key_type)  # a valid key, but not the certificate's
    outcome = login(card_pki, cert, signer=thief)
    assert (outcome.ok, outcome.reason) == (False, "bad signature")


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_signature_over_another_channel(card_pki: pki.CardPKI, key_type: pki.KeyType) -> None:
    """A proof made for one TLS connection does not pass on another."""
    cert = card_pki.person(1, key_type)
    outcome = login(card_pki, cert, sign_channel=OTHER_CHANNEL, verify_channel=CHANNEL)
    assert (outcome.ok, outcome.reason) == (False, "bad signature")


def test_signature_over_another_nonce(card_pki: pki.CardPKI) -> None:
    outcome = login(card_pki, card_pki.person(1), sign_nonce=b"\x00" * 32)
    assert outcome.reason == "bad signature"


@pytest.mark.parametrize(
    ("key_type", "algorithm"), [("rsa", "ecdsa-p256-sha256"), ("ec", "rsa-pkcs1-sha256")]
)
def test_algorithm_that_does_not_fit_the_key(
    card_pki: pki.CardPKI, key_type: pki.KeyType, algorithm: str
) -> None:
    outcome = login(card_pki, card_pki.person(1, key_type), algorithm=algorithm)
    assert outcome.reason == "bad signature"


# -- malformed input ------------------------------------------------------------------


def _good_response(card_pki: pki.CardPKI) -> dict[str, Any]:
    cert = card_pki.person(1)
    return {
        "certificate": b64e(cert.der),
        "chain": [],
        "algorithm": "rsa-pkcs1-sha256",
        "signature": b64e(b"\x01" * 256),
    }


MALFORMED: list[tuple[str, Any]] = [
    ("empty", {}),
    ("not-an-object", ["certificate"]),
    ("string", "hello"),
    ("none", None),
    ("certificate-missing", {"certificate": None}),
    ("certificate-not-base64", {"certificate": "%%%not base64%%%"}),
    ("certificate-not-der", {"certificate": b64e(b"\x30\x03\x02\x01\x01")}),
    ("certificate-number", {"certificate": 12345}),
    ("certificate-huge", {"certificate": b64e(b"\x30" * 100_000)}),
    ("chain-not-list", {"chain": "abc"}),
    ("chain-garbage", {"chain": ["@@"]}),
    ("chain-not-der", {"chain": [b64e(b"junk")]}),
    ("chain-too-long", {"chain": [b64e(b"x")] * 50}),
    ("signature-missing", {"signature": None}),
    ("signature-empty", {"signature": ""}),
    ("signature-huge", {"signature": b64e(b"\x00" * 5000)}),
    ("algorithm-unknown", {"algorithm": "rsa-pss-sha1"}),
    ("algorithm-missing", {"algorithm": None}),
]


@pytest.mark.parametrize(("patch"), [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_response_is_a_rejection(card_pki: pki.CardPKI, patch: Any) -> None:
    table = card_pki.settings()
    ctx = context(card_pki, table, {"cert_serial": pki.person_id(1)})
    verifier = SmartcardVerifier()
    state = verifier.begin(ctx).state
    if isinstance(patch, dict) and patch:
        response: Any = {**_good_response(card_pki), **patch}
    else:
        response = patch
    outcome = verifier.complete(ctx, state, response)
    assert (outcome.ok, outcome.reason) == (False, "malformed response")


def test_malformed_state_is_a_rejection(card_pki: pki.CardPKI) -> None:
    ctx = context(card_pki, card_pki.settings(), {"cert_serial": pki.person_id(1)})
    outcome = SmartcardVerifier().complete(ctx, {"nonce": "short"}, _good_response(card_pki))
    assert outcome.reason == "malformed state"


FUZZ_TABLE: dict[str, dict[str, Any]] = {}  # one settings table for all examples

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    certificate=st.one_of(_json, st.binary(max_size=300).map(b64e)),
    chain=_json,
    algorithm=st.sampled_from(["rsa-pkcs1-sha256", "ecdsa-p256-sha256", "x"]) | _json,
    signature=st.one_of(_json, st.binary(max_size=300).map(b64e)),
)
def test_fuzzed_responses_never_raise(
    card_pki: pki.CardPKI, certificate: Any, chain: Any, algorithm: Any, signature: Any
) -> None:
    ctx = context(
        card_pki, FUZZ_TABLE.setdefault("t", card_pki.settings()), {"cert_serial": pki.person_id(1)}
    )
    response = {
        "certificate": certificate,
        "chain": chain,
        "algorithm": algorithm,
        "signature": signature,
    }
    outcome = SmartcardVerifier().complete(ctx, SmartcardVerifier().begin(ctx).state, response)
    assert not outcome.ok
    assert outcome.reason in {
        "malformed response",
        "untrusted issuer",
        "certificate expired",
        "not an authentication certificate",
    }


# -- settings ---------------------------------------------------------------------------


def test_settings_problems_fail_closed(card_pki: pki.CardPKI, tmp_path: Path) -> None:
    cert = card_pki.person(1)
    good = card_pki.settings()
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate")
    for table in (
        {**good, "trust_anchors": []},
        {**good, "trust_anchors": "root.pem"},
        {**good, "trust_anchors": [str(tmp_path / "missing.pem")]},
        {**good, "trust_anchors": [str(broken)]},
        {**good, "crl_files": []},
        {**good, "crl_files": [str(broken)]},
        {**good, "required_policy": "not an oid"},
        {**good, "subject_field": "shoeSize"},
    ):
        outcome = login(card_pki, cert, settings_table=table)
        assert (outcome.ok, outcome.reason) == (False, "settings invalid"), table
        assert outcome.detail["error"].startswith("auth.smartcard.")


def test_load_settings_reports_the_key(card_pki: pki.CardPKI) -> None:
    from relay.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        smartcard.load_settings({**card_pki.settings(), "crl_files": None})
    assert err.value.key == "auth.smartcard.crl_files"
    parsed = smartcard.load_settings(card_pki.settings())
    assert parsed.required_policy.dotted_string == "2.16.578.1.26.1.3.1"
    assert parsed.subject_field.dotted_string == "2.5.4.5"
    assert len(parsed.crls) == 2


def test_new_crl_file_is_picked_up(card_pki: pki.CardPKI) -> None:
    """The cache is keyed by mtimes: a replaced CRL counts at the next login."""
    table = card_pki.settings()
    cert = card_pki.person(1)
    assert login(card_pki, cert, settings_table=table).ok
    card_pki.revoke(cert)
    paths = card_pki.write_crls()  # same file names, in place
    assert [str(p) for p in paths] == table["crl_files"]
    later = os.stat(paths[0]).st_mtime_ns + 10_000_000_000
    os.utime(paths[0], ns=(later, later))
    assert login(card_pki, cert, settings_table=table).reason == "certificate revoked"


def test_reload_rereads_files(card_pki: pki.CardPKI) -> None:
    table = card_pki.settings()
    cert = card_pki.person(1)
    assert login(card_pki, cert, settings_table=table).ok
    # Replace the CRL with a stale one but keep mtime and size: only reload() sees it.
    path = Path(table["crl_files"][0])
    before = path.stat()
    stale = card_pki.intermediate.crl(card_pki.now - 8 * pki.DAY, card_pki.now - pki.DAY)
    path.write_bytes(stale.public_bytes(serialization.Encoding.DER))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    if path.stat().st_size == before.st_size:  # same stamp: the cache still answers
        assert login(card_pki, cert, settings_table=table).ok
    smartcard.reload()
    assert login(card_pki, cert, settings_table=table).reason == "crl stale"


# -- registration -----------------------------------------------------------------------


def test_factor_is_registered() -> None:
    assert registry.get("smartcard") is FACTOR
    assert FACTOR.name == "smartcard"
    assert FACTOR.verifier().name == "smartcard"


def test_import_does_not_need_pyscard() -> None:
    code = (
        "import sys; sys.modules['smartcard'] = None; sys.modules['smartcard.scard'] = None\n"
        "import auth.smartcard as m\n"
        "assert m.FACTOR.name == 'smartcard'\n"
        "from auth.base import ProverOptions\n"
        "p = m.FACTOR.prover(ProverOptions('kari', lambda t, s: ''))\n"
        "import asyncio\n"
        "try:\n"
        "    asyncio.run(p.respond({'nonce': 'A' * 43}, b'x' * 32))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("DeviceError ")  # an AuthError: gw exits 4
    assert "pip install 'gatewayd[smartcard]'" in result.stdout
    assert "libpcsclite" in result.stdout


# -- RSA-PSS and the challenge's hints (PKCS#11 tokens) -------------------------------


def _pss_login(card_pki: pki.CardPKI, issued: pki.Issued, algorithm: str, salt: int) -> Outcome:
    ctx = context(card_pki, card_pki.settings(), {"cert_serial": pki.person_id(1)})
    verifier = SmartcardVerifier()
    challenge = verifier.begin(ctx)
    nonce = base64.urlsafe_b64decode(challenge.payload["nonce"] + "=")
    key = issued.key
    assert isinstance(key, rsa.RSAPrivateKey)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt)
    signature = key.sign(to_be_signed(nonce, CHANNEL), pss, hashes.SHA256())
    response = {
        "certificate": b64e(issued.der),
        "chain": [],
        "algorithm": algorithm,
        "signature": b64e(signature),
    }
    return verifier.complete(ctx, challenge.state, response)


def test_rsa_pss_signature(card_pki: pki.CardPKI) -> None:
    cert = card_pki.person(1, "rsa")
    outcome = _pss_login(card_pki, cert, "rsa-pss-sha256", 32)
    assert outcome.ok and outcome.detail["algorithm"] == "rsa-pss-sha256"
    # A PSS signature named as PKCS#1 v1.5, or with another salt length, is refused.
    assert _pss_login(card_pki, cert, "rsa-pkcs1-sha256", 32).reason == "bad signature"
    assert _pss_login(card_pki, cert, "rsa-pss-sha256", 20).reason == "bad signature"
    # PSS does not fit an EC key.
    ec_cert = card_pki.person(1, "ec")
    outcome = login(card_pki, ec_cert, algorithm="rsa-pss-sha256")
    assert outcome.reason == "bad signature"
    assert outcome.detail["error"] == "algorithm does not fit a P-256 key"


def test_challenge_names_the_policy_and_the_trusted_cas(card_pki: pki.CardPKI) -> None:
    ctx = context(card_pki, card_pki.settings(), None)
    challenge = SmartcardVerifier().begin(ctx)
    assert challenge.payload["policy"] == pki.POLICY_PERSON_CARD
    names = {base64.urlsafe_b64decode(n + "==") for n in challenge.payload["issuers"]}
    assert names == {card_pki.root.name.public_bytes(), card_pki.intermediate.name.public_bytes()}
    assert set(challenge.state) == {"nonce"}
