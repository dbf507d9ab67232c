"""Home office with a PKI smartcard, end to end, as an employee runs it (issue 4).

Real processes on loopback: gatewayd (its ``[auth.smartcard]`` trusting the test PKI of
tests/support/pki.py, with that PKI's CRLs), an agent exposing an echo service,
``gw admin``, and ``gw connect --smartcard`` in a pseudo-terminal (the PIN is asked
without echo, which needs a terminal), reaching a real pcscd whose vpcd reader holds a
virtual PIV card (tests/support/virtual_piv.py). One world per module; every test
uses its own employee and card.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pcsc
import pki
import pytest
import virtual_piv as vpiv
from terminal_screen import screen

from gatewayd.demo import BIN, Lab, free_port, round_trip, wait_for

if TYPE_CHECKING:
    from world import World

pytestmark = [pytest.mark.integration, pytest.mark.smartcard]

PIN = "246813"
PASSWORD = "home office pass phrase"
NO_ANSWER = "no answer from the client (eof)"
PIN_PROMPT = (
    r"PIN for the smartcard of (?P<holder>[^(]+) \((?P<reader>[^)]+)\)"
    r"(?P<tries>, \d (?:try|tries) left)?: "
)


# -- a person at a terminal -------------------------------------------------------------


class Terminal:
    """A command in a pseudo-terminal of its own, as a person at a keyboard runs it.

    The command gets a new session without a controlling terminal, so ``getpass``
    falls back to the pty on its standard input, turning echo off there.
    """

    def __init__(self, lab: Lab, args: list[str], env: dict[str, str] | None = None) -> None:
        master, slave = os.openpty()
        full_env = lab.env()
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=full_env,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.raw = ""
        self.pos = 0

    @property
    def output(self) -> str:
        return self.raw.replace("\r\n", "\n")

    def _read(self, timeout: float) -> bool:
        """Read what is there; False once the terminal is closed."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: every slave end closed, the command is gone
            return False
        self.raw += data.decode("utf-8", "replace")
        return bool(data)

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until ``pattern`` appears after what the last expect() matched."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern).search(self.raw, self.pos)
            if found is not None:
                self.pos = found.end()
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output}")
            if not self._read(0.1) and self.proc.poll() is not None:
                raise AssertionError(
                    f"exited {self.proc.returncode} before {pattern!r}:\n{self.output}"
                )

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def wait(self, timeout: float = 30.0) -> int:
        """Read until the command exits; its exit status."""
        deadline = time.monotonic() + timeout
        while self._read(0.1) or self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"still running after {timeout} s:\n{self.output}")
        return self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            os.close(self.master)


# -- the world: a gateway that trusts the test PKI, an office PC, employees ------------


def toml_table(table: dict[str, Any]) -> str:
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in table.items())


def set_table(lab: Lab, header: str, body: str) -> None:
    """Replace the body of ``[header]`` in the gateway's config."""
    text = lab.config.read_text()
    pattern = re.compile(rf"^\[{re.escape(header)}\]\n.*?(?=^\[|\Z)", re.S | re.M)
    new, n = pattern.subn(lambda _: f"[{header}]\n{body}\n\n", text, count=1)
    assert n == 1, f"no [{header}] in {lab.config}"
    lab.config.write_text(new)


def reload(lab: Lab) -> None:
    """SIGHUP, as ``systemctl reload gatewayd`` sends; wait for its audit record."""
    before = len(lab.events("gateway.reload"))
    gatewayd = next(p for p in lab.procs if p.name == "gatewayd")
    gatewayd.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: len(lab.events("gateway.reload")) > before, 60, "gateway.reload")
    assert lab.events("gateway.reload")[-1]["outcome"] == "success"


class HomeOffice:
    def __init__(self, world: World, card_pki: pki.CardPKI, readers: pcsc.VirtualReaders) -> None:
        self.world = world
        self.lab = world.lab
        self.pki = card_pki
        self.readers = readers
        self.reader = readers.names[0]
        self._users = itertools.count(1)

    def employee(self, person: str, *, cert: pki.Issued | None = None) -> str:
        """An employee of the clinic, granted pc1, with a password and a smartcard.

        With ``cert`` the card is enrolled from the certificate file (pinning its
        issuer), else by the person's serialNumber.
        """
        user = f"kari{next(self._users)}"
        args = ["user", "add", user, "--org", "clinic", "--password-stdin"]
        if cert is not None:
            path = self.lab.root / f"{user}.pem"
            path.write_bytes(cert.pem)
            args += ["--cert-file", str(path)]
        else:
            args += ["--cert-serial", person]
        out = self.lab.admin(*args, input=PASSWORD + "\n")
        assert out.startswith(f"user {user} added; smartcard {person}")
        self.lab.admin("grant", "add", user, "pc1")
        return user

    @contextlib.contextmanager
    def inserted(
        self, issued: pki.Issued, **kw: Any
    ) -> Iterator[tuple[vpiv.VirtualPIV, vpiv.VpcdLink]]:
        """A virtual PIV card with ``issued`` in slot 9A, in the reader for the block."""
        card = vpiv.VirtualPIV(issued.cert, issued.key, pin=PIN, **kw)
        link = vpiv.VpcdLink(card, self.readers.host, self.readers.port(self.reader))
        link.insert()
        self.readers.wait_card(self.reader, present=True)
        try:
            yield card, link
        finally:
            link.remove()
            self.readers.wait_card(self.reader, present=False)

    def connect(
        self, user: str, *extra: str, reader: str | None = None, env: dict[str, str] | None = None
    ) -> tuple[Terminal, int]:
        """``gw connect pc1 --mode homeoffice -L ... --smartcard --reader ...`` in a terminal."""
        port = free_port()
        args = self.lab.connect_args(
            "pc1", user, "echo", "homeoffice", "-L", f"127.0.0.1:{port}", "--smartcard",
            "--reader", reader or self.reader, *extra,
        )  # fmt: skip
        return Terminal(self.lab, args, env), port

    def login(self, user: str) -> tuple[Terminal, int]:
        """A login that works: PIN, then password; returns once the tunnel listens."""
        term, port = self.connect(user)
        try:
            term.expect(PIN_PROMPT)
            term.type(PIN)
            term.expect(rf"Password for {user}: ")
            term.type(PASSWORD)
            term.expect(r"listening on 127\.0\.0\.1:\d+")
        except BaseException:
            term.close()
            raise
        return term, port

    def attempt(
        self, user: str, pin: str | None = PIN, **kw: Any
    ) -> tuple[int, str, re.Match[str] | None]:
        """A login that stops at the card: (exit status, what gw said after the PIN
        prompt, or all it said if it asked none; the PIN prompt)."""
        term, _ = self.connect(user, **kw)
        try:
            prompt = None
            if pin is not None:
                prompt = term.expect(PIN_PROMPT)
                term.type(pin)
            status = term.wait()
        finally:
            term.close()
        said = term.raw[prompt.end() :] if prompt else term.raw
        return status, said.replace("\r\n", "\n"), prompt

    def attempts(self, user: str) -> list[dict[str, Any]]:
        return [r for r in self.lab.events("auth.attempt") if r["user"] == user]

    def last_attempt(self, user: str) -> dict[str, Any]:
        wait_for(lambda: bool(self.attempts(user)), 60, f"auth.attempt of {user}")
        return self.attempts(user)[-1]


@pytest.fixture(scope="module")
def office(card_world: World, card_pki: pki.CardPKI, pcscd_vpcd: pcsc.VirtualReaders) -> HomeOffice:
    # The operator fills in the [auth.smartcard] that `gatewayd init` wrote, then
    # reloads: the test PKI's root and person CA, and their CRLs.
    set_table(card_world.lab, "auth.smartcard", toml_table(card_pki.settings()))
    reload(card_world.lab)
    return HomeOffice(card_world, card_pki, pcscd_vpcd)


def one_line(output: str) -> str:
    """The command's only line of output on the terminal (no traceback, nothing else)."""
    lines = [line for line in screen(output).splitlines() if line.strip()]
    assert len(lines) == 1, repr(output)
    assert "Traceback" not in output
    return lines[0]


# -- configuration ----------------------------------------------------------------------


def test_init_and_check_config(office: HomeOffice, tmp_path: Path) -> None:
    fresh = tmp_path / "gw"
    subprocess.run(
        [str(BIN / "gatewayd"), "init", "--dir", str(fresh)], check=True, capture_output=True
    )
    config = fresh / "gatewayd.toml"
    text = config.read_text()
    assert 'factors = ["smartcard", "password"]' in text
    assert "end_on_card_removal = true" in text
    assert 'required_policy = "2.16.578.1.26.1.3.1"' in text
    assert 'subject_field = "serialNumber"' in text

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "gatewayd"), "check-config", "--config", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )

    # Fresh from init: valid, but homeoffice cannot log anyone in yet, and it says so.
    result = check()
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        "warning: auth.smartcard names no trust_anchors or crl_files yet: smartcard logins "
        "fail until it does (needed by modes.homeoffice)"
    )
    # Filled in, but the files are not there yet: an error naming the key.
    config.write_text(
        text.replace("trust_anchors = []", 'trust_anchors = ["pki/root-ca.pem"]').replace(
            "crl_files = []", 'crl_files = ["pki/root.crl"]'
        )
    )
    result = check()
    assert result.returncode == 4  # a config problem (docs/exit-codes.md)
    assert result.stderr.strip() == (
        "Error: config error: auth.smartcard.trust_anchors: cannot read "
        f"{fresh}/pki/root-ca.pem: No such file or directory (needed by modes.homeoffice)"
    )
    # A CRL that is not a CRL.
    (fresh / "pki" / "root-ca.pem").write_bytes(office.pki.root.pem)
    (fresh / "pki" / "root.crl").write_text("not a CRL\n")
    result = check()
    assert result.returncode == 4
    assert result.stderr.strip() == (
        f"Error: config error: auth.smartcard.crl_files: {fresh}/pki/root.crl: not a CRL file "
        "(needed by modes.homeoffice)"
    )
    # The lab's config, filled in with the test PKI, passes without a warning.
    ok = office.lab.run("gatewayd", "check-config", "--config", str(office.lab.config))
    assert ok.stdout.strip().endswith(": ok") and not ok.stderr.strip()


# -- logins that work ----------------------------------------------------------------------


def test_good_card_opens_the_tunnel(office: HomeOffice) -> None:
    card = office.pki.card(1)
    user = office.employee(card.person, cert=card.auth)
    with office.inserted(card.auth):
        term, port = office.connect(user)
        try:
            prompt = term.expect(PIN_PROMPT)
            assert prompt["holder"] == "Nordmann Kari1" and prompt["reader"] == office.reader
            term.type(PIN)
            term.expect(rf"Password for {user}: ")
            term.type(PASSWORD)
            term.expect(r"listening on 127\.0\.0\.1:\d+")
            for line in (b"referral to radiology\n", b"x-ray 42\n"):
                assert round_trip(port, line) == line.upper()
        finally:
            term.close()
    assert PIN not in term.output and PASSWORD not in term.output  # typed without echo

    smartcard, password = office.attempts(user)
    assert (smartcard["factor"], smartcard["outcome"], smartcard["reason"]) == (
        "smartcard",
        "success",
        "ok",
    )
    assert (password["factor"], password["outcome"]) == ("password", "success")
    assert smartcard["person"] == card.person
    assert f"2.5.4.5={card.person}" in smartcard["subject"]
    assert "CN=Test Person High CA G1" in smartcard["issuer"]
    assert smartcard["policy"] == pki.POLICY_PERSON_CARD
    (added,) = [
        r for r in office.lab.events("admin.change") if r["op"] == "user.add" and r["user"] == user
    ]
    assert added["cert_serial"] == card.person and added["issuer"] == smartcard["issuer"]


def test_pulling_the_card_ends_the_session(office: HomeOffice) -> None:
    card = office.pki.card(2)
    user = office.employee(card.person)
    with office.inserted(card.auth) as (_, link):
        term, port = office.login(user)
        try:
            assert round_trip(port, b"hello\n") == b"HELLO\n"
            link.remove()
            status = term.wait(20)
        finally:
            term.close()
    assert status == 1
    assert f"gw: the smartcard was removed from '{office.reader}': session ended" in term.output
    assert "Traceback" not in term.output
    wait_for(
        lambda: any(r["user"] == user for r in office.lab.events("session.end")), 10, "session.end"
    )
    (end,) = [r for r in office.lab.events("session.end") if r["user"] == user]
    assert end["reason"] == "client: card removed"


def test_mode_may_keep_the_session_when_the_card_is_pulled(office: HomeOffice) -> None:
    set_table(
        office.lab,
        "modes.homeoffice",
        'factors = ["smartcard", "password"]\nend_on_card_removal = false',
    )
    reload(office.lab)
    try:
        card = office.pki.card(3)
        user = office.employee(card.person)
        with office.inserted(card.auth) as (_, link):
            term, port = office.login(user)
            try:
                link.remove()
                office.readers.wait_card(office.reader, present=False)
                time.sleep(1.5)  # three polls of a watcher, were there one
                assert term.proc.poll() is None, term.output
                assert round_trip(port, b"still here\n") == b"STILL HERE\n"
            finally:
                term.close()
    finally:
        set_table(office.lab, "modes.homeoffice", 'factors = ["smartcard", "password"]')
        reload(office.lab)


def test_renewed_card_is_set_with_set_cert(office: HomeOffice) -> None:
    card = office.pki.card(4)
    user = office.employee(pki.person_id(999))  # a typo in the card order
    with office.inserted(card.auth):
        status, said, _ = office.attempt(user)
        assert status == 1 and one_line(said) == "gw: authentication failed"
        assert office.last_attempt(user)["reason"] == "certificate of another person"

        both = office.lab.run(
            "gw", "admin", "--config", str(office.lab.config), "user", "set-cert", user,
            "--cert-serial", "x", "--cert-file", "y", check=False,
        )  # fmt: skip
        assert both.returncode == 2 and "not both" in both.stderr
        pem = office.lab.root / "renewed.pem"
        pem.write_bytes(card.auth.pem)
        out = office.lab.admin("user", "set-cert", user, "--cert-file", str(pem))
        issuer = card.auth.cert.issuer.rfc4514_string()
        assert out.strip() == f"user {user}: smartcard {card.person} (issuer {issuer})"
        term, port = office.login(user)
        try:
            assert round_trip(port, b"ok\n") == b"OK\n"
        finally:
            term.close()
    change = office.lab.events("admin.change")[-1]
    assert change["op"] == "user.set_cert" and change["user"] == user
    assert change["replaced"] is True and change["cert_serial"] == card.person


# -- the card refuses ------------------------------------------------------------------------


def test_wrong_pin_says_how_many_tries_are_left(office: HomeOffice) -> None:
    card = office.pki.card(5)
    user = office.employee(card.person)
    with office.inserted(card.auth) as (piv, _):
        status, said, prompt = office.attempt(user, pin="135790")
        assert status == 1
        assert one_line(said) == "gw: wrong PIN: 2 tries left before the card is blocked"
        assert piv.tries_left == 2
        # The next login says so before the PIN is typed.
        status, said, prompt = office.attempt(user, pin="135791")
        assert prompt is not None and prompt["tries"] == ", 2 tries left"
        assert status == 1
        assert one_line(said) == "gw: wrong PIN: 1 try left before the card is blocked"
    first, second = office.attempts(user)
    for record, left in ((first, 2), (second, 1)):
        assert record["factor"] == "smartcard" and record["outcome"] == "failure"
        assert record["reason"] == "wrong pin" and record["reported_by"] == "client"
        assert record["tries_left"] == left
        assert f"2.5.4.5={card.person}" in record["subject"]


def test_blocked_card(office: HomeOffice) -> None:
    card = office.pki.card(6)
    user = office.employee(card.person)
    with office.inserted(card.auth) as (piv, _):
        piv.tries_left = 0
        status, out, _ = office.attempt(user, pin=None)  # not even asked
    assert status == 4
    assert one_line(out) == (
        "gw: the smartcard is blocked (too many wrong PINs): ask your organisation's card "
        "administrator to unblock it with the PUK"
    )
    record = office.last_attempt(user)
    assert record["reason"] == "card blocked" and record["reported_by"] == "client"
    assert card.person in record["subject"]


def test_expired_certificate(office: HomeOffice) -> None:
    card = office.pki.card(7, expired=True)
    user = office.employee(card.person)
    with office.inserted(card.auth):
        status, out, _ = office.attempt(user, pin=None)  # refused before the PIN
    assert status == 1
    assert re.fullmatch(
        r"gw: the certificate on your smartcard expired on \d{4}-\d\d-\d\d: order a new card",
        one_line(out),
    )
    record = office.last_attempt(user)
    assert (record["outcome"], record["reason"]) == ("failure", "certificate expired")
    assert card.person in record["subject"] and "Test Person High CA G1" in record["issuer"]
    assert record["not_after"] == card.auth.cert.not_valid_after_utc.isoformat()


# -- the gateway refuses: the person sees only "authentication failed" -----------------------


def refused(office: HomeOffice, user: str, issued: pki.Issued) -> dict[str, Any]:
    with office.inserted(issued):
        status, said, prompt = office.attempt(user)
    assert prompt is not None
    assert status == 1
    assert one_line(said) == "gw: authentication failed"
    record = office.last_attempt(user)
    assert record["factor"] == "smartcard" and record["outcome"] == "failure"
    assert "reported_by" not in record  # the gateway's own finding
    return record


def test_revoked_certificate(office: HomeOffice) -> None:
    card = office.pki.card(8)
    user = office.employee(card.person)
    office.pki.revoke(card.auth)
    office.pki.write_crls()  # the configured files, rewritten: read at the next login
    record = refused(office, user, card.auth)
    assert record["reason"] == "certificate revoked"
    assert record["revoked_serial"] == format(card.auth.cert.serial_number, "x")


def test_replaced_crl_takes_effect_on_sighup(office: HomeOffice) -> None:
    card = office.pki.card(9)
    user = office.employee(card.person)
    with office.inserted(card.auth):
        term, _ = office.login(user)
        term.close()
    # The person CA revokes the card; the operator's timer fetches the new CRL, renames
    # it over the old one and reloads the daemon (systemctl reload: SIGHUP).
    office.pki.revoke(card.auth)
    configured = office.pki.write_crls()[0]
    staged = configured.with_name("fetched.crl")
    os.replace(configured, staged)  # what the fetcher downloaded...
    os.replace(staged, configured)  # ...renamed into place
    reload(office.lab)
    assert refused(office, user, card.auth)["reason"] == "certificate revoked"


def test_stale_crl(office: HomeOffice) -> None:
    card = office.pki.card(10)
    user = office.employee(card.person)
    office.pki.write_crls(stale=True)  # the CRL fetcher stopped a week ago
    reload(office.lab)
    try:
        record = refused(office, user, card.auth)
    finally:
        office.pki.write_crls()
        reload(office.lab)
    assert record["reason"] == "crl stale"
    assert "Test Person High CA G1" in record["crl_issuer"]


def test_wrong_policy_oid(office: HomeOffice) -> None:
    issued = office.pki.person(11, policy=pki.POLICY_PERSON_HSM)  # key in an HSM, not a card
    user = office.employee(pki.person_id(11))
    record = refused(office, user, issued)
    assert record["reason"] == "policy oid missing"
    assert record["required_policy"] == pki.POLICY_PERSON_CARD


def test_untrusted_issuer(office: HomeOffice) -> None:
    forged = office.pki.untrusted(12)  # same names as the real CAs, other keys
    user = office.employee(pki.person_id(12))
    record = refused(office, user, forged)
    assert record["reason"] == "untrusted issuer"
    assert "Test Person High CA G1" in record["issuer"]


def test_certificate_of_another_person(office: HomeOffice) -> None:
    user = office.employee(pki.person_id(13))
    colleague = office.pki.card(14)
    record = refused(office, user, colleague.auth)
    assert record["reason"] == "certificate of another person"
    assert record["cert_value"] == colleague.person


# -- the card cannot be used: a local problem, exit 4 --------------------------------------


def test_no_card_and_unknown_reader(office: HomeOffice) -> None:
    user = office.employee(pki.person_id(15))
    status, out, _ = office.attempt(user, pin=None)
    assert status == 4
    assert one_line(out) == f"gw: no smartcard in the reader '{office.reader}': insert your card"
    assert office.last_attempt(user)["reason"] == NO_ANSWER

    status, out, _ = office.attempt(user, pin=None, reader="Lost Reader")
    assert status == 4
    assert one_line(out).startswith("gw: no card reader named 'Lost Reader' (readers: ")


def test_pcscd_not_running(office: HomeOffice, tmp_path: Path) -> None:
    user = office.employee(pki.person_id(16))
    env = {"PCSCLITE_CSOCK_NAME": str(tmp_path / "no-pcscd.comm")}
    status, out, _ = office.attempt(user, pin=None, env=env)
    assert status == 4
    assert one_line(out) == (
        "gw: the PC/SC service is not running: start pcscd (e.g. systemctl start pcscd.socket)"
    )


def test_without_pyscard(office: HomeOffice, tmp_path: Path) -> None:
    fake = tmp_path / "site" / "smartcard"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("pyscard is not installed (test)")\n')
    user = office.employee(pki.person_id(17))
    env = {"PYTHONPATH": str(fake.parent)}
    status, out, _ = office.attempt(user, pin=None, env=env)
    assert status == 4
    line = one_line(out)
    assert line.startswith(
        "gw: the smartcard factor needs pyscard: pip install 'gatewayd[smartcard]'"
    )
    assert "apt install pcscd libpcsclite1" in line


def test_pin_needs_a_terminal(office: HomeOffice) -> None:
    card = office.pki.card(18)
    user = office.employee(card.person)
    args = office.lab.connect_args(
        "pc1", user, "echo", "homeoffice", "--stdio", "--smartcard", "--reader", office.reader
    )
    with office.inserted(card.auth):
        result = office.lab.run(*args, input="", check=False)
    assert result.returncode == 4
    assert one_line(result.stderr) == (
        f"gw: PIN for the smartcard of Nordmann Kari18 ({office.reader}) needed, "
        "but there is no terminal to ask on"
    )
