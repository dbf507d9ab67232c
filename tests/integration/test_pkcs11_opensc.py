"""Home office with OpenSC's PKCS#11 module, the real PC/SC stack and a PIV card (issue 13).

``gw connect --smartcard --pkcs11-module opensc-pkcs11.so`` in a pseudo-terminal, against
a real gatewayd: OpenSC's PIV driver talks through the real pcscd and the vpcd reader
to the virtual PIV card of tests/support/virtual_piv.py (which carries the CHUID, CCC
and discovery object OpenSC reads, besides the certificate containers), as a national
card is used through its middleware. The card sits in the second vpcd reader, so this
module does not share a reader with test_smartcard.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pcsc
import pki
import pytest
import virtual_piv as vpiv
from test_pkcs11 import PROMPT, Office
from test_smartcard import PIN, one_line, reload, set_table, toml_table

from gatewayd.demo import round_trip, wait_for

if TYPE_CHECKING:
    from world import World

OPENSC = next(
    (
        p
        for p in (
            "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
            "/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so",
            "/usr/lib/opensc-pkcs11.so",
        )
        if Path(p).exists()
    ),
    None,
)

pytestmark = [pytest.mark.integration, pytest.mark.smartcard]


@pytest.fixture(autouse=True, scope="module")
def _middleware() -> None:
    if OPENSC is None:  # fail, never skip: make test installs it
        pytest.fail("OpenSC's opensc-pkcs11.so is missing: apt install opensc", pytrace=False)


def opensc() -> str:
    assert OPENSC is not None
    return OPENSC


class Cards:
    def __init__(self, readers: pcsc.VirtualReaders) -> None:
        self.readers = readers
        self.reader = readers.names[-1]

    @contextlib.contextmanager
    def inserted(
        self, issued: pki.Issued, sign: pki.Issued | None = None, **kw: Any
    ) -> Iterator[tuple[vpiv.VirtualPIV, vpiv.VpcdLink]]:
        card = vpiv.VirtualPIV(
            issued.cert, issued.key, sign.cert if sign else None, sign.key if sign else None,
            pin=PIN, **kw,
        )  # fmt: skip
        link = vpiv.VpcdLink(card, self.readers.host, self.readers.port(self.reader))
        link.insert()
        self.readers.wait_card(self.reader, present=True)
        try:
            yield card, link
        finally:
            link.remove()
            self.readers.wait_card(self.reader, present=False)


@pytest.fixture(scope="module")
def office(card_world: World, card_pki: pki.CardPKI) -> Office:
    set_table(card_world.lab, "auth.smartcard", toml_table(card_pki.settings()))
    set_table(
        card_world.lab,
        "modes.homeoffice",
        'factors = ["smartcard", "password"]\ncard_heartbeat = 1\ncard_heartbeat_timeout = 2',
    )
    reload(card_world.lab)
    return Office(card_world, card_pki)


@pytest.fixture(scope="module")
def cards(pcscd_vpcd: pcsc.VirtualReaders) -> Cards:
    return Cards(pcscd_vpcd)


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_good_card_through_opensc(office: Office, cards: Cards, key_type: pki.KeyType) -> None:
    n = {"rsa": 201, "ec": 202}[key_type]
    card = office.pki.card(n, key_type)
    user = office.employee(card.person)
    with cards.inserted(card.auth, card.sign) as (piv, _):
        term, port = office.connect(user, None, module=opensc())
        try:
            prompt = term.expect(PROMPT)
            # OpenSC names the token after the card holder.
            assert prompt["holder"] == f"Nordmann Kari{n}"
            assert prompt["tries"] is None
            term.type(PIN)
            term.expect(rf"Password for {user}: ")
            term.type("home office pass phrase")
            term.expect(r"listening on 127\.0\.0\.1:\d+")
            assert round_trip(port, b"x-ray\n") == b"X-RAY\n"
        finally:
            term.close()
        assert any(line.startswith("87 -> 9000") for line in piv.log)  # signed on the card
    assert PIN not in term.output
    smartcard, password = office.attempts(user)
    assert (smartcard["outcome"], password["outcome"]) == ("success", "success")
    assert smartcard["person"] == card.person
    expected = {"rsa": "rsa-pkcs1-sha256", "ec": "ecdsa-p256-sha256"}[key_type]
    assert smartcard["algorithm"] == expected


def test_wrong_pin_then_locked(office: Office, cards: Cards) -> None:
    card = office.pki.card(203)
    user = office.employee(card.person)
    with cards.inserted(card.auth, card.sign) as (piv, _):
        status, said, _ = office.attempt(user, None, pin="135790", module=opensc())
        assert status == 1 and piv.tries_left == 2
        # OpenSC's PIV token tells the last try and the lock, not "count low".
        assert one_line(said) == "gw: wrong PIN"
        status, said, prompt = office.attempt(user, None, pin="135791", module=opensc())
        assert prompt["tries"] is None
        assert status == 1
        assert one_line(said) == "gw: wrong PIN: 1 try left before the card is locked"
        status, said, prompt = office.attempt(user, None, pin="135792", module=opensc())
        assert prompt["tries"] == ", 1 try left"
        assert status == 1 and piv.tries_left == 0
        assert one_line(said) == "gw: wrong PIN: the card's PIN is now locked"
        # Locked: not even asked.
        status, out, _ = office.attempt(user, None, pin=None, module=opensc())
        assert status == 4
        assert one_line(out) == (
            "gw: the PIN of the smartcard 'Nordmann Kari203' is locked: unblock it with its "
            "PUK (or ask the card's issuer)"
        )
    records = office.attempts(user)
    assert [r["reason"] for r in records] == ["wrong pin"] * 3 + ["card blocked"]
    assert [r.get("tries_left") for r in records] == [None, 1, 0, None]
    assert all(r["reported_by"] == "client" for r in records)
    assert all(f"2.5.4.5={card.person}" in r["subject"] for r in records)


def test_card_pulled_ends_the_session(office: Office, cards: Cards) -> None:
    card = office.pki.card(204)
    user = office.employee(card.person)
    with cards.inserted(card.auth, card.sign) as (_, link):
        term, port = office.login(user, None, module=opensc())
        try:
            assert round_trip(port, b"hello\n") == b"HELLO\n"
            link.remove()
            status = term.wait(20)
        finally:
            term.close()
    assert status == 1
    assert f"gw: the smartcard was removed from '{cards.reader}': session ended" in term.output
    assert "Traceback" not in term.output
    wait_for(
        lambda: any(r["user"] == user for r in office.lab.events("session.end")), 10, "session.end"
    )
    (end,) = [r for r in office.lab.events("session.end") if r["user"] == user]
    assert end["reason"] == "client: card removed"
