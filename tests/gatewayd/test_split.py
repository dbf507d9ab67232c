"""The broker's parts, in process: login over a fake link, the session directory, dial
pairing, approvals, the tunnel and data roles' refusals. A real store and audit log in
a temporary folder, a clock the test moves; no sockets, no sleeps, no subprocesses."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_config import ACCESS_MODE, MINIMAL

from auth.password import hash_password
from auth.totp import code_at
from gatewayd.access import Access
from gatewayd.agent import AgentConn, Agents
from gatewayd.audit import AuditLog
from gatewayd.clock import ManualClock
from gatewayd.config import ConfigHolder, parse
from gatewayd.event import AuthLocked, Event, EventBus
from gatewayd.login import Login
from gatewayd.rejection import RejectionLog
from gatewayd.session import Approvals, Session, SessionDirectory
from gatewayd.store import Store
from gatewayd.tunnel import DialError, DialPairing, Tunnels
from relay import message as m
from relay.aio import ConnectionClosed

CONFIG = MINIMAL + "[lockout]\nthreshold = 3\nbase_seconds = 60\n" + ACCESS_MODE
PASSWORD = "correct horse battery"
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
KEY = bytes(range(32))


class FakeLink:
    """What the parts use of a FramedLink, with the peer's answers given in advance."""

    def __init__(self, *answers: m.Message, peer: str = "192.0.2.7:5000") -> None:
        self.peer = peer
        self.answers = deque(answers)
        self.sent: list[m.Message] = []
        self.errors: list[tuple[str, str]] = []
        self.certificate: bytes | None = None

    def channel_binding(self) -> bytes:
        return b"\x42" * 32

    def extend_handshake(self, seconds: float) -> None:
        pass

    def peer_certificate(self) -> bytes | None:
        return self.certificate

    def send(self, msg: m.Message) -> None:
        self.sent.append(msg)

    def send_error(self, code: str, message: str = "") -> None:
        self.errors.append((code, message))

    async def expect(self, *types: type[m.Message]) -> m.Message:
        if not self.answers:
            raise ConnectionClosed("eof", "the peer left")
        msg = self.answers.popleft()
        assert isinstance(msg, types)
        return msg


class Parts:
    def __init__(self, root: Path) -> None:
        self.clock = ManualClock()
        self.holder = ConfigHolder(parse(CONFIG, root / "gatewayd.toml"))
        self.store = Store(root / "directory.db", KEY)
        self.audit = AuditLog(root / "audit.jsonl", node="t", fsync=False)
        self.bus = EventBus(self.audit)
        self.events: list[Event] = []
        self.bus.subscribe(self.events.append)
        self.rejections = RejectionLog(self.audit)
        self.login = Login(self.holder, self.store, self.bus, self.clock.clock())
        self.dials = DialPairing()
        self.approvals = Approvals()
        self.agents = Agents(
            self.store,
            self.bus,
            self.rejections,
            self.clock.clock(),
            on_dial_failed=self.dials.fail,
            on_approval=self.approvals.answer,
        )
        self.sessions = SessionDirectory(self.agents)
        asyncio.run(self.fill(self.clock.now()))

    async def fill(self, now: float) -> None:
        await self.store.add_org("clinic", "Clinic", now)
        await self.store.add_vendor("acme", "Acme", now)
        await self.store.add_user("vera@acme", kind="vendor", vendor="acme", org=None, now=now)
        password = {"hash": hash_password(PASSWORD)}
        await self.store.set_credential("vera@acme", "password", password, now)
        await self.store.set_credential("vera@acme", "totp", {"secret": SECRET}, now)

    def records(self, event: str) -> list[dict[str, Any]]:
        lines = self.audit.path.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["event"] == event]

    def tunnels(self) -> Tunnels:
        return Tunnels(
            self.holder,
            self.bus,
            self.clock.clock(),
            access=Access(self.holder, self.store, self.clock.clock()),
            directory=self.sessions,
            dials=self.dials,
            rejections=self.rejections,
            verified_agent=self.agents.verified,
            spawn=lambda coro: coro.close(),
        )


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    p = Parts(tmp_path)
    yield p
    asyncio.run(p.store.close())


def hello(user: str = "vera@acme") -> m.ClientHello:
    return m.ClientHello(user=user, agent="pc1", target="ssh", mode="access", client_key="k")


def answers(password: str, code: str) -> tuple[m.AuthResponse, m.AuthResponse]:
    return (
        m.AuthResponse("password", {"password": password}),
        m.AuthResponse("totp", {"code": code}),
    )


def login(parts: Parts, link: FakeLink, sid: str = "s1") -> bool:
    return asyncio.run(parts.login.authenticate(link, hello(), sid))  # type: ignore[arg-type]


# -- login -------------------------------------------------------------------------------


def test_login_proves_each_factor_and_records_each(parts: Parts) -> None:
    link = FakeLink(*answers(PASSWORD, code_at(SECRET, parts.clock.now())))
    assert login(parts, link)
    assert [type(msg).__name__ for msg in link.sent] == ["AuthRequest", "AuthRequest"]
    attempts = parts.records("auth.attempt")
    assert [(r["factor"], r["outcome"], r["reason"]) for r in attempts] == [
        ("password", "success", "ok"),
        ("totp", "success", "ok"),
    ]
    assert link.errors == []


def test_a_totp_code_is_taken_once(parts: Parts) -> None:
    """The second login with the same code fails, on the same node, at the same instant."""
    code = code_at(SECRET, parts.clock.now())
    assert login(parts, FakeLink(*answers(PASSWORD, code)), "s1")
    replay = FakeLink(*answers(PASSWORD, code))
    assert not login(parts, replay, "s2")
    assert replay.errors == [("auth_failed", "authentication failed")]
    last = parts.records("auth.attempt")[-1]
    assert (last["session"], last["factor"], last["outcome"]) == ("s2", "totp", "failure")
    assert "already used" in last["reason"]
    # A code of the next step is good again.
    parts.clock.advance(30)
    assert login(parts, FakeLink(*answers(PASSWORD, code_at(SECRET, parts.clock.now()))), "s3")


def test_wrong_passwords_lock_the_account_then_even_the_right_one_fails(parts: Parts) -> None:
    for n in range(3):
        assert not login(parts, FakeLink(*answers("wrong password!", "000000")), f"w{n}")
    locked = [e for e in parts.events if isinstance(e, AuthLocked)]
    assert [(e.user, e.failures, e.seconds) for e in locked] == [("vera@acme", 3, 60)]
    right = FakeLink(*answers(PASSWORD, code_at(SECRET, parts.clock.now())))
    assert not login(parts, right, "r1")
    assert parts.records("auth.attempt")[-1]["reason"].startswith("account locked")


def test_an_unknown_user_gets_the_same_answer(parts: Parts) -> None:
    link = FakeLink(*answers(PASSWORD, "123456"))
    assert not asyncio.run(parts.login.authenticate(link, hello("nobody"), "s1"))  # type: ignore[arg-type]
    assert link.errors == [("auth_failed", "authentication failed")]
    assert parts.records("auth.attempt")[-1]["reason"] == "unknown user"


def test_a_client_that_gives_up_is_on_the_record_but_not_counted(parts: Parts) -> None:
    with pytest.raises(ConnectionClosed):
        login(parts, FakeLink())
    (attempt,) = parts.records("auth.attempt")
    assert attempt["reason"] == "no answer from the client (eof)"
    user = asyncio.run(parts.store.get_user("vera@acme"))
    assert user is not None and user.failures == 0


def test_rate_limits_per_source_and_per_user(parts: Parts) -> None:
    parts.login.auth_limiter.limit = 2
    assert parts.login.rate_limited("192.0.2.7:1", "a") is None
    assert parts.login.rate_limited("192.0.2.7:2", "b") is None
    assert parts.login.rate_limited("192.0.2.7:3", "c") == "source"
    parts.clock.advance(61)
    assert parts.login.rate_limited("192.0.2.7:3", "c") is None


# -- dial pairing and approvals --------------------------------------------------------


def test_dial_pairing_takes_only_the_asked_agents_answer_once() -> None:
    async def run() -> None:
        dials = DialPairing()
        token, waiter = dials.expect("pc1")
        first, second = FakeLink(), FakeLink()
        assert dials.answer("no such token", "pc1", first) == "unknown"  # type: ignore[arg-type]
        assert dials.answer(token, "pc2", first) == "unknown"  # type: ignore[arg-type]
        assert dials.answer(token, None, first) == "unknown"  # type: ignore[arg-type]
        assert not waiter.done()
        assert dials.answer(token, "pc1", first) is None  # type: ignore[arg-type]
        assert waiter.result() is first
        assert dials.answer(token, "pc1", second) == "answered"  # type: ignore[arg-type]
        dials.forget(token)
        assert dials.answer(token, "pc1", second) == "unknown"  # type: ignore[arg-type]

    asyncio.run(run())


def test_a_dial_failure_counts_only_from_the_asked_agent() -> None:
    async def run() -> None:
        dials = DialPairing()
        token, waiter = dials.expect("pc1")
        dials.fail(token, "pc2", "not mine")
        assert not waiter.done()
        dials.fail(token, "pc1", "connection refused")
        with pytest.raises(DialError, match="connection refused"):
            waiter.result()

    asyncio.run(run())


def test_an_approval_is_answered_once_by_the_asked_agent() -> None:
    async def run() -> None:
        approvals = Approvals()
        request, waiter = approvals.expect("pc1")
        answer = m.ApprovalAnswer(request=request, approved=True, by="anna", reason="")
        approvals.answer("pc2", answer)
        assert not waiter.done()
        approvals.answer("pc1", answer)
        assert waiter.result() is answer
        approvals.answer("pc1", m.ApprovalAnswer(request, False, "mallory", ""))
        assert waiter.result() is answer
        approvals.forget(request)
        assert request not in approvals.pending

    asyncio.run(run())


# -- the session directory -----------------------------------------------------------------


def session(sid: str = "s1", ticket: str = "t1", agent: str = "pc1") -> Session:
    return Session(
        id=sid,
        user="vera@acme",
        agent=agent,
        target="ssh",
        mode="access",
        reason="ticket 42",
        source="192.0.2.7:5000",
        client_key=b"k" * 32,
        ticket=ticket,
        started=1.0,
        expires=100.0,
        idle_timeout=60.0,
        link=FakeLink(),  # type: ignore[arg-type]
        agreement=None,
    )


def test_session_directory_register_look_up_end_remove(parts: Parts) -> None:
    async def run() -> None:
        directory = parts.sessions
        s = session()
        directory.register(s)
        assert directory.lookup("s1") is s and directory.by_ticket("t1") is s
        assert len(directory) == 1
        (row,) = directory.rows()
        assert (row["session"], row["approved_by"], row["tunnels"]) == ("s1", "-", 0)
        assert directory.end("s1", "killed by root")
        assert s.ended.is_set() and s.end_reason == "killed by root"
        assert not directory.end("nope", "x")
        directory.remove(s)
        assert directory.lookup("s1") is None and directory.by_ticket("t1") is None

    asyncio.run(run())


def test_where_is_this_agent_and_ask_it_to_dial(parts: Parts) -> None:
    link = FakeLink()
    dial = m.Dial("tok", "ssh", "s1", "key", "vera@acme", "access")
    assert parts.sessions.locate("pc1") is None
    assert not parts.sessions.ask_to_dial("pc1", dial)
    parts.agents.online["pc1"] = AgentConn("pc1", "clinic", link, frozenset({"ssh"}), 1.0, "x")  # type: ignore[arg-type]
    assert parts.sessions.locate("pc1") is not None
    assert parts.sessions.ask_to_dial("pc1", dial)
    assert link.sent == [dial]


# -- tunnel and data roles ---------------------------------------------------------------


def test_a_tunnel_for_an_unknown_ticket_is_refused_and_recorded(parts: Parts) -> None:
    link = FakeLink()
    kept = asyncio.run(parts.tunnels().serve(link, m.TunnelHello(ticket="forged")))  # type: ignore[arg-type]
    assert not kept
    assert link.errors == [("session_ended", "no such session")]
    (refused,) = parts.records("tunnel.refused")
    assert refused["reason"] == "unknown or ended session"


def test_a_data_connection_without_a_known_agent_certificate_is_refused(parts: Parts) -> None:
    async def run() -> None:
        token, waiter = parts.dials.expect("pc1")
        link = FakeLink()  # no client certificate: not an enrolled agent
        assert not await parts.tunnels().serve_data(link, m.DataHello(token=token))  # type: ignore[arg-type]
        assert link.errors == [("auth_failed", "unknown dial token")]
        assert not waiter.done()

    asyncio.run(run())
    (rejected,) = parts.records("connection.rejected")
    assert rejected["code"] == "auth_failed"
