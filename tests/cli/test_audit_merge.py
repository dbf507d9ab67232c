"""``gw audit`` over several nodes' trails: merged by time with the node shown, every
filter across them, sessions whose records are on several nodes, and ``verify``
checking and reporting each node's chain on its own (an edit, a cut, a trail signed
with another node's key).

The trails are real: written by the audit writer (:class:`gatewayd.audit.AuditLog`)
with each node's own signing key, in each node's own folder.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import gatewayd.audit as audit_mod
from cli.audit import audit, follow_trails, trail_files
from gatewayd.audit import AuditLog, load_or_create_key, public_key_file, write_public_key

DAY = "2026-11-30T"

#: (node, time, event, fields): a session whose client is on gw3, its agent on gw1.
EVENTS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("gw1", "08:00:01", "agent.connect", {"agent": "pc1", "org": "clinic", "source": "10.1.0.5:1"}),
    ("gw2", "08:00:02", "agent.connect", {"agent": "pc2", "org": "other", "source": "10.2.0.5:1"}),
    (
        "gw3",
        "09:00:00",
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
        "gw2",
        "09:00:00.5",
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
        "gw3",
        "09:00:01",
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
        "gw1",
        "09:00:02",
        "approval.result",
        {"session": "s1", "agent": "pc1", "outcome": "approved", "by": "nurse"},
    ),
    (
        "gw3",
        "09:00:03",
        "tunnel.start",
        {"session": "s1", "user": "alice", "agent": "pc1", "target": "ssh", "mode": "support"},
    ),
    (
        "gw3",
        "09:30:03",
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
    ("gw1", "10:00:00", "agent.disconnect", {"agent": "pc1", "reason": "closed"}),
]
NODES = ("gw1", "gw2", "gw3")


def _ts(clock: str) -> str:
    whole, _, frac = clock.partition(".")
    return f"{DAY}{whole}.{(frac or '0').ljust(6, '0')}Z"


def write_node(root: Path, node: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One node's trail in ``root/<node>/audit.jsonl``, signed with the node's own key
    (``<node>/audit.key``, its public half beside the trail as gatewayd keeps it)."""
    mine = [(_ts(t), e, f) for n, t, e, f in EVENTS if n == node]
    # The start checkpoint (the time it signs, its own), each record at its time; the
    # stop checkpoint last.
    times = iter([_ts("07:00:00"), _ts("07:00:00"), *(t for t, _, _ in mine)])
    monkeypatch.setattr(audit_mod, "now_rfc3339", lambda ts=None: next(times, _ts("23:00:00")))
    folder = root / node
    key = load_or_create_key(folder / "audit.key")
    path = folder / "audit.jsonl"
    log = AuditLog(path, node=node, fsync=False, signer=key)
    write_public_key(path, key)
    log.write_startup_records()
    for _, event, fields in mine:
        log.write(event, **fields)
    asyncio.run(log.close())
    monkeypatch.undo()
    return path


@pytest.fixture
def trails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    return {node: write_node(tmp_path, node, monkeypatch) for node in NODES}


def invoke(*args: str) -> Any:
    return CliRunner().invoke(audit, list(args))


def trail_args(trails: dict[str, Path], *nodes: str) -> list[str]:
    return [a for n in nodes or NODES for a in ("--trail", str(trails[n].parent))]


def records(trails: dict[str, Path], *args: str) -> list[dict[str, Any]]:
    result = invoke(*trail_args(trails), *args, "--json")
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def picked(trails: dict[str, Path], *args: str) -> list[tuple[str, str]]:
    """(node, event) of what a query selects, checkpoints left out."""
    return [
        (r["node"], r["event"])
        for r in records(trails, *args)
        if r["event"] not in ("audit.checkpoint", "audit.retention")
    ]


def test_records_of_every_node_merged_by_time(trails: dict[str, Path]) -> None:
    recs = records(trails)
    assert [r["ts"] for r in recs] == sorted(r["ts"] for r in recs)
    assert {r["node"] for r in recs} == set(NODES)
    # Each node's own chain order is kept inside the merge.
    for node in NODES:
        seqs = [r["seq"] for r in recs if r["node"] == node]
        assert seqs == sorted(seqs) and seqs[0] == 1
    assert picked(trails) == [(n, e) for n, _, e, _ in EVENTS]


def test_the_table_shows_each_records_node(trails: dict[str, Path]) -> None:
    result = invoke(*trail_args(trails), "--session", "s1")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["TS", "NODE", "EVENT"]
    assert [line.split()[2:4] for line in lines[1:]] == [
        ["gw3", "auth.attempt"],
        ["gw3", "session.start"],
        ["gw1", "approval.result"],
        ["gw3", "tunnel.start"],
        ["gw3", "session.end"],
    ]
    out = invoke(*trail_args(trails), "--user", "alice", "--csv").stdout
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][:3] == ["ts", "seq", "node"] and {r[2] for r in rows[1:]} == {"gw3"}


def test_every_filter_works_across_the_nodes(trails: dict[str, Path]) -> None:
    assert picked(trails, "--agent", "pc1") == [
        ("gw1", "agent.connect"),
        ("gw3", "session.start"),
        ("gw1", "approval.result"),
        ("gw3", "tunnel.start"),
        ("gw3", "session.end"),
        ("gw1", "agent.disconnect"),
    ]
    assert picked(trails, "--event", "agent.") == [
        ("gw1", "agent.connect"),
        ("gw2", "agent.connect"),
        ("gw1", "agent.disconnect"),
    ]
    assert picked(trails, "--outcome", "failure") == [("gw2", "auth.attempt")]
    assert picked(trails, "--outcome", "success") == [
        ("gw3", "auth.attempt"),
        ("gw1", "approval.result"),
    ]
    assert picked(trails, "--source", "2001:db8::/32") == [("gw2", "auth.attempt")]
    assert picked(trails, "--org", "clinic") == [("gw1", "agent.connect")]  # no directory
    window = ("--since", f"{DAY}09:00:00.5Z", "--until", f"{DAY}09:00:03Z")
    assert picked(trails, *window) == [
        ("gw2", "auth.attempt"),
        ("gw3", "session.start"),
        ("gw1", "approval.result"),
    ]
    assert picked(trails, "--event", "auth.", "--limit", "1") == [("gw2", "auth.attempt")]
    assert picked(trails, "--event", "auth.", "--reverse") == [
        ("gw2", "auth.attempt"),
        ("gw3", "auth.attempt"),
    ]


def test_a_folder_of_several_trails_and_the_same_trail_twice(
    trails: dict[str, Path], tmp_path: Path
) -> None:
    # Three nodes' trails side by side in one folder (e.g. one host's workers).
    shared = tmp_path / "all"
    shared.mkdir()
    for node, path in trails.items():
        for f in path.parent.glob("audit.jsonl*"):
            (shared / f.name.replace("audit", f"audit-{node}", 1)).write_bytes(f.read_bytes())
    assert [p.name for p in trail_files(shared)] == [f"audit-{n}.jsonl" for n in NODES]
    result = invoke("--trail", str(shared), "--event", "agent.connect", "--json")
    assert [json.loads(x)["node"] for x in result.stdout.splitlines()] == ["gw1", "gw2"]
    # A trail named twice (its folder and its file) is read once.
    twice = invoke(
        "--trail", str(trails["gw1"]), "--trail", str(trails["gw1"].parent), "--json"
    ).stdout
    assert len(twice.splitlines()) == len(trails["gw1"].read_text().splitlines())


def test_bad_trails_are_one_clear_error(tmp_path: Path) -> None:
    missing = invoke("--trail", str(tmp_path / "nowhere"))
    assert missing.exit_code == 2 and "no such trail or folder" in missing.output
    empty = invoke("--trail", str(tmp_path))
    assert empty.exit_code == 2 and "no audit trail in this folder" in empty.output
    with pytest.MonkeyPatch.context() as mp:  # no config where gw audit looks by default
        mp.setenv("GATEWAYD_CONFIG", str(tmp_path / "no-config.toml"))
        neither = invoke()
    assert neither.exit_code == 4 and "--trail DIR" in neither.output  # docs/exit-codes.md


def test_a_session_whose_records_are_on_several_nodes(trails: dict[str, Path]) -> None:
    result = invoke(*trail_args(trails), "sessions", "--json")
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["session"] == "s1" and row["agent"] == "pc1" and row["user"] == "alice"
    assert row["org"] == "clinic"  # from gw1's agent.connect
    assert row["end"] == "client closed" and row["bytes_down"] == 50000
    # The session's approval is on gw1's trail: filtering by who approved finds it.
    by = invoke("sessions", *trail_args(trails), "--user", "nurse", "--json")
    assert [json.loads(x)["session"] for x in by.stdout.splitlines()] == ["s1"]


def test_verify_checks_and_reports_each_node(trails: dict[str, Path]) -> None:
    result = invoke(*trail_args(trails), "verify")
    assert result.exit_code == 0, result.output
    for node in NODES:
        assert f"node {node} ({trails[node]}): ok:" in result.stdout
        assert f"node {node} ({trails[node]}): last verified checkpoint" in result.stdout
    assert "all 3 trails intact" in result.stdout


def test_an_edit_on_one_node_fails_that_node_only(trails: dict[str, Path]) -> None:
    path = trails["gw2"]
    path.write_text(path.read_text().replace("wrong password", "right password"))
    result = invoke("verify", *trail_args(trails))
    assert result.exit_code == 1
    assert (
        f"node gw2 ({path}): FAIL: audit.jsonl line 4: seq 4: the record before it was changed"
        in result.stderr
    )
    for node in ("gw1", "gw3"):
        assert f"node {node} ({trails[node]}): ok:" in result.stdout
    assert "1 of 3 trails failed verification" in result.stderr


def test_records_removed_from_one_node_are_found(trails: dict[str, Path]) -> None:
    path = trails["gw3"]
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]))  # the session's end and the stop checkpoint gone
    result = invoke("verify", *trail_args(trails))
    assert result.exit_code == 1
    assert f"node gw3 ({path}): FAIL:" in result.stderr and "truncated" in result.stderr
    assert "node gw1" not in result.stderr and "node gw2" not in result.stderr


def test_a_trail_rewritten_with_another_nodes_key_fails_with_its_own(
    trails: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who holds gw2's key rewrites gw1's whole trail and signs it with gw2's
    key (the .pub beside it swapped too): gw1's own key, given out of band, refuses it."""
    gw1_pub = tmp_path / "gw1.pub"
    gw1_pub.write_bytes(public_key_file(trails["gw1"]).read_bytes())
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "audit.key").write_bytes((trails["gw2"].parent / "audit.key").read_bytes())
    global EVENTS
    honest = EVENTS
    EVENTS = [(n, t, e, {**f, "agent": "pc9"} if n == "gw1" else f) for n, t, e, f in honest]
    try:
        fake = write_node(forged, "gw1", monkeypatch)
    finally:
        EVENTS = honest
    # With only the key beside it, the rewritten trail passes: that key is the forger's.
    assert invoke("verify", "--trail", str(fake)).exit_code == 0
    result = invoke("verify", "--trail", str(fake), "--key", f"gw1={gw1_pub}")
    assert result.exit_code == 1
    assert "node gw1" in result.stderr and "FAIL" in result.stderr
    # The honest trails pass with each node's key given by name.
    keys = [a for n in NODES for a in ("--key", f"{n}={public_key_file(trails[n])}")]
    assert invoke("verify", *trail_args(trails), *keys).exit_code == 0


def test_a_trail_without_a_key_beside_it_is_a_failure_that_says_so(
    trails: dict[str, Path],
) -> None:
    public_key_file(trails["gw2"]).unlink()
    result = invoke("verify", *trail_args(trails))
    assert result.exit_code == 1
    assert "node gw2" in result.stderr and "give --key gw2=FILE" in result.stderr


def test_follow_reads_every_trail(trails: dict[str, Path]) -> None:
    paths = list(trails.values())
    total = sum(len(p.read_text().splitlines()) for p in paths)
    got: list[dict[str, Any]] = []
    done = threading.Event()
    for rec in follow_trails(paths, dict.fromkeys(paths, 0), done.is_set):
        got.append(rec)
        if len(got) == total:
            done.set()
    assert len(got) == total
    assert {(r["node"], r["seq"]) for r in got} == {
        (n, s) for n, p in trails.items() for s in range(1, len(p.read_text().splitlines()) + 1)
    }


def test_a_new_nodes_trail_folder_gets_the_public_key_beside_it(tmp_path: Path) -> None:
    """gatewayd keeps ``<trail>.pub`` beside each trail, also in a folder its audit log
    makes at the first start (a new node's), so verify finds the key there."""
    from gatewayd import config as config_mod
    from gatewayd.audit import audit_key_path, load_public_key, open_audit_log

    cfg_file = tmp_path / "gatewayd.toml"
    cfg_file.write_text(
        '[gateway]\nlisten = "127.0.0.1:8443"\nnode_id = "gw7"\n'
        '[tls]\ncert_file = "a"\nkey_file = "b"\nca_file = "c"\nca_key_file = "d"\n'
        '[store]\npath = "state/directory.db"\nsecrets_key_file = "state/secrets.key"\n'
        '[audit]\npath = "new-node/audit.jsonl"\n[admin]\nsocket = "admin.sock"\n'
    )
    (tmp_path / "state").mkdir()
    cfg = config_mod.load(cfg_file)
    log = open_audit_log(cfg)
    try:
        pub = public_key_file(tmp_path / "new-node" / "audit.jsonl")
        assert pub.exists()
        own = load_public_key(public_key_file(audit_key_path(cfg)))
        assert load_public_key(pub) == own
    finally:
        asyncio.run(log.close())
