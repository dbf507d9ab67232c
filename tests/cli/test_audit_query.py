"""``gw audit``: every filter, the output formats, ``gw audit sessions``, ``gw audit key``."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from gateway_config import MINIMAL

import gatewayd.audit as audit_mod
from cli.audit import audit
from gatewayd.audit import AuditLog, load_or_create_key, public_key_text

CONFIG = MINIMAL

#: (time, event, fields): a small day at the gateway.
TRAIL: list[tuple[str, str, dict[str, Any]]] = [
    ("2026-11-30T08:00:00.000000Z", "gateway.start", {"listen": "0.0.0.0:8443"}),
    (
        "2026-11-30T08:01:00.000000Z",
        "agent.connect",
        {"agent": "pc1", "org": "clinic", "source": "10.1.0.5:4000"},
    ),
    (
        "2026-11-30T09:00:00.000000Z",
        "auth.attempt",
        {
            "session": "s1",
            "user": "alice",
            "factor": "password",
            "outcome": "success",
            "source": "203.0.113.7:5000",
        },
    ),
    (
        "2026-11-30T09:00:01.000000Z",
        "auth.attempt",
        {
            "session": "s1",
            "user": "alice",
            "factor": "totp",
            "outcome": "success",
            "source": "203.0.113.7:5000",
        },
    ),
    (
        "2026-11-30T09:00:02.000000Z",
        "policy.decision",
        {
            "session": "s1",
            "user": "alice",
            "agent": "pc1",
            "target": "ssh",
            "mode": "support",
            "decision": "allow",
            "agreement": "ag1",
            "reason_given": "ticket 7",
            "source": "203.0.113.7:5000",
        },
    ),
    (
        "2026-11-30T09:00:03.000000Z",
        "session.start",
        {
            "session": "s1",
            "user": "alice",
            "agent": "pc1",
            "target": "ssh",
            "mode": "support",
            "reason_given": "ticket 7",
            "approved_by": "nurse",
            "source": "203.0.113.7:5000",
        },
    ),
    (
        "2026-11-30T09:30:03.000000Z",
        "session.end",
        {
            "session": "s1",
            "user": "alice",
            "agent": "pc1",
            "target": "ssh",
            "mode": "support",
            "reason": "client closed",
            "duration": 1800.0,
            "bytes_up": 1000,
            "bytes_down": 50000,
        },
    ),
    (
        "2026-11-30T10:00:00.000000Z",
        "auth.attempt",
        {
            "session": "s2",
            "user": "bob",
            "factor": "password",
            "outcome": "failure",
            "reason": "wrong password",
            "source": "[2001:db8::9]:6000",
        },
    ),
    (
        "2026-11-30T10:05:00.000000Z",
        "connection.rejected",
        {"source": "198.51.100.1:7000", "code": "tls", "message": "bad\x1b[31m"},
    ),
    (
        "2026-12-01T12:00:00.000000Z",
        "admin.change",
        {"by": "root", "op": "agent.add", "id": "pc2", "org": "other"},
    ),
]


def write_trail(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = root / "gatewayd.toml"
    config.write_text(CONFIG)
    times = iter([t for t, _, _ in TRAIL])
    monkeypatch.setattr(audit_mod, "now_rfc3339", lambda ts=None: next(times))
    log = AuditLog(root / "log" / "audit.jsonl", node="gw1", fsync=False)
    for _, event, fields in TRAIL:
        log.write(event, **fields)
    monkeypatch.undo()
    import asyncio

    asyncio.run(log.close())
    db = root / "state" / "directory.db"
    db.parent.mkdir(exist_ok=True)
    conn = sqlite3.connect(db)
    conn.executescript(
        """
        CREATE TABLE agents (id TEXT, org TEXT);
        CREATE TABLE users (id TEXT, vendor TEXT, org TEXT);
        CREATE TABLE agreements (id TEXT, vendor TEXT, org TEXT);
        INSERT INTO agents VALUES ('pc1', 'clinic'), ('pc2', 'other');
        INSERT INTO users VALUES ('alice', 'acme', NULL), ('bob', 'acme', NULL),
                                 ('erin', NULL, 'clinic');
        INSERT INTO agreements VALUES ('ag1', 'acme', 'clinic');
        """
    )
    conn.commit()
    conn.close()
    return config


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return write_trail(tmp_path, monkeypatch)


def run(config: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(audit, ["--config", str(config), *args])
    assert result.exit_code == code, result.output
    return result.output


def events(config: Path, *args: str) -> list[str]:
    out = run(config, *args, "--json")
    return [json.loads(line)["event"] for line in out.splitlines()]


def seqs(config: Path, *args: str) -> list[int]:
    return [json.loads(line)["seq"] for line in run(config, *args, "--json").splitlines()]


def test_time_filters(config: Path) -> None:
    assert seqs(config, "--since", "2026-12-01") == [10]
    assert seqs(config, "--until", "2026-11-30T08:01:00Z") == [1]
    assert seqs(
        config, "--since", "2026-11-30T09:00:00+00:00", "--until", "2026-11-30T09:00:02Z"
    ) == [3, 4]
    assert seqs(config, "--since", "1000d") == list(range(1, 11))
    assert seqs(config, "--until", "1000d") == []
    out = CliRunner().invoke(audit, ["--config", str(config), "--until", "soon"])
    assert out.exit_code == 2 and "--until" in out.output


def test_user_agent_session_event_filters(config: Path) -> None:
    assert seqs(config, "--user", "alice") == [3, 4, 5, 6, 7]
    assert seqs(config, "--user", "root") == [10]  # admin changes by them
    assert seqs(config, "--agent", "pc1") == [2, 5, 6, 7]
    assert seqs(config, "--session", "s2") == [8]
    assert events(config, "--event", "auth.") == ["auth.attempt"] * 3
    assert events(config, "--event", "auth") == []  # an exact name unless it ends in '.'
    assert seqs(config, "--event", "session.start") == [6]
    assert seqs(config, "--user", "alice", "--event", "auth.") == [3, 4]


def test_org_matches_its_agents_users_and_agreements(config: Path) -> None:
    assert seqs(config, "--org", "clinic") == [2, 5, 6, 7]
    assert seqs(config, "--org", "other") == [10]
    assert seqs(config, "--vendor", "acme") == [3, 4, 5, 6, 7, 8]


def test_outcome_and_source_filters(config: Path) -> None:
    assert seqs(config, "--outcome", "failure") == [8, 9]
    assert seqs(config, "--outcome", "success") == [3, 4, 5]
    assert seqs(config, "--source", "203.0.113.0/24") == [3, 4, 5, 6]
    assert seqs(config, "--source", "2001:db8::/32") == [8]
    assert seqs(config, "--source", "198.51.100.1") == [9]
    bad = CliRunner().invoke(audit, ["--config", str(config), "--source", "nowhere"])
    assert bad.exit_code == 2 and "--source" in bad.output


def test_limit_and_reverse(config: Path) -> None:
    assert seqs(config, "--limit", "2") == [9, 10]  # the last two
    assert seqs(config, "--reverse", "--limit", "2") == [10, 9]
    assert seqs(config, "--reverse", "--user", "alice") == [7, 6, 5, 4, 3]


def test_table_csv_and_no_escape_sequences(config: Path) -> None:
    table = run(config, "--event", "connection.rejected")
    assert table.splitlines()[0].startswith("TS ")
    assert "\x1b" not in table and "bad\\x1b[31m" in table
    out = run(config, "--csv", "--user", "alice")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][:4] == ["ts", "seq", "node", "event"]
    assert [r[3] for r in rows[1:]] == [
        "auth.attempt",
        "auth.attempt",
        "policy.decision",
        "session.start",
        "session.end",
    ]
    assert json.loads(rows[1][-1])["factor"] == "password"
    assert rows[3][rows[0].index("outcome")] == "allow"


def test_failures_stand_out_on_a_terminal(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cli import audit as cli_audit

    out = io.StringIO()
    monkeypatch.setattr(cli_audit.sys, "stdout", out)
    printer = cli_audit.Output("table", color=True)
    printer.rows([{"ts": "t", "event": "auth.attempt", "outcome": "failure"}])
    printer.rows([{"ts": "t", "event": "auth.attempt", "outcome": "success"}])
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("\x1b[31m\x1b[1m") and "\x1b[31m" not in lines[2]


def test_sessions_view(config: Path) -> None:
    out = run(config, "sessions", "--json")
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row == {
        "session": "s1",
        "user": "alice",
        "vendor": "acme",
        "org": "clinic",
        "agent": "pc1",
        "target": "ssh",
        "mode": "support",
        "reason": "ticket 7",
        "approved_by": "nurse",
        "start": "2026-11-30T09:00:03.000000Z",
        "duration": 1800.0,
        "bytes_up": 1000,
        "bytes_down": 50000,
        "end": "client closed",
    }
    table = run(config, "sessions", "--org", "clinic")
    assert table.splitlines()[0].split()[:3] == ["SESSION", "USER", "VENDOR"]
    assert "nurse" in table and "client closed" in table
    assert "no matching sessions" in run(config, "sessions", "--org", "other")
    assert "no matching sessions" in run(config, "sessions", "--since", "2026-12-01")
    rows = list(csv.reader(io.StringIO(run(config, "sessions", "--csv"))))
    assert rows[1][rows[0].index("bytes_down")] == "50000"


def test_a_corrupt_line_is_reported_and_the_rest_read(config: Path) -> None:
    path = config.parent / "log" / "audit.jsonl"
    raw = path.read_bytes().splitlines()
    raw[2] = b"{not json"
    path.write_bytes(b"\n".join(raw) + b"\n")
    result = CliRunner().invoke(audit, ["--config", str(config), "--json"])
    assert result.exit_code == 0
    assert "gw audit: audit.jsonl line 3: not an audit record" in result.output
    assert len([x for x in result.output.splitlines() if x.startswith("{")]) == 9


def test_audit_key_prints_the_public_key(config: Path) -> None:
    key = load_or_create_key(config.parent / "state" / "audit.key")
    out = CliRunner().invoke(audit, ["--config", str(config), "key"])
    assert out.exit_code == 0
    assert out.output.splitlines()[0] == public_key_text(key.public_key())


def test_follow_with_filters_across_rotation(config: Path) -> None:
    """`gw audit --follow` prints the matching records written later, through rotations."""
    import subprocess
    import sys
    import threading

    path = config.parent / "log" / "audit.jsonl"
    gw = [sys.executable, "-m", "cli.main", "audit", "--config", str(config)]
    proc = subprocess.Popen(
        [*gw, "--follow", "--json", "--user", "carol"],
        stdout=subprocess.PIPE,
        text=True,
    )
    got: list[dict[str, Any]] = []
    want = [i for n in range(200) for i in ([n, n] if n % 2 else [n])]
    try:
        assert proc.stdout is not None
        stdout = proc.stdout

        def read() -> None:
            for line in stdout:
                got.append(json.loads(line))
                if len(got) == len(want):
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        log = AuditLog(path, node="gw1", fsync=False, rotate_bytes=2000)
        for i in range(200):
            log.write("test.event", i=i, user="carol" if i % 2 else "dave")
            log.write("test.event", i=i, user="carol")
        import asyncio

        asyncio.run(log.close())
        reader.join(60)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert [r["i"] for r in got] == want
    assert all(r["user"] == "carol" for r in got)
    assert len({r["seq"] for r in got}) == len(got)
    assert len(audit_mod.log_files(path)) > 10


def test_bad_files_are_reported_with_file_and_line_and_the_rest_read(tmp_path: Path) -> None:
    import asyncio
    import gzip

    from cli.audit import Filter, scan
    from gatewayd.audit import compress_file, log_files

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, node="gw1", fsync=False, rotate_bytes=600)
    for i in range(40):
        log.write("test.event", i=i, user="carol")
    asyncio.run(log.close())
    files = log_files(path)
    for f in files[:-1]:
        compress_file(f)
    files = log_files(path)
    cut = files[1].read_bytes()
    files[1].write_bytes(cut[: len(cut) // 2])
    files[2].unlink()
    files[2].mkdir()
    with gzip.open(files[3], "rb") as gz:
        lines = gz.read().splitlines()
    lines[1] = b"{garbage"
    with gzip.open(files[3], "wb") as gz:
        gz.write(b"\n".join(lines) + b"\n")
    reports: list[str] = []
    for flt in (Filter(), Filter(since="2000-01-01T00:00:00.000000Z")):
        reports.clear()
        got = [r["i"] for r in scan(path, flt, reports.append)]
        assert got[-1] == 39 and len(got) > 20
        assert reports[0].startswith(f"{files[1].name} line ")
        assert reports[0].endswith("cannot read: compressed file cut short")
        assert reports[1].startswith(f"{files[2].name} line 1: cannot read:")
        assert reports[2] == f"{files[3].name} line 2: not an audit record"


def test_records_never_go_back_in_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock stepped back does not put records out of order (readers rely on it)."""
    import asyncio

    path = tmp_path / "audit.jsonl"
    times = iter(["2026-12-01T10:00:00.000000Z", "2026-12-01T09:00:00.000000Z"])
    monkeypatch.setattr(audit_mod, "now_rfc3339", lambda ts=None: next(times))
    log = AuditLog(path, node="gw1", fsync=False)
    log.write("one")
    log.write("two")
    monkeypatch.undo()
    asyncio.run(log.close())
    ts = [json.loads(x)["ts"] for x in path.read_bytes().splitlines()]
    assert ts == ["2026-12-01T10:00:00.000000Z"] * 2
