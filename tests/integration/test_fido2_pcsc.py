"""Security keys over PC/SC (NFC readers, CCID keys), with the real ``gw`` processes (issue 13).

A virtual FIDO2 card (tests/support/virtual_fido.py: the software authenticator behind
the FIDO applet's APDUs) sits in a vpcd reader, so ``gw fido2 register`` and
``gw connect --fido2`` find it as they find a key on an NFC reader: through pcscd and
python-fido2's ``CtapPcscDevice``. The gateway, the agent and ``gw`` are real processes;
``gw`` runs in a pseudo-terminal where a person would type (PINs without echo).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pcsc
import pytest
from soft_authenticator import SoftAuthenticator
from test_fido2_login import PASSWORD, World
from test_smartcard import Terminal, one_line
from virtual_fido import VirtualFidoCard
from virtual_piv import VpcdLink

from gatewayd.demo import free_port, round_trip

pytestmark = [pytest.mark.integration, pytest.mark.smartcard]

KEY_PIN = "4321"
CLONE = "signature counter did not increase (cloned key?)"


class Keys:
    """The world, the vpcd readers, and helpers that run ``gw`` as the person does."""

    def __init__(self, world: World, readers: pcsc.VirtualReaders) -> None:
        self.world = world
        self.lab = world.lab
        self.readers = readers
        self.reader = readers.names[-1]
        self.other_reader = readers.names[0]

    @contextlib.contextmanager
    def on_reader(
        self, key: SoftAuthenticator, reader: str | None = None
    ) -> Iterator[tuple[VirtualFidoCard, VpcdLink]]:
        reader = reader or self.reader
        card = VirtualFidoCard(key)
        link = VpcdLink(card, self.readers.host, self.readers.port(reader))
        link.insert()
        self.readers.wait_card(reader, present=True)
        try:
            yield card, link
        finally:
            link.remove()
            self.readers.wait_card(reader, present=False)

    def register(self, user: str, pin: str | None = None, *extra: str) -> str:
        code = self.lab.admin("fido2", "invite", user).strip()
        term = Terminal(
            self.lab,
            ["gw", "fido2", "register", "--gateway", self.lab.gateway,
             "--ca-file", str(self.lab.ca_file), "--user", user, "--code", code, *extra],
        )  # fmt: skip
        try:
            if pin is not None:
                term.expect("Security key PIN: ")
                term.type(pin)
            status = term.wait()
        finally:
            term.close()
        assert status == 0, term.output
        assert f"registered for {user}" in term.output
        return term.output

    def connect(self, user: str, *extra: str) -> tuple[Terminal, int]:
        port = free_port()
        args = self.lab.connect_args(
            "pc1", user, "echo", "access", "-L", f"127.0.0.1:{port}", "--fido2", *extra
        )
        return Terminal(self.lab, args, {"GW_PASSWORD": PASSWORD}), port

    def login(self, user: str, *extra: str, pin: str | None = None) -> Terminal:
        term, port = self.connect(user, *extra)
        try:
            if pin is not None:
                term.expect("Security key PIN: ")
                term.type(pin)
            term.expect(r"listening on 127\.0\.0\.1:\d+")
            assert round_trip(port, b"over nfc\n") == b"OVER NFC\n"
        finally:
            term.close()
        return term

    def fails(self, user: str, *extra: str) -> tuple[int, str]:
        term, _ = self.connect(user, *extra)
        try:
            status = term.wait()
        finally:
            term.close()
        return status, term.output

    def fido2_attempts(self, user: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.lab.events("auth.attempt")
            if r["user"] == user and r["factor"] == "fido2"
        ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("fido2-pcsc"))
    try:
        w.build()
        yield w
    finally:
        w.close()


@pytest.fixture(scope="module")
def keys(world: World, pcscd_vpcd: pcsc.VirtualReaders) -> Keys:
    return Keys(world, pcscd_vpcd)


def test_register_and_log_in_with_a_key_on_the_reader(keys: Keys) -> None:
    user = keys.world.new_user()
    key = SoftAuthenticator()
    with keys.on_reader(key) as (card, _):
        keys.register(user, None, "--name", "NFC key")
        keys.login(user)
        assert any(line.startswith("10 -> ") for line in card.log)  # NFCCTAP_MSG
    (attempt,) = keys.fido2_attempts(user)
    assert attempt["outcome"] == "success" and attempt["key_name"] == "NFC key"
    assert len(key.credentials) == 1


def test_key_with_a_pin(keys: Keys) -> None:
    user = keys.world.new_user()
    with keys.on_reader(SoftAuthenticator(pin=KEY_PIN)):
        keys.register(user, KEY_PIN)
        term = keys.login(user, pin=KEY_PIN)
        assert KEY_PIN not in term.output  # asked without echo
        # A wrong PIN: one line, and the key says how many tries are left.
        term, _ = keys.connect(user)
        try:
            term.expect("Security key PIN: ")
            term.type("0000")
            status = term.wait()
        finally:
            term.close()
    assert status != 0
    said = term.output.split("Security key PIN: ", 1)[1]
    assert one_line(said) == (
        "gw: wrong PIN for the security key (7 attempts left before the key locks)"
    )
    assert [r["outcome"] for r in keys.fido2_attempts(user)] == ["success", "failure"]


def test_unregistered_key_is_refused(keys: Keys) -> None:
    user = keys.world.new_user()
    with keys.on_reader(SoftAuthenticator()):
        keys.register(user)
    with keys.on_reader(SoftAuthenticator()):  # someone else's key
        status, out = keys.fails(user)
    assert status != 0
    assert one_line(out) == (
        "gw: this security key is not registered for your account (wrong key?); use the key "
        "you registered, or ask your administrator to register this one"
    )
    assert all(r["outcome"] == "failure" for r in keys.fido2_attempts(user))


def test_cloned_key_is_refused(keys: Keys) -> None:
    user = keys.world.new_user()
    key = SoftAuthenticator()
    with keys.on_reader(key):
        keys.register(user)
        keys.login(user)
        keys.login(user)
    with keys.on_reader(key.clone(counter=0)):
        status, out = keys.fails(user)
    assert status == 1 and "gw: authentication failed" in out
    last = keys.fido2_attempts(user)[-1]
    assert last["outcome"] == "failure" and last["reason"] == CLONE


def test_key_taken_off_the_reader_mid_login(keys: Keys) -> None:
    user = keys.world.new_user()
    key = SoftAuthenticator()
    with keys.on_reader(key) as (_, link):
        keys.register(user)
        # Now the person never touches it, and takes it away while gw waits for the touch.
        key.presence, key.wait_for_cancel, key.max_wait = "timeout", True, 60.0
        term, _ = keys.connect(user)
        try:
            term.expect("Touch your security key")
            link.remove()
            status = term.wait()
        finally:
            term.close()
    assert status == 4
    said = term.output.split("Touch your security key", 1)[1]
    assert one_line(said) == (
        "gw: the security key left the reader during login: hold it there and try again"
    )
    assert "Traceback" not in term.output


def test_two_keys_refused_in_scripts_chosen_by_name_or_asked(keys: Keys) -> None:
    user = keys.world.new_user()
    mine = SoftAuthenticator()
    with keys.on_reader(mine):
        keys.register(user)
    with keys.on_reader(mine), keys.on_reader(SoftAuthenticator(), keys.other_reader):
        # A script (no terminal): refused, with the list.
        port = free_port()
        result = keys.lab.run(
            *keys.lab.connect_args(
                "pc1", user, "echo", "access", "-L", f"127.0.0.1:{port}", "--fido2",
                "--password-stdin",
            ),
            input=PASSWORD + "\n",
            check=False,
        )  # fmt: skip
        assert result.returncode == 4
        names = sorted([keys.reader, keys.other_reader])
        assert one_line(result.stderr) == (
            f"gw: 2 security keys are plugged in ('{names[0]}', '{names[1]}'): "
            "choose one with --fido2-device NAME"
        )
        # By name.
        keys.login(user, "--fido2-device", keys.reader)
        # At a terminal: asked.
        term, port = keys.connect(user)
        try:
            term.expect(r"Security key to use \(1-2\): ")
            assert f"2. {names[1]}" in term.output
            term.type(str(names.index(keys.reader) + 1))
            term.expect(r"listening on 127\.0\.0\.1:\d+")
            assert round_trip(port, b"chosen\n") == b"CHOSEN\n"
        finally:
            term.close()
        status, out = keys.fails(user, "--fido2-device", "no such reader")
        assert status == 4 and "gw: no security key named 'no such reader'" in out
