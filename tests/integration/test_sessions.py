"""Support, access and home office as the agreement or grant says, approval at the machine,
tenant separation and live session control: real gatewayd, agents and gw processes."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gatewayd.demo import BIN, EchoServer, Lab, Proc, round_trip, wait_for

pytestmark = pytest.mark.integration

PASSWORD = "session tests pass phrase"
APPROVAL_SECONDS = 5
# A bound on waits for a process to exit: a guard against a hang, never a speed promise.
HANG_GUARD = 60
_n = itertools.count(1)


class Site:
    def __init__(self, lab: Lab, echo: EchoServer) -> None:
        self.lab = lab
        self.echo = echo

    def vendor_user(self, vendor: str) -> str:
        user = f"s{next(_n)}-{vendor}"
        self.lab.vendor_user(user, vendor, PASSWORD)
        return user

    def employee(self, org: str) -> str:
        user = f"e{next(_n)}-{org}"
        self.lab.admin("user", "add", user, "--org", org, "--password-stdin", input=PASSWORD + "\n")
        self.lab.totp_secrets[user] = json.loads(self.lab.admin("totp", "enroll", user, "--json"))[
            "secret"
        ]
        return user

    def stdio(
        self, agent: str, user: str, mode: str, *extra: str, totp: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.lab.connect_stdio(
            agent, user, PASSWORD, "echo", "hi", *extra, mode=mode, totp=totp
        )

    def start_connect(self, agent: str, user: str, mode: str, *extra: str) -> subprocess.Popen[str]:
        """gw connect --stdio in the background (it may wait for approval)."""
        lab = self.lab
        args = lab.connect_args(
            agent,
            user,
            "echo",
            mode,
            "--stdio",
            "--password-stdin",
            "--totp",
            lab.totp(user),
            *extra,
        )
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=lab.env(),
        )
        assert proc.stdin is not None
        proc.stdin.write(f"{PASSWORD}\nhello")
        proc.stdin.close()
        return proc

    def pending(self, agent: str) -> list[dict[str, Any]]:
        out = self.lab.run(
            "gw",
            "agent",
            "approvals",
            "--state-dir",
            str(self.lab.root / f"agent-{agent}"),
            "--json",
        ).stdout
        rows: list[dict[str, Any]] = json.loads(out) if out.strip().startswith("[") else []
        return rows

    def wait_pending(self, agent: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = self.pending(agent)
            return bool(found)

        wait_for(check, 60, "an approval request at the agent")
        return found[0]


def _config(lab: Lab) -> None:
    text = lab.config.read_text()
    for mode in ("access", "support"):
        text = text.replace(
            f"[modes.{mode}]\n", f"[modes.{mode}]\napproval_timeout = {APPROVAL_SECONDS}\n"
        )
    # Employees here log in with password + TOTP (the smartcard has its own tests).
    start = text.index("[modes.homeoffice]\n")
    end = text.index("\n[", start + 1)
    text = text[:start] + '[modes.homeoffice]\nfactors = ["password", "totp"]\n' + text[end:]
    lab.config.write_text(text + "\n[limits]\nauth_per_minute = 5000\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    lab = Lab(tmp_path_factory.mktemp("sessions"))
    lab.init()
    _config(lab)
    lab.start_gateway()
    echo = EchoServer()
    for org in ("clinic", "other"):
        lab.admin("org", "add", org, "--name", org.title())
    for vendor in ("acme", "beta", "pending", "old"):
        lab.admin("vendor", "add", vendor, "--name", f"{vendor.title()} AS")
    lab.agreement("acme", "clinic", "access,support", unattended=True)
    lab.agreement("beta", "clinic", "access", unattended=False)
    lab.agreement("pending", "clinic", "access", accept=("vendor",))
    old = lab.admin(
        "agreement",
        "add",
        "--vendor",
        "old",
        "--org",
        "clinic",
        "--modes",
        "access",
        "--unattended",
        "--valid-until",
        "2020-01-01T00:00:00Z",
    ).strip()
    for side in ("vendor", "org"):
        lab.admin("agreement", "accept", old, "--side", side)
    lab.enroll_agent("pc1", "clinic")
    lab.enroll_agent("pc2", "clinic")
    lab.enroll_agent("pc-other", "other")
    lab.start_agent("pc1", {"echo": echo.port}, "--no-prompt")
    lab.start_agent("pc2", {"echo": echo.port}, "--approval-command", 'test "$GW_REASON" = please')
    lab.start_agent("pc-other", {"echo": echo.port})
    try:
        yield Site(lab, echo)
    finally:
        lab.close()
        echo.close()


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Wait for a background gw connect (its stdin is already closed)."""
    assert proc.stdout is not None and proc.stderr is not None
    proc.wait(30)
    with proc.stdout, proc.stderr:
        return proc.stdout.read(), proc.stderr.read()


def _records(site: Site, event: str, **match: object) -> list[dict[str, Any]]:
    return [r for r in site.lab.events(event) if all(r.get(k) == v for k, v in match.items())]


# -- approval at the machine ---------------------------------------------------------


def test_support_approved_through_the_agent_socket(site: Site) -> None:
    user = site.vendor_user("acme")
    proc = site.start_connect("pc1", user, "support", "--reason", "ticket 7")
    request = site.wait_pending("pc1")
    assert request["user"] == user and request["vendor_name"] == "Acme AS"
    assert request["mode"] == "support" and request["reason"] == "ticket 7"
    state = str(site.lab.root / "agent-pc1")
    out = site.lab.run("gw", "agent", "approve", request["id"], "--state-dir", state).stdout
    assert "approved" in out
    stdout, stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    assert stdout == "HELLO"
    # The vendor saw the same short authentication string as the person at the machine.
    assert request["sas"] in stderr and "waiting for approval" in stderr
    (result,) = _records(site, "approval.result", user=user)
    assert result["outcome"] == "approved" and result["by"] == "root"
    (start,) = _records(site, "session.start", user=user)
    assert start["approved_by"] == "root" and start["reason_given"] == "ticket 7"
    session = start["session"]
    assert {r["event"] for r in site.lab.audit_records() if r.get("session") == session} >= {
        "auth.attempt",
        "policy.decision",
        "approval.requested",
        "approval.result",
        "session.start",
        "tunnel.start",
        "tunnel.end",
        "session.end",
    }


def test_support_denied_at_the_machine(site: Site) -> None:
    user = site.vendor_user("acme")
    proc = site.start_connect("pc1", user, "support", "--reason", "ticket 8")
    request = site.wait_pending("pc1")
    state = str(site.lab.root / "agent-pc1")
    site.lab.run("gw", "agent", "deny", request["id"], "--state-dir", state, "--reason", "busy")
    _, stderr = _finish(proc)
    assert proc.returncode == 1
    assert "approval denied by root: busy" in stderr
    (result,) = _records(site, "approval.result", user=user)
    assert result["outcome"] == "denied" and result["reason"] == "busy"


def test_approval_times_out_and_is_single_use(site: Site) -> None:
    user = site.vendor_user("acme")
    proc = site.start_connect("pc1", user, "support", "--reason", "nobody home")
    request = site.wait_pending("pc1")
    _, stderr = _finish(proc)
    assert proc.returncode == 1 and "approval timed out" in stderr
    # The configured timeout ended the wait (the gateway's own record of it; no wall-clock
    # bound here: a loaded machine only makes the wait longer).
    (asked,) = _records(site, "approval.requested", user=user)
    assert asked["timeout"] == APPROVAL_SECONDS
    (result,) = _records(site, "approval.result", user=user)
    assert result["outcome"] == "timeout"
    assert result["seconds"] >= APPROVAL_SECONDS - 0.1
    state = str(site.lab.root / "agent-pc1")
    late = site.lab.run("gw", "agent", "approve", request["id"], "--state-dir", state, check=False)
    assert late.returncode == 1 and "no pending request" in late.stderr


def test_attended_access_asks_the_approval_command(site: Site) -> None:
    user = site.vendor_user("beta")
    ok = site.stdio("pc2", user, "access", "--reason", "please")
    assert ok.returncode == 0 and ok.stdout == "HI", ok.stderr
    (result,) = _records(site, "approval.result", user=user)
    assert result["by"] == "approval_command"
    user = site.vendor_user("beta")
    refused = site.stdio("pc2", user, "access", "--reason", "no please")
    assert refused.returncode == 1 and "approval denied by approval_command" in refused.stderr


def test_unattended_access_is_announced_at_the_machine(site: Site) -> None:
    user = site.vendor_user("acme")
    assert site.stdio("pc1", user, "access").returncode == 0
    log = (site.lab.root / "agent-pc1.log").read_text()
    wait_for(
        lambda: "unattended session end" in (site.lab.root / "agent-pc1.log").read_text(),
        10,
        "the end notice",
    )
    assert "unattended session start" in log and f"user={user}" in log
    assert not _records(site, "approval.requested", user=user)


# -- agreements -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vendor", "mode", "agent", "reason"),
    [
        ("pending", "access", "pc1", "terms not accepted by the org"),
        ("old", "access", "pc1", "expired"),
        ("acme", "access", "pc-other", "no agreement between vendor acme and org other"),
        ("beta", "support", "pc1", "does not cover support"),
    ],
)
def test_agreement_denials(site: Site, vendor: str, mode: str, agent: str, reason: str) -> None:
    user = site.vendor_user(vendor)
    result = site.stdio(agent, user, mode, "--reason", "x")
    assert result.returncode == 1 and reason in result.stderr, result.stderr
    (decision,) = _records(site, "policy.decision", user=user)
    assert decision["decision"] == "deny" and reason in decision["reason"]


def test_suspended_agreement_and_reason_required(site: Site) -> None:
    user = site.vendor_user("acme")
    plain = site.lab.run(
        *site.lab.connect_args(
            "pc1",
            user,
            "echo",
            "access",
            "--reason",
            "",
            "--stdio",
            "--password-stdin",
            "--totp",
            site.lab.totp(user),
        ),
        input=f"{PASSWORD}\nx",
        check=False,
    )
    assert plain.returncode == 1 and "a reason is required" in plain.stderr
    agreement = json.loads(site.lab.admin("agreement", "list", "--json"))
    (acme,) = [a for a in agreement if a["vendor"] == "acme"]
    site.lab.admin("agreement", "suspend", acme["id"])
    try:
        user = site.vendor_user("acme")
        result = site.stdio("pc1", user, "access")
        assert result.returncode == 1 and "is suspended" in result.stderr
    finally:
        site.lab.admin("agreement", "resume", acme["id"])


# -- home office ----------------------------------------------------------------------


def test_homeoffice_only_to_granted_equipment_of_own_org(site: Site) -> None:
    # A fresh employee per login: each login spends that user's current TOTP step.
    user = site.employee("clinic")
    denied = site.stdio("pc1", user, "homeoffice")
    assert denied.returncode == 1 and "not granted" in denied.stderr
    user = site.employee("clinic")
    site.lab.admin("grant", "add", user, "pc1")
    ok = site.stdio("pc1", user, "homeoffice")
    assert ok.returncode == 0 and ok.stdout == "HI", ok.stderr
    user = site.employee("clinic")
    site.lab.admin("grant", "add", user, "pc1")
    other = site.stdio("pc-other", user, "homeoffice")
    assert other.returncode == 1 and "another organisation" in other.stderr
    vendor = site.vendor_user("acme")
    assert "homeoffice is for employees" in site.stdio("pc1", vendor, "homeoffice").stderr


# -- live session control -------------------------------------------------------------


def _live(site: Site, user: str, agent: str = "pc1", mode: str = "access") -> tuple[Proc, int]:
    return site.lab.connect_local(agent, user, PASSWORD, "echo", mode=mode)


def _session_of(site: Site, user: str) -> dict[str, Any]:
    rows = json.loads(site.lab.admin("sessions", "list", "--json"))
    (row,) = [r for r in rows if r["user"] == user]
    return row


def test_admin_kill_ends_a_session(site: Site) -> None:
    user = site.vendor_user("acme")
    proc, port = _live(site, user)
    assert round_trip(port, b"x") == b"X"
    row = _session_of(site, user)
    assert row["approved_by"] == "unattended" and row["bytes_up"] > 0
    site.lab.admin("sessions", "kill", row["session"])
    # The kill itself ends the client (its exit and the record say why); the deadline
    # only guards against a hang, it is no promise about speed.
    proc.popen.wait(HANG_GUARD)
    assert proc.popen.returncode == 1 and "killed by root" in proc.output()
    (end,) = _records(site, "session.end", session=row["session"])
    assert end["reason"] == "killed by root"
    (change,) = _records(site, "admin.change", op="sessions.kill", session=row["session"])
    assert change["by"] == "root"


@pytest.mark.parametrize("what", ["user", "vendor", "agent", "grant"])
def test_disabling_what_a_session_depends_on_ends_it(site: Site, what: str) -> None:
    if what == "grant":
        user = site.employee("clinic")
        site.lab.admin("grant", "add", user, "pc2")
        proc, port = _live(site, user, agent="pc2", mode="homeoffice")
    else:
        vendor = "acme" if what != "vendor" else f"v{next(_n)}"
        if what == "vendor":
            site.lab.admin("vendor", "add", vendor, "--name", "Short lived")
            site.lab.agreement(vendor, "clinic", "access", unattended=True)
        user = site.vendor_user(vendor)
        agent = "pc2" if what == "agent" else "pc1"
        if what == "agent":
            site.lab.enroll_agent("pc-spare", "clinic")
            site.lab.start_agent("pc-spare", {"echo": site.echo.port})
            agent = "pc-spare"
        proc, port = _live(site, user, agent=agent)
    assert round_trip(port, b"ok") == b"OK"
    session = _session_of(site, user)["session"]
    if what == "grant":
        site.lab.admin("grant", "remove", user, "pc2")
    else:
        ident = {"user": user, "vendor": user.split("-", 1)[1], "agent": "pc-spare"}[what]
        site.lab.admin(what, "disable", ident)
    proc.popen.wait(HANG_GUARD)
    assert proc.popen.returncode == 1
    (end,) = _records(site, "session.end", session=session)
    assert end["reason"].startswith("no longer allowed")


# -- tenant separation ----------------------------------------------------------------


def test_agents_lists_only_what_the_user_may_reach(site: Site) -> None:
    user = site.vendor_user("acme")
    out = site.lab.run(
        "gw",
        "agents",
        "--gateway",
        site.lab.gateway,
        "--ca-file",
        str(site.lab.ca_file),
        "--user",
        user,
        "--password-stdin",
        "--totp",
        site.lab.totp(user),
        "--json",
        input=PASSWORD + "\n",
    ).stdout
    rows = {r["agent"]: r for r in json.loads(out)}
    assert "pc-other" not in rows
    assert rows["pc1"]["modes"] == ["access", "support"] and rows["pc1"]["online"] is True


def test_vendor_source_networks(site: Site) -> None:
    site.lab.admin("vendor", "add", "netco", "--name", "Net Co")
    site.lab.agreement("netco", "clinic", "access", unattended=True)
    site.lab.admin("vendor", "networks", "netco", "10.0.0.0/8")
    user = site.vendor_user("netco")
    # Refused after the first factor, as an unknown user is (the answer must not tell
    # that the user exists), so the code is never looked at.
    refused = site.stdio("pc1", user, "access", totp="000000")
    assert refused.returncode == 1 and "authentication failed" in refused.stderr
    (attempt,) = _records(site, "auth.attempt", user=user)
    assert attempt["factor"] == "password" and attempt["source"].startswith("127.0.0.1:")
    assert attempt["reason"] == "source address not allowed for vendor netco"
    site.lab.admin("vendor", "networks", "netco", "127.0.0.0/8")
    assert site.stdio("pc1", user, "access").returncode == 0


def test_approval_on_the_agents_terminal(site: Site) -> None:
    """`gw agent run` in a terminal asks the person there, with who, what and the code."""
    import os
    import pty
    import select

    lab = site.lab
    lab.enroll_agent("pc-tty", "clinic")
    master, slave = pty.openpty()
    args = [
        str(BIN / "gw"),
        "agent",
        "run",
        "--state-dir",
        str(lab.root / "agent-pc-tty"),
        f"--target=echo=127.0.0.1:{site.echo.port}",
    ]
    agent = subprocess.Popen(
        args, stdin=slave, stdout=slave, stderr=slave, env=lab.env(), start_new_session=True
    )
    os.close(slave)
    seen = b""

    def read_until(text: bytes, timeout: float = 20) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            assert time.monotonic() < deadline, f"no {text!r} on the agent's terminal: {seen!r}"
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                seen += os.read(master, 4096)

    try:
        read_until(b"connected")
        user = site.vendor_user("acme")
        proc = site.start_connect("pc-tty", user, "support", "--reason", "printer jam")
        read_until(b"Allow? [y/N]")
        assert user.encode() in seen and b"Acme AS" in seen and b"printer jam" in seen
        os.write(master, b"y\n")
        stdout, stderr = _finish(proc)
        assert proc.returncode == 0 and stdout == "HELLO", stderr
        code = stderr.rsplit("must match: ", 1)[1].split()[0]
        assert code.encode() in seen  # both people saw the same code
        (result,) = _records(site, "approval.result", user=user)
        assert result["outcome"] == "approved" and result["by"] == "root (terminal)"
    finally:
        agent.terminate()
        agent.wait(10)
        os.close(master)
