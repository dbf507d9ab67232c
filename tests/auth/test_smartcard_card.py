"""The smartcard prover through the real PC/SC stack: pyscard -> pcscd -> vpcd -> a virtual
PIV card (tests/support/virtual_piv.py) holding keys from the test PKI.

These tests need pcscd and vsmartcard-vpcd installed; the session fixture starts pcscd
when none runs and fails (never skips) when something is missing.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pcsc
import pki
import pytest
import virtual_piv as vpiv

from auth import smartcard
from auth.base import AuthContext, Outcome, ProverOptions
from auth.smartcard import FACTOR, SmartcardProver, SmartcardVerifier, wait_for_removal
from relay.errors import AuthError

pytestmark = pytest.mark.smartcard

PIN = "123456"
CHANNEL = bytes(range(32))


class Prompt:
    """Records prompts; answers with a fixed PIN (or runs a side effect first)."""

    def __init__(self, answer: str = PIN, before: Callable[[], None] | None = None) -> None:
        self.answer = answer
        self.before = before
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, text: str, secret: bool) -> str:
        self.calls.append((text, secret))
        if self.before is not None:
            self.before()
        return self.answer


@pytest.fixture
def readers(pcscd_vpcd: pcsc.VirtualReaders) -> pcsc.VirtualReaders:
    return pcscd_vpcd


@pytest.fixture
def reader(readers: pcsc.VirtualReaders) -> str:
    """The reader the tests insert cards into; the second vpcd reader stays empty."""
    return readers.names[0]


InsertCard = Callable[..., tuple[vpiv.VirtualPIV, vpiv.VpcdLink]]


@pytest.fixture
def insert_card(readers: pcsc.VirtualReaders, reader: str) -> Iterator[InsertCard]:
    """Put a virtual PIV card for a :class:`PersonCard` into ``reader``; pull it afterwards."""
    links: list[vpiv.VpcdLink] = []

    def insert(card: pki.PersonCard, **kw: Any) -> tuple[vpiv.VirtualPIV, vpiv.VpcdLink]:
        piv = vpiv.VirtualPIV(
            card.auth.cert,
            card.auth.key,
            card.sign.cert,
            card.sign.key,
            pin=kw.pop("pin", PIN),
            **kw,
        )
        link = vpiv.VpcdLink(piv, readers.host, readers.port(reader))
        link.insert()
        links.append(link)
        readers.wait_card(reader, present=True)
        return piv, link

    yield insert
    for link in links:
        link.remove()
        assert link.error is None, link.error
    readers.wait_card(reader, present=False)


def prover_for(reader: str | None, prompt: Prompt) -> SmartcardProver:
    values = {"smartcard_reader": reader} if reader is not None else {}
    prover = FACTOR.prover(ProverOptions("kari", prompt, values))
    assert isinstance(prover, SmartcardProver)
    return prover


def round_trip(
    card_pki: pki.CardPKI,
    prover: SmartcardProver,
    *,
    person: int = 1,
    prover_channel: bytes = CHANNEL,
    verifier_channel: bytes = CHANNEL,
) -> Outcome:
    """begin() in the 'gateway', respond() through the card, complete() in the 'gateway'."""
    smartcard.reload()
    ctx = AuthContext(
        user="kari",
        channel_binding=verifier_channel,
        now=dt.datetime.now(dt.UTC).timestamp(),
        source="192.0.2.7",
        credential={"cert_serial": pki.person_id(person)},
        settings=card_pki.settings(),
    )
    verifier = SmartcardVerifier()
    challenge = verifier.begin(ctx)
    response = asyncio.run(prover.respond(challenge.payload, prover_channel))
    return verifier.complete(ctx, challenge.state, response)


# -- good cards -------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_good_card_round_trip(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str, key_type: pki.KeyType
) -> None:
    card = card_pki.card(1, key_type)
    piv, _ = insert_card(card)
    prompt = Prompt()
    prover = prover_for(reader, prompt)

    outcome = round_trip(card_pki, prover)

    assert outcome.ok, outcome
    assert outcome.detail["person"] == pki.person_id(1)
    assert prompt.calls == [(f"PIN for the smartcard of Nordmann Kari1 ({reader}): ", True)]
    assert prover.reader == reader
    assert piv.tries_left == 3
    assert not piv.verified  # the card was reset at the end of the login
    assert any(line.startswith("87 ") and line.endswith("9000") for line in piv.log)


def test_first_reader_with_a_card_is_used(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str
) -> None:
    insert_card(card_pki.card(1, "ec"))
    prover = prover_for(None, Prompt())
    assert round_trip(card_pki, prover).ok
    assert prover.reader == reader


def test_reader_chosen_by_part_of_its_name(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str
) -> None:
    insert_card(card_pki.card(1, "ec"))
    prover = prover_for(reader[-5:].lower(), Prompt())  # "00 00"
    assert round_trip(card_pki, prover).ok


def test_compressed_certificate_object(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str
) -> None:
    insert_card(card_pki.card(1, "rsa"), compress=True)
    assert round_trip(card_pki, prover_for(reader, Prompt())).ok


def test_proof_does_not_replay_on_another_channel(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str
) -> None:
    insert_card(card_pki.card(1, "ec"))
    outcome = round_trip(
        card_pki, prover_for(reader, Prompt()), verifier_channel=bytes(reversed(CHANNEL))
    )
    assert (outcome.ok, outcome.reason) == (False, "bad signature")


def test_card_of_another_person(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str
) -> None:
    insert_card(card_pki.card(2, "rsa"))
    outcome = round_trip(card_pki, prover_for(reader, Prompt()), person=1)
    assert outcome.reason == "certificate of another person"


# -- PIN ----------------------------------------------------------------------------------


def test_wrong_pin_reports_tries_left(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str
) -> None:
    piv, _ = insert_card(card_pki.card(1, "rsa"))
    with pytest.raises(AuthError, match=r"^wrong PIN: 2 tries left before the card is blocked$"):
        round_trip(card_pki, prover_for(reader, Prompt("654321")))
    prompt = Prompt("000000")
    with pytest.raises(AuthError, match=r"^wrong PIN: 1 try left"):
        round_trip(card_pki, prover_for(reader, prompt))
    assert prompt.calls[0][0].endswith(", 2 tries left: ")
    assert piv.tries_left == 1
    # The right PIN resets the counter.
    assert round_trip(card_pki, prover_for(reader, Prompt())).ok
    assert piv.tries_left == 3


def test_last_wrong_pin_blocks_the_card(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str
) -> None:
    piv, _ = insert_card(card_pki.card(1, "ec"), max_tries=1)
    with pytest.raises(AuthError, match="blocked"):
        round_trip(card_pki, prover_for(reader, Prompt("999999")))
    assert piv.blocked


def test_blocked_card_is_refused_before_the_pin_prompt(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str
) -> None:
    piv, _ = insert_card(card_pki.card(1, "rsa"))
    piv.tries_left = 0
    prompt = Prompt()
    with pytest.raises(AuthError, match=r"blocked .*PUK"):
        round_trip(card_pki, prover_for(reader, prompt))
    assert prompt.calls == []


@pytest.mark.parametrize("pin", ["", "12345", "123456789", "12345\u00e6"])
def test_malformed_pin_is_not_sent(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str, pin: str
) -> None:
    piv, _ = insert_card(card_pki.card(1, "ec"))
    with pytest.raises(AuthError) as err:
        round_trip(card_pki, prover_for(reader, Prompt(pin)))
    assert piv.tries_left == 3  # no VERIFY attempt was spent
    if pin:
        assert pin not in str(err.value)


# -- no reader, no card, expired card, pulled card -----------------------------------------


def test_no_card_in_the_named_reader(readers: pcsc.VirtualReaders) -> None:
    empty = readers.names[1]
    assert not readers.card_present(empty)
    with pytest.raises(AuthError, match=f"^no smartcard in the reader '{empty}': insert your card"):
        asyncio.run(prover_for(empty, Prompt()).respond({"nonce": "A" * 43}, CHANNEL))


def test_no_card_in_any_reader(readers: pcsc.VirtualReaders) -> None:
    assert not any(readers.card_present(name) for name in readers.names)
    with pytest.raises(AuthError, match=r"^no smartcard in any reader .*insert your card"):
        asyncio.run(prover_for(None, Prompt()).respond({"nonce": "A" * 43}, CHANNEL))


def test_no_such_reader(readers: pcsc.VirtualReaders) -> None:
    with pytest.raises(AuthError, match=r"^no card reader named 'Lost Reader' \(readers: "):
        asyncio.run(prover_for("Lost Reader", Prompt()).respond({"nonce": "A" * 43}, CHANNEL))


def test_ambiguous_reader_name(readers: pcsc.VirtualReaders) -> None:
    with pytest.raises(AuthError, match="matches several card readers"):
        asyncio.run(prover_for("virtual", Prompt()).respond({"nonce": "A" * 43}, CHANNEL))


def test_expired_card_is_refused_before_the_pin_prompt(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str
) -> None:
    insert_card(card_pki.card(1, "rsa", expired=True))
    prompt = Prompt()
    with pytest.raises(AuthError, match=r"^the certificate on your smartcard expired on \d{4}-"):
        round_trip(card_pki, prover_for(reader, prompt))
    assert prompt.calls == []


def test_card_pulled_during_login(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str, readers: pcsc.VirtualReaders
) -> None:
    _, link = insert_card(card_pki.card(1, "ec"))

    def pull() -> None:
        link.remove()
        readers.wait_card(reader, present=False)

    with pytest.raises(AuthError):
        round_trip(card_pki, prover_for(reader, Prompt(before=pull)))


def test_malformed_challenge() -> None:
    for challenge in ({}, {"nonce": "abc"}, {"nonce": 5}):
        with pytest.raises(AuthError, match="malformed smartcard challenge"):
            asyncio.run(prover_for(None, Prompt()).respond(challenge, CHANNEL))


def test_pyscard_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "smartcard", None)
    monkeypatch.setitem(sys.modules, "smartcard.scard", None)
    nonce = base64.urlsafe_b64encode(b"\x00" * 32).rstrip(b"=").decode()
    with pytest.raises(AuthError) as err:
        asyncio.run(prover_for(None, Prompt()).respond({"nonce": nonce}, CHANNEL))
    assert "pip install 'gatewayd[smartcard]'" in str(err.value)
    assert "libpcsclite" in str(err.value)


# -- removal watcher ------------------------------------------------------------------------


def test_wait_for_removal(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str, readers: pcsc.VirtualReaders
) -> None:
    _, link = insert_card(card_pki.card(1, "ec"))

    async def scenario() -> None:
        watcher = asyncio.create_task(wait_for_removal(reader, poll=0.1))
        await asyncio.sleep(1.0)
        assert not watcher.done()  # card still there
        await asyncio.to_thread(link.remove)
        await asyncio.wait_for(watcher, timeout=5.0)

    asyncio.run(scenario())


def test_wait_for_removal_when_no_card(readers: pcsc.VirtualReaders) -> None:
    asyncio.run(asyncio.wait_for(wait_for_removal(readers.names[1], poll=0.1), timeout=5.0))


def test_wait_for_removal_of_unknown_reader(readers: pcsc.VirtualReaders) -> None:
    asyncio.run(asyncio.wait_for(wait_for_removal("Lost Reader", poll=0.1), timeout=5.0))


def test_wait_for_removal_can_be_cancelled(
    card_pki: pki.CardPKI, insert_card: InsertCard, reader: str
) -> None:
    insert_card(card_pki.card(1, "rsa"))

    async def scenario() -> None:
        watcher = asyncio.create_task(wait_for_removal(reader, poll=0.1))
        await asyncio.sleep(0.3)
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher

    asyncio.run(scenario())


# -- PC/SC failures that the vpcd setup cannot produce, through a stand-in scard module ----


class FakeScard:
    """The few ``smartcard.scard`` calls the connector makes, with chosen results."""

    def __init__(self, establish: int = 0, readers: tuple[int, list[str]] = (0, [])) -> None:
        from smartcard import scard

        for name in dir(scard):
            if name.startswith("SCARD_"):
                setattr(self, name, getattr(scard, name))
        self.SCardGetErrorMessage = scard.SCardGetErrorMessage
        self._establish = establish
        self._readers = readers
        self.released = 0

    def SCardEstablishContext(self, scope: int) -> tuple[int, int]:
        return self._establish, 1

    def SCardListReaders(self, context: int, groups: list[str]) -> tuple[int, list[str]]:
        return self._readers

    def SCardReleaseContext(self, context: int) -> int:
        self.released += 1
        return 0


def _respond_with(monkeypatch: pytest.MonkeyPatch, fake: FakeScard) -> str:
    monkeypatch.setattr(smartcard, "_pyscard", lambda: fake)
    nonce = base64.urlsafe_b64encode(b"\x00" * 32).rstrip(b"=").decode()
    with pytest.raises(AuthError) as err:
        asyncio.run(prover_for(None, Prompt()).respond({"nonce": nonce}, CHANNEL))
    return str(err.value)


def test_pcsc_service_not_running(monkeypatch: pytest.MonkeyPatch) -> None:
    from smartcard import scard

    message = _respond_with(monkeypatch, FakeScard(establish=scard.SCARD_E_NO_SERVICE))
    assert message.startswith("the PC/SC service is not running: start pcscd")


def test_no_reader_connected(monkeypatch: pytest.MonkeyPatch) -> None:
    from smartcard import scard

    fake = FakeScard(readers=(scard.SCARD_E_NO_READERS_AVAILABLE, []))
    message = _respond_with(monkeypatch, fake)
    assert message == "no smartcard reader found: connect your card reader"
    assert fake.released == 1


def test_wait_for_removal_without_pcsc_service(monkeypatch: pytest.MonkeyPatch) -> None:
    from smartcard import scard

    monkeypatch.setattr(
        smartcard, "_pyscard", lambda: FakeScard(establish=scard.SCARD_E_NO_SERVICE)
    )
    asyncio.run(asyncio.wait_for(wait_for_removal("Any Reader", poll=0.1), timeout=5.0))
