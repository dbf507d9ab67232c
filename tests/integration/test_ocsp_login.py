"""Home office with a PKI smartcard whose revocation the gateway asks an OCSP responder.

Real processes on loopback, as tests/integration/test_smartcard.py runs them: gatewayd
(``[auth.smartcard] revocation = "ocsp"``, its responder a real HTTP OCSP responder
thread built on cryptography's OCSPResponseBuilder, tests/support/ocsp_responder.py),
an agent with an echo service, and ``gw connect --smartcard`` in a pseudo-terminal
reaching a real pcscd whose vpcd reader holds a virtual PIV card. Also the strict RFC
5280 path validation mode through the same journey.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ocsp_responder
import pcsc
import pki
import pytest
from test_smartcard import (
    PASSWORD,
    PIN,
    PIN_PROMPT,
    HomeOffice,
    one_line,
    reload,
    set_table,
    toml_table,
)

from gatewayd.demo import round_trip

if TYPE_CHECKING:
    from world import World

pytestmark = [pytest.mark.integration, pytest.mark.smartcard]


@pytest.fixture(scope="module")
def responder(card_pki: pki.CardPKI) -> Iterator[ocsp_responder.OcspResponder]:
    with ocsp_responder.running([card_pki.root, card_pki.intermediate]) as running:
        yield running


@pytest.fixture(scope="module")
def office(card_world: World, card_pki: pki.CardPKI, pcscd_vpcd: pcsc.VirtualReaders) -> HomeOffice:
    return HomeOffice(card_world, card_pki, pcscd_vpcd)


def configure(office: HomeOffice, **table: Any) -> None:
    """The operator's ``[auth.smartcard]``, then ``systemctl reload gatewayd``."""
    set_table(office.lab, "auth.smartcard", toml_table(office.pki.settings(**table)))
    reload(office.lab)


def log_in(office: HomeOffice, user: str) -> dict[str, Any]:
    """PIN and password at the terminal; the tunnel carries data; the smartcard record."""
    term, port = office.connect(user)
    try:
        term.expect(PIN_PROMPT)
        term.type(PIN)
        term.expect(rf"Password for {user}: ")
        term.type(PASSWORD)
        term.expect(r"listening on 127\.0\.0\.1:\d+")
        assert round_trip(port, b"discharge letter\n") == b"DISCHARGE LETTER\n"
    finally:
        term.close()
    (record,) = [r for r in office.attempts(user) if r["factor"] == "smartcard"]
    assert (record["outcome"], record["reason"]) == ("success", "ok")
    return record


def refused(office: HomeOffice, user: str, issued: pki.Issued) -> dict[str, Any]:
    with office.inserted(issued):
        status, said, prompt = office.attempt(user)
    assert prompt is not None and status == 1
    assert one_line(said) == "gw: authentication failed"
    record = office.last_attempt(user)
    assert (record["factor"], record["outcome"]) == ("smartcard", "failure")
    return record


def test_good_card_checked_by_ocsp(
    office: HomeOffice, responder: ocsp_responder.OcspResponder
) -> None:
    configure(office, crls=False, revocation="ocsp", ocsp_url=responder.url)
    card = office.pki.card(401)
    user = office.employee(card.person)
    before = responder.requests
    with office.inserted(card.auth):
        record = log_in(office, user)
    assert record["revocation"] == ["ocsp", "ocsp"]  # the card's certificate and its CA's
    assert responder.requests >= before + 2


def test_revoked_by_ocsp_while_the_crl_does_not_list_it(
    office: HomeOffice, responder: ocsp_responder.OcspResponder
) -> None:
    configure(office, revocation="ocsp-then-crl", ocsp_url=responder.url, ocsp_cache_seconds=0)
    card = office.pki.card(402)
    user = office.employee(card.person)
    office.pki.revoke(card.auth)  # after the configured CRL was written: only OCSP knows
    record = refused(office, user, card.auth)
    assert record["reason"] == "certificate revoked"
    assert record["revoked_by"] == "ocsp"
    assert record["revoked_serial"] == format(card.auth.cert.serial_number, "x")


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [("http 500", "ocsp unavailable"), ("wrong key", "ocsp invalid"), ("stale", "ocsp stale")],
)
def test_no_proven_answer_refuses_the_login(
    office: HomeOffice, responder: ocsp_responder.OcspResponder, behaviour: str, reason: str
) -> None:
    configure(office, crls=False, revocation="ocsp", ocsp_url=responder.url)
    card = office.pki.card(403)
    user = office.employee(card.person)
    responder.behaviour = behaviour
    try:
        record = refused(office, user, card.auth)
    finally:
        responder.behaviour = "normal"
    assert record["reason"] == reason
    assert record["ocsp_url"] == responder.url and record["ocsp_error"]


def test_unknown_certificate_refuses_the_login(
    office: HomeOffice, responder: ocsp_responder.OcspResponder
) -> None:
    configure(office, crls=False, revocation="ocsp", ocsp_url=responder.url)
    card = office.pki.card(404)
    responder.unknown.add(card.auth.cert.serial_number)
    user = office.employee(card.person)
    assert refused(office, user, card.auth)["reason"] == "ocsp unknown"


def test_rfc5280_path_validation(office: HomeOffice) -> None:
    configure(office, path_validation="rfc5280")
    card = office.pki.card(405)
    user = office.employee(card.person)
    with office.inserted(card.auth):
        record = log_in(office, user)
    assert record["revocation"] == ["crl", "crl"]
    untrusted = office.pki.untrusted(406)
    user = office.employee(pki.person_id(406))
    record = refused(office, user, untrusted)
    assert record["reason"] == "untrusted issuer"
