"""A ``gw login`` credential at the gateway, in process: a real store and audit log in a
temporary folder, a clock the test moves (the 30-minute idle time and the 12-hour life
without waiting), a fake link that signs the gateway's nonce. No sockets, no sleeps."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_config import ACCESS_MODE, MINIMAL

from gatewayd.audit import AuditLog
from gatewayd.clock import ManualClock
from gatewayd.config import ConfigHolder, parse
from gatewayd.event import EventBus
from gatewayd.login import Login
from gatewayd.store import LoginCredential, Store
from relay import credential as cred
from relay import message as m

CONFIG = MINIMAL + ACCESS_MODE
BINDING = b"\x42" * 32


class SigningLink:
    """What Login uses of a link; answers the credential request with ``key``'s proof."""

    def __init__(self, key: Any, credential: str, binding: bytes = BINDING) -> None:
        self.key, self.credential, self.binding = key, credential, binding
        self.peer = "192.0.2.7:5000"
        self.sent: list[m.Message] = []
        self.errors: list[tuple[str, str]] = []

    def channel_binding(self) -> bytes:
        return BINDING

    def extend_handshake(self, seconds: float) -> None:
        pass

    def send(self, msg: m.Message) -> None:
        self.sent.append(msg)

    def send_error(self, code: str, message: str = "") -> None:
        self.errors.append((code, message))

    async def expect(self, *types: type[m.Message]) -> m.Message:
        request = self.sent[-1]
        assert isinstance(request, m.AuthRequest) and request.method == "credential"
        payload = cred.prove(self.key, self.credential, request.payload, self.binding)
        return m.AuthResponse("credential", payload)


class Gateway:
    def __init__(self, root: Path) -> None:
        self.clock = ManualClock()
        self.store = Store(root / "directory.db", bytes(range(32)))
        self.audit = AuditLog(root / "audit.jsonl", node="t", fsync=False)
        self.bus = EventBus(self.audit)
        holder = ConfigHolder(parse(CONFIG, root / "gatewayd.toml"))
        self.login = Login(holder, self.store, self.bus, self.clock.clock())
        self.key = cred.new_key()
        asyncio.run(self.fill())

    async def fill(self) -> None:
        now = self.clock.now()
        await self.store.add_org("clinic", "Clinic", now)
        await self.store.add_vendor("acme", "Acme", now)
        for user in ("vera", "otto"):
            await self.store.add_user(user, kind="vendor", vendor="acme", org=None, now=now)
        await self.store.add_login(
            LoginCredential(
                id="c0ffee",
                user="vera",
                mode="access",
                public_key=cred.public_text(self.key),
                session="login1",
                source="192.0.2.7:4000",
                created=now,
                expires=now + 12 * 3600,
                idle_timeout=1800,
                last_used=now,
            )
        )

    def use(self, user: str = "vera", key: Any = None, binding: bytes = BINDING) -> SigningLink:
        link = SigningLink(key or self.key, "c0ffee", binding)
        hello = m.ClientHello(
            user=user, agent="", target="", mode="access", client_key="k", credential="c0ffee"
        )
        asyncio.run(self.login.prove_login(link, hello, "s1"))  # type: ignore[arg-type]
        return link

    def last(self) -> dict[str, Any]:
        lines = self.audit.path.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["event"] == "auth.attempt"][-1]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    g = Gateway(tmp_path)
    yield g
    asyncio.run(g.store.close())


def test_used_within_the_idle_time_it_lives_on(gateway: Gateway) -> None:
    for _ in range(4):  # two hours, a use every 29 minutes
        gateway.clock.advance(29 * 60)
        assert gateway.use().errors == []
    record = gateway.last()
    assert (record["factor"], record["outcome"], record["reason"]) == (
        "credential",
        "success",
        "ok",
    )
    assert (record["credential"], record["login_session"]) == ("c0ffee", "login1")


def test_30_minutes_idle_ends_it(gateway: Gateway) -> None:
    gateway.clock.advance(30 * 60)
    assert gateway.use().errors == [("login_ended", "your gw login has ended; run gw login again")]
    assert gateway.last()["reason"] == "login idle timeout"
    gateway.clock.advance(-29 * 60)  # a wall clock set back does not revive it
    assert gateway.use().errors[0][0] == "login_ended"
    assert gateway.last()["reason"] == "login ended (idle timeout)"


def test_12_hours_end_it_however_often_it_is_used(gateway: Gateway) -> None:
    for _ in range(24):
        gateway.clock.advance(29 * 60 + 59)
        assert gateway.use().errors == []
    gateway.clock.advance(29 * 60)
    assert gateway.use().errors[0][0] == "login_ended"
    assert gateway.last()["reason"] == "login expired"


def test_ended_by_logout_or_administrator(gateway: Gateway) -> None:
    now = gateway.clock.now()
    ended = asyncio.run(gateway.store.end_logins("vera", now, "ended by administrator root"))
    assert ended == ["c0ffee"]
    assert gateway.use().errors[0][0] == "login_ended"
    assert gateway.last()["reason"] == "login ended (ended by administrator root)"
    # Ending twice ends nothing more.
    assert asyncio.run(gateway.store.end_logins("vera", now, "logout")) == []


def test_another_key_another_channel_another_user(gateway: Gateway) -> None:
    assert gateway.use(key=cred.new_key()).errors == [("auth_failed", "authentication failed")]
    assert gateway.last()["reason"] == "wrong proof of the login credential's key"
    # A proof made for another TLS channel (a replay) does not verify on this one.
    assert gateway.use(binding=b"\x43" * 32).errors[0][0] == "auth_failed"
    assert gateway.last()["reason"] == "wrong proof of the login credential's key"
    assert gateway.use(user="otto").errors[0][0] == "auth_failed"
    assert gateway.last()["reason"] == "login credential of another user (vera)"
    # None of those counted as a use, nor ended it.
    assert gateway.use().errors == []


def test_session_traffic_keeps_it_alive(gateway: Gateway) -> None:
    """A session opened with the credential and busy for 40 minutes counts as use."""
    start = gateway.clock.now()
    gateway.clock.advance(40 * 60)
    asyncio.run(gateway.store.keep_login("c0ffee", start + 39 * 60))
    assert gateway.use().errors == []
    # Never backwards, and never for an ended credential.
    asyncio.run(gateway.store.keep_login("c0ffee", start))
    gateway.clock.advance(29 * 60)
    assert gateway.use().errors == []
    asyncio.run(gateway.store.end_logins("vera", gateway.clock.now(), "logout"))
    asyncio.run(gateway.store.keep_login("c0ffee", gateway.clock.now() + 60))
    got = asyncio.run(gateway.store.get_login("c0ffee"))
    assert got is not None and got.ended_reason == "logout"
    assert got.last_used == gateway.clock.now()


class CardLink(SigningLink):
    """Records what the gateway asks; the client then leaves (no card answer)."""

    async def expect(self, *types: type[m.Message]) -> m.Message:
        from relay.aio import ConnectionClosed

        raise ConnectionClosed("eof", "the client left")


@pytest.mark.parametrize("ends_on_removal", [True, False])
def test_home_office_still_asks_for_the_card(tmp_path: Path, ends_on_removal: bool) -> None:
    """With end_on_card_removal the credential replaces the password, never the card."""
    from relay.aio import ConnectionClosed

    config = CONFIG + (
        '[modes.homeoffice]\nfactors = ["smartcard", "password"]\n'
        f"end_on_card_removal = {str(ends_on_removal).lower()}\n"
    )
    holder = ConfigHolder(parse(config, tmp_path / "gatewayd.toml"))
    g = Gateway(tmp_path)
    login = Login(holder, g.store, g.bus, g.clock.clock())
    link = CardLink(g.key, "c0ffee")
    hello = m.ClientHello(
        user="vera", agent="", target="", mode="homeoffice", client_key="k", credential="c0ffee"
    )
    try:
        if ends_on_removal:
            with pytest.raises(ConnectionClosed):
                asyncio.run(login.authenticate(link, hello, "s1", card_only=True))  # type: ignore[arg-type]
            assert [(type(s).__name__, getattr(s, "method", "")) for s in link.sent] == [
                ("AuthRequest", "smartcard")
            ]
        else:
            assert asyncio.run(login.authenticate(link, hello, "s1", card_only=True))  # type: ignore[arg-type]
            assert link.sent == []
    finally:
        asyncio.run(g.store.close())
