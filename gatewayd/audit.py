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
sessions until it can (fail closed).

Rotation: when the file passes ``rotate_bytes``, it is renamed to
``<name>.<UTC stamp>`` and a new file continues the same chain; readers take the
rotated files (plain or ``.gz``) in order, then the live one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gzip
import hashlib
import json
import os
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from relay.errors import GatewayError

GENESIS = "0" * 64
#: The head file is one fixed-size record, rewritten in place.
HEAD_SIZE = 128
#: Rotate the live file past this size: small enough to copy and grep comfortably.
ROTATE_BYTES = 64 * 1024 * 1024


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
        p for p in path.parent.glob(path.name + ".*") if not p.name.endswith((".head", ".tmp"))
    )
    return [*rotated, path] if path.exists() else rotated


def read_lines(path: Path) -> Iterator[bytes]:
    """Every line of the trail, rotated and compressed files included, in order."""
    for p in log_files(path):
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rb") as f:
            for raw in f:
                yield raw.rstrip(b"\n")


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
        self.failure: str | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self.seq, self.prev = _tail(path)
        self.discontinuity: str | None = None
        head = read_head(path)
        if head is not None and (
            head.seq > self.seq or (head.seq == self.seq and head.hash != self.prev)
        ):
            self.discontinuity = (
                f"log ends at seq {self.seq} but its head file says {head.seq}: "
                "records were removed or changed"
            )
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._head_fd = os.open(head_path(path), os.O_WRONLY | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size
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

    def _append(self, line: bytes) -> None:
        try:
            if self._size + len(line) > self.rotate_bytes and self._size > 0:
                self._rotate()
            os.write(self._fd, line + b"\n")
            self._size += len(line) + 1
        except OSError as exc:
            self.seq -= 1  # _stamp took this number for a line that was not written
            self.failure = f"cannot write audit log {self.path}: {exc.strerror or exc}"
            raise AuditError(self.failure) from exc
        self.prev = line_hash(line)

    def _rotate(self) -> None:
        self._sync()
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        os.close(self._fd)
        os.rename(self.path, self.path.with_name(f"{self.path.name}.{stamp}"))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = 0

    def write(self, event: str, **fields: Any) -> int:
        """Append a record now; returns its sequence number. Raises AuditError if it cannot."""
        if self.failure is not None:
            # Try again: the disk may have room now.
            self.failure = None
        self._logger.msg(event, **fields)
        if self._flusher is not None:
            self._wake.set()
        return self.seq

    async def commit(self, seq: int | None = None) -> None:
        """Wait until record ``seq`` (default: the last written) is on disk."""
        seq = self.seq if seq is None else seq
        if self.failure is not None:
            raise AuditError(self.failure)
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
            self.failure = f"cannot sync audit log {self.path}: {exc.strerror or exc}"
            raise AuditError(self.failure) from exc
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


@dataclass
class VerifyResult:
    ok: bool
    records: int
    problems: list[str]


def verify(path: Path) -> VerifyResult:
    """Check the chain over the whole trail and against the head file."""
    problems: list[str] = []
    prev_hash: str | None = None
    last_seq = 0
    count = 0
    for line in read_lines(path):
        count += 1
        try:
            rec = json.loads(line)
            seq = int(rec["seq"])
            prev = str(rec["prev"])
        except (ValueError, KeyError, TypeError):
            problems.append(f"line after seq {last_seq}: not an audit record")
            prev_hash = line_hash(line)
            continue
        if prev_hash is None:
            if seq != 1 or prev != GENESIS:
                problems.append(f"seq {seq}: the trail does not start at seq 1 (records removed)")
        else:
            if seq != last_seq + 1:
                problems.append(f"seq {seq}: expected seq {last_seq + 1} (removed or moved)")
            if prev != prev_hash:
                problems.append(f"seq {seq}: the record before it was changed, removed or moved")
        prev_hash = line_hash(line)
        last_seq = seq
    head = read_head(path)
    if head is None:
        if count:
            problems.append("head file missing: truncation cannot be ruled out")
    elif head.seq > last_seq:
        problems.append(f"the log ends at seq {last_seq} but the head says {head.seq}: truncated")
    elif head.seq == last_seq and head.hash != (prev_hash or GENESIS):
        problems.append(f"seq {last_seq}: the last record was changed")
    return VerifyResult(not problems, count, problems)
