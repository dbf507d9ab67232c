"""The FIDO2 factor, end to end in memory.

python-fido2's real client (``Fido2Client`` over ``Ctap2``, inside
:class:`auth.fido2.Fido2Prover` and :func:`auth.fido2.register`) drives the software
authenticator from ``tests/support``; :class:`auth.fido2.Fido2Verifier` and the
registration helpers check what comes back. No sockets; the only waits are the
authenticator's own event waits in the cancellation tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from soft_authenticator import SOFT_AAGUID, SoftAuthenticator

import auth.fido2 as f2
from auth import registry
from auth.base import AuthContext, Outcome, ProverOptions, b64d, b64e
from relay.errors import AuthError, ConfigError

ROOT = Path(__file__).resolve().parents[2]
RP = "gateway.example.org"
SETTINGS: dict[str, Any] = {"rp_id": RP, "rp_name": "Test gateway"}
USER_ID = b"user-0001"
CLONE = "signature counter did not increase (cloned key?)"
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def _no_pcsc_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys here are USB keys the test plugs in; a virtual card another test has in
    pcscd's readers at the same time must not count (tests/integration/test_fido2_pcsc.py
    covers keys over PC/SC)."""
    monkeypatch.setattr(f2, "_pcsc_devices", list)


class Person:
    """The person at the terminal: answers PIN prompts and reads notices."""

    def __init__(self, pin: str | None = None) -> None:
        self.pin = pin
        self.prompts: list[tuple[str, bool]] = []
        self.notices: list[str] = []

    def prompt(self, text: str, secret: bool) -> str:
        self.prompts.append((text, secret))
        return self.pin or ""

    def notify(self, text: str) -> None:
        self.notices.append(text)


def cb() -> bytes:
    """A fresh TLS channel binding (RFC 9266 tls-exporter is 32 bytes)."""
    return os.urandom(32)


def context(
    record: Mapping[str, Any] | None,
    binding: bytes,
    settings_: Mapping[str, Any] = SETTINGS,
    now: float = 2000.0,
) -> AuthContext:
    return AuthContext(
        user="alice",
        channel_binding=binding,
        now=now,
        source="192.0.2.7",
        credential=record,
        settings=settings_,
    )


def applied(record: Mapping[str, Any], outcome: Outcome) -> dict[str, Any]:
    """The record as the gateway's counters then stand: ``outcome.counter`` applied."""
    entries = [dict(e) for e in record["credentials"]]
    if outcome.counter is not None:
        key, value = outcome.counter
        for entry in entries:
            if entry["id"] == key and value:  # 0: a key without a counter, nothing moves
                assert value > entry["sign_count"]
                entry["sign_count"] = value
    return {**record, "credentials": entries}


def enroll(
    device: SoftAuthenticator,
    record: Mapping[str, Any] | None = None,
    *,
    uv: str = "preferred",
    person: Person | None = None,
    name: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    binding = cb()
    payload, state = f2.registration_begin(
        RP, "Test gateway", USER_ID, "alice", record, binding, uv
    )
    person = person or Person()
    response = run(
        f2.register(device, payload, binding, person.prompt, notify=person.notify, name=name)
    )
    return f2.registration_complete(state, response, record, now=1000.0)


def prover_for(device: Any, person: Person, **values: Any) -> f2.Fido2Prover:
    options = ProverOptions(
        user="alice",
        prompt=person.prompt,
        values={"fido2_device": device, "notify": person.notify, **values},
    )
    prover = f2.FACTOR.prover(options)
    assert isinstance(prover, f2.Fido2Prover)
    return prover


def login(
    device: Any,
    record: Mapping[str, Any] | None,
    *,
    person: Person | None = None,
    settings_: Mapping[str, Any] = SETTINGS,
    prover_binding: bytes | None = None,
    tamper: Mapping[str, Any] | None = None,
    **values: Any,
) -> tuple[Outcome, dict[str, Any], dict[str, Any]]:
    """One login: begin -> prover (through Fido2Client) -> complete.

    Returns the outcome, the verifier state and the prover's response.
    ``prover_binding`` makes the prover see another TLS channel; ``tamper`` edits the
    challenge payload on its way (a lying network or client).
    """
    binding = cb()
    verifier = f2.FACTOR.verifier()
    ctx = context(record, binding, settings_)
    challenge = verifier.begin(ctx)
    payload = {**challenge.payload, **(tamper or {})}
    prover = prover_for(device, person or Person(), **values)
    response = run(prover.respond(payload, prover_binding or binding))
    json.dumps(response)  # the wire is JSON
    return verifier.complete(ctx, challenge.state, response), challenge.state, response


@pytest.fixture(scope="module")
def enrolled() -> tuple[SoftAuthenticator, dict[str, Any]]:
    device = SoftAuthenticator()
    record, _ = enroll(device)
    return device, record


# ---------------------------------------------------------------- registration


def test_register_one_key() -> None:
    device = SoftAuthenticator()
    person = Person()
    record, info = enroll(device, person=person, name="blue key")
    json.dumps(record)
    [entry] = record["credentials"]
    assert b64d(entry["id"]) in device.credentials
    assert entry["name"] == "blue key" == info["name"]
    assert entry["aaguid"] == SOFT_AAGUID.hex() == info["aaguid"]
    assert entry["added"] == 1000.0
    assert entry["sign_count"] == info["sign_count"] == device.counter
    assert info["attestation"] == "packed" and info["attestation_verified"] is True
    assert info["user_verified"] is False
    assert person.notices == ["Touch your security key"]
    assert person.prompts == []  # no PIN on this key, none asked


def test_register_two_keys_and_log_in_with_each() -> None:
    first, second = SoftAuthenticator(), SoftAuthenticator(attestation="none")
    record, _ = enroll(first)
    record, info = enroll(second, record)
    assert info["attestation"] == "none" and info["attestation_verified"] is False
    listed = f2.list_credentials(record)
    assert [k["name"] for k in listed] == ["security key 1", "security key 2"]
    assert all("public_key" not in k for k in listed)
    for device in (first, second):
        outcome, _, response = login(device, record)
        assert outcome.ok, outcome
        assert outcome.detail["key_id"] == response["credential_id"]
        record = applied(record, outcome)


def test_register_with_pin_sets_uv() -> None:
    device = SoftAuthenticator(pin="123456")
    person = Person(pin="123456")
    _, info = enroll(device, uv="required", person=person)
    assert info["user_verified"] is True
    assert person.prompts == [("Security key PIN: ", True)]


def test_register_same_key_twice_is_refused(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    device, record = enrolled
    with pytest.raises(AuthError, match="already registered"):
        enroll(device, record)


def test_register_duplicate_refused_by_gateway_even_if_client_ignores_exclude() -> None:
    device = SoftAuthenticator()
    binding = cb()
    payload, state = f2.registration_begin(RP, "gw", USER_ID, "alice", None, binding)
    response = run(f2.register(device, payload, binding, Person().prompt))
    record, _ = f2.registration_complete(state, response, None)
    with pytest.raises(AuthError, match="already registered"):
        f2.registration_complete(state, response, record)


def test_registration_bound_to_the_channel() -> None:
    device = SoftAuthenticator()
    payload, state = f2.registration_begin(RP, "gw", USER_ID, "alice", None, cb())
    response = run(f2.register(device, payload, cb(), Person().prompt))
    with pytest.raises(AuthError, match="challenge mismatch"):
        f2.registration_complete(state, response, None)


def test_registration_with_foreign_origin_rejected() -> None:
    binding = cb()
    payload, state = f2.registration_begin(RP, "gw", USER_ID, "alice", None, binding)
    origin = f"https://login.{RP}"
    response = run(f2.register(SoftAuthenticator(), payload, binding, Person().prompt, origin))
    with pytest.raises(AuthError, match="origin mismatch"):
        f2.registration_complete(state, response, None)


def test_registration_requiring_uv_needs_a_pin_on_the_key() -> None:
    binding = cb()
    payload, _ = f2.registration_begin(RP, "gw", USER_ID, "alice", None, binding, "required")
    with pytest.raises(AuthError, match="no PIN set"):
        run(f2.register(SoftAuthenticator(), payload, binding, Person().prompt))


def test_registration_requiring_uv_rejects_a_key_that_does_not_report_it() -> None:
    binding = cb()
    payload, state = f2.registration_begin(RP, "gw", USER_ID, "alice", None, binding, "required")
    device = SoftAuthenticator(pin="1234", set_uv_flag=False)
    response = run(f2.register(device, payload, binding, Person("1234").prompt))
    with pytest.raises(AuthError, match="user verification required"):
        f2.registration_complete(state, response, None)


def test_registration_limit() -> None:
    ids = [b64e(os.urandom(16)) for _ in range(f2.MAX_CREDENTIALS)]
    with pytest.raises(AuthError, match="limit"):
        f2.registration_begin(RP, "gw", USER_ID, "alice", ids, cb())


def test_registration_tampered_attestation_rejected() -> None:
    binding = cb()
    payload, state = f2.registration_begin(RP, "gw", USER_ID, "alice", None, binding)
    response = run(f2.register(SoftAuthenticator(), payload, binding, Person().prompt))
    att = bytearray(b64d(response["attestation_object"]))
    att[-1] ^= 0x01  # last byte of the packed signature
    with pytest.raises(AuthError, match="registration rejected"):
        f2.registration_complete(state, {**response, "attestation_object": b64e(bytes(att))}, None)


@settings(max_examples=150, deadline=None, database=None)
@given(st.data())
def test_registration_complete_only_ever_raises_auth_error(data: st.DataObject) -> None:
    binding = b"\x01" * 32
    _, state = f2.registration_begin(RP, "gw", USER_ID, "alice", None, binding)
    response = data.draw(
        st.one_of(
            json_values(),
            st.fixed_dictionaries(
                {
                    "credential_id": b64_or_junk(),
                    "client_data_json": b64_or_junk(),
                    "attestation_object": b64_or_junk(),
                }
            ),
        )
    )
    with pytest.raises(AuthError):
        f2.registration_complete(state, response, None)


# ------------------------------------------------------------------------ login


def test_good_login_updates_the_counter(enrolled: tuple[SoftAuthenticator, dict[str, Any]]) -> None:
    device, record = enrolled
    person = Person()
    outcome, _, response = login(device, record, person=person)
    assert outcome.ok and outcome.reason == "ok"
    assert person.notices == ["Touch your security key"]
    assert person.prompts == []
    # The verifier reports which counter moves where; it returns no record to write.
    [entry] = record["credentials"]
    assert outcome.counter == (entry["id"], device.counter)
    assert device.counter > entry["sign_count"]
    assert outcome.rehash is None
    assert outcome.detail["user_verified"] is False
    assert outcome.detail["key_id"] == response["credential_id"] == entry["id"]


def test_login_with_pin_when_required() -> None:
    device = SoftAuthenticator(pin="4711")
    person = Person(pin="4711")
    record, _ = enroll(device, uv="required", person=person)
    person = Person(pin="4711")
    outcome, _, _ = login(
        device, record, person=person, settings_={**SETTINGS, "user_verification": "required"}
    )
    assert outcome.ok, outcome
    assert outcome.detail["user_verified"] is True
    assert person.prompts == [("Security key PIN: ", True)]


def test_preferred_uses_the_pin_when_the_key_has_one() -> None:
    device = SoftAuthenticator(pin="4711")
    record, _ = enroll(device, person=Person("4711"))
    person = Person(pin="4711")
    outcome, _, _ = login(device, record, person=person)
    assert outcome.ok and outcome.detail["user_verified"] is True
    assert len(person.prompts) == 1


def test_preferred_without_pin_on_the_key_is_touch_only(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    # python-fido2 alone would refuse "preferred" on a PIN-capable key without a PIN.
    device, record = enrolled
    assert device.pin_supported
    outcome, _, _ = login(device, record)
    assert outcome.ok and outcome.detail["user_verified"] is False


def test_discouraged_never_asks_for_the_pin() -> None:
    device = SoftAuthenticator(pin="4711")
    record, _ = enroll(device, person=Person("4711"))
    person = Person(pin="4711")
    outcome, _, _ = login(
        device, record, person=person, settings_={**SETTINGS, "user_verification": "discouraged"}
    )
    assert outcome.ok and person.prompts == []


def test_fido2_pin_value_replaces_the_prompt() -> None:
    device = SoftAuthenticator(pin="4711")
    record, _ = enroll(device, person=Person("4711"))
    person = Person()
    outcome, _, _ = login(device, record, person=person, fido2_pin="4711")
    assert outcome.ok and person.prompts == []


def test_key_without_counter_support_is_accepted() -> None:
    device = SoftAuthenticator(fixed_counter=0)
    record, _ = enroll(device)
    for _ in range(2):
        outcome, _, _ = login(device, record)
        assert outcome.ok
        # Nothing moves forward; the gateway only checks the key is still registered.
        assert outcome.counter == (record["credentials"][0]["id"], 0)


def test_stuck_counter_is_a_clone() -> None:
    device = SoftAuthenticator(fixed_counter=7)
    record, _ = enroll(device)
    outcome, _, _ = login(device, record)
    assert not outcome.ok and outcome.reason == CLONE
    assert outcome.detail["stored_sign_count"] == outcome.detail["received_sign_count"] == 7


def test_cloned_key_is_refused(enrolled: tuple[SoftAuthenticator, dict[str, Any]]) -> None:
    device, record = enrolled
    clone = device.clone(counter=1)  # copied early; the original key has been used since
    for _ in range(2):
        outcome, _, _ = login(device, record)
        assert outcome.ok
        record = applied(record, outcome)
    outcome, _, _ = login(clone, record)
    assert not outcome.ok
    assert outcome.reason == CLONE
    assert outcome.detail["key_id"] == record["credentials"][0]["id"]
    assert outcome.detail["stored_sign_count"] == record["credentials"][0]["sign_count"]
    assert outcome.detail["received_sign_count"] < outcome.detail["stored_sign_count"]
    assert outcome.counter is None


def test_unregistered_key_is_told_it_is_the_wrong_key(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    _, record = enrolled
    stranger = SoftAuthenticator()
    with pytest.raises(AuthError, match="not registered for your account"):
        login(stranger, record)


def test_assertion_by_another_users_key_is_rejected(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    _, alice = enrolled
    bobs_key = SoftAuthenticator()
    bob, _ = enroll(bobs_key)
    # Bob's key answers a challenge for Bob; the response is then offered as Alice's.
    binding = cb()
    verifier = f2.Fido2Verifier()
    bob_challenge = verifier.begin(context(bob, binding))
    response = run(prover_for(bobs_key, Person()).respond(bob_challenge.payload, binding))
    alice_ctx = context(alice, binding)
    outcome = verifier.complete(alice_ctx, verifier.begin(alice_ctx).state, response)
    assert not outcome.ok and outcome.reason.startswith("unknown credential")


def test_replayed_assertion_against_the_same_state(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    device, record = enrolled
    binding = cb()
    verifier = f2.Fido2Verifier()
    ctx = context(record, binding)
    challenge = verifier.begin(ctx)
    response = run(prover_for(device, Person()).respond(challenge.payload, binding))
    first = verifier.complete(ctx, challenge.state, response)
    assert first.ok
    again = verifier.complete(context(applied(record, first), binding), challenge.state, response)
    assert not again.ok and again.reason == CLONE
    # The same through the gateway's counters, the record as registered.
    assert first.counter is not None
    counted = AuthContext(
        user="alice",
        channel_binding=binding,
        now=2000.0,
        source="192.0.2.7",
        credential=record,
        settings=SETTINGS,
        counters=dict([first.counter]),
    )
    again = verifier.complete(counted, challenge.state, response)
    assert not again.ok and again.reason == CLONE


def test_replayed_assertion_against_a_new_challenge(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    device, record = enrolled
    binding = cb()
    verifier = f2.Fido2Verifier()
    ctx = context(record, binding)
    response = run(prover_for(device, Person()).respond(verifier.begin(ctx).payload, binding))
    outcome = verifier.complete(ctx, verifier.begin(ctx).state, response)
    assert not outcome.ok and outcome.reason.startswith("challenge mismatch")


def test_assertion_bound_to_another_tls_channel(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    device, record = enrolled
    outcome, _, _ = login(device, record, prover_binding=cb())
    assert not outcome.ok and outcome.reason.startswith("challenge mismatch")


def test_state_moved_to_another_connection(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    device, record = enrolled
    verifier = f2.Fido2Verifier()
    challenge = verifier.begin(context(record, cb()))
    other = cb()  # the response arrives on another connection, made for that one
    response = run(prover_for(device, Person()).respond(challenge.payload, other))
    outcome = verifier.complete(context(record, other), challenge.state, response)
    assert not outcome.ok and outcome.reason == "TLS channel changed between challenge and response"


def test_uv_required_but_key_never_reports_it() -> None:
    device = SoftAuthenticator(pin="4711", set_uv_flag=False)
    record, _ = enroll(device, person=Person("4711"))
    outcome, _, _ = login(
        device,
        record,
        person=Person("4711"),
        settings_={**SETTINGS, "user_verification": "required"},
    )
    assert not outcome.ok and outcome.reason == "user verification required but not performed"


def test_uv_required_but_client_skipped_it(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    device, record = enrolled
    outcome, _, _ = login(
        device,
        record,
        settings_={**SETTINGS, "user_verification": "required"},
        tamper={"user_verification": "discouraged"},
    )
    assert not outcome.ok and outcome.reason == "user verification required but not performed"


def test_uv_required_on_a_key_without_pin_is_explained(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    device, record = enrolled
    with pytest.raises(AuthError, match="no PIN set"):
        login(device, record, settings_={**SETTINGS, "user_verification": "required"})


def test_key_that_cannot_verify_users_still_logs_in_when_preferred() -> None:
    device = SoftAuthenticator(pin_supported=False)
    record, _ = enroll(device)
    outcome, _, _ = login(device, record)
    assert outcome.ok and outcome.detail["user_verified"] is False


def test_user_presence_missing() -> None:
    device = SoftAuthenticator()
    record, _ = enroll(device)
    device.presence = "skip"
    outcome, _, _ = login(device, record)
    assert not outcome.ok and outcome.reason == "user presence flag not set"


def test_registration_without_user_presence_rejected() -> None:
    binding = cb()
    payload, state = f2.registration_begin(RP, "gw", USER_ID, "alice", None, binding)
    response = run(
        f2.register(SoftAuthenticator(presence="skip"), payload, binding, Person().prompt)
    )
    with pytest.raises(AuthError, match="user presence"):
        f2.registration_complete(state, response, None)


def test_origin_mismatch(enrolled: tuple[SoftAuthenticator, dict[str, Any]]) -> None:
    device, record = enrolled
    outcome, _, _ = login(device, record, tamper={"origin": f"https://other.{RP}"})
    assert not outcome.ok and outcome.reason == "origin mismatch"


def test_relying_party_mismatch() -> None:
    # The gateway is configured for the parent domain; a client signs for the subdomain.
    device = SoftAuthenticator()
    record, _ = enroll(device)
    parent = {"rp_id": "example.org", "origin": f"https://{RP}"}
    outcome, _, _ = login(device, record, settings_=parent, tamper={"rp_id": RP})
    assert not outcome.ok and outcome.reason == "relying party id mismatch"


def test_prover_refuses_an_unexpected_relying_party(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    device, record = enrolled
    with pytest.raises(AuthError, match=r"expected 'gw\.example\.net'"):
        login(device, record, fido2_rp_id="gw.example.net")


def test_user_without_keys() -> None:
    verifier = f2.Fido2Verifier()
    ctx = context(None, cb())
    challenge = verifier.begin(ctx)
    assert challenge.payload["allow"] == []
    with pytest.raises(AuthError, match="no security key is registered"):
        run(
            prover_for(SoftAuthenticator(), Person()).respond(
                challenge.payload, ctx.channel_binding
            )
        )
    outcome = verifier.complete(ctx, challenge.state, {})
    assert not outcome.ok and outcome.reason == "no FIDO2 security key registered for this user"


def test_corrupt_stored_record(enrolled: tuple[SoftAuthenticator, dict[str, Any]]) -> None:
    device, record = enrolled
    binding = cb()
    verifier = f2.Fido2Verifier()
    challenge = verifier.begin(context(record, binding))
    response = run(prover_for(device, Person()).respond(challenge.payload, binding))
    broken = {"credentials": [{**record["credentials"][0], "public_key": "AAAA"}]}
    outcome = verifier.complete(context(broken, binding), challenge.state, response)
    assert not outcome.ok and outcome.reason == "stored FIDO2 credential record is invalid"


# --------------------------------------------------------- key and PIN errors


def test_touch_denied(enrolled: tuple[SoftAuthenticator, dict[str, Any]]) -> None:
    device, record = enrolled
    denying = device.clone(counter=10**6)
    denying.presence = "deny"
    with pytest.raises(AuthError, match="touch denied"):
        login(denying, record)


def test_touch_timeout_reported_by_the_key(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    device, record = enrolled
    slow = device.clone(counter=10**6)
    slow.presence = "timeout"
    with pytest.raises(AuthError, match="timed out waiting for you to touch"):
        login(slow, record)


def test_touch_timeout_from_the_gateways_deadline(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    device, record = enrolled
    slow = device.clone(counter=10**6)
    slow.presence, slow.wait_for_cancel = "timeout", True
    with pytest.raises(AuthError, match="timed out waiting for you to touch"):
        login(slow, record, settings_={**SETTINGS, "timeout": 0.05})
    assert slow.cancel_seen.is_set()


def test_cancelling_the_login_cancels_the_key(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    device, record = enrolled
    slow = device.clone(counter=10**6)
    slow.presence, slow.wait_for_cancel = "timeout", True
    challenge = f2.Fido2Verifier().begin(context(record, b"\x02" * 32))
    prover = prover_for(slow, Person())

    async def abandon() -> None:
        task = asyncio.ensure_future(prover.respond(challenge.payload, b"\x02" * 32))
        while not slow.touches:  # until the key waits for a touch
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(abandon())
    assert slow.cancel_seen.wait(5)


def test_wrong_pin_says_how_many_tries_are_left() -> None:
    device = SoftAuthenticator(pin="4711")
    record, _ = enroll(device, person=Person("4711"))
    with pytest.raises(AuthError, match=r"wrong PIN for the security key \(7 attempts left"):
        login(device, record, person=Person("0000"))
    assert device.pin_retries == 7


def test_last_wrong_pin_blocks_the_key() -> None:
    device = SoftAuthenticator(pin="4711")
    record, _ = enroll(device, person=Person("4711"))
    blocked = device.clone(counter=10**6)
    blocked.pin_retries = 1
    with pytest.raises(AuthError, match="PIN is blocked after too many wrong attempts"):
        login(blocked, record, person=Person("0000"))
    with pytest.raises(AuthError, match="PIN is blocked after too many wrong attempts"):
        login(blocked, record, person=Person("4711"))


def test_three_wrong_pins_in_a_row() -> None:
    device = SoftAuthenticator(pin="4711")
    record, _ = enroll(device, person=Person("4711"))
    for _ in range(2):
        with pytest.raises(AuthError, match="wrong PIN"):
            login(device, record, person=Person("0000"))
    with pytest.raises(AuthError, match="unplug the security key"):
        login(device, record, person=Person("0000"))


def test_no_pin_entered() -> None:
    device = SoftAuthenticator(pin="4711")
    record, _ = enroll(device, person=Person("4711"))
    with pytest.raises(AuthError, match="needs its PIN"):
        login(device, record, person=Person(None))


def test_malformed_challenge_is_a_clear_error() -> None:
    prover = prover_for(SoftAuthenticator(), Person())
    for payload in (
        {},
        {"v": 2},
        {"v": 1, "rp_id": RP},
        {"v": 1, "rp_id": "HTTP://x", "nonce": ""},
    ):
        with pytest.raises(AuthError, match="malformed FIDO2 request"):
            run(prover.respond(payload, cb()))
    short_nonce = {"v": 1, "rp_id": RP, "nonce": b64e(b"x" * 16), "allow": [b64e(b"id")]}
    with pytest.raises(AuthError, match="nonce must be 32 bytes"):
        run(prover.respond(short_nonce, cb()))


def test_prover_refuses_an_unbound_proof(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> None:
    device, record = enrolled
    challenge = f2.Fido2Verifier().begin(context(record, cb()))
    with pytest.raises(AuthError, match="no TLS channel binding"):
        run(prover_for(device, Person()).respond(challenge.payload, b""))


# ------------------------------------------------------------ HID discovery


class _Hid:
    """Stands in for fido2.hid.CtapHidDevice.list_devices."""

    def __init__(self, *devices: SoftAuthenticator) -> None:
        self.devices = devices

    def __call__(self) -> Any:
        return iter(self.devices)


def test_no_key_plugged_in(monkeypatch: pytest.MonkeyPatch) -> None:
    import fido2.hid

    monkeypatch.setattr(fido2.hid.CtapHidDevice, "list_devices", _Hid())
    challenge = f2.Fido2Verifier().begin(context({"credentials": []}, cb()))
    prover = f2.FACTOR.prover(ProverOptions(user="alice", prompt=Person().prompt))
    payload = {**challenge.payload, "allow": [b64e(b"some-key")]}
    with pytest.raises(AuthError, match="no security key found"):
        run(prover.respond(payload, cb()))


def test_several_keys_plugged_in(monkeypatch: pytest.MonkeyPatch) -> None:
    import fido2.hid

    keys = (SoftAuthenticator(), SoftAuthenticator())
    monkeypatch.setattr(fido2.hid.CtapHidDevice, "list_devices", _Hid(*keys))
    prover = f2.FACTOR.prover(ProverOptions(user="alice", prompt=Person().prompt))
    payload = {"v": 1, "rp_id": RP, "nonce": b64e(os.urandom(32)), "allow": [b64e(b"k")]}
    with pytest.raises(AuthError, match="2 security keys are plugged in"):
        run(prover.respond(payload, cb()))
    assert all(k.closed for k in keys)


def test_discovered_key_is_used_and_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    import fido2.hid

    device = SoftAuthenticator()
    record, _ = enroll(device)
    monkeypatch.setattr(fido2.hid.CtapHidDevice, "list_devices", _Hid(device))
    binding = cb()
    verifier = f2.Fido2Verifier()
    ctx = context(record, binding)
    challenge = verifier.begin(ctx)
    prover = f2.FACTOR.prover(ProverOptions(user="alice", prompt=Person().prompt))

    async def session() -> dict[str, Any]:
        try:
            return await prover.respond(challenge.payload, binding)
        finally:
            await prover.aclose()

    assert verifier.complete(ctx, challenge.state, run(session())).ok
    assert device.closed


def test_registration_discovers_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import fido2.hid

    device = SoftAuthenticator()
    monkeypatch.setattr(fido2.hid.CtapHidDevice, "list_devices", _Hid(device))
    binding = cb()
    payload, state = f2.registration_begin(RP, "gw", USER_ID, "alice", None, binding)
    response = run(f2.register(None, payload, binding, Person().prompt))
    record, _ = f2.registration_complete(state, response, None)
    assert len(record["credentials"]) == 1 and device.closed


# ------------------------------------------------------------ malformed input


def b64_or_junk() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.binary(max_size=300).map(b64e),
        st.text(max_size=40),
        st.integers(),
        st.none(),
        st.lists(st.integers(), max_size=3),
    )


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=20), inner, max_size=4)
        ),
        max_leaves=12,
    )


@pytest.fixture(scope="module")
def one_login(
    enrolled: tuple[SoftAuthenticator, dict[str, Any]],
) -> tuple[dict[str, Any], bytes, dict[str, Any], dict[str, Any]]:
    """A verified login's updated record, binding, state and response, to be corrupted."""
    device, record = enrolled
    binding = cb()
    verifier = f2.Fido2Verifier()
    challenge = verifier.begin(context(record, binding))
    response = run(
        prover_for(device.clone(counter=10**5), Person()).respond(challenge.payload, binding)
    )
    outcome = verifier.complete(context(record, binding), challenge.state, response)
    assert outcome.ok
    # The updated record: from here on this very response is a replay.
    return applied(record, outcome), binding, challenge.state, response


MALFORMED: list[Any] = [
    None,
    [],
    "response",
    42,
    {},
    {"credential_id": "x"},
    {"credential_id": None, "client_data_json": 1, "authenticator_data": [], "signature": {}},
    {
        "credential_id": "A" * 10**6,
        "client_data_json": "",
        "authenticator_data": "",
        "signature": "",
    },
]


@pytest.mark.parametrize("response", MALFORMED)
def test_malformed_response_is_rejected(
    one_login: tuple[dict[str, Any], bytes, dict[str, Any], dict[str, Any]], response: Any
) -> None:
    record, binding, state, _ = one_login
    outcome = f2.Fido2Verifier().complete(context(record, binding), state, response)
    assert not outcome.ok and outcome.reason


@pytest.mark.parametrize(
    "field_name", ["credential_id", "client_data_json", "authenticator_data", "signature"]
)
@pytest.mark.parametrize(
    "value",
    [b"", b"\x00", b"{}", b"not json", b'{"type":"webauthn.get"}', b"\xff" * 37, b"\x00" * 200],
)
def test_garbled_field_is_rejected(
    one_login: tuple[dict[str, Any], bytes, dict[str, Any], dict[str, Any]],
    field_name: str,
    value: bytes,
) -> None:
    record, binding, state, response = one_login
    outcome = f2.Fido2Verifier().complete(
        context(record, binding), state, {**response, field_name: b64e(value)}
    )
    assert not outcome.ok


def test_client_data_with_wrong_types_is_rejected(
    one_login: tuple[dict[str, Any], bytes, dict[str, Any], dict[str, Any]],
) -> None:
    # Well-formed JSON of the wrong shape; the signature fails first, so sign nothing:
    # check that parsing alone never raises.
    docs: list[Any] = [{"type": 1, "challenge": "AA", "origin": []}, {"type": "webauthn.get"}, []]
    for doc in docs:
        with pytest.raises(f2._Rejected):
            f2._client_data(json.dumps(doc).encode(), "webauthn.get")


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_response_never_raises(
    one_login: tuple[dict[str, Any], bytes, dict[str, Any], dict[str, Any]], data: st.DataObject
) -> None:
    record, binding, state, response = one_login
    choice = data.draw(st.sampled_from(["json", "fields", "flip"]))
    if choice == "json":
        candidate: Any = data.draw(json_values())
    elif choice == "fields":
        candidate = {
            **response,
            **data.draw(st.dictionaries(st.sampled_from(sorted(response)), b64_or_junk())),
        }
    else:
        name = data.draw(st.sampled_from(sorted(response)))
        raw = bytearray(b64d(response[name]))
        index = data.draw(st.integers(0, len(raw) - 1))
        raw[index] ^= data.draw(st.integers(1, 255))
        candidate = {**response, name: b64e(bytes(raw))}
    outcome = f2.Fido2Verifier().complete(context(record, binding), state, candidate)
    assert isinstance(outcome, Outcome)
    assert not outcome.ok  # a counter already used, or a broken field


def test_fuzzed_state_never_raises(
    one_login: tuple[dict[str, Any], bytes, dict[str, Any], dict[str, Any]],
) -> None:
    record, binding, state, response = one_login
    for bad in ({}, {"v": 1}, {"v": 1, "nonce": 5, "challenge": "x"}, {**state, "v": 0}):
        outcome = f2.Fido2Verifier().complete(context(record, binding), bad, response)
        assert not outcome.ok and outcome.reason == "invalid verifier state"


def signed(
    device: SoftAuthenticator, record: Mapping[str, Any], client_data: bytes
) -> dict[str, Any]:
    """A response whose signature is good over arbitrary clientDataJSON.

    A user holding a registered key can always get this far, so whatever the verifier
    parses after the signature check must still be treated as hostile.
    """
    from fido2.ctap2.base import Ctap2

    cred_id = b64d(record["credentials"][0]["id"])
    assertion = Ctap2(device).get_assertion(
        RP, hashlib.sha256(client_data).digest(), [{"type": "public-key", "id": cred_id}]
    )
    return {
        "credential_id": b64e(cred_id),
        "client_data_json": b64e(client_data),
        "authenticator_data": b64e(bytes(assertion.auth_data)),
        "signature": b64e(assertion.signature),
    }


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        # python-fido2 would pass this integer to bytes() and allocate a petabyte.
        ({"type": "webauthn.get", "challenge": 10**15, "origin": f"https://{RP}"}, "malformed"),
        ({"type": "webauthn.get", "challenge": ["x"], "origin": f"https://{RP}"}, "malformed"),
        ({"type": "webauthn.get", "challenge": "AA", "origin": 1}, "malformed"),
        ({"type": "webauthn.create", "challenge": "AA", "origin": f"https://{RP}"}, "wrong"),
        ({"type": "webauthn.get", "challenge": "!!", "origin": f"https://{RP}"}, "challenge"),
        ("[" * 3000, "malformed"),
    ],
)
def test_signed_but_hostile_client_data(doc: Any, reason: str) -> None:
    device = SoftAuthenticator()
    record, _ = enroll(device)
    binding = cb()
    verifier = f2.Fido2Verifier()
    state = verifier.begin(context(record, binding)).state
    raw = doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
    outcome = verifier.complete(context(record, binding), state, signed(device, record, raw))
    assert not outcome.ok and outcome.reason.startswith(reason), outcome
    if reason == "malformed":
        assert "clientDataJSON" in outcome.detail["error"]


def test_signed_cross_origin_client_data_is_rejected() -> None:
    device = SoftAuthenticator()
    record, _ = enroll(device)
    binding = cb()
    verifier = f2.Fido2Verifier()
    state = verifier.begin(context(record, binding)).state
    doc = {
        "type": "webauthn.get",
        "challenge": state["challenge"],
        "origin": f"https://{RP}",
        "crossOrigin": True,
    }
    response = signed(device, record, json.dumps(doc).encode())
    outcome = verifier.complete(context(record, binding), state, response)
    assert not outcome.ok and outcome.reason == "cross-origin assertion"


def _registration_parts(
    auth_data: bytes | int, fmt: str = "none", stmt: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A hand-made registration response around ``auth_data``, with a correct challenge."""
    from fido2 import cbor

    _, state = f2.registration_begin(RP, "gw", USER_ID, "alice", None, cb())
    client_data = json.dumps(
        {"type": "webauthn.create", "challenge": state["challenge"], "origin": f"https://{RP}"}
    ).encode()
    att = cbor.encode({"fmt": fmt, "authData": auth_data, "attStmt": stmt or {}})
    response = {
        "credential_id": b64e(b"cred-0001"),
        "client_data_json": b64e(client_data),
        "attestation_object": b64e(att),
    }
    return state, response


def _attested(cose: Mapping[int, Any], flags: int = 0x41) -> bytes:
    import struct

    from fido2 import cbor

    cred_id = b"cred-0001"
    key: bytes = cbor.encode(dict(cose))
    return (
        hashlib.sha256(RP.encode()).digest()
        + struct.pack(">BI", flags, 1)
        + SOFT_AAGUID
        + struct.pack(">H", len(cred_id))
        + cred_id
        + key
    )


def test_registration_auth_data_of_the_wrong_type_is_not_allocated() -> None:
    # python-fido2's AttestationObject would pass this integer to bytes().
    state, response = _registration_parts(10**15)
    with pytest.raises(AuthError, match="members have wrong types"):
        f2.registration_complete(state, response, None)


@pytest.mark.parametrize(
    "cose",
    [
        {1: 2, 3: -7, -1: 1, -2: b"\x01" * 32, -3: b"\x01" * 32},  # not on P-256
        {1: 2, 3: -7, -1: 1, -2: b"\x01" * 31, -3: b"\x01" * 32},  # short coordinate
        {1: 2, 3: -7, -1: 2, -2: b"\x01" * 32, -3: b"\x01" * 32},  # wrong curve
        {1: 2, 3: -7, -1: 1, -2: 5, -3: b"\x01" * 32},  # not bytes
        {1: 1, 3: -8, -1: 6, -2: b"\x01" * 31},  # short Ed25519 key
        {1: 3, 3: -257, -1: (2**1024 + 1).to_bytes(129, "big"), -2: b"\x01\x00\x01"},  # RSA-1024
    ],
)
def test_registration_refuses_unusable_public_keys(cose: dict[int, Any]) -> None:
    state, response = _registration_parts(_attested(cose))
    with pytest.raises(AuthError, match="invalid credential public key"):
        f2.registration_complete(state, response, None)


def test_registration_refuses_unoffered_algorithms() -> None:
    state, response = _registration_parts(_attested({1: 2, 3: -9, -1: 1}))  # ESP256
    with pytest.raises(AuthError, match="unsupported key algorithm"):
        f2.registration_complete(state, response, None)


def test_registration_none_attestation_must_be_empty() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    cose = {
        1: 2,
        3: -7,
        -1: 1,
        -2: numbers.x.to_bytes(32, "big"),
        -3: numbers.y.to_bytes(32, "big"),
    }
    state, response = _registration_parts(_attested(cose), stmt={"sig": b"x"})
    with pytest.raises(AuthError, match="invalid attestation statement"):
        f2.registration_complete(state, response, None)
    state, response = _registration_parts(_attested(cose))
    record, info = f2.registration_complete(state, response, None)
    assert info["attestation"] == "none" and len(record["credentials"]) == 1


# ----------------------------------------------------------- credential record


def test_remove_credential() -> None:
    first, second = SoftAuthenticator(), SoftAuthenticator()
    record, one = enroll(first)
    record, two = enroll(second, record)
    with pytest.raises(AuthError, match="no security key"):
        f2.remove_credential(record, "nope")
    smaller = f2.remove_credential(record, one["id"][:12])
    assert [k["id"] for k in f2.list_credentials(smaller)] == [two["id"]]
    assert len(record["credentials"]) == 2  # the input was not changed
    with pytest.raises(AuthError, match="not registered for your account"):
        login(first, smaller)
    assert login(second, smaller)[0].ok
    empty = f2.remove_credential(smaller, two["id"])
    assert empty["credentials"] == []


def test_remove_credential_ambiguous_prefix() -> None:
    record = {"credentials": [{"id": "abcdefgh1"}, {"id": "abcdefgh2"}]}
    with pytest.raises(AuthError, match="matches 2 keys"):
        f2.remove_credential(record, "abcdefgh")
    with pytest.raises(AuthError, match="no security key"):
        f2.remove_credential(record, "abc")  # too short to be a prefix


def test_list_credentials_of_nobody() -> None:
    assert f2.list_credentials(None) == []
    assert f2.list_credentials({}) == []


# ------------------------------------------------------------------- settings


def test_settings_defaults() -> None:
    s = f2.parse_settings({"rp_id": RP})
    assert s == f2.Fido2Settings(
        rp_id=RP, rp_name=RP, user_verification="preferred", origin=f"https://{RP}", timeout=60.0
    )


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({}, "auth.fido2.rp_id"),
        ({"rp_id": "https://gw.example.org"}, "auth.fido2.rp_id"),
        ({"rp_id": RP, "user_verification": "always"}, "auth.fido2.user_verification"),
        ({"rp_id": RP, "user_verfication": "required"}, "auth.fido2.user_verfication"),
        ({"rp_id": RP, "origin": "https://evil.example.com"}, "auth.fido2.origin"),
        ({"rp_id": RP, "origin": f"http://{RP}"}, "auth.fido2.origin"),
        ({"rp_id": RP, "timeout": 0}, "auth.fido2.timeout"),
        ({"rp_id": RP, "timeout": True}, "auth.fido2.timeout"),
        ({"rp_id": RP, "timeout": float("nan")}, "auth.fido2.timeout"),
        ({"rp_id": RP, "rp_name": ""}, "auth.fido2.rp_name"),
    ],
)
def test_settings_errors_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        f2.parse_settings(table)
    assert info.value.key == key


def test_begin_with_bad_settings_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        f2.Fido2Verifier().begin(context(None, cb(), {}))


# ------------------------------------------------------------ wire and factor


def test_challenge_derivation() -> None:
    nonce, binding = bytes(range(32)), bytes(range(100, 132))
    assert (
        f2.login_challenge(nonce, binding)
        == hashlib.sha256(b"gw-fido2-v1\x00" + nonce + binding).digest()
    )
    assert (
        f2.registration_challenge(nonce, binding)
        == hashlib.sha256(b"gw-fido2-register-v1\x00" + nonce + binding).digest()
    )
    with pytest.raises(AuthError):
        f2.login_challenge(nonce, b"")
    with pytest.raises(AuthError):
        f2.login_challenge(nonce[:31], binding)


def test_begin_payload_shape(enrolled: tuple[SoftAuthenticator, dict[str, Any]]) -> None:
    _, record = enrolled
    binding = cb()
    challenge = f2.Fido2Verifier().begin(context(record, binding))
    payload, state = challenge.payload, challenge.state
    assert set(payload) == {
        "v",
        "rp_id",
        "origin",
        "nonce",
        "allow",
        "user_verification",
        "timeout",
    }
    assert payload["allow"] == [record["credentials"][0]["id"]]
    nonce = b64d(payload["nonce"])
    assert len(nonce) == 32 and state["nonce"] == payload["nonce"]
    assert b64d(state["challenge"]) == f2.login_challenge(nonce, binding)
    json.dumps(payload), json.dumps(state)


def test_registered_in_the_factor_registry() -> None:
    assert registry.get("fido2") is f2.FACTOR
    assert f2.FACTOR.name == "fido2" and f2.FACTOR.description


def test_soft_authenticator_interoperates_with_fido2_server() -> None:
    # Check the test double against python-fido2's own relying party.
    from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction
    from fido2.server import Fido2Server
    from fido2.webauthn import (
        AttestationConveyancePreference,
        PublicKeyCredentialRpEntity,
        PublicKeyCredentialUserEntity,
        UserVerificationRequirement,
    )

    class WithPin(UserInteraction):
        def request_pin(self, permissions: Any, rp_id: str | None) -> str:
            return "24680"

    server = Fido2Server(
        PublicKeyCredentialRpEntity(id=RP, name="gw"),
        attestation=AttestationConveyancePreference.DIRECT,
    )
    client = Fido2Client(
        SoftAuthenticator(pin="24680"), DefaultClientDataCollector(f"https://{RP}"), WithPin()
    )
    uv = UserVerificationRequirement.REQUIRED
    creation, state = server.register_begin(
        PublicKeyCredentialUserEntity(id=USER_ID, name="alice"), user_verification=uv
    )
    auth_data = server.register_complete(state, client.make_credential(creation.public_key))
    assert auth_data.credential_data is not None
    request, state = server.authenticate_begin([auth_data.credential_data], user_verification=uv)
    response = client.get_assertion(request.public_key).get_response(0)
    server.authenticate_complete(state, [auth_data.credential_data], response)


def test_without_python_fido2_the_errors_say_what_to_install() -> None:
    script = """
import sys
sys.modules["fido2"] = None  # as if python-fido2 were not installed
import auth.fido2 as f2
from auth.base import ProverOptions
from relay.errors import AuthError, ConfigError
try:
    f2.FACTOR.prover(ProverOptions(user="a", prompt=lambda t, s: ""))
except AuthError as exc:
    print("prover:", exc)
try:
    f2.FACTOR.verifier()
except ConfigError as exc:
    print("verifier:", exc)
"""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert all("pip install 'gatewayd[fido2]'" in line for line in lines)
    assert lines[1].startswith("verifier: auth.fido2:")
