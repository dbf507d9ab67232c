"""Rotation by size and by day, compression, retention, and reading a trail with bad parts."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gatewayd.audit import (
    CHECKPOINT,
    RETENTION,
    AuditLog,
    log_files,
    numbered_lines,
    read_lines,
    rotated_stamp,
    verify,
)

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


def open_log(path: Path, **kw: Any) -> AuditLog:
    kw.setdefault("checkpoint_every", 10)
    log = AuditLog(path, node="gw1", fsync=False, signer=KEY, **kw)
    log.write_startup_records()
    return log


async def fill(path: Path, n: int, *, first: int = 0, **kw: Any) -> None:
    log = open_log(path, **kw)
    try:
        for i in range(first, first + n):
            await log.record("test.event", i=i, text="x" * 100)
    finally:
        await log.close()


def recs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_lines(path)]


def numbers(path: Path) -> list[int]:
    return [r["i"] for r in recs(path) if "i" in r]


@pytest.mark.asyncio
async def test_each_new_file_starts_with_a_signed_checkpoint(log_path: Path) -> None:
    await fill(log_path, 40, rotate_bytes=1500)
    files = log_files(log_path)
    assert len(files) > 3
    for f in files[1:]:
        first = json.loads(f.read_bytes().splitlines()[0])
        assert (first["event"], first["reason"]) == (CHECKPOINT, "rotation")
    assert numbers(log_path) == list(range(40))
    assert [r["seq"] for r in recs(log_path)] == list(range(1, len(recs(log_path)) + 1))
    result = verify(log_path, PUB)
    assert result.ok, result.problems


@pytest.mark.asyncio
async def test_rotation_by_day(log_path: Path) -> None:
    log = open_log(log_path, rotate_daily=True)
    try:
        await log.record("test.event", i=0)
        await log.record("test.event", i=1)
        assert len(log_files(log_path)) == 1
        log._file_day = "2026-01-01"  # the live file began on another day
        await log.record("test.event", i=2)
    finally:
        await log.close()
    files = log_files(log_path)
    assert len(files) == 2
    assert b'"i":2' in files[1].read_bytes() and b'"i":1' in files[0].read_bytes()
    assert verify(log_path, PUB).ok


@pytest.mark.asyncio
async def test_rotated_files_are_gzipped_and_verify_across_restarts(log_path: Path) -> None:
    await fill(log_path, 30, rotate_bytes=1500, compress=True)
    await fill(log_path, 30, first=30, rotate_bytes=1500, compress=True)
    files = log_files(log_path)
    assert all(f.name.endswith(".gz") for f in files[:-1]) and len(files) > 4
    assert files[-1] == log_path
    assert numbers(log_path) == list(range(60))
    result = verify(log_path, PUB)
    assert result.ok, result.problems


def rotated_at(path: Path, f: Path) -> float:
    stamp = rotated_stamp(f, path)
    assert stamp is not None
    return dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.UTC).timestamp()


@pytest.mark.asyncio
async def test_retention_deletes_old_files_and_what_remains_verifies(log_path: Path) -> None:
    await fill(log_path, 60, rotate_bytes=1500, compress=True)
    files = log_files(log_path)[:-1]
    assert len(files) >= 4
    # Two years after the third file was rotated, and before the fourth was.
    then = (rotated_at(log_path, files[2]) + rotated_at(log_path, files[3])) / 2 + 730 * 86400
    log = open_log(log_path, rotate_bytes=1500, compress=True, retention_days=730)
    try:
        log._write_retention(then)
        for i in range(60, 65):
            await log.record("test.event", i=i, text="x" * 100)
    finally:
        await log.close()
    assert not any(f.exists() for f in files[:3])
    assert set(files[3:]) <= set(log_files(log_path))
    deleted = [r for r in recs(log_path) if r["event"] == RETENTION]
    assert len(deleted) == 1 and deleted[0]["files"] == [f.name for f in files[:3]]
    assert deleted[0]["retention_days"] == 730
    assert numbers(log_path)[-5:] == list(range(60, 65))
    result = verify(log_path, PUB)
    assert result.ok, result.problems
    assert result.first_seq > 1
    # Without the key, a trail that does not begin at seq 1 cannot be told from a cut one.
    assert not verify(log_path).ok
    # The oldest file left, deleted by hand: the next one also starts at a checkpoint,
    # but no retention record deleted the file before it.
    oldest = log_files(log_path)[0]
    oldest.unlink()
    problems = verify(log_path, PUB).problems
    assert len(problems) == 1
    assert "which no audit.retention record deleted" in problems[0]
    assert f"begins after {oldest.name.removesuffix('.gz')}" in problems[0]
    # Deleting a file in the middle instead is found.
    log_files(log_path)[1].unlink()
    assert not verify(log_path, PUB).ok


@pytest.mark.asyncio
async def test_deleting_the_oldest_file_by_hand_is_found_without_a_checkpoint_start(
    log_path: Path,
) -> None:
    """A trail written without a key has no checkpoint to begin from."""
    log = AuditLog(log_path, node="gw1", fsync=False, rotate_bytes=1500)
    for i in range(40):
        await log.record("test.event", i=i, text="x" * 100)
    await log.close()
    log_files(log_path)[0].unlink()
    assert any("does not start at seq 1" in p for p in verify(log_path).problems)


def test_rotation_under_load_loses_and_duplicates_nothing(log_path: Path) -> None:
    """A writer thread rotating (and compressing) every few records; a follower reading
    along through the renames sees each record exactly once, in order."""
    from cli.audit import follow

    n = 3000
    log = open_log(log_path, rotate_bytes=4000, compress=True, checkpoint_every=50)
    done = threading.Event()
    error: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(n):
                log.write("test.event", i=i, text="y" * 60)
            log.write("test.last")
        except BaseException as exc:
            error.append(exc)
        finally:
            done.set()

    seen: list[int] = []
    seqs: list[int] = []
    thread = threading.Thread(target=writer)
    thread.start()
    for rec in follow(log_path, poll=0.005, start_at_end=False):
        seqs.append(rec["seq"])
        if rec["event"] == "test.last":
            break
        if "i" in rec:
            seen.append(rec["i"])
    thread.join()

    asyncio.run(log.close())
    assert not error
    assert seen == list(range(n))
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(log_files(log_path)) > 20
    assert verify(log_path, PUB).ok


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_gzip_cut_short_and_an_unreadable_file_are_reported_and_the_rest_read(
    log_path: Path,
) -> None:
    await fill(log_path, 60, rotate_bytes=1500, compress=True)
    files = log_files(log_path)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    files[2].unlink()
    files[2].mkdir()  # cannot be read as a file
    errors: list[Any] = []
    read = list(numbered_lines(log_path, errors))
    assert [str(e).split(":")[0] for e in errors] == [
        f"{files[1].name} line {sum(1 for f, _, _ in read if f == files[1]) + 1}",
        f"{files[2].name} line 1",
    ]
    assert "cut short" in str(errors[0])
    assert any(f == files[3] for f, _, _ in read)  # the files after them are still read
    assert read[-1][0] == log_path
    result = verify(log_path, PUB)
    assert not result.ok
    assert any("cannot read" in p and files[1].name in p for p in result.problems)


@pytest.mark.asyncio
async def test_a_corrupt_line_is_reported_by_verify_and_the_rest_read(log_path: Path) -> None:
    await fill(log_path, 10)
    raw = log_path.read_bytes().splitlines()
    raw[3] = b"\x00\xffnot json"
    log_path.write_bytes(b"\n".join(raw) + b"\n")
    result = verify(log_path, PUB)
    assert any(p.startswith("audit.jsonl line 4: not an audit record") for p in result.problems)
    assert result.records == len(raw)


def test_a_gz_and_plain_twin_are_read_once(log_path: Path) -> None:
    """While a rotated file is being compressed both names exist for a moment."""
    log_path.parent.mkdir(parents=True)
    plain = log_path.with_name(log_path.name + ".20261201T000000000000Z")
    plain.write_bytes(b'{"seq":1}\n')
    with gzip.open(plain.with_name(plain.name + ".gz"), "wb") as gz:
        gz.write(b'{"seq":1}\n')
    assert log_files(log_path) == [plain]
