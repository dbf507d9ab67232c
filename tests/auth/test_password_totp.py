"""The password (Argon2id; older scrypt records) and TOTP (RFC 6238) factors: pure verifiers."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from typing import Any

import pyotp
import pytest

from auth import password, totp
from auth.base import AuthContext, Outcome, ProverOptions
from relay.errors import AuthError


def ctx(credential: Mapping[str, Any] | None, now: float = 1_700_000_000.0) -> AuthContext:
    return AuthContext(
        user="alice@acme",
        channel_binding=b"\x00" * 32,
        now=now,
        source="192.0.2.10:50000",
        credential=credential,
    )


# -- password ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored() -> str:
    """One Argon2id hash at the real cost, shared by the tests below."""
    return password.hash_password("correct horse battery staple")


@pytest.fixture(scope="module")
def scrypt_stored() -> str:
    """A record as written before Argon2id (scrypt, about 0.1 s)."""
    return password.scrypt_hash("correct horse battery staple")


def test_hash_format(stored: str) -> None:
    # OWASP Password Storage Cheat Sheet: Argon2id, m = 19 MiB, t = 2, p = 1.
    _, scheme, version, params, salt, key = stored.split("$")
    assert (scheme, version, params) == ("argon2id", "v=19", "m=19456,t=2,p=1")
    assert len(base64.b64decode(salt + "==")) == 16
    assert len(base64.b64decode(key + "=")) == 32
    assert not password.needs_rehash(stored)


def test_scrypt_hash_format(scrypt_stored: str) -> None:
    scheme, log2_n, r, p, salt, key = scrypt_stored.split("$")
    assert (scheme, int(log2_n), int(r), int(p)) == ("scrypt", 15, 8, 1)
    assert len(base64.urlsafe_b64decode(salt + "==")) == 16
    assert len(base64.urlsafe_b64decode(key + "=")) == password.KEY_LEN
    assert password.needs_rehash(scrypt_stored)


def test_scrypt_record_is_accepted_and_rehashed_with_argon2id(scrypt_stored: str) -> None:
    outcome = password.PasswordVerifier().complete(
        ctx({"hash": scrypt_stored}), {}, {"password": "correct horse battery staple"}
    )
    assert outcome.ok and outcome.rehash is not None
    new = outcome.rehash["hash"]
    assert new.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert password.check_password(new, "correct horse battery staple")
    wrong = password.PasswordVerifier().complete(
        ctx({"hash": scrypt_stored}), {}, {"password": "wrong"}
    )
    assert (wrong.ok, wrong.rehash) == (False, None)


@pytest.mark.parametrize(
    "params",
    ["m=1048576,t=2,p=1", "m=19456,t=100,p=1", "m=19456,t=2,p=64"],
    ids=["1GiB", "t100", "p64"],
)
def test_argon2_record_asking_too_much_is_refused_before_any_work(stored: str, params: str) -> None:
    parts = stored.split("$")
    parts[3] = params
    assert not password.check_password("$".join(parts), "correct horse battery staple")


def test_argon2i_record_is_refused(stored: str) -> None:
    assert not password.check_password(
        stored.replace("$argon2id$", "$argon2i$"), "correct horse battery staple"
    )


def test_hash_is_salted() -> None:
    assert password.hash_password("pw") != password.hash_password("pw")


def test_check_password(stored: str, scrypt_stored: str) -> None:
    for hashed in (stored, scrypt_stored):
        assert password.check_password(hashed, "correct horse battery staple")
        assert not password.check_password(hashed, "correct horse battery stapler")
        assert not password.check_password(hashed, "")


def _with(stored: str, **parts: str) -> str:
    names = ("scheme", "log2_n", "r", "p", "salt", "key")
    values = dict(zip(names, stored.split("$"), strict=True))
    values.update(parts)
    return "$".join(values[n] for n in names)


@pytest.mark.parametrize(
    "change",
    [
        {"scheme": "bcrypt"},
        {"log2_n": "9"},  # too cheap to be one of ours
        {"log2_n": "21"},  # too dear: refused before any work
        {"log2_n": "x"},
        {"r": "0"},
        {"p": "0"},
        {"r": "-1"},
        {"p": "-1"},
        {"r": str(2**20)},  # would need terabytes
        {"p": str(2**20)},  # would run for hours
        {"salt": "!!!"},
        {"key": ""},
        {"key": "AAAA"},
    ],
    ids=lambda c: "-".join(f"{k}={v[:8]}" for k, v in c.items()),
)
def test_malformed_stored_hash_does_not_match(scrypt_stored: str, change: dict[str, str]) -> None:
    assert not password.check_password(
        _with(scrypt_stored, **change), "correct horse battery staple"
    )


@pytest.mark.parametrize(
    "bad",
    ["", "scrypt", "scrypt$15$8$1$$", "plaintext", "$$$$$$$", "$argon2id$", "$argon2id$v=19$$$"],
)
def test_malformed_stored_hash_shapes(bad: str) -> None:
    assert not password.check_password(bad, "anything")


def test_password_verifier(stored: str) -> None:
    v = password.PasswordVerifier()
    c = ctx({"hash": stored})
    challenge = v.begin(c)
    assert challenge.payload == {"prompt": "password"}
    good = v.complete(c, challenge.state, {"password": "correct horse battery staple"})
    assert good == Outcome.accept()
    bad = v.complete(c, challenge.state, {"password": "wrong"})
    assert (bad.ok, bad.reason) == (False, "wrong password")


def test_password_verifier_without_password_set() -> None:
    v = password.PasswordVerifier()
    for credential in (None, {}, {"hash": 5}):
        outcome = v.complete(ctx(credential), {}, {"password": "x"})
        assert (outcome.ok, outcome.reason) == (False, "no password set")


@pytest.mark.parametrize(
    "response",
    [
        {},
        {"password": None},
        {"password": ""},
        {"password": 12345678},
        {"password": ["pw"]},
        {"password": "x" * (password.MAX_PASSWORD + 1)},
        {"pw": "correct horse battery staple"},
    ],
    ids=["missing", "null", "empty", "int", "list", "too-long", "wrong-key"],
)
def test_password_malformed_response_is_rejected(stored: str, response: dict[str, Any]) -> None:
    outcome = password.PasswordVerifier().complete(ctx({"hash": stored}), {}, response)
    assert (outcome.ok, outcome.reason) == (False, "malformed response")


def test_password_that_cannot_be_encoded_is_rejected_not_raised(stored: str) -> None:
    # JSON may carry a lone surrogate, which has no UTF-8 form.
    outcome = password.PasswordVerifier().complete(
        ctx({"hash": stored}), {}, {"password": "\ud800"}
    )
    assert not outcome.ok


def test_password_prover() -> None:
    asked: list[tuple[str, bool]] = []

    def prompt(text: str, secret: bool) -> str:
        asked.append((text, secret))
        return "typed"

    given = password.PasswordProver(ProverOptions("alice", prompt, {"password": "given"}))
    assert asyncio.run(given.respond({}, b"")) == {"password": "given"}
    assert asked == []
    typed = password.PasswordProver(ProverOptions("alice", prompt))
    assert asyncio.run(typed.respond({}, b"")) == {"password": "typed"}
    assert asked == [("Password for alice: ", True)]  # echo off
    empty = password.PasswordProver(ProverOptions("alice", lambda t, s: ""))
    with pytest.raises(AuthError):
        asyncio.run(empty.respond({}, b""))


# -- TOTP ------------------------------------------------------------------------------------

# RFC 6238 Appendix B: the SHA-1 seed is the ASCII string "12345678901234567890",
# 30-second steps, T0 = 0, 8-digit codes.
RFC6238_SECRET = base64.b32encode(b"12345678901234567890").decode()
RFC6238_SHA1 = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("when", "code"), RFC6238_SHA1)
def test_rfc6238_vectors_with_pyotp(when: int, code: str) -> None:
    # Our assumption about pyotp: default SHA-1, 30 s steps, T0 = 0.
    assert pyotp.TOTP(RFC6238_SECRET, digits=8).at(when) == code


@pytest.mark.parametrize(("when", "code"), RFC6238_SHA1)
def test_rfc6238_vectors_with_our_verifier(when: int, code: str) -> None:
    # A 6-digit HOTP value is the 8-digit one modulo 10**6 (RFC 4226 section 5.3).
    assert totp.code_at(RFC6238_SECRET, when) == code[-6:]
    outcome = totp.TotpVerifier().complete(
        ctx({"secret": RFC6238_SECRET}, now=when), {}, {"code": code[-6:]}
    )
    assert outcome.ok, outcome.reason
    assert outcome.counter == ("", when // 30)


SECRET = RFC6238_SECRET
NOW = 1_700_000_015.0  # in the middle of a step
STEP = int(NOW) // totp.STEP


def verify(code: str, *, now: float = NOW, last: int | None = None) -> Outcome:
    credential: dict[str, Any] = {"secret": SECRET}
    if last is not None:
        credential["last_counter"] = last
    return totp.TotpVerifier().complete(ctx(credential, now), {}, {"code": code})


def code_for_step(step: int) -> str:
    return totp.code_at(SECRET, step * totp.STEP)


def test_totp_challenge() -> None:
    challenge = totp.TotpVerifier().begin(ctx({"secret": SECRET}))
    assert challenge.payload == {"digits": 6, "step": 30}


def test_totp_current_code() -> None:
    outcome = verify(code_for_step(STEP))
    assert outcome.ok
    assert outcome.counter == ("", STEP)


@pytest.mark.parametrize("drift", [-1, 1])
def test_totp_one_step_of_drift_each_way(drift: int) -> None:
    outcome = verify(code_for_step(STEP + drift))
    assert outcome.ok
    assert outcome.counter == ("", STEP + drift)


@pytest.mark.parametrize("drift", [-2, 2, -10, 10])
def test_totp_more_drift_is_rejected(drift: int) -> None:
    code = code_for_step(STEP + drift)
    assert code not in {code_for_step(STEP + d) for d in (-1, 0, 1)}  # no chance collision
    outcome = verify(code)
    assert (outcome.ok, outcome.reason) == (False, "wrong code")
    assert outcome.counter is None


def test_totp_step_boundaries() -> None:
    start = STEP * totp.STEP
    assert verify(code_for_step(STEP + 1), now=start - 1).ok is False  # two steps ahead of then
    assert verify(code_for_step(STEP + 1), now=start).ok  # one step ahead
    assert verify(code_for_step(STEP - 1), now=start + totp.STEP - 1).ok
    assert verify(code_for_step(STEP - 1), now=start + totp.STEP).ok is False


def test_totp_replay_is_rejected() -> None:
    first = verify(code_for_step(STEP))
    assert first.ok and first.counter is not None
    last = first.counter[1]
    again = verify(code_for_step(STEP), last=last)
    assert (again.ok, again.reason) == (False, "code already used")
    assert again.detail == {"step": STEP}
    assert again.counter is None
    # Still refused 20 seconds later, while the code is within the drift window.
    assert not verify(code_for_step(STEP), now=NOW + 20, last=last).ok
    # The next step's code is fine.
    assert verify(code_for_step(STEP + 1), now=NOW + 30, last=last).ok


def test_totp_older_code_after_newer_is_rejected() -> None:
    newer = verify(code_for_step(STEP + 1))  # a phone a little ahead
    assert newer.ok and newer.counter is not None
    older = verify(code_for_step(STEP), last=newer.counter[1])
    assert (older.ok, older.reason) == (False, "code already used")
    older = verify(code_for_step(STEP - 1), last=newer.counter[1])
    assert not older.ok


def test_totp_reports_the_step_and_never_a_record() -> None:
    """The verifier says which step it accepted; it never hands back a record to write
    (a login waits for the person, and a record built from its copy would undo an
    administrator's re-enrollment made meanwhile)."""
    outcome = totp.TotpVerifier().complete(
        ctx({"secret": SECRET, "last_counter": 5, "label": "phone"}, NOW),
        {},
        {"code": code_for_step(STEP)},
    )
    assert (outcome.counter, outcome.rehash) == (("", STEP), None)


def test_totp_gateway_counter_overrides_the_record() -> None:
    """The gateway's counter (raised by every accepted code) wins over the record's value."""
    context = AuthContext(
        user="vera",
        channel_binding=b"\x00" * 32,
        now=NOW,
        source="127.0.0.1:1",
        credential={"secret": SECRET, "last_counter": 5},
        counters={"": STEP},
    )
    outcome = totp.TotpVerifier().complete(context, {}, {"code": code_for_step(STEP)})
    assert (outcome.ok, outcome.reason) == (False, "code already used")


@pytest.mark.parametrize(
    "response",
    [
        {},
        {"code": None},
        {"code": 123456},
        {"code": ""},
        {"code": "12345"},
        {"code": "1234567"},
        {"code": "12345a"},
        {"code": " 12345"},
        {"code": "12 456"},
        {"code": "-12345"},
        {"code": "١٢٣٤٥٦"},  # Arabic-Indic digits: str.isdigit() says yes
        {"code": "¹²³⁴⁵⁶"},  # superscripts, likewise
        {"code": ["123456"]},
    ],
)
def test_totp_malformed_response_is_rejected(response: dict[str, Any]) -> None:
    outcome = totp.TotpVerifier().complete(ctx({"secret": SECRET}, NOW), {}, response)
    assert (outcome.ok, outcome.reason) == (False, "malformed response")


@pytest.mark.parametrize("credential", [None, {}, {"secret": None}, {"secret": 5}])
def test_totp_not_enrolled(credential: Mapping[str, Any] | None) -> None:
    outcome = totp.TotpVerifier().complete(ctx(credential, NOW), {}, {"code": "123456"})
    assert (outcome.ok, outcome.reason) == (False, "totp not enrolled")


@pytest.mark.parametrize("secret", ["not base32!", "", "A", "ABCDEFGH"])
def test_totp_unusable_stored_secret_is_rejected_not_raised(secret: str) -> None:
    outcome = totp.TotpVerifier().complete(ctx({"secret": secret}, NOW), {}, {"code": "123456"})
    assert not outcome.ok


def test_new_secret_is_160_bits_of_base32() -> None:
    secret = totp.new_secret()
    assert len(secret) == 32
    assert set(secret) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    assert len(base64.b32decode(secret)) == 20
    assert totp.new_secret() != secret


def test_provisioning_uri() -> None:
    uri = totp.provisioning_uri(SECRET, "alice@acme", "Example Gateway")
    assert uri.startswith("otpauth://totp/")
    assert f"secret={SECRET}" in uri
    assert "issuer=Example%20Gateway" in uri


def test_totp_prover_strips_spaces() -> None:
    prover = totp.TotpProver(ProverOptions("alice", lambda t, s: " 123 456 "))
    assert asyncio.run(prover.respond({}, b"")) == {"code": "123456"}
    given = totp.TotpProver(ProverOptions("alice", lambda t, s: "", {"totp": "654321"}))
    assert asyncio.run(given.respond({}, b"")) == {"code": "654321"}
    empty = totp.TotpProver(ProverOptions("alice", lambda t, s: "  "))
    with pytest.raises(AuthError):
        asyncio.run(empty.respond({}, b""))
