"""The admin socket's operations, in process: a real AdminServer over a real store, audit
log and broker made by ``gatewayd init`` in a temporary folder; requests go straight to
the dispatcher (no socket, no daemon)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd import config as c
from gatewayd.admin import AdminServer
from gatewayd.audit import AuditLog
from gatewayd.broker import Broker
from gatewayd.init import init
from gatewayd.session import Session
from gatewayd.store import Store, load_secrets_key


class Admin:
    def __init__(self, root: Path) -> None:
        path, _ = init(root, ("127.0.0.1", 0), ["localhost"])
        cfg = c.load(path)
        self.store = Store(cfg.store.path, load_secrets_key(cfg.store.secrets_key_file))
        self.audit = AuditLog(cfg.audit.path, node="t", fsync=False)
        self.broker = Broker(cfg, self.store, self.audit)
        self.server = AdminServer(self.store, self.audit, self.broker)
        self.loop = asyncio.new_event_loop()

    def __call__(self, op: str, **args: Any) -> dict[str, Any]:
        line = json.dumps({"op": op, "args": args}).encode()
        reply: dict[str, Any] = self.loop.run_until_complete(self.server._dispatch(line, "root"))
        return reply

    def ok(self, op: str, **args: Any) -> Any:
        reply = self(op, **args)
        assert reply["ok"], reply
        return reply["result"]

    def changes(self) -> list[dict[str, Any]]:
        lines = self.audit.path.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["event"] == "admin.change"]

    def close(self) -> None:
        self.loop.run_until_complete(self.audit.close())
        self.loop.run_until_complete(self.store.close())
        self.loop.close()


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    a = Admin(tmp_path / "gw")
    yield a
    a.close()


def live_session(admin: Admin, user: str, agent: str = "pc1") -> Session:
    session = Session(
        id="s1",
        user=user,
        agent=agent,
        target="ssh",
        mode="access",
        reason="",
        source="192.0.2.7:5000",
        client_key=b"k" * 32,
        ticket="t1",
        started=1.0,
        expires=2e9,
        idle_timeout=60.0,
        link=None,  # type: ignore[arg-type]
        agreement=None,
    )
    admin.broker.sessions.register(session)
    return session


def test_operations_change_the_directory_and_are_on_the_record(admin: Admin) -> None:
    admin.ok("org.add", org="clinic", name="Clinic")
    admin.ok("vendor.add", vendor="acme")
    admin.ok("user.add", user="vera", vendor="acme")
    assert [r["id"] for r in admin.ok("list", what="users")] == ["vera"]
    assert [(r["op"], r["by"]) for r in admin.changes()] == [
        ("org.add", "root"),
        ("vendor.add", "root"),
        ("user.add", "root"),
    ]
    status = admin.ok("status")
    assert (status["sessions"], status["agents_online"], status["audit"]) == (0, [], "ok")


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json", "malformed request"),
        (b"[1, 2]", "malformed request"),
        (b'{"op": "org.add", "args": []}', "malformed request"),
        (b'{"op": "evil"}', "unknown operation 'evil'"),
        (b'{"op": "_org_add"}', "unknown operation '_org_add'"),
        (b'{"op": "org.add", "args": {"org": "no spaces allowed"}}', "org: expected an identifier"),
        (b'{"op": "sessions.kill", "args": {"session": "nope"}}', "no live session 'nope'"),
    ],
)
def test_bad_requests_get_a_clear_error(admin: Admin, line: bytes, error: str) -> None:
    reply = admin.loop.run_until_complete(admin.server._dispatch(line, "root"))
    assert reply["ok"] is False and str(reply["error"]).startswith(error)
    assert admin.changes() == []


def test_disabling_a_user_ends_the_live_sessions_the_policy_no_longer_allows(admin: Admin) -> None:
    admin.ok("org.add", org="clinic")
    admin.ok("vendor.add", vendor="acme")
    admin.ok("user.add", user="vera", vendor="acme")
    admin.ok("agent.add", agent="pc1", org="clinic")
    session = live_session(admin, "vera")
    assert admin.ok("show", kind="user", id="vera")["sessions"] == ["s1"]
    assert admin.ok("disable", kind="user", id="vera") == {"user": "vera", "sessions_ended": 1}
    assert session.ended.is_set() and session.end_reason.startswith("no longer allowed")
    assert admin.changes()[-1]["op"] == "user.disable"


def test_kill_ends_a_live_session(admin: Admin) -> None:
    session = live_session(admin, "vera")
    assert admin.ok("sessions.list")[0]["session"] == "s1"
    assert admin.ok("sessions.kill", session="s1") == {"session": "s1"}
    assert session.end_reason == "killed by root"
