"""The hash-chained audit log (gatewayd/audit.py): writing, rotation, group commit, verify.

Every test writes into its own tmp dir with fsync off (except where fsync is the point)
and then edits the files the way an intruder or a full disk would.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gatewayd.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    head_path,
    line_hash,
    log_files,
    now_rfc3339,
    read_head,
    read_lines,
    verify,
)


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
    assert result.problems == ["seq 4: the record before it was changed, removed or moved"]


@pytest.mark.asyncio
async def test_edited_last_record(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, [*five[:4], five[4].replace(b"alice@acme", b"mallory@acme")])
    result = verify(log_path)
    assert result.problems == ["seq 5: the last record was changed"]


@pytest.mark.asyncio
async def test_deleted_middle_record(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, [*five[:2], *five[3:]])
    result = verify(log_path)
    assert not result.ok
    assert result.records == 4
    assert "seq 4: expected seq 3 (removed or moved)" in result.problems


@pytest.mark.asyncio
async def test_deleted_first_record(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, five[1:])
    result = verify(log_path)
    assert result.problems == ["seq 2: the trail does not start at seq 1 (records removed)"]


@pytest.mark.asyncio
async def test_two_records_swapped(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, [five[0], five[2], five[1], five[3], five[4]])
    result = verify(log_path)
    assert not result.ok
    assert "seq 3: expected seq 2 (removed or moved)" in result.problems
    assert "seq 4: the record before it was changed, removed or moved" in result.problems


@pytest.mark.asyncio
async def test_truncated_tail(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, five[:3])
    assert head_path(log_path).exists()
    result = verify(log_path)
    assert result.problems == ["the log ends at seq 3 but the head says 5: truncated"]


@pytest.mark.asyncio
async def test_truncated_to_nothing(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, [])
    result = verify(log_path)
    assert result.problems == ["the log ends at seq 0 but the head says 5: truncated"]


@pytest.mark.asyncio
async def test_missing_head_file(log_path: Path, five: list[bytes]) -> None:
    head_path(log_path).unlink()
    result = verify(log_path)
    assert result.problems == ["head file missing: truncation cannot be ruled out"]


@pytest.mark.asyncio
async def test_non_json_line(log_path: Path, five: list[bytes]) -> None:
    rewrite(log_path, [*five[:2], b"{oops", *five[2:]])
    result = verify(log_path)
    assert not result.ok
    assert result.records == 6
    assert "line after seq 2: not an audit record" in result.problems
    assert "seq 3: the record before it was changed, removed or moved" in result.problems


@pytest.mark.asyncio
@pytest.mark.parametrize("line", [b"[1, 2]", b'"text"', b"{}", b'{"seq": "x", "prev": ""}'])
async def test_json_that_is_not_a_record(log_path: Path, five: list[bytes], line: bytes) -> None:
    rewrite(log_path, [*five[:2], line, *five[2:]])
    assert "line after seq 2: not an audit record" in verify(log_path).problems


@pytest.mark.asyncio
async def test_forged_record_appended(log_path: Path, five: list[bytes]) -> None:
    # An intruder who can recompute the hash still trips over the chain or the head.
    forged = json.dumps(
        {"ts": "x", "seq": 5, "prev": line_hash(five[3]), "node": "t", "event": "nothing"}
    ).encode()
    rewrite(log_path, [*five[:4], forged])
    assert verify(log_path).problems == ["seq 5: the last record was changed"]


# -- rotation --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rotation_keeps_the_chain(log_path: Path) -> None:
    await write_records(log_path, 30, rotate_bytes=1000)
    files = log_files(log_path)
    assert len(files) > 3
    assert files[-1] == log_path
    for f in files:
        assert f.stat().st_size <= 1000 + 1  # the limit is checked without the newline
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
    # The disk has room again: the next record continues the chain without a gap.
    await log.record("after")
    assert log.failure is None
    await log.close()
    assert [r["event"] for r in records(log_path)] == ["before", "after"]
    result = verify(log_path)
    assert result.ok, result.problems
