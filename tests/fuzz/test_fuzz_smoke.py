"""The fuzz harnesses in CI: the kept corpus replayed, then a short Hypothesis run each.

``make fuzz`` (tests/fuzz/run.py, atheris) searches for hours if asked; this runs in
seconds on every ``make test`` and needs no atheris. Every input of
``tests/fuzz/corpus/<target>/`` goes through its harness (the seeds, what the
coverage-guided runs kept, and the inputs of past findings), then Hypothesis feeds
each harness random bytes and mutations of the corpus. A harness fails when the
parser raises anything it does not document (see fuzz_targets.py).

The tests after that pin the findings one by one, by name.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE.parent / "support"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import fuzz_targets as ft  # noqa: E402

#: Examples per target in the smoke: the slower harnesses get fewer.
EXAMPLES = {"admin": 150, "config": 150, "piv_card": 200, "smartcard_crl": 150}


@pytest.fixture(scope="module", autouse=True)
def _release() -> Iterator[None]:
    yield
    ft.close()


def corpus(name: str) -> list[bytes]:
    folder = ft.CORPUS / name
    return [p.read_bytes() for p in sorted(folder.iterdir())] if folder.is_dir() else []


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A corpus input with a few byte-level edits (flip, insert, delete, cut, splice)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "cut", "splice"]))
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "cut":
            del data[pos:]
        elif kind == "splice":
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(other)))
            data[pos:] = other[start:]
    return bytes(data)


def test_every_target_has_a_corpus() -> None:
    assert set(ft.TARGETS) <= {p.name for p in ft.CORPUS.iterdir()}
    for name in ft.TARGETS:
        assert any(p.name.startswith("seed-") for p in (ft.CORPUS / name).iterdir()), name


@pytest.mark.parametrize("name", sorted(ft.TARGETS))
def test_seeds_are_accepted(name: str) -> None:
    """The harnesses are not vacuous: a valid input of each kind gets all the way through."""
    harness = ft.TARGETS[name]
    seeds = [p for p in sorted((ft.CORPUS / name).iterdir()) if p.name.startswith("seed-")]
    assert any(harness(p.read_bytes()) for p in seeds), f"no seed of {name} is accepted"


@pytest.mark.parametrize("name", sorted(ft.TARGETS))
def test_kept_corpus(name: str) -> None:
    harness = ft.TARGETS[name]
    for data in corpus(name):
        harness(data)


@pytest.mark.parametrize("name", sorted(ft.TARGETS))
def test_fuzz_smoke(name: str) -> None:
    seeds = corpus(name)
    harness = ft.TARGETS[name]

    @settings(
        max_examples=EXAMPLES.get(name, 300),
        deadline=None,
        derandomize=True,  # the same examples on every CI run; make fuzz explores
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.one_of(st.binary(max_size=512), mutated(seeds)))
    def run(data: bytes) -> None:
        harness(data)

    run()


# -- findings, one test each ---------------------------------------------------------------


def test_fields_round_trip() -> None:
    assert ft.fields(ft.pack(b"a", b"", b"ccc"), 3) == [b"a", b"", b"ccc"]
    assert ft.fields(b"\x00", 3) == [b"", b"", b""]


def regression(name: str, label: str) -> bytes:
    return (ft.CORPUS / name / f"crash-{label}").read_bytes()


def test_fido2_login_cose_key_not_a_map_is_a_malformed_response() -> None:
    """authenticatorData with attested credential data whose COSE key is an integer.

    python-fido2 raised AttributeError, which only the verifier's catch-all stopped.
    """
    import auth.fido2 as f2

    data = regression("fido2_login", "cose-key-not-a-map")
    _, client_data, auth_data, _ = ft.fields(data[1:], 4)
    fx = ft._fido2()
    settings = f2.parse_settings(fx["settings"])
    response = {
        "credential_id": fx["login_response"]["credential_id"],
        "client_data_json": ft.b64e(client_data),
        "authenticator_data": ft.b64e(auth_data),
        "signature": ft.b64e(b"sig"),
    }
    with pytest.raises(f2._Rejected) as info:
        f2.Fido2Verifier()._check(ft._fido2_ctx(fx), settings, fx["state"], response)
    assert info.value.reason == "malformed response"
    assert info.value.detail["error"] == "authenticatorData: AttributeError"


def test_piv_card_certificate_with_unreadable_key_is_an_auth_error() -> None:
    """A card whose certificate parses but whose public key does not: gw said ValueError."""
    from auth import smartcard as sc
    from relay.errors import AuthError

    card = sc.PivCard(ft.ScriptedPort(regression("piv_card", "unreadable-public-key")))
    cert = sc.SmartcardProver._load_certificate(sc.SmartcardProver._read_certificate(card))
    with pytest.raises(AuthError, match="unreadable public key"):
        sc.sign_with_card(card, cert, b"message")


def test_smartcard_certificate_with_unparseable_issuer_is_a_malformed_response() -> None:
    """A client's certificate whose issuer name does not parse (lazily, in cryptography).

    It was a "verification error" from the catch-all, without the certificate's details.
    """
    from auth import smartcard as sc

    data = regression("smartcard_response", "unparseable-issuer")
    leaf, _, _, signature = ft.fields(data[1:], 4)
    response = {"certificate": ft.b64e(leaf), "algorithm": sc.ALG_ECDSA_P256_SHA256}
    response["signature"] = ft.b64e(signature or b"x")
    with pytest.raises(sc._Reject) as info:
        sc._parse_response(response)
    assert info.value.reason == "malformed response"
    assert info.value.detail == {"error": "certificate is not DER X.509"}


def test_crl_with_unparseable_issuer_is_a_config_error(tmp_path: Path) -> None:
    """A CRL file that loads but whose issuer does not parse failed every login later."""
    from auth import smartcard as sc
    from relay.errors import ConfigError

    path = tmp_path / "bad.crl"
    path.write_bytes(regression("smartcard_crl", "unparseable-issuer"))
    settings = {**ft._smartcard()["settings"], "crl_files": [str(path)]}
    sc.reload()
    with pytest.raises(ConfigError, match="not a CRL file") as info:
        sc.load_settings(settings)
    assert info.value.key == "auth.smartcard.crl_files"


@pytest.mark.parametrize(
    ("label", "key"),
    [
        ("unicode-digit-port", "gateway.listen"),  # "8²43": str.isdigit() is true, int() fails
        ("long-port", "gateway.listen"),  # 5000 digits: int() refuses to read them
        ("huge-integer", "gateway.handshake_timeout"),  # float() overflows
    ],
)
def test_config_numbers_out_of_reach_are_config_errors(label: str, key: str) -> None:
    """These raised ValueError / OverflowError out of parse(): gatewayd and check-config
    stopped with a traceback instead of naming the key."""
    from gatewayd import config as c
    from relay.errors import ConfigError

    text = regression("config", label).decode()
    with pytest.raises(ConfigError) as info:
        c.parse(text, ft._scratch() / "gatewayd.toml")
    assert info.value.key == key


def test_card_certificate_of_unknown_version_is_an_auth_error() -> None:
    """cryptography raises InvalidVersion (not a ValueError) for an X.509 version it
    does not know: gw stopped with a traceback on such a card."""
    from auth import smartcard as sc
    from relay.errors import AuthError

    card = sc.PivCard(ft.ScriptedPort(regression("piv_card", "invalid-version")))
    der = sc.SmartcardProver._read_certificate(card)
    with pytest.raises(AuthError, match="cannot be read"):
        sc.SmartcardProver._load_certificate(der)


def test_client_certificate_of_unknown_version_is_a_malformed_response() -> None:
    from auth import smartcard as sc

    data = regression("smartcard_response", "invalid-version")
    leaf = ft.fields(data[1:], 4)[0]
    response = {
        "certificate": ft.b64e(leaf),
        "algorithm": sc.ALG_ECDSA_P256_SHA256,
        "signature": ft.b64e(b"x"),
    }
    with pytest.raises(sc._Reject) as info:
        sc._parse_response(response)
    assert info.value.reason == "malformed response"


def test_crl_of_unknown_version_is_a_config_error(tmp_path: Path) -> None:
    from auth import smartcard as sc
    from relay.errors import ConfigError

    path = tmp_path / "bad.crl"
    path.write_bytes(regression("smartcard_crl", "invalid-version"))
    sc.reload()
    with pytest.raises(ConfigError, match="not a CRL file"):
        sc.load_settings({**ft._smartcard()["settings"], "crl_files": [str(path)]})


def test_client_certificate_with_bitstring_name_is_a_malformed_response() -> None:
    """A name attribute of BIT STRING type under another OID: cryptography's Name raised
    TypeError when the issuer was first read."""
    from auth import smartcard as sc

    data = regression("smartcard_response", "bitstring-name")
    response = {
        "certificate": ft.b64e(ft.fields(data[1:], 4)[0]),
        "algorithm": sc.ALG_ECDSA_P256_SHA256,
        "signature": ft.b64e(b"x"),
    }
    with pytest.raises(sc._Reject) as info:
        sc._parse_response(response)
    assert info.value.reason == "malformed response"


@pytest.mark.parametrize("label", ["unsupported-curve", "invalid-version"])
def test_enroll_csr_with_unusable_key_or_version_is_a_ca_error(label: str) -> None:
    """An enroll message's CSR on a curve cryptography does not know (UnsupportedAlgorithm)
    or of an unknown version (InvalidVersion): both escaped the broker's enroll handler,
    so the agent got no clear error and the failure no audit record."""
    from gatewayd import ca

    data = regression("enroll_csr", label)
    pem = "-----BEGIN CERTIFICATE REQUEST-----\n" + ft.base64.encodebytes(data).decode()
    pem += "-----END CERTIFICATE REQUEST-----\n"
    key, cert = ft._enroll_ca()
    with pytest.raises(ca.CAError):
        ca.sign_agent_csr(key, cert, pem, "agent-1", 365)
