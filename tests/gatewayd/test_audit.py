"""The hash-chained audit log (gatewayd/audit.py): writing, rotation, group commit, verify.

Every test writes into its own tmp dir with fsync off (except where fsync is the point)
and then edits the files the way an intruder or a full disk would.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gatewayd.audit import (
    ACKNOWLEDGED,
    DISCONTINUITY,
    GENESIS,
    AuditError,
    AuditLog,
    Problem,
    head_path,
    line_hash,
    log_files,
    now_rfc3339,
    read_head,
    read_lines,
    verify,
)
from gatewayd.rejection import RejectionLog, source_host, source_key


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.log"


async def write_records(path: Path, n: int, *, first: int = 0, **kw: Any) -> None:
    log = AuditLog(path, node="t", fsync=False, **kw)
    try:
        for i in range(first, first + n):
            await log.record("test.event", i=i, user="alice@acme")
    finally:
        await log.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_lines(path)]


def rewrite(path: Path, new_lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in new_lines))


# -- writing ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_records_are_chained(log_path: Path) -> None:
    await write_records(log_path, 4)
    raw = lines(log_path)
    recs = [json.loads(line) for line in raw]
    assert [r["seq"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["prev"] == GENESIS
    for before, rec in zip(raw, recs[1:], strict=False):
        assert rec["prev"] == line_hash(before)
    assert list(recs[0])[:5] == ["ts", "seq", "prev", "node", "event"]
    assert recs[2] | {"ts": None} == {
        "ts": None,
        "seq": 3,
        "prev": line_hash(raw[1]),
        "node": "t",
        "event": "test.event",
        "i": 2,
        "user": "alice@acme",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", recs[0]["ts"])
    head = read_head(log_path)
    assert head is not None
    assert (head.seq, head.hash) == (4, line_hash(raw[-1]))
    assert verify(log_path).ok
    assert verify(log_path).records == 4


def test_now_rfc3339() -> None:
    assert now_rfc3339(0) == "1970-01-01T00:00:00.000000Z"
    assert now_rfc3339(1_700_000_000.5) == "2023-11-14T22:13:20.500000Z"


@pytest.mark.asyncio
async def test_write_returns_seq_and_commit_makes_it_durable(log_path: Path) -> None:
    log = AuditLog(log_path, node="t", fsync=True)
    assert log.write("a") == 1
    assert log.write("b") == 2
    await log.commit(1)  # one fsync covers both
    head = read_head(log_path)
    assert head is not None and head.seq == 2
    await log.commit()
    await log.close()
    assert verify(log_path).ok


@pytest.mark.asyncio
async def test_reopen_continues_seq_and_prev(log_path: Path) -> None:
    await write_records(log_path, 3)
    last = lines(log_path)[-1]
    log = AuditLog(log_path, node="t", fsync=False)
    assert (log.seq, log.prev) == (3, line_hash(last))
    assert log.discontinuity is None
    await log.record("again")
    await log.close()
    recs = records(log_path)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4]
    assert recs[3]["prev"] == line_hash(last)
    assert verify(log_path).ok


@pytest.mark.asyncio
async def test_reopen_notices_truncation(log_path: Path) -> None:
    await write_records(log_path, 5)
    rewrite(log_path, lines(log_path)[:3])
    log = AuditLog(log_path, node="t", fsync=False)
    try:
        assert log.discontinuity is not None
        assert "head file says 5" in log.discontinuity
    finally:
        await log.close()


@pytest.mark.asyncio
async def test_reopen_refuses_a_log_ending_in_garbage(log_path: Path) -> None:
    await write_records(log_path, 2)
    with log_path.open("ab") as f:
        f.write(b"not json\n")
    with pytest.raises(AuditError, match="not an audit record"):
        AuditLog(log_path, node="t", fsync=False)


# -- verify finds tampering ----------------------------------------------------------------------


def test_verify_of_no_log_at_all(log_path: Path) -> None:
    result = verify(log_path)
    assert (result.ok, result.records, result.problems) == (True, 0, [])


@pytest.mark.asyncio
async def test_verify_of_a_log_opened_and_closed_without_records(log_path: Path) -> None:
    log = AuditLog(log_path, node="t", fsync=False)
    await log.close()
    result = verify(log_path)
    assert result.ok, result.problems


@pytest_asyncio.fixture
async def five(log_path: Path) -> list[bytes]:
    await write_records(log_path, 5)
    assert verify(log_path).ok
    return lines(log_path)


@pytest.mark.asyncio
async def test_edited_record(log_path: Path, five: list[bytes]) -> None:
    edited = list(five)
    edited[2] = edited[2].replace(b"alice@acme", b"mallory@acme")
    rewrite(log_path, edited)
    result = verify(log_path)
    assert not result.ok
    assert result.problems == [
        "audit.log line 4: seq 4: the record before it was changed, removed or moved"
    ]


@pytest.mark.asyncio
async def test_edited_last_record(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, [*five[:4], five[4].replace(b"alice@acme", b"mallory@acme")])
    result = verify(log_path)
    assert result.problems == ["audit.log line 5: seq 5: the last record was changed"]


@pytest.mark.asyncio
async def test_deleted_middle_record(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, [*five[:2], *five[3:]])
    result = verify(log_path)
    assert not result.ok
    assert result.records == 4
    assert "audit.log line 3: seq 4: expected seq 3 (removed or moved)" in result.problems


@pytest.mark.asyncio
async def test_deleted_first_record(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, five[1:])
    result = verify(log_path)
    assert result.problems == [
        "audit.log line 1: seq 2: the trail does not start at seq 1 (records removed)"
    ]


@pytest.mark.asyncio
async def test_two_records_swapped(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, [five[0], five[2], five[1], five[3], five[4]])
    result = verify(log_path)
    assert not result.ok
    assert "audit.log line 2: seq 3: expected seq 2 (removed or moved)" in result.problems
    assert (
        "audit.log line 4: seq 4: the record before it was changed, removed or moved"
        in result.problems
    )


@pytest.mark.asyncio
async def test_truncated_tail(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, five[:3])
    assert head_path(log_path).exists()
    result = verify(log_path)
    assert result.problems == [
        "audit.log line 3: the log ends at seq 3 but the head says 5: truncated"
    ]


@pytest.mark.asyncio
async def test_truncated_to_nothing(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, [])
    result = verify(log_path)
    assert result.problems == [
        "audit.log (empty): the log ends at seq 0 but the head says 5: truncated"
    ]


@pytest.mark.asyncio
async def test_missing_head_file(log_path: Path, five: list[bytes]) -> None:
    head_path(log_path).unlink()
    result = verify(log_path)
    assert result.problems == [
        "audit.log line 5: head file missing: truncation cannot be ruled out"
    ]


@pytest.mark.asyncio
async def test_non_json_line(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, [*five[:2], b"{oops", *five[2:]])
    result = verify(log_path)
    assert not result.ok
    assert result.records == 6
    assert "audit.log line 3: not an audit record (after seq 2)" in result.problems
    assert (
        "audit.log line 4: seq 3: the record before it was changed, removed or moved"
        in result.problems
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("line", [b"[1, 2]", b'"text"', b"{}", b'{"seq": "x", "prev": ""}'])
async def test_json_that_is_not_a_record(log_path: Path, five: list[bytes], line: bytes) -> None:
    rewrite(log_path, [*five[:2], line, *five[2:]])
    assert "audit.log line 3: not an audit record (after seq 2)" in verify(log_path).problems


@pytest.mark.asyncio
async def test_forged_record_appended(log_path: Path, five: list[bytes]) -> None:
    # An intruder who can recompute the hash still trips over the chain or the head.
    forged = json.dumps(
        {"ts": "x", "seq": 5, "prev": line_hash(five[3]), "node": "t", "event": "nothing"}
    ).encode()
    rewrite(log_path, [*five[:4], forged])
    assert verify(log_path).problems == ["audit.log line 5: seq 5: the last record was changed"]


# -- rotation --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rotation_keeps_the_chain(log_path: Path) -> None:
    await write_records(log_path, 30, rotate_bytes=1000)
    files = log_files(log_path)
    assert len(files) > 3
    assert files[-1] == log_path
    for f in files:
        assert f.stat().st_size <= 1000 + 200  # rotated once past the limit: one record over
    assert [r["seq"] for r in records(log_path)] == list(range(1, 31))
    assert [r["i"] for r in records(log_path)] == list(range(30))
    result = verify(log_path)
    assert (result.ok, result.records) == (True, 30)


@pytest.mark.asyncio
async def test_rotated_files_may_be_compressed(log_path: Path) -> None:
    await write_records(log_path, 30, rotate_bytes=1000)
    oldest, second = log_files(log_path)[:2]
    for f in (oldest, second):
        with gzip.open(f.with_name(f.name + ".gz"), "wb") as gz:
            gz.write(f.read_bytes())
        f.unlink()
    names = [f.name for f in log_files(log_path)]
    assert names[0].endswith(".gz") and names[1].endswith(".gz")
    assert [r["seq"] for r in records(log_path)] == list(range(1, 31))
    assert verify(log_path).ok
    # A log whose rotated files are compressed can still be continued.
    await write_records(log_path, 5, first=30, rotate_bytes=1000)
    assert [r["seq"] for r in records(log_path)] == list(range(1, 36))
    assert verify(log_path).ok


@pytest.mark.asyncio
async def test_rotation_and_reopen(log_path: Path) -> None:
    await write_records(log_path, 12, rotate_bytes=800)
    await write_records(log_path, 12, first=12, rotate_bytes=800)
    assert [r["i"] for r in records(log_path)] == list(range(24))
    assert verify(log_path).ok


@pytest.mark.asyncio
async def test_deleted_rotated_file_is_found(log_path: Path) -> None:
    await write_records(log_path, 30, rotate_bytes=1000)
    log_files(log_path)[1].unlink()
    result = verify(log_path)
    assert not result.ok
    assert any("removed or moved" in p for p in result.problems)


@pytest.mark.asyncio
async def test_deleted_oldest_rotated_file_is_found(log_path: Path) -> None:
    await write_records(log_path, 30, rotate_bytes=1000)
    log_files(log_path)[0].unlink()
    assert any("does not start at seq 1" in p for p in verify(log_path).problems)


# -- group commit ----------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fsync", "rotate_bytes"), [(False, 64 << 20), (True, 64 << 20), (True, 4000)]
)
async def test_group_commit(log_path: Path, fsync: bool, rotate_bytes: int) -> None:
    log = AuditLog(log_path, node="t", fsync=fsync, rotate_bytes=rotate_bytes)
    log.start()
    try:
        seqs = await asyncio.gather(*(log.record("burst", i=i) for i in range(300)))
    finally:
        await log.close()
    assert sorted(seqs) == list(range(1, 301))
    head = read_head(log_path)
    assert head is not None
    last = list(read_lines(log_path))[-1]
    assert (head.seq, head.hash) == (300, line_hash(last))
    result = verify(log_path)
    assert (result.ok, result.records) == (True, 300), result.problems


@pytest.mark.asyncio
async def test_record_after_start_waits_for_the_flusher(log_path: Path) -> None:
    log = AuditLog(log_path, node="t", fsync=False)
    log.start()
    try:
        seq = await log.record("one")
        head = read_head(log_path)
        assert head is not None and head.seq == seq == 1
        await log.commit(seq)  # already durable: returns at once
    finally:
        await log.close()


# -- failure and recovery ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_failed_write_fails_closed_and_leaves_no_gap(log_path: Path) -> None:
    log = AuditLog(log_path, node="t", fsync=False)
    await log.record("before")
    # Stand in for a full disk: the descriptor refuses writes.
    good_fd = log._fd
    log._fd = os.open(log_path, os.O_RDONLY)
    try:
        with pytest.raises(AuditError, match="cannot write audit log"):
            log.write("lost")
        assert log.failure is not None
        with pytest.raises(AuditError):
            await log.commit()
    finally:
        os.close(log._fd)
        log._fd = good_fd
    # The disk has room again: the next record continues the chain without a gap, after
    # one that says since when and why the log could not be written.
    await log.record("after")
    assert log.failure is None
    await log.close()
    recs = records(log_path)
    assert [r["event"] for r in recs] == ["before", "audit.resumed", "after"]
    assert "cannot write audit log" in recs[1]["failure"] and recs[1]["since"]
    result = verify(log_path)
    assert result.ok, result.problems


# -- short writes and a full disk ------------------------------------------------------------------


class TrickleLog(AuditLog):
    """An audit log whose file takes at most ``step`` bytes per write(2), then maybe none."""

    def __init__(self, path: Path, *, step: int, fail_after: int | None = None) -> None:
        super().__init__(path, node="t", fsync=False)
        self.step = step
        self.fail_after = fail_after  # write(2) calls before the disk is full
        self.calls = 0

    def _write_some(self, data: memoryview) -> int:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super()._write_some(data[: self.step])


def whole_records(path: Path) -> list[dict[str, Any]]:
    """Every line of the file, each a whole record; fails on a torn one."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"torn last record: {data[-80:]!r}"
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.asyncio
async def test_short_writes_are_completed(log_path: Path) -> None:
    log = TrickleLog(log_path, step=7)
    try:
        for i in range(3):
            await log.record("short.writes", i=i)
        assert log.calls > 30  # every record took many writes
    finally:
        await log.close()
    assert [r["i"] for r in whole_records(log_path)] == [0, 1, 2]
    assert verify(log_path).ok


@pytest.mark.asyncio
async def test_disk_full_mid_record_cuts_back_and_fails_closed(log_path: Path) -> None:
    await write_records(log_path, 2)
    size = log_path.stat().st_size
    log = TrickleLog(log_path, step=20, fail_after=3)  # 60 bytes of a longer line, then ENOSPC
    try:
        with pytest.raises(AuditError, match="No space left"):
            log.write("lost", filler="x" * 200)
        assert log.failure is not None and "No space left" in log.failure
        assert log_path.stat().st_size == size  # cut back to the last whole record
        with pytest.raises(AuditError):
            await log.commit()
        assert log.seq == 2
        log.fail_after = None  # room again
        await log.record("after")
    finally:
        await log.close()
    recs = whole_records(log_path)
    assert [(r["seq"], r["event"]) for r in recs[2:]] == [(3, "audit.resumed"), (4, "after")]
    assert verify(log_path).ok


@pytest.mark.asyncio
async def test_a_failed_cut_back_is_retried_before_the_next_record(log_path: Path) -> None:
    await write_records(log_path, 1)
    size = log_path.stat().st_size
    log = TrickleLog(log_path, step=10, fail_after=1)
    real_ftruncate = os.ftruncate
    try:
        os.ftruncate = _refuse  # type: ignore[assignment]
        try:
            with pytest.raises(AuditError, match="cannot cut it back"):
                log.write("lost", filler="y" * 100)
        finally:
            os.ftruncate = real_ftruncate
        assert log_path.stat().st_size == size + 10  # the torn part is still there...
        log.fail_after = None
        await log.record("after")  # ...and is cut before the next record
    finally:
        await log.close()
    assert [r["event"] for r in whole_records(log_path)] == ["test.event", "audit.resumed", "after"]
    assert verify(log_path).ok


def _refuse(fd: int, length: int) -> None:
    raise OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.mark.asyncio
async def test_asking_whether_the_log_works_tries_again(log_path: Path) -> None:
    log = TrickleLog(log_path, step=1000, fail_after=0)
    try:
        with pytest.raises(AuditError):
            log.write("lost")
        assert log.failure is not None  # asked again at once: no new try yet
        assert log.calls == 1
        log.fail_after = None
        log._next_retry = 0.0  # a second later
        assert log.failure is None  # the try wrote audit.resumed
        await log.commit()
    finally:
        await log.close()
    assert [r["event"] for r in whole_records(log_path)] == ["audit.resumed"]
    assert verify(log_path).ok


FULL_DISK = """
import asyncio, json, resource, sys
from pathlib import Path
from gatewayd.audit import AuditError, AuditLog

path = Path(sys.argv[1])
limit = path.stat().st_size + 1000  # room for a few records, then EFBIG mid-record
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ

async def main() -> None:
    log = AuditLog(path, node="t", fsync=True)
    written = 0
    try:
        for i in range(100):
            await log.record("fill", i=i, filler="z" * 90)
            written += 1
    except AuditError as exc:
        print(json.dumps({"written": written, "error": str(exc), "failure": log.failure}))
    await log.close()

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_a_really_full_file_keeps_only_whole_records(log_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel write part of a record and refuse the rest."""
    await write_records(log_path, 3)
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(log_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    outcome = json.loads(result.stdout)
    assert 0 < outcome["written"] < 100
    assert "File too large" in outcome["error"] and outcome["failure"] == outcome["error"]
    recs = whole_records(log_path)
    assert [r["seq"] for r in recs] == list(range(1, 4 + outcome["written"]))
    assert verify(log_path).ok, verify(log_path).problems


# -- one writer --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_second_writer_is_refused(log_path: Path) -> None:
    first = AuditLog(log_path, node="t", fsync=False)
    try:
        with pytest.raises(AuditError, match="in use by another process"):
            AuditLog(log_path, node="t", fsync=False)
        await first.record("still.mine")
    finally:
        await first.close()
    second = AuditLog(log_path, node="t", fsync=False)  # free once the first is closed
    await second.close()
    assert verify(log_path).ok


# -- a torn last record at start ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_torn_last_record_is_moved_aside_and_noted(log_path: Path) -> None:
    await write_records(log_path, 3)
    torn = b'{"ts":"2026-12-01T00:00:00.000000Z","seq":4,"prev":"ab'
    with log_path.open("ab") as f:
        f.write(torn)
    log = AuditLog(log_path, node="t", fsync=False)
    try:
        assert log.recovered is not None
        size, aside = log.recovered
        assert size == len(torn)
        assert aside.read_bytes() == torn
        assert aside.name.startswith("audit.log.torn-")
        log.write_startup_records()
        await log.record("next")
    finally:
        await log.close()
    recs = whole_records(log_path)
    assert [r["event"] for r in recs] == [*["test.event"] * 3, "audit.recovered", "next"]
    assert recs[3]["bytes"] == len(torn) and recs[3]["aside"] == str(aside)
    assert aside not in log_files(log_path)
    assert verify(log_path).ok, verify(log_path).problems


@pytest.mark.asyncio
async def test_a_log_that_is_all_torn(log_path: Path) -> None:
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(b"\x00" * 300)  # what a crash can leave: a size, no data
    log = AuditLog(log_path, node="t", fsync=False)
    try:
        assert log.recovered is not None and log.recovered[0] == 300
        log.write_startup_records()
    finally:
        await log.close()
    assert [r["event"] for r in whole_records(log_path)] == ["audit.recovered"]
    assert verify(log_path).ok


# -- re-anchoring and acknowledgement ------------------------------------------------------------


async def restart(path: Path, *events: str) -> None:
    log = AuditLog(path, node="t", fsync=False)
    try:
        log.write_startup_records()
        for event in events:
            await log.record(event)
    finally:
        await log.close()


async def acknowledge(path: Path, problem: Problem) -> None:
    log = AuditLog(path, node="t", fsync=False)
    try:
        await log.record(
            ACKNOWLEDGED,
            by="root",
            acknowledged_seq=problem.seq,
            acknowledged_hash=problem.hash,
            reason="disk replaced",
        )
    finally:
        await log.close()


@pytest.mark.asyncio
async def test_truncation_then_restart_is_a_failure_until_acknowledged(
    log_path: Path, five: list[bytes]
) -> None:
    rewrite(log_path, five[:3])
    await restart(log_path, "after.restart")
    recs = records(log_path)
    anchor = recs[3]
    assert anchor["event"] == DISCONTINUITY
    # The lost numbers are never reused, and the chain goes on from what is left.
    assert (anchor["seq"], anchor["found_seq"], anchor["head_seq"]) == (6, 3, 5)
    assert anchor["missing"] == [4, 5] and anchor["prev"] == line_hash(five[2])
    assert recs[4]["seq"] == 7
    result = verify(log_path)
    assert not result.ok
    assert len(result.open) == 1
    problem = result.open[0]
    assert (problem.where, problem.seq, problem.gap) == ("audit.log line 4", 6, True)
    assert str(problem).startswith("audit.log line 4: seq 6: the chain was re-anchored")
    await acknowledge(log_path, problem)
    result = verify(log_path)
    assert result.ok, result.problems
    assert [p.seq for p in result.acknowledged] == [6]
    # A second cut, not acknowledged, still fails; the first stays accepted.
    await restart(log_path, "one", "two")  # seq 9, 10
    rewrite(log_path, lines(log_path)[:-1])
    await restart(log_path)
    result = verify(log_path)
    assert [(p.seq, p.where) for p in result.open] == [(11, "audit.log line 8")]
    assert [p.seq for p in result.acknowledged] == [6]


@pytest.mark.asyncio
async def test_an_acknowledgement_names_exactly_one_record(
    log_path: Path, five: list[bytes]
) -> None:
    rewrite(log_path, five[:3])
    await restart(log_path)
    problem = verify(log_path).open[0]
    await acknowledge(log_path, Problem(problem.where, problem.seq, "", "0" * 64, gap=True))
    assert not verify(log_path).ok  # wrong hash: not this record


@pytest.mark.asyncio
async def test_an_edit_cannot_be_acknowledged(log_path: Path, five: list[bytes]) -> None:
    edited = [*five[:2], five[2].replace(b"alice@acme", b"mallory@acme"), *five[3:]]
    rewrite(log_path, edited)
    problem = verify(log_path).open[0]
    assert not problem.gap
    await acknowledge(log_path, problem)
    assert not verify(log_path).ok


@pytest.mark.asyncio
async def test_a_deleted_middle_record_is_a_gap_that_may_be_acknowledged(
    log_path: Path, five: list[bytes]
) -> None:
    rewrite(log_path, [*five[:2], *five[3:]])
    result = verify(log_path)
    assert {(p.seq, p.gap) for p in result.open} == {(4, True)}
    await acknowledge(log_path, result.open[0])
    assert verify(log_path).ok


@pytest.mark.asyncio
async def test_a_deleted_log_is_re_anchored_at_genesis(log_path: Path, five: list[bytes]) -> None:
    log_path.unlink()
    await restart(log_path)
    recs = records(log_path)
    assert (recs[0]["event"], recs[0]["seq"], recs[0]["prev"]) == (DISCONTINUITY, 6, GENESIS)
    result = verify(log_path)
    assert [p.seq for p in result.open] == [6]


# -- rejected connections: bounded, summarised, never dropped ----------------------------------


def rejected(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    recs = records(path)
    return (
        [r for r in recs if r["event"] == "connection.rejected"],
        [r for r in recs if r["event"] == "connection.rejected.summary"],
    )


@pytest.mark.asyncio
async def test_a_flood_of_rejections_is_summarised(log_path: Path) -> None:
    log = AuditLog(log_path, node="t", fsync=False)
    rej = RejectionLog(log, per_interval=10, interval=60.0)
    t0 = 1_700_000_000.0
    try:
        for i in range(3000):  # 3,000 junk connections in 4 s, from 10 ports of one host
            rej.reject(
                f"198.51.100.7:{40000 + i % 10}", "tls" if i % 3 else "timeout", "x", t0 + i / 750
            )
        rej.reject("[2001:db8::1]:5555", "protocol_error", "garbage", t0 + 4)
        assert rej.pending == 2990
        rej.flush_due(t0 + 59.9)
        assert rej.pending == 2990  # the interval is not over yet
        rej.flush_due(t0 + 60)
        assert rej.pending == 0
        # The next interval starts afresh with full records.
        rej.reject("198.51.100.7:1", "tls", "again", t0 + 61)
        rej.flush_all()
    finally:
        await log.close()
    single, summaries = rejected(log_path)
    assert len(single) == 12
    assert [r["source"] for r in single if r["source"].startswith("[")] == ["[2001:db8::1]:5555"]
    assert len(summaries) == 1
    summary = summaries[0]
    assert summary["source"] == "198.51.100.7"
    assert summary["count"] == 2990 and sum(summary["codes"].values()) == 2990
    assert summary["recorded"] == 10
    assert summary["first"] == now_rfc3339(t0 + 10 / 750)
    assert summary["last"] == now_rfc3339(t0 + 2999 / 750)
    assert len(single) - 2 + summary["count"] == 3000
    assert verify(log_path).ok


@pytest.mark.asyncio
async def test_shutdown_and_a_full_table_flush_every_count(log_path: Path) -> None:
    log = AuditLog(log_path, node="t", fsync=False)
    rej = RejectionLog(log, per_interval=1, interval=60.0, max_sources=3)
    try:
        for host in range(5):  # more sources than the table holds
            for n in range(4):
                rej.reject(f"192.0.2.{host}:{n}", "tls", "x", 100.0 + host)
        rej.flush_all()
    finally:
        await log.close()
    single, summaries = rejected(log_path)
    assert len(single) == 5
    assert sorted(r["source"] for r in summaries) == [f"192.0.2.{h}" for h in range(5)]
    assert sum(r["count"] for r in summaries) + len(single) == 20


def test_source_host() -> None:
    assert source_host("192.0.2.1:443") == "192.0.2.1"
    assert source_host("[2001:db8::1]:443") == "2001:db8::1"
    assert source_host("?") == "?"


@pytest.mark.asyncio
async def test_many_sources_together_are_bounded_too(log_path: Path) -> None:
    log = AuditLog(log_path, node="t", fsync=False)
    rej = RejectionLog(log, per_interval=10, interval=60.0, total_per_interval=50)
    try:
        for i in range(1000):  # a botnet: 1,000 addresses, one connection each
            rej.reject(f"10.0.{i // 250}.{i % 250}:1", "tls", "x", 1000.0 + i / 100)
        rej.flush_all()
    finally:
        await log.close()
    single, summaries = rejected(log_path)
    assert len(single) == 50
    assert len(single) + sum(r["count"] for r in summaries) == 1000


@pytest.mark.asyncio
async def test_an_ipv6_64_is_one_source(log_path: Path) -> None:
    log = AuditLog(log_path, node="t", fsync=False)
    rej = RejectionLog(log, per_interval=2, interval=60.0)
    try:
        for i in range(20):
            rej.reject(f"[2001:db8:1:2::{i:x}]:443", "tls", "x", 5.0)
        rej.flush_all()
    finally:
        await log.close()
    single, summaries = rejected(log_path)
    assert len(single) == 2
    assert [(r["source"], r["count"]) for r in summaries] == [("2001:db8:1:2::/64", 18)]


def test_source_key() -> None:
    assert source_key("192.0.2.1:443") == "192.0.2.1"
    assert source_key("[2001:db8::1]:443") == "2001:db8::/64"
    assert source_key("[::ffff:192.0.2.9]:443") == "192.0.2.9"
    assert source_key("?") == "?"


@pytest.mark.asyncio
async def test_other_refusals_share_the_bounds(log_path: Path) -> None:
    log = AuditLog(log_path, node="t", fsync=False)
    rej = RejectionLog(log, per_interval=3, interval=60.0)
    try:
        for i in range(5):
            rej.refuse("auth.rate_limited", "192.0.2.1:1", "rate_limited", 1.0, user=f"u{i}")
        rej.reject("192.0.2.1:2", "tls", "handshake failed", 2.0)
        rej.flush_all()
    finally:
        await log.close()
    recs = records(log_path)
    assert [r["event"] for r in recs] == ["auth.rate_limited"] * 3 + ["connection.rejected.summary"]
    assert recs[0]["source"] == "192.0.2.1:1" and recs[0]["user"] == "u0"
    assert recs[-1]["codes"] == {"rate_limited": 2, "tls": 1}


@pytest.mark.asyncio
async def test_a_failed_rotation_keeps_writing_to_the_same_file(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(log_path, node="t", fsync=False, rotate_bytes=300)
    try:
        await log.record("one", filler="a" * 200)

        def refuse(*_: Any) -> None:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(os, "rename", refuse)
        with pytest.raises(AuditError, match="Permission denied"):
            log.write("two", filler="b" * 200)
        monkeypatch.undo()
        await log.record("three", filler="c" * 200)  # rotates now
    finally:
        await log.close()
    assert [r["event"] for r in records(log_path)] == ["one", "audit.resumed", "three"]
    assert verify(log_path).ok, verify(log_path).problems
