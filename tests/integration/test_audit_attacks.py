"""Attacks on the audit trail and the daemon around it, against real gatewayd and gw processes.

Each test runs a gateway of its own (most of them stop, damage and restart it): a full
disk, a crash mid-record, a truncated log, a flood of junk connections, a second
gatewayd on the same config, a key log left on, a reload that must reach every part,
and escape sequences aimed at the operator's terminal.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from auth.base import b64e
from gatewayd.audit import AuditLog, load_or_create_key
from gatewayd.demo import BIN, Lab, Proc, wait_for
from relay import message as m
from relay.protocol import Closed, Connection, Side

pytestmark = pytest.mark.integration

PASSWORD = "audit attack pass phrase"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    the_lab = Lab(tmp_path / "lab")
    the_lab.init()
    the_lab.start_gateway()
    try:
        yield the_lab
    finally:
        the_lab.close()


def gateway_proc(lab: Lab) -> Proc:
    return [p for p in lab.procs if p.name == "gatewayd"][-1]


def stop_gateway(lab: Lab) -> None:
    assert gateway_proc(lab).stop() == 0
    lab.procs = [p for p in lab.procs if p.name != "gatewayd"]


def verify_cli(lab: Lab) -> subprocess.CompletedProcess[str]:
    return lab.run("gw", "audit", "verify", "--config", str(lab.config), check=False)


def status(lab: Lab) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(lab.admin("status"))
    return result


# -- a full disk -----------------------------------------------------------------------------------


def test_full_disk_keeps_whole_records_and_refuses_sessions(lab: Lab) -> None:
    lab.admin("vendor", "add", "acme", "--name", "Acme")
    stop_gateway(lab)
    # Make the log the largest file by far, so a file-size limit just above it hits the
    # log mid-record long before the database or the daemon's own log.
    # Written as gatewayd would: signed checkpoints, with the gateway's own key.
    key = load_or_create_key(lab.root / "gw" / "state" / "audit.key")
    filler = AuditLog(lab.audit_path, node="gw1", fsync=False, signer=key)
    for i in range(6000):
        filler.write("test.filler", i=i, text="f" * 200)
    asyncio.run(filler.close())
    limit = lab.audit_path.stat().st_size + 800
    db = lab.root / "gw" / "state"
    assert all(p.stat().st_size < limit // 2 for p in db.glob("*") if p.is_file())

    def limited() -> None:  # the child, before exec: Python ignores SIGXFSZ itself
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    out = (lab.root / "gatewayd-full.log").open("wb")
    popen = subprocess.Popen(
        [str(BIN / "gatewayd"), "--config", str(lab.config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=lab.env(),
        preexec_fn=limited,  # only setrlimit: safe after fork
    )
    out.close()
    lab.procs.append(Proc("gatewayd", popen, lab.root / "gatewayd-full.log"))
    wait_for(lambda: (lab.root / "gw" / "admin.sock").exists(), 60, "gatewayd to start")
    # Fill the rest with audited admin changes until the log refuses one.
    for n in range(40):
        if lab.admin("org", "add", f"org{n}", "--name", "N", check=False) == "":
            break
        if status(lab)["audit"] != "ok":
            break
    failure = status(lab)["audit"]
    assert "cannot write audit log" in failure and "File too large" in failure
    data = lab.audit_path.read_bytes()
    assert len(data) <= limit
    assert data.endswith(b"\n"), "a record was left torn"
    for line in data.splitlines():
        json.loads(line)
    # New sessions are refused, and the client is told why.
    result = lab.run(
        *lab.connect_args(
            "pc1", "someone", "echo", "access", "--stdio", "--password-stdin", "--totp", "123456"
        ),
        input=f"{PASSWORD}\n",
        check=False,
    )
    assert result.returncode == 1
    assert "audit log" in result.stderr, result.stderr
    # Room again: the gateway writes again by itself, saying since when it could not.
    resource.prlimit(popen.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    wait_for(lambda: status(lab)["audit"] == "ok", 60, "the audit log to work again")
    resumed = lab.events("audit.resumed")
    assert len(resumed) == 1 and "File too large" in resumed[0]["failure"]
    result = lab.run(
        *lab.connect_args(
            "pc1", "someone", "echo", "access", "--stdio", "--password-stdin", "--totp", "123456"
        ),
        input=f"{PASSWORD}\n",
        check=False,
    )
    assert "audit log" not in result.stderr, result.stderr
    # The chain on disk is whole.
    stop_gateway(lab)
    assert verify_cli(lab).returncode == 0


# -- a crash mid-record ----------------------------------------------------------------------------


def test_torn_last_record_does_not_stop_the_gateway(lab: Lab) -> None:
    lab.admin("org", "add", "clinic", "--name", "N")
    stop_gateway(lab)
    torn = b'{"ts":"2026-12-01T10:00:00.000000Z","seq":9,"prev":"3f2a'
    with lab.audit_path.open("ab") as f:
        f.write(torn)
    lab.start_gateway()
    recovered = lab.events("audit.recovered")
    assert len(recovered) == 1
    aside = Path(recovered[0]["aside"])
    assert recovered[0]["bytes"] == len(torn)
    assert aside.read_bytes() == torn
    assert aside.parent == lab.audit_path.parent and ".torn-" in aside.name
    lab.admin("org", "add", "after", "--name", "N")
    result = verify_cli(lab)
    assert result.returncode == 0, result.stderr


# -- a truncated log -------------------------------------------------------------------------------


def cut_last_lines(path: Path, n: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-n]))


def test_truncation_is_a_failure_of_verify_until_acknowledged(lab: Lab) -> None:
    for org in ("a", "b", "c"):
        lab.admin("org", "add", org, "--name", "N")
    stop_gateway(lab)
    cut_last_lines(lab.audit_path, 3)  # an intruder removes the last records
    lab.start_gateway()
    anchor = lab.events("audit.discontinuity")[-1]
    result = verify_cli(lab)
    assert result.returncode == 1
    line = next(
        number
        for number, raw in enumerate(lab.audit_path.read_bytes().splitlines(), 1)
        if f'"seq":{anchor["seq"]},'.encode() in raw
    )
    assert (
        f"FAIL: audit.jsonl line {line}: seq {anchor['seq']}: the chain was re-anchored"
        in result.stderr
    ), result.stderr
    # Only a gap or a re-anchor can be acknowledged, and only through the daemon.
    wrong = lab.run(
        "gw", "audit", "acknowledge", "--config", str(lab.config), "--seq", "2",
        "--reason", "nothing there", check=False,
    )  # fmt: skip
    assert wrong.returncode == 1 and "no unacknowledged gap" in wrong.stderr
    ack = lab.run(
        "gw", "audit", "acknowledge", "--config", str(lab.config),
        "--seq", str(anchor["seq"]), "--reason", "restored from backup, ticket 12",
    )  # fmt: skip
    assert f"acknowledged seq {anchor['seq']}" in ack.stdout
    record = lab.events("audit.acknowledged")[-1]
    assert record["acknowledged_seq"] == anchor["seq"]
    assert record["reason"] == "restored from backup, ticket 12" and record["by"]
    ok = verify_cli(lab)
    assert ok.returncode == 0, ok.stderr
    assert f"acknowledged: audit.jsonl line {line}: seq {anchor['seq']}" in ok.stdout
    # A second cut, not acknowledged, fails again; the first one stays accepted.
    lab.admin("org", "add", "d", "--name", "N")
    stop_gateway(lab)
    cut_last_lines(lab.audit_path, 1)
    lab.start_gateway()
    second = lab.events("audit.discontinuity")[-1]
    result = verify_cli(lab)
    assert result.returncode == 1
    fails = [x for x in result.stderr.splitlines() if x.startswith("FAIL")]
    assert len(fails) == 1 and f"seq {second['seq']}: the chain was re-anchored" in fails[0]


# -- a flood of junk connections -------------------------------------------------------------------


def junk(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        while s.recv(4096):  # until the gateway hangs up: the rejection is then counted
            pass


def test_junk_connections_cannot_fill_the_disk(lab: Lab) -> None:
    before = len(lab.audit_records())
    for _ in range(500):
        junk(lab.port)

    def counted() -> int:
        recs = lab.audit_records()
        single = sum(r["event"] == "connection.rejected" for r in recs)
        summed = sum(r["count"] for r in recs if r["event"] == "connection.rejected.summary")
        return single + summed + status(lab)["rejections_pending"]

    wait_for(lambda: counted() == 500, 60, "every junk connection to be counted")
    stop_gateway(lab)  # shutdown writes the pending summary
    recs = lab.audit_records()[before:]
    single = [r for r in recs if r["event"] == "connection.rejected"]
    summaries = [r for r in recs if r["event"] == "connection.rejected.summary"]
    assert len(single) <= 20  # 10 per source and minute; the test may straddle a minute
    assert summaries and all(s["source"] == "127.0.0.1" for s in summaries)
    assert len(single) + sum(s["count"] for s in summaries) == 500
    assert len(recs) < 40
    assert verify_cli(lab).returncode == 0
    shown = lab.run("gw", "audit", "--config", str(lab.config), "--event", "connection.").stdout
    assert f"{summaries[0]['count']} more (tls {summaries[0]['count']})" in shown


def hello_and_leave(lab: Lab) -> str:
    """A ClientHello, then gone at the first answer: what a password sprayer's script does."""
    ctx = ssl.create_default_context(cafile=str(lab.ca_file))
    conn = Connection(Side.CONNECTOR, now=time.monotonic())
    conn.send(
        m.ClientHello(
            user="nobody",
            agent="pc1",
            target="echo",
            mode="access",
            client_key=b64e(bytes(32)),
            reason="x",
        )
    )
    with (
        socket.create_connection(("127.0.0.1", lab.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(conn.data_to_send())
        while data := tls.recv(65536):
            conn.receive_data(data, time.monotonic())
            for event in conn.events_received():
                if isinstance(event, m.Error | Closed):
                    return event.code
                return type(event).__name__
    return "eof"


def test_rate_limited_logins_cannot_fill_the_disk(lab: Lab) -> None:
    answers = [hello_and_leave(lab) for _ in range(150)]
    limited = answers.count("rate_limited")
    assert limited >= 100, answers  # 20 a minute per user name, 30 per source

    def counted() -> int:
        recs = lab.audit_records()
        single = sum(r["event"] == "auth.rate_limited" for r in recs)
        summed = sum(
            r["codes"].get("rate_limited", 0)
            for r in recs
            if r["event"] == "connection.rejected.summary"
        )
        return single + summed + status(lab)["rejections_pending"]

    wait_for(lambda: counted() == limited, 60, "every refused login to be counted")
    stop_gateway(lab)
    recs = lab.audit_records()
    single = [r for r in recs if r["event"] == "auth.rate_limited"]
    summaries = [r for r in recs if r["event"] == "connection.rejected.summary"]
    assert len(single) <= 20
    assert len(single) + sum(s["codes"]["rate_limited"] for s in summaries) == limited


# -- two gatewayd on one config --------------------------------------------------------------------


def test_a_second_gatewayd_on_the_same_config_exits(lab: Lab) -> None:
    records = len(lab.audit_records())
    second = lab.run("gatewayd", "--config", str(lab.config), check=False, timeout=30)
    assert second.returncode == 1
    assert "another gatewayd is already running" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert len(lab.audit_records()) == records  # it wrote nothing
    lab.admin("org", "add", "still-served", "--name", "N")  # the first keeps working
    assert lab.events("admin.change")[-1]["org"] == "still-served"
    start = lab.events("gateway.start")[-1]
    assert start["reuse_port"] is False
    assert verify_cli(lab).returncode == 0


# -- SSLKEYLOGFILE ---------------------------------------------------------------------------------


def test_a_key_log_is_warned_about_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keylog = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
    the_lab = Lab(tmp_path / "lab")
    the_lab.init()
    proc = the_lab.start_gateway()
    try:
        wait_for(lambda: "gatewayd ready" in proc.output(), 60, "gatewayd to log")
        warning = next(
            json.loads(line) for line in proc.output().splitlines() if "SSLKEYLOGFILE" in line
        )
        assert warning["level"] == "warning"
        assert warning["sslkeylogfile"] == str(keylog)
        assert "every TLS session secret" in warning["event"]
        assert the_lab.events("gateway.start")[-1]["tls_keylog"] is True
    finally:
        the_lab.close()


def test_no_key_log_no_warning(lab: Lab) -> None:
    assert lab.events("gateway.start")[-1]["tls_keylog"] is False
    assert "SSLKEYLOGFILE" not in gateway_proc(lab).output()


# -- SIGHUP reaches every part ---------------------------------------------------------------------


def test_reload_reaches_the_admin_server(lab: Lab) -> None:
    lab.admin("vendor", "add", "acme", "--name", "N")
    lab.admin("org", "add", "clinic", "--name", "N")
    lab.vendor_user("alice", "acme", PASSWORD)
    before = json.loads(lab.admin("totp", "enroll", "alice", "--json"))["uri"]
    assert "issuer=gatewayd" in before
    text = lab.config.read_text()
    assert 'issuer = "gatewayd"' in text
    text = text.replace('issuer = "gatewayd"', 'issuer = "Clinic Remote"')
    lab.config.write_text(text + "\n[enrollment]\ntoken_ttl = 600\n")
    gateway_proc(lab).popen.send_signal(signal.SIGHUP)
    wait_for(lambda: bool(lab.events("gateway.reload")), 60, "the reload record")
    assert lab.events("gateway.reload")[-1]["outcome"] == "success"
    after = json.loads(lab.admin("totp", "enroll", "alice", "--json"))["uri"]
    assert "issuer=Clinic%20Remote" in after
    # The new lifetime, bracketed by the clock around the command (no speed assumed).
    before_add = time.time()
    lab.admin("agent", "add", "pc9", "--org", "clinic")
    after_add = time.time()
    expires = lab.events("admin.change")[-1]["token_expires"]
    assert before_add + 600 - 1 <= expires <= after_add + 600 + 1


# -- escape sequences aimed at the operator's terminal ---------------------------------------------


def raw_login(lab: Lab, user: str, answer_method: str) -> str:
    """Log in with a hand-made client that answers the first factor under another name."""
    ctx = ssl.create_default_context(cafile=str(lab.ca_file))
    conn = Connection(Side.CONNECTOR, now=time.monotonic())
    conn.send(
        m.ClientHello(
            user=user,
            agent="pc1",
            target="echo",
            mode="access",
            client_key=b64e(os.urandom(32)),
            reason="ticket 1",
            factors=("totp",),
        )
    )
    with (
        socket.create_connection(("127.0.0.1", lab.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(conn.data_to_send())
        while data := tls.recv(65536):
            conn.receive_data(data, time.monotonic())
            for event in conn.events_received():
                if isinstance(event, m.AuthRequest):
                    conn.send(m.AuthResponse(answer_method, {}))
                    tls.sendall(conn.data_to_send())
                elif isinstance(event, Closed):
                    return event.code
    return "eof"


def test_gw_audit_never_prints_escape_sequences(lab: Lab) -> None:
    evil = "\x1b]0;owned\x07\x1b[2J\x1b[1A\u202e"
    lab.admin("vendor", "add", "acme", "--name", "Acme")
    lab.vendor_user("mallory", "acme", PASSWORD)
    assert raw_login(lab, "mallory", evil) == "auth_failed"
    attempt = lab.events("auth.attempt")[-1]
    assert attempt["user"] == "mallory" and attempt["outcome"] == "failure"
    table = lab.run("gw", "audit", "--config", str(lab.config), "--user", "mallory").stdout
    as_json = lab.run("gw", "audit", "--config", str(lab.config), "--json").stdout
    for out in (table, as_json):
        assert "mallory" in out
        assert not any(ch in out for ch in "\x1b\x07\u202e"), repr(out)
    assert evil in attempt["reason"]  # the factor name reached the trail as sent...
    assert "\\x1b]0;owned\\x07\\x1b[2J" in table  # ...and the table shows it escaped
