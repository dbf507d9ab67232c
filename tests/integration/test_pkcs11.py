"""Home office with a smartcard through PKCS#11 middleware, end to end (issue 13).

The real ``gw connect --smartcard --pkcs11-module`` in a pseudo-terminal, against a real
gatewayd trusting the test PKI (tests/support/pki.py), with SoftHSM2 as the middleware:
a real PKCS#11 module whose tokens hold the person certificates and keys
(tests/support/softhsm.py). Each test has its own token directory, so ``gw`` sees
exactly the tokens the test made.

SoftHSM2 cannot lock a PIN (a wrong PIN only sets its "count low" flag); the locked PIN
is tested through OpenSC and the virtual PIV card (test_pkcs11_opensc.py).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pki
import pytest
import softhsm
from test_smartcard import (
    PASSWORD,
    PIN,
    Terminal,
    one_line,
    reload,
    set_table,
    toml_table,
)

from gatewayd.demo import BIN, free_port, round_trip, wait_for

if TYPE_CHECKING:
    from world import World

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True, scope="module")
def _middleware() -> None:
    if not softhsm.available():  # fail, never skip: make test installs both
        pytest.fail(
            f"SoftHSM2 ({softhsm.MODULE}) or OpenSC's pkcs11-tool is missing: "
            "apt install softhsm2 opensc",
            pytrace=False,
        )


TOKEN = "Kari Card"
PROMPT = r"PIN for the smartcard of (?P<holder>[^(]+) \((?P<token>[^)]+)\)(?P<tries>, [^:]+)?: "


class Office:
    """The gateway (heartbeat every second, ended after two without one) and employees."""

    def __init__(self, world: World, card_pki: pki.CardPKI) -> None:
        self.lab = world.lab
        self.pki = card_pki
        self._users = 0

    def employee(self, person: str) -> str:
        self._users += 1
        user = f"kari{self._users}"
        args = ["user", "add", user, "--org", "clinic", "--password-stdin"]
        self.lab.admin(*args, "--cert-serial", person, input=PASSWORD + "\n")
        self.lab.admin("grant", "add", user, "pc1")
        return user

    def connect(
        self,
        user: str,
        hsm: softhsm.SoftHSM | None,
        *extra: str,
        module: str | None = None,
        env: dict[str, str] | None = None,
    ) -> tuple[Terminal, int]:
        port = free_port()
        args = self.lab.connect_args(
            "pc1", user, "echo", "homeoffice", "-L", f"127.0.0.1:{port}", "--smartcard",
            *(["--pkcs11-module", module or softhsm.MODULE] if module != "" else []), *extra,
        )  # fmt: skip
        env = {**(hsm.env if hsm else {}), **(env or {})}
        if module == "":
            env["GW_PKCS11_MODULE"] = "/nonexistent/env-pkcs11.so"
        return Terminal(self.lab, args, env), port

    def login(
        self, user: str, hsm: softhsm.SoftHSM | None, *extra: str, module: str | None = None
    ) -> tuple[Terminal, int]:
        term, port = self.connect(user, hsm, *extra, module=module)
        try:
            term.expect(PROMPT)
            term.type(PIN)
            term.expect(rf"Password for {user}: ")
            term.type(PASSWORD)
            term.expect(r"listening on 127\.0\.0\.1:\d+")
        except BaseException:
            term.close()
            raise
        return term, port

    def attempt(
        self, user: str, hsm: softhsm.SoftHSM | None, pin: str | None = PIN, **kw: Any
    ) -> tuple[int, str, Any]:
        """A login that stops at the card: (exit status, what gw said after the PIN
        prompt or all it said, the prompt)."""
        term, _ = self.connect(user, hsm, *kw.pop("extra", ()), **kw)
        try:
            prompt = None
            if pin is not None:
                prompt = term.expect(PROMPT)
                term.type(pin)
            status = term.wait()
        finally:
            term.close()
        said = term.raw[prompt.end() :] if prompt else term.raw
        return status, said.replace("\r\n", "\n"), prompt

    def attempts(self, user: str) -> list[dict[str, Any]]:
        return [r for r in self.lab.events("auth.attempt") if r["user"] == user]


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


@pytest.fixture
def hsm(tmp_path: Path) -> softhsm.SoftHSM:
    return softhsm.SoftHSM(tmp_path / "softhsm")


def card_on_token(
    office: Office, hsm: softhsm.SoftHSM, n: int, key_type: pki.KeyType = "rsa", **kw: Any
) -> pki.PersonCard:
    """Person ``n``'s card as a token: the authentication and the signing certificate."""
    card = office.pki.card(n, key_type)
    hsm.token(TOKEN, PIN)
    hsm.put(TOKEN, PIN, card.auth, label="Authentication", key_id="01", **kw)
    hsm.put(TOKEN, PIN, card.sign, label="Signature", key_id="02")
    return card


@pytest.mark.parametrize(
    ("key_type", "allowed", "algorithm"),
    [
        ("rsa", None, "rsa-pkcs1-sha256"),
        ("rsa", "RSA-PKCS-PSS", "rsa-pss-sha256"),
        ("ec", None, "ecdsa-p256-sha256"),
    ],
)
def test_good_token_opens_the_tunnel(
    office: Office,
    hsm: softhsm.SoftHSM,
    key_type: pki.KeyType,
    allowed: str | None,
    algorithm: str,
) -> None:
    n = {"rsa-pkcs1-sha256": 101, "rsa-pss-sha256": 102, "ecdsa-p256-sha256": 103}[algorithm]
    card = card_on_token(office, hsm, n, key_type, allowed=allowed)
    user = office.employee(card.person)
    term, port = office.connect(user, hsm)
    try:
        prompt = term.expect(PROMPT)
        assert prompt["holder"] == f"Nordmann Kari{n}" and prompt["token"] == TOKEN
        assert prompt["tries"] is None
        term.type(PIN)
        term.expect(rf"Password for {user}: ")
        term.type(PASSWORD)
        term.expect(r"listening on 127\.0\.0\.1:\d+")
        assert round_trip(port, b"referral\n") == b"REFERRAL\n"
    finally:
        term.close()
    assert PIN not in term.output and PASSWORD not in term.output  # typed without echo
    smartcard, password = office.attempts(user)
    assert (smartcard["factor"], smartcard["outcome"]) == ("smartcard", "success")
    assert smartcard["person"] == card.person and password["outcome"] == "success"
    # The signing certificate on the same token was never a candidate: only one fits.
    assert f"2.5.4.5={card.person}" in smartcard["subject"]
    assert smartcard["algorithm"] == algorithm


def test_wrong_pin(office: Office, hsm: softhsm.SoftHSM) -> None:
    card = card_on_token(office, hsm, 104)
    user = office.employee(card.person)
    status, said, _ = office.attempt(user, hsm, pin="135790")
    assert status == 1
    assert one_line(said) == "gw: wrong PIN: few tries left before the card is locked"
    # The token's flag says so at the next prompt too.
    status, said, prompt = office.attempt(user, hsm, pin="135791")
    assert prompt["tries"] == ", few tries left" and status == 1
    (first, second) = office.attempts(user)
    for record in (first, second):
        assert (record["factor"], record["outcome"]) == ("smartcard", "failure")
        assert record["reason"] == "wrong pin" and record["reported_by"] == "client"
        assert f"2.5.4.5={card.person}" in record["subject"]
    # The right PIN still works.
    term, _ = office.login(user, hsm)
    term.close()


def test_no_suitable_certificate(office: Office, hsm: softhsm.SoftHSM) -> None:
    # Only the signing certificate and one of the central-HSM policy.
    card = office.pki.card(105)
    hsm.token(TOKEN, PIN)
    hsm.put(TOKEN, PIN, card.sign, label="Signature", key_id="02")
    hsm_policy = office.pki.person(105, policy=pki.POLICY_PERSON_HSM)
    hsm.put(TOKEN, PIN, hsm_policy, label="Other policy", key_id="03")
    user = office.employee(card.person)
    status, out, _ = office.attempt(user, hsm, pin=None)
    assert status == 4
    assert one_line(out) == (
        "gw: no suitable certificate on the smartcard for this gateway "
        "('Other policy' on 'Kari Card' (Nordmann Kari105, issuer Test Person High CA G1): "
        f"without policy {pki.POLICY_PERSON_CARD}; 'Signature' on 'Kari Card' (Nordmann "
        "Kari105, issuer Test Person High CA G1): not for authentication)"
    )


def test_several_suitable_certificates_and_cert_label(office: Office, hsm: softhsm.SoftHSM) -> None:
    card = office.pki.card(106)
    hsm.token(TOKEN, PIN)
    hsm.put(TOKEN, PIN, card.auth, label="Card A", key_id="01")
    other = office.pki.card(107)
    hsm.put(TOKEN, PIN, other.auth, label="Card B", key_id="02")
    user = office.employee(card.person)
    status, out, _ = office.attempt(user, hsm, pin=None)
    assert status == 4
    assert one_line(out) == (
        "gw: several suitable certificates on the smartcard: 'Card A' on 'Kari Card' "
        "(Nordmann Kari106, issuer Test Person High CA G1); 'Card B' on 'Kari Card' "
        "(Nordmann Kari107, issuer Test Person High CA G1): choose one with --cert-label"
    )
    status, out, _ = office.attempt(user, hsm, pin=None, extra=("--cert-label", "Card C"))
    assert status == 4
    assert one_line(out) == (
        "gw: no suitable certificate labelled 'Card C' (suitable: 'Card A', 'Card B')"
    )
    term, port = office.login(user, hsm, "--cert-label", "Card A")
    try:
        assert round_trip(port, b"a\n") == b"A\n"
    finally:
        term.close()
    # The other person's certificate is refused by the gateway, signature or not.
    status, said, prompt = office.attempt(user, hsm, extra=("--cert-label", "Card B"))
    assert prompt["holder"] == "Nordmann Kari107"
    assert status == 1 and one_line(said) == "gw: authentication failed"
    assert office.attempts(user)[-1]["reason"] == "certificate of another person"


def test_module_cannot_be_loaded(office: Office, hsm: softhsm.SoftHSM, tmp_path: Path) -> None:
    user = office.employee(pki.person_id(108))
    status, out, _ = office.attempt(user, hsm, pin=None, module="/nonexistent/pkcs11.so")
    assert status == 4
    assert one_line(out) == (
        "gw: cannot load the PKCS#11 module /nonexistent/pkcs11.so: /nonexistent/pkcs11.so: "
        "cannot open shared object file: No such file or directory"
    )
    # GW_PKCS11_MODULE is the default.
    status, out, _ = office.attempt(user, hsm, pin=None, module="")
    assert status == 4 and "cannot load the PKCS#11 module /nonexistent/env-pkcs11.so" in out
    # A file that is no PKCS#11 module.
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a library")
    status, out, _ = office.attempt(user, hsm, pin=None, module=str(junk))
    assert status == 4 and one_line(out).startswith(f"gw: cannot load the PKCS#11 module {junk}")


def test_no_token(office: Office, hsm: softhsm.SoftHSM) -> None:
    user = office.employee(pki.person_id(109))
    status, out, _ = office.attempt(user, hsm, pin=None)  # SoftHSM: only its empty slot
    assert status == 4
    assert one_line(out) == (
        f"gw: no smartcard found by the PKCS#11 module {softhsm.MODULE}: insert your card"
    )


def test_token_removed_ends_the_session(office: Office, hsm: softhsm.SoftHSM) -> None:
    card = card_on_token(office, hsm, 110)
    user = office.employee(card.person)
    term, port = office.login(user, hsm)
    try:
        # The gateway ends a session whose card_present heartbeat stops after 2 s: the
        # token-present polling keeps sending it.
        time.sleep(3.5)
        assert round_trip(port, b"still here\n") == b"STILL HERE\n"
        hsm.remove(TOKEN)
        status = term.wait(20)
    finally:
        term.close()
    assert status == 1
    assert "gw: the smartcard was removed from 'SoftHSM slot ID 0x" in term.output
    assert "Traceback" not in term.output
    wait_for(
        lambda: any(r["user"] == user for r in office.lab.events("session.end")), 10, "session.end"
    )
    (end,) = [r for r in office.lab.events("session.end") if r["user"] == user]
    assert end["reason"] == "client: card removed"


def test_expired_certificate_is_refused_before_the_pin(
    office: Office, hsm: softhsm.SoftHSM
) -> None:
    card = office.pki.card(111, expired=True)
    hsm.token(TOKEN, PIN)
    hsm.put(TOKEN, PIN, card.auth, label="Authentication", key_id="01")
    user = office.employee(card.person)
    status, out, _ = office.attempt(user, hsm, pin=None)
    assert status == 1
    assert re.fullmatch(
        r"gw: the certificate on your smartcard expired on \d{4}-\d\d-\d\d: order a new card",
        one_line(out),
    )
    wait_for(lambda: bool(office.attempts(user)), 60, "auth.attempt")
    (record,) = office.attempts(user)
    assert (record["outcome"], record["reason"]) == ("failure", "certificate expired")
    assert record["not_after"] == card.auth.cert.not_valid_after_utc.isoformat()


def test_key_that_does_not_match_its_certificate(office: Office, hsm: softhsm.SoftHSM) -> None:
    # A token whose key under the certificate's id is another one: gw checks the
    # signature against the certificate before it sends anything signed.
    card, other = office.pki.card(112), office.pki.card(113)
    hsm.token(TOKEN, PIN)
    hsm.put(TOKEN, PIN, card.auth, label="Authentication", key_id="01", with_key=False)
    hsm.put(TOKEN, PIN, other.auth, label="Other", key_id="01", cert=False)
    user = office.employee(card.person)
    status, said, _ = office.attempt(user, hsm)
    assert status == 1
    assert one_line(said) == "gw: the smartcard's signature does not match its certificate"
    wait_for(lambda: bool(office.attempts(user)), 60, "auth.attempt")
    (record,) = office.attempts(user)
    assert (record["reason"], record["reported_by"]) == ("card error", "client")


def test_without_python_pkcs11(office: Office, hsm: softhsm.SoftHSM, tmp_path: Path) -> None:
    fake = tmp_path / "site" / "pkcs11"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("python-pkcs11 is not installed")\n')
    user = office.employee(pki.person_id(114))
    env = {"PYTHONPATH": str(fake.parent)}
    status, out, _ = office.attempt(user, hsm, pin=None, env=env)
    assert status == 4
    assert one_line(out) == (
        "gw: smartcards through a PKCS#11 module need python-pkcs11: pip install 'gatewayd[pkcs11]'"
    )


def test_pin_needs_a_terminal(office: Office, hsm: softhsm.SoftHSM) -> None:
    card = card_on_token(office, hsm, 115)
    user = office.employee(card.person)
    args = office.lab.connect_args(
        "pc1", user, "echo", "homeoffice", "--stdio", "--smartcard",
        "--pkcs11-module", softhsm.MODULE,
    )  # fmt: skip
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        input="",
        capture_output=True,
        text=True,
        env=office.lab.env() | hsm.env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 4
    assert one_line(result.stderr) == (
        f"gw: PIN for the smartcard of Nordmann Kari115 ({TOKEN}) needed, "
        "but there is no terminal to ask on"
    )


def test_names_from_the_token_cannot_write_to_the_terminal(
    office: Office, hsm: softhsm.SoftHSM
) -> None:
    # A hostile token: its label clears the screen and reverses the text after it.
    label = "Kari\x1b[2J\u202eevil"
    card = office.pki.card(116)
    hsm.token(label, PIN)
    hsm.put(label, PIN, card.auth, label="A\x1b]0;title\x07", key_id="01")
    hsm.put(label, PIN, office.pki.card(117).auth, label="B", key_id="02")
    user = office.employee(card.person)
    status, out, _ = office.attempt(user, hsm, pin=None)
    # The only escape sequence on the terminal is gw's own erasing of its progress line.
    ours = out.replace("\r\x1b[K", "")
    assert status == 4 and "\x1b" not in ours and "\u202e" not in ours
    assert "'A\\x1b]0;title\\x07' on 'Kari\\x1b[2J\\u202eevil'" in one_line(out)
    term, _ = office.connect(user, hsm, "--cert-label", "A\x1b]0;title\x07")
    try:
        prompt = term.expect(PROMPT)
    finally:
        term.close()
    assert prompt["token"] == "Kari\\x1b[2J\\u202eevil"


def test_empty_pin_is_not_sent_to_the_token(office: Office, hsm: softhsm.SoftHSM) -> None:
    card = card_on_token(office, hsm, 118)
    user = office.employee(card.person)
    status, said, _ = office.attempt(user, hsm, pin="")
    assert status == 1 and one_line(said) == "gw: no PIN was entered"
    wait_for(lambda: bool(office.attempts(user)), 60, "auth.attempt")
    (record,) = office.attempts(user)
    assert (record["reason"], record["reported_by"]) == ("pin not verified", "client")


def test_renewed_card_with_its_expired_certificate_needs_no_choice(
    office: Office, hsm: softhsm.SoftHSM
) -> None:
    old = office.pki.card(119, expired=True)
    new = office.pki.card(119)
    hsm.token(TOKEN, PIN)
    hsm.put(TOKEN, PIN, old.auth, label="Authentication 2021", key_id="01")
    hsm.put(TOKEN, PIN, new.auth, label="Authentication 2024", key_id="02")
    user = office.employee(new.person)
    term, _ = office.login(user, hsm)
    term.close()
    (smartcard, _) = office.attempts(user)
    assert smartcard["outcome"] == "success"
    assert smartcard["serial"] == format(new.auth.cert.serial_number, "x")
