"""The audit trail: JSON lines, hash-chained, durable before it matters.

Records are produced through a structlog logger whose processor chain stamps the
time (UTC, RFC 3339), the node, a sequence number and the SHA-256 of the previous
line, and renders one JSON object per line (``docs/audit.md`` lists every field).

Integrity: each line's ``prev`` is the hex SHA-256 of the previous line's bytes
(without the newline), and ``seq`` counts up by one, so any edit, deletion or
reordering breaks the chain. A *head file* beside the log holds the sequence
number and hash of the last line known durable; a log cut short no longer reaches
it, so truncation is found too (:func:`verify`).

Durability: :meth:`AuditLog.write` appends at once; :meth:`AuditLog.commit` waits
until that line has been fsync'ed. One fsync covers every line written before it
started (group commit), so many concurrent sessions share the cost. When the log
cannot be written, :attr:`AuditLog.failure` says why and the gateway refuses new
sessions until it can (fail closed). Each look at ``failure`` (at most once a second)
and each new record first tries to write ``audit.resumed``, which says since when and
why the log could not be written; once that succeeds the gateway serves again.

A record is acknowledged only once all of its bytes are written: a short write is
retried, and a write that fails part-way (a full disk) cuts the file back to the
last whole record before the writer fails closed.

Start-up: one process at a time holds the log (an exclusive ``flock`` on the head
file). Bytes after the last newline (a crash or a full disk mid-record) are moved
aside to ``<name>.torn-<UTC stamp>`` and noted by an ``audit.recovered`` record. A
log that no longer reaches its head (records removed) is re-anchored: an
``audit.discontinuity`` record continues the chain from what is left and skips the
sequence numbers of the lost records, and :func:`verify` reports it until an
operator acknowledges it (``audit.acknowledged``, written by the daemon for
``gw audit acknowledge``).

Rotation: when the file passes ``rotate_bytes``, it is renamed to
``<name>.<UTC stamp>`` and a new file continues the same chain; readers take the
rotated files (plain or ``.gz``) in order, then the live one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import fcntl
import gzip
import hashlib
import json
import os
import time
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from relay.errors import GatewayError

GENESIS = "0" * 64
#: The head file is one fixed-size record, rewritten in place.
HEAD_SIZE = 128
#: Rotate the live file past this size: small enough to copy and grep comfortably.
ROTATE_BYTES = 64 * 1024 * 1024
#: Marks the file that keeps a torn last record found at start; never read as the trail.
TORN_MARK = ".torn-"
#: Longest torn tail kept aside: a record is a few KiB; more than this is not a torn record.
MAX_TORN_BYTES = 1024 * 1024

DISCONTINUITY = "audit.discontinuity"
ACKNOWLEDGED = "audit.acknowledged"
#: Seconds between tries to write again after a failure, when asked whether it is over.
RETRY_EVERY = 1.0


class AuditError(GatewayError):
    """The audit log cannot be written or does not verify."""


def now_rfc3339(ts: float | None = None) -> str:
    when = dt.datetime.now(dt.UTC) if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def log_files(path: Path) -> list[Path]:
    """Rotated files (oldest first) then the live file, for reading the whole trail."""
    rotated = sorted(
        p
        for p in path.parent.glob(path.name + ".*")
        if not p.name.endswith((".head", ".tmp")) and TORN_MARK not in p.name
    )
    return [*rotated, path] if path.exists() else rotated


def read_lines(path: Path) -> Iterator[bytes]:
    """Every line of the trail, rotated and compressed files included, in order."""
    for _, _, line in numbered_lines(path):
        yield line


def numbered_lines(path: Path) -> Iterator[tuple[Path, int, bytes]]:
    """(file, line number from 1, line) for every line of the trail, in order."""
    for p in log_files(path):
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rb") as f:
            for number, raw in enumerate(f, 1):
                yield p, number, raw.rstrip(b"\n")


@dataclass
class Head:
    seq: int
    hash: str


def read_head(path: Path) -> Head | None:
    try:
        data = json.loads(head_path(path).read_text())
        return Head(int(data["seq"]), str(data["hash"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tail(path: Path) -> tuple[int, str]:
    """seq and hash of the last line of the trail (0, GENESIS when empty)."""
    last = None
    for p in reversed(log_files(path)):
        if p.suffix == ".gz":
            with gzip.open(p, "rb") as f:
                lines = f.read().splitlines()
        else:
            lines = p.read_bytes().splitlines()
        if lines:
            last = lines[-1]
            break
    if last is None:
        return 0, GENESIS
    try:
        seq = int(json.loads(last)["seq"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditError(f"last line of {path} is not an audit record") from exc
    return seq, line_hash(last)


def _stamp_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")


def recover_torn_tail(path: Path) -> tuple[int, Path] | None:
    """Move bytes after the live file's last newline aside; (byte count, aside file) or None.

    A record is one line; bytes without their newline are a record cut short (a crash,
    a full disk). They are kept, not deleted, in ``<name>.torn-<UTC stamp>``.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        end = size
        cut = None
        while end > 0 and cut is None and size - end < MAX_TORN_BYTES + 4096:
            start = max(0, end - 4096)
            chunk = os.pread(fd, end - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                cut = start + newline + 1
            end = start
        if cut is None:
            if end > 0:
                raise AuditError(
                    f"{path} ends in more than {MAX_TORN_BYTES} bytes without a newline: "
                    "not a torn record; look at the file before starting"
                )
            cut = 0
        if cut == size:
            return None
        torn = os.pread(fd, size - cut, cut)
        aside = path.with_name(f"{path.name}{TORN_MARK}{_stamp_now()}")
        with aside.open("xb") as f:
            f.write(torn)
            f.flush()
            os.fsync(f.fileno())
        os.ftruncate(fd, cut)
        os.fsync(fd)
        return len(torn), aside
    except OSError as exc:
        raise AuditError(f"cannot recover the torn end of {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Gap:
    """At start, the log does not reach what its head file says was durable."""

    found_seq: int
    found_hash: str
    head_seq: int
    head_hash: str

    @property
    def message(self) -> str:
        return (
            f"log ends at seq {self.found_seq} but its head file says {self.head_seq}: "
            "records were removed or changed"
        )


class _Sink:
    """structlog's "logger": receives the rendered line."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    def msg(self, line: str) -> None:
        self._log._append(line.encode())


class AuditLog:
    """Append-only, hash-chained audit log with group-commit fsync."""

    def __init__(
        self, path: Path, *, node: str, fsync: bool = True, rotate_bytes: int = ROTATE_BYTES
    ) -> None:
        self.path = path
        self.node = node
        self.do_fsync = fsync
        self.rotate_bytes = rotate_bytes
        self._failure: str | None = None
        self._failed_at = 0.0
        self._next_retry = 0.0
        path.parent.mkdir(parents=True, exist_ok=True)
        # One writer per log: the head file is locked for the life of this object, before
        # anything is read or changed.
        self._head_fd = os.open(head_path(path), os.O_WRONLY | os.O_CREAT, 0o640)
        try:
            fcntl.flock(self._head_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._head_fd)
            raise AuditError(
                f"the audit log {path} is in use by another process "
                "(another gatewayd with this config?)"
            ) from exc
        try:
            self.recovered = recover_torn_tail(path)
            self.seq, self.prev = _tail(path)
        except AuditError:
            os.close(self._head_fd)
            raise
        self.gap: Gap | None = None
        head = read_head(path)
        if head is not None and (
            head.seq > self.seq or (head.seq == self.seq and head.hash != self.prev)
        ):
            self.gap = Gap(self.seq, self.prev, head.seq, head.hash)
        self.discontinuity = self.gap.message if self.gap else None
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size
        #: Where the file must be cut back to before the next write (a write failed part-way).
        self._cut_to: int | None = None
        # fsync gets a thread of its own, so it never queues behind password hashing.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-fsync")
        self._durable = self.seq
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._logger = structlog.wrap_logger(
            _Sink(self),
            wrapper_class=structlog.BoundLogger,
            cache_logger_on_first_use=False,
            processors=[
                self._stamp,
                structlog.processors.JSONRenderer(separators=(",", ":"), sort_keys=False),
            ],
        )

    # -- writing ------------------------------------------------------------------------

    def _stamp(self, _: Any, __: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
        event = event_dict.pop("event")
        self.seq += 1
        return {
            "ts": now_rfc3339(),
            "seq": self.seq,
            "prev": self.prev,
            "node": self.node,
            "event": event,
            **event_dict,
        }

    def _write_some(self, data: memoryview) -> int:
        """One write(2) of the live file; may write less than asked (a full disk)."""
        return os.write(self._fd, data)

    def _append(self, line: bytes) -> None:
        data = memoryview(line + b"\n")
        try:
            if self._cut_to is not None:
                os.ftruncate(self._fd, self._cut_to)
                self._size, self._cut_to = self._cut_to, None
            if self._size + len(line) > self.rotate_bytes and self._size > 0:
                try:
                    self._rotate()
                except AuditError:
                    self.seq -= 1
                    raise
            start = self._size
            written = 0
            while written < len(data):
                self._cut_to = start  # until the whole line is down
                n = self._write_some(data[written:])
                if n <= 0:
                    raise OSError(errno.ENOSPC, "no byte written")
                written += n
            self._cut_to = None
            self._size = start + written
        except OSError as exc:
            self.seq -= 1  # _stamp took this number for a line that was not written
            failure = f"cannot write audit log {self.path}: {exc.strerror or exc}"
            if self._cut_to is not None:
                # Part of the line may be down: cut back to the last whole record now,
                # or before the next write if even that fails.
                try:
                    os.ftruncate(self._fd, self._cut_to)
                    self._size, self._cut_to = self._cut_to, None
                except OSError as cut:
                    failure += f"; cannot cut it back: {cut.strerror or cut}"
            raise AuditError(self._fail(failure)) from exc
        self.prev = line_hash(line)

    def write_startup_records(self) -> None:
        """The records that say what start-up found: a re-anchor, torn bytes moved aside.

        Call once, before any other record.
        """
        if self.gap is not None:
            gap = self.gap
            # Never reuse the sequence numbers of lost records: continue past the head.
            self.seq = max(self.seq, gap.head_seq)
            missing = [gap.found_seq + 1, gap.head_seq] if gap.head_seq > gap.found_seq else None
            self.write(
                DISCONTINUITY,
                message=gap.message,
                found_seq=gap.found_seq,
                head_seq=gap.head_seq,
                head_hash=gap.head_hash,
                missing=missing,
            )
            self.gap = None
        if self.recovered is not None:
            size, aside = self.recovered
            self.write(
                "audit.recovered",
                bytes=size,
                aside=str(aside),
                message=f"{size} bytes of a record cut short were moved to {aside.name}",
            )
            self.recovered = None

    def _rotate(self) -> None:
        self._sync()
        stamp = _stamp_now()
        os.close(self._fd)
        try:
            os.rename(self.path, self.path.with_name(f"{self.path.name}.{stamp}"))
        finally:
            # A new file, or the same one again if the rename failed: never a closed fd.
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._size = os.fstat(self._fd).st_size

    @property
    def failure(self) -> str | None:
        """Why the log cannot be written, or None. Tries again at most once a second."""
        if self._failure is not None and time.monotonic() >= self._next_retry:
            with contextlib.suppress(AuditError):
                self._resume()
        return self._failure

    def _fail(self, failure: str) -> str:
        if self._failure is None:
            self._failed_at = time.time()
        self._failure = failure
        self._next_retry = time.monotonic() + RETRY_EVERY
        return failure

    def _resume(self) -> None:
        """Try to write again: the first record after a failure says since when and why."""
        failure, since = self._failure, self._failed_at
        if failure is None:
            return
        self._failure = None
        try:
            self._logger.msg("audit.resumed", failure=failure, since=now_rfc3339(since))
        except AuditError:
            self._failed_at = since
            raise
        if self._flusher is not None:
            self._wake.set()

    def write(self, event: str, **fields: Any) -> int:
        """Append a record now; returns its sequence number. Raises AuditError if it cannot."""
        self._resume()  # the disk may have room now
        self._logger.msg(event, **fields)
        if self._flusher is not None:
            self._wake.set()
        return self.seq

    async def commit(self, seq: int | None = None) -> None:
        """Wait until record ``seq`` (default: the last written) is on disk."""
        seq = self.seq if seq is None else seq
        if self._failure is not None:
            raise AuditError(self._failure)
        if seq <= self._durable:
            return
        if self._flusher is None:
            self._sync()
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, fut))
        self._wake.set()
        await fut

    async def record(self, event: str, **fields: Any) -> int:
        """Write a record and wait until it is durable."""
        seq = self.write(event, **fields)
        await self.commit(seq)
        return seq

    def _sync(self) -> None:
        self._sync_to(self.seq, self.prev)

    def _sync_to(self, seq: int, hash_: str) -> None:
        """fsync, then record (seq, hash) of a line written before the fsync in the head."""
        try:
            if self.do_fsync:
                os.fsync(self._fd)
            # Overwrite in place, padded to a fixed size: one small pwrite is far cheaper
            # than write-and-rename on every commit, and a write of one block is not torn.
            record = json.dumps({"seq": seq, "hash": hash_}).encode().ljust(HEAD_SIZE - 1)
            os.pwrite(self._head_fd, record + b"\n", 0)
        except OSError as exc:
            raise AuditError(
                self._fail(f"cannot sync audit log {self.path}: {exc.strerror or exc}")
            ) from exc
        self._durable = max(self._durable, seq)

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._durable >= self.seq and not self._waiters:
                continue
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._sync_to, self.seq, self.prev
                )
            except AuditError as exc:
                for _, fut in self._waiters:
                    if not fut.done():
                        fut.set_exception(exc)
                self._waiters.clear()
                continue
            still = []
            for seq, fut in self._waiters:
                if seq <= self._durable:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    still.append((seq, fut))
            self._waiters = still
            if still:
                self._wake.set()

    def start(self) -> None:
        """Start group commit (needs a running loop)."""
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        with contextlib.suppress(AuditError):
            self._sync()
        self._executor.shutdown(wait=True)
        os.close(self._fd)
        os.close(self._head_fd)


# -- reading and verifying ---------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One place where the trail is not what was written, and whether it may be acknowledged."""

    where: str
    """``FILE line N``."""
    seq: int | None
    text: str
    hash: str = ""
    """SHA-256 of the line at fault (what an acknowledgement names)."""
    gap: bool = False
    """Records are missing before this one, or it re-anchors the chain: an operator may
    acknowledge it (``gw audit acknowledge``). Edits never can be."""

    def __str__(self) -> str:
        at = f"seq {self.seq}: " if self.seq is not None else ""
        return f"{self.where}: {at}{self.text}"


@dataclass
class VerifyResult:
    ok: bool
    records: int
    problems: list[str]
    """Every problem not acknowledged, as ``FILE line N: seq S: what``."""
    open: list[Problem] = field(default_factory=list)
    acknowledged: list[Problem] = field(default_factory=list)


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
        if isinstance(rec, dict):
            int(rec["seq"])
            str(rec["prev"])
            return rec
    except (ValueError, KeyError, TypeError):
        pass
    return None


def verify(path: Path) -> VerifyResult:
    """Check the chain over the whole trail and against the head file.

    A gap in the sequence numbers and a re-anchor (``audit.discontinuity``) are
    problems until an ``audit.acknowledged`` record later in the chain names that
    record by sequence number and hash.
    """
    found: list[Problem] = []
    acks: set[tuple[int, str]] = set()
    prev_hash: str | None = None
    last_seq = 0
    count = 0
    where = f"{path.name} (empty)"
    for file, number, line in numbered_lines(path):
        count += 1
        where = f"{file.name} line {number}"
        digest = line_hash(line)
        rec = _record(line)
        if rec is None:
            found.append(Problem(where, None, f"not an audit record (after seq {last_seq})"))
            prev_hash = digest
            continue
        seq, prev = int(rec["seq"]), str(rec["prev"])
        event = rec.get("event")
        if event == ACKNOWLEDGED:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                acks.add((int(rec["acknowledged_seq"]), str(rec["acknowledged_hash"])))
        reanchor = event == DISCONTINUITY and seq > last_seq
        if reanchor:
            found.append(
                Problem(
                    where,
                    seq,
                    f"the chain was re-anchored at start: {rec.get('message', 'records lost')}",
                    digest,
                    gap=True,
                )
            )
        if prev_hash is None:
            if (seq != 1 or prev != GENESIS) and not (reanchor and prev == GENESIS):
                found.append(
                    Problem(
                        where,
                        seq,
                        "the trail does not start at seq 1 (records removed)",
                        digest,
                        gap=seq > 1 and prev != GENESIS,
                    )
                )
        else:
            if seq != last_seq + 1 and not reanchor:
                found.append(
                    Problem(
                        where,
                        seq,
                        f"expected seq {last_seq + 1} (removed or moved)",
                        digest,
                        gap=seq > last_seq + 1,
                    )
                )
            if prev != prev_hash:
                found.append(
                    Problem(
                        where,
                        seq,
                        "the record before it was changed, removed or moved",
                        digest,
                        # Part of a gap of missing records; an edit alone is never acknowledged.
                        gap=seq > last_seq + 1 and not reanchor,
                    )
                )
        prev_hash = digest
        last_seq = seq
    head = read_head(path)
    if head is None:
        if count:
            found.append(Problem(where, None, "head file missing: truncation cannot be ruled out"))
    elif head.seq > last_seq:
        found.append(
            Problem(
                where,
                None,
                f"the log ends at seq {last_seq} but the head says {head.seq}: truncated",
            )
        )
    elif head.seq == last_seq and head.hash != (prev_hash or GENESIS):
        found.append(Problem(where, last_seq, "the last record was changed"))
    still: list[Problem] = []
    done: list[Problem] = []
    for p in found:
        (done if p.gap and (p.seq, p.hash) in acks else still).append(p)
    return VerifyResult(not still, count, [str(p) for p in still], still, done)
