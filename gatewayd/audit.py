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

Signed checkpoints: with a signing key (Ed25519, in gatewayd's state), an
``audit.checkpoint`` record signs the chain head (node, sequence number, hash, time)
at start, every ``checkpoint_every`` records, every ``checkpoint_seconds``, as the
first record of each new file and at close. Someone who rewrites the whole trail and
its head consistently cannot make those signatures; :func:`verify` checks each one.

Rotation: once the file has reached ``rotate_bytes``, or the UTC day changed
(``rotate_daily``), it is renamed to ``<name>.<UTC stamp>`` (gzip-compressed in the
background when ``compress``) and a new file continues the same chain, starting with
a checkpoint; rotated files older than the retention are deleted from the oldest, so
what remains starts from a signed checkpoint. Readers take the rotated files (plain
or ``.gz``) in order, then the live one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import errno
import fcntl
import gzip
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from relay.errors import GatewayError

if TYPE_CHECKING:
    from .config import Config

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
CHECKPOINT = "audit.checkpoint"
RETENTION = "audit.retention"
#: Defaults of ``[audit]``: a checkpoint at least every 1000 records and every minute.
CHECKPOINT_EVERY = 1000
CHECKPOINT_SECONDS = 60.0
#: Records beyond ``every`` a stretch between checkpoints may hold: those a start
#: writes (re-anchor, recovery, retention) before its own checkpoint.
CHECKPOINT_SLACK = 8
#: Default retention: the health norm expects the access log kept for two years.
RETENTION_DAYS = 730
#: What a checkpoint signature covers starts with this, so it can mean nothing else.
SIGNING_CONTEXT = b"gatewayd audit checkpoint v1"
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


# -- the signing key ----------------------------------------------------------------------------


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The audit signing key in ``path`` (PEM, PKCS#8), made (mode 0600) if missing."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_key(path)  # made meanwhile by another process
        except OSError as exc:
            raise AuditError(f"cannot create the audit key {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        return key
    except OSError as exc:
        raise AuditError(f"cannot read the audit key {path}: {exc.strerror}") from exc
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise AuditError(f"{path} is not a PEM private key") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise AuditError(f"{path} is not an Ed25519 key")
    return loaded


def public_key_file(key_path: Path) -> Path:
    """``<key>.pub``: the public key in text, readable by whoever reads the trail."""
    return key_path.with_name(key_path.name + ".pub")


def write_public_key(key_path: Path, key: Ed25519PrivateKey) -> None:
    """Keep ``<key>.pub`` up to date (best effort: the private key is what counts)."""
    text = public_key_text(key.public_key()) + "\n"
    pub = public_key_file(key_path)
    with contextlib.suppress(OSError):
        if not pub.exists() or pub.read_text() != text:
            tmp = pub.with_name(pub.name + ".tmp")
            tmp.write_text(text)
            tmp.chmod(0o644)
            tmp.replace(pub)


def public_key_text(key: Ed25519PublicKey) -> str:
    """``ed25519:<base64 of the 32-byte key>``: what ``gw audit key`` prints."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode()


def key_id(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key from a file: ``ed25519:BASE64`` (as printed), PEM public or private key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read the key {path}: {exc.strerror}") from exc
    text = data.strip()
    try:
        if text.startswith(b"ed25519:"):
            raw = base64.b64decode(text[len(b"ed25519:") :], validate=True)
            return Ed25519PublicKey.from_public_bytes(raw)
        if b"PRIVATE KEY" in text:
            private = serialization.load_pem_private_key(text, password=None)
            if isinstance(private, Ed25519PrivateKey):
                return private.public_key()
        else:
            public = serialization.load_pem_public_key(text)
            if isinstance(public, Ed25519PublicKey):
                return public
    except ValueError as exc:
        raise AuditError(f"{path}: not an Ed25519 key ({exc})") from exc
    raise AuditError(f"{path}: not an Ed25519 key (expected ed25519:BASE64 or PEM)")


def checkpoint_message(node: str, seq: int, hash_: str, ts: str, every: int) -> bytes:
    """The bytes a checkpoint signs."""
    parts = [node, str(seq), hash_, ts, str(every)]
    return b"\n".join([SIGNING_CONTEXT, *(part.encode() for part in parts)])


# -- files ---------------------------------------------------------------------------------------


def rotated_stamp(path: Path, live: Path) -> str | None:
    """The UTC stamp in a rotated file's name (``<live>.<stamp>[.gz]``), or None."""
    rest = path.name[len(live.name) + 1 :]
    stamp = rest.removesuffix(".gz")
    return stamp if re.fullmatch(r"\d{8}T\d{12}Z", stamp) else None


def log_files(path: Path) -> list[Path]:
    """Rotated files (oldest first) then the live file, for reading the whole trail."""
    names = {
        p.name
        for p in path.parent.glob(path.name + ".*")
        if not p.name.endswith((".head", ".tmp", ".pub")) and TORN_MARK not in p.name
    }
    # While a rotated file is being compressed both exist for a moment: read the plain one.
    rotated = sorted(n for n in names if not (n.endswith(".gz") and n[:-3] in names))
    files = [path.parent / n for n in rotated]
    return [*files, path] if path.exists() else files


def read_lines(path: Path) -> Iterator[bytes]:
    """Every line of the trail, rotated and compressed files included, in order."""
    for _, _, line in numbered_lines(path):
        yield line


def open_log_file(p: Path) -> Any:
    """A rotated or live file for reading; one compressed meanwhile is read compressed."""
    if p.suffix == ".gz":
        return gzip.open(p, "rb")
    try:
        return open(p, "rb")
    except FileNotFoundError:
        gz = p.with_name(p.name + ".gz")
        if gz.exists():
            return gzip.open(gz, "rb")
        raise


#: Size of the blocks readers take at once.
BLOCK = 8 << 20


def read_blocks(f: Any, size: int = BLOCK) -> Iterator[bytes]:
    """Blocks of whole lines (each ends with a newline, but maybe the last)."""
    rest = b""
    while chunk := f.read(size):
        data = rest + chunk if rest else chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            rest = data
            continue
        yield data[:cut]
        rest = data[cut:]
    if rest:
        yield rest


def numbered_blocks(
    path: Path, errors: list[Problem], files: list[Path] | None = None
) -> Iterator[tuple[Path, int, list[bytes], bytes]]:
    """(file, number of the block's first line, its lines, block) over the trail, like
    :func:`numbered_lines` but a block of lines at a time, for speed."""
    for p in log_files(path) if files is None else files:
        base = 0
        try:
            with open_log_file(p) as f:
                for block in read_blocks(f):
                    lines = block.split(b"\n")
                    if lines[-1] == b"":
                        lines.pop()
                    yield p, base + 1, lines, block
                    base += len(lines)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            what = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            if isinstance(exc, EOFError):
                what = "compressed file cut short"
            errors.append(Problem(f"{p.name} line {base + 1}", None, f"cannot read: {what}"))


def numbered_lines(
    path: Path, errors: list[Problem] | None = None, files: list[Path] | None = None
) -> Iterator[tuple[Path, int, bytes]]:
    """(file, line number from 1, line) for every line of the trail, in order.

    A file that cannot be read, or a gzip file cut short, is noted in ``errors`` (file,
    line) and the next file is read; without ``errors`` it raises :class:`AuditError`.
    """
    for p in log_files(path) if files is None else files:
        number = 0
        try:
            with open_log_file(p) as f:
                for number, raw in enumerate(f, 1):
                    yield p, number, raw.rstrip(b"\n")
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            what = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            if isinstance(exc, EOFError):
                what = "compressed file cut short"
            problem = Problem(f"{p.name} line {number + 1}", None, f"cannot read: {what}")
            if errors is None:
                raise AuditError(str(problem)) from exc
            errors.append(problem)


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


def _tail(path: Path) -> tuple[int, str, int, str]:
    """seq and hash of the last line of the trail (0, GENESIS when empty), how many
    records of its last file follow its last checkpoint, and its time."""
    lines: list[bytes] = []
    for p in reversed(log_files(path)):
        with open_log_file(p) as f:
            lines = f.read().splitlines()
        if lines:
            break
    if not lines:
        return 0, GENESIS, 0, ""
    last = lines[-1]
    try:
        rec = json.loads(last)
        seq = int(rec["seq"])
        ts = rec.get("ts") if isinstance(rec.get("ts"), str) else ""
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditError(f"last line of {path} is not an audit record") from exc
    since = 0
    mark = b'"event":"' + CHECKPOINT.encode() + b'"'
    for line in reversed(lines):
        if mark in line:
            break
        since += 1
    return seq, line_hash(last), since, ts


def last_seq(path: Path) -> int:
    """Sequence number of the last record of the trail (0 when empty or unreadable)."""
    try:
        return _tail(path)[0]
    except (AuditError, OSError, EOFError):
        return 0


def _first_day(path: Path) -> str | None:
    """UTC day (``YYYY-MM-DD``) of the live file's first record, None when it is empty."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except FileNotFoundError:
        return None
    return first[7:17].decode("ascii", "replace") if first.startswith(b'{"ts":"') else None


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
        self,
        path: Path,
        *,
        node: str,
        fsync: bool = True,
        rotate_bytes: int = ROTATE_BYTES,
        rotate_daily: bool = False,
        compress: bool = False,
        retention_days: float | None = None,
        signer: Ed25519PrivateKey | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
    ) -> None:
        self.path = path
        self.node = node
        self.do_fsync = fsync
        self.rotate_bytes = rotate_bytes
        self.rotate_daily = rotate_daily
        self.compress = compress
        self.retention_days = retention_days
        self.signer = signer
        self.key_id = key_id(signer.public_key()) if signer is not None else None
        self.checkpoint_every = max(1, checkpoint_every)
        self.checkpoint_seconds = checkpoint_seconds
        self._checkpoint_at = time.monotonic()
        self._housekeeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-gzip")
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
            self.seq, self.prev, self._since_checkpoint, self._last_ts = _tail(path)
            self._file_day = _first_day(path)
        except (AuditError, OSError) as exc:
            os.close(self._head_fd)
            if isinstance(exc, AuditError):
                raise
            raise AuditError(f"cannot read the audit log {path}: {exc}") from exc
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
        # Never earlier than the record before (a clock stepped back): readers rely on
        # the trail being in time order to find a time window without reading it all.
        ts = max(now_rfc3339(), self._last_ts)
        self._last_ts = ts
        return {
            "ts": ts,
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
            if start == 0:
                self._file_day = line[7:17].decode("ascii", "replace")
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
        self._write_retention()
        if self.signer is not None and (self._since_checkpoint or self.seq == 0):
            self.checkpoint("start")

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint(self, reason: str, **extra: Any) -> int | None:
        """Sign the chain head now (``audit.checkpoint``); its seq, or None without a key."""
        if self.signer is None:
            return None
        ts = now_rfc3339()
        every = self.checkpoint_every
        message = checkpoint_message(self.node, self.seq, self.prev, ts, every)
        self._logger.msg(
            CHECKPOINT,
            signed_seq=self.seq,
            signed_hash=self.prev,
            signed_ts=ts,
            every=every,
            key_id=self.key_id,
            reason=reason,
            sig=base64.b64encode(self.signer.sign(message)).decode(),
            **extra,
        )
        self._since_checkpoint = 0
        self._checkpoint_at = time.monotonic()
        if self._flusher is not None:
            self._wake.set()
        return self.seq

    def _checkpoint_due(self) -> bool:
        return self.signer is not None and (
            self._since_checkpoint >= self.checkpoint_every
            or (
                self._since_checkpoint > 0
                and time.monotonic() - self._checkpoint_at >= self.checkpoint_seconds
            )
        )

    # -- rotation and retention -----------------------------------------------------------

    def _rotation_due(self) -> bool:
        if self._size == 0:
            return False
        if self._size >= self.rotate_bytes:
            return True
        return (
            self.rotate_daily
            and self._file_day is not None
            and self._file_day != now_rfc3339()[:10]
        )

    def _rotate_if_due(self) -> None:
        """Before a record: a new file when this one is full or from another day."""
        if not self._rotation_due():
            return
        try:
            rotated = self._rotate()
        except OSError as exc:
            raise AuditError(
                self._fail(f"cannot rotate audit log {self.path}: {exc.strerror or exc}")
            ) from exc
        if self.compress:
            self._housekeeper.submit(compress_file, rotated)
        if self.signer is not None:
            # The new file starts from a signed point, and names the file before it, so
            # that verify can tell retention from files removed by hand.
            self.checkpoint("rotation", previous=rotated.name)
        self._write_retention()

    def _rotate(self) -> Path:
        self._sync()
        rotated = self.path.with_name(f"{self.path.name}.{_stamp_now()}")
        os.close(self._fd)
        try:
            os.rename(self.path, rotated)
        finally:
            # A new file, or the same one again if the rename failed: never a closed fd.
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._size = os.fstat(self._fd).st_size
        self._file_day = None
        return rotated

    def remove_expired(self, now: float | None = None) -> list[str]:
        """Delete rotated files (oldest first) whose last record is older than the retention.

        A rotated file's name stamp is its rotation time, after its last record. Only a
        prefix of the trail is removed, so what remains is one unbroken chain; each file
        begins with a signed checkpoint, from which ``verify`` starts.
        """
        if self.retention_days is None:
            return []
        limit = (time.time() if now is None else now) - self.retention_days * 86400
        removed: list[str] = []
        for p in log_files(self.path):
            stamp = rotated_stamp(p, self.path) if p != self.path else None
            if stamp is None:
                break
            when = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.UTC)
            if when.timestamp() >= limit:
                break
            for q in (p, p.with_name(p.name.removesuffix(".gz") + ".gz")):
                with contextlib.suppress(FileNotFoundError):
                    q.unlink()
            removed.append(p.name)
        return removed

    def _write_retention(self, now: float | None = None) -> None:
        try:
            removed = self.remove_expired(now)
        except OSError as exc:
            removed = []
            self._logger.msg(
                RETENTION, files=[], message=f"cannot delete expired files: {exc.strerror}"
            )
            self._since_checkpoint += 1
        if removed:
            self._logger.msg(
                RETENTION,
                files=removed,
                retention_days=self.retention_days,
                message=f"{len(removed)} rotated files older than the retention deleted",
            )
            self._since_checkpoint += 1

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
            self._emit("audit.resumed", {"failure": failure, "since": now_rfc3339(since)})
        except AuditError:
            self._failed_at = since
            raise
        if self._flusher is not None:
            self._wake.set()

    def write(self, event: str, **fields: Any) -> int:
        """Append a record now; returns its sequence number. Raises AuditError if it cannot."""
        self._resume()  # the disk may have room now
        seq = self._emit(event, fields)
        if self._flusher is not None:
            self._wake.set()
        return seq

    def _emit(self, event: str, fields: dict[str, Any]) -> int:
        """Rotate first if due, write the record, then a checkpoint if one is due."""
        self._rotate_if_due()
        self._logger.msg(event, **fields)
        seq = self.seq
        self._since_checkpoint += 1
        if self._checkpoint_due():
            # The record is written; a failed checkpoint fails the next record instead.
            with contextlib.suppress(AuditError):
                self.checkpoint(
                    "count" if self._since_checkpoint >= self.checkpoint_every else "time"
                )
        return seq

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
            timeout = None
            if self.signer is not None and self._since_checkpoint:
                timeout = max(0.0, self._checkpoint_at + self.checkpoint_seconds - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                # Quiet for checkpoint_seconds after a record: sign the head now (and if
                # the log cannot be written, try again an interval later, not at once).
                self._checkpoint_at = time.monotonic()
                with contextlib.suppress(AuditError):
                    self._resume()
                    if self._since_checkpoint:
                        self.checkpoint("time")
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
        if self._failure is None and self._since_checkpoint and self.signer is not None:
            with contextlib.suppress(AuditError):
                self.checkpoint("stop")
        with contextlib.suppress(AuditError):
            self._sync()
        self._executor.shutdown(wait=True)
        self._housekeeper.shutdown(wait=True)
        os.close(self._fd)
        os.close(self._head_fd)


def audit_key_path(cfg: Config) -> Path:
    """Where the signing key of this config's audit log lives."""
    return cfg.audit.key_file or cfg.store.path.parent / "audit.key"


def open_audit_log(cfg: Config) -> AuditLog:
    """The audit log as ``[audit]`` configures it, its signing key made if missing."""
    a = cfg.audit
    signer = load_or_create_key(audit_key_path(cfg))
    write_public_key(audit_key_path(cfg), signer)
    log = AuditLog(
        a.path,
        node=cfg.gateway.node_id,
        fsync=a.fsync,
        rotate_bytes=a.rotate_bytes,
        rotate_daily=a.rotate_daily,
        compress=a.compress,
        retention_days=a.retention_days,
        signer=signer,
        checkpoint_every=a.checkpoint_every,
        checkpoint_seconds=a.checkpoint_seconds,
    )
    # Beside the trail too: whoever may read the trail may check it, without the state
    # (once the log made its folder: a new node's trail folder does not exist before).
    write_public_key(a.path, signer)
    return log


def compress_file(path: Path) -> Path | None:
    """gzip a rotated file to ``<name>.gz`` (through a temporary file), then delete it."""
    target = path.with_name(path.name + ".gz")
    tmp = path.with_name(path.name + ".gz.tmp")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                while chunk := src.read(1 << 20):
                    gz.write(chunk)
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(tmp, target)
        path.unlink()
    except OSError:
        # Left plain (readers take both); a temporary file is never read as the trail.
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    return target


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


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: the records up to ``seq`` are signed."""

    seq: int
    """The last record it signs."""
    ts: str
    where: str


@dataclass
class VerifyResult:
    ok: bool
    records: int
    problems: list[str]
    """Every problem not acknowledged, as ``FILE line N: seq S: what``."""
    open: list[Problem] = field(default_factory=list)
    acknowledged: list[Problem] = field(default_factory=list)
    checkpoints: int = 0
    """How many checkpoints were checked with the key (0 without a key)."""
    last_checkpoint: Checkpoint | None = None
    unsigned: int = 0
    """Records after the last checkpoint (not yet signed)."""
    first_seq: int = 0


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


#: The fixed start of every record as gatewayd renders it: verify reads seq and prev
#: from it without parsing the JSON (the chain of hashes covers the rest of the line).
_HEAD_RE = re.compile(rb'\{"ts":"[^"]{1,40}","seq":(\d{1,19}),"prev":"([0-9a-f]{64})","node":')
#: Records verify must read whole: they carry meaning for the chain itself.
_SPECIAL = b'"event":"audit.'


class _Verifier:
    def __init__(self, keys: list[Ed25519PublicKey] | None) -> None:
        self.keys = {key_id(k): k for k in keys} if keys else None
        self.key = bool(self.keys)
        self.retained: set[str] = set()
        """Names of the files ``audit.retention`` records say were deleted."""
        self.start_previous: str | None = None
        self.start_where = self.start_digest = ""
        self.found: list[Problem] = []
        self.acks: set[tuple[int, str]] = set()
        self.prev_hash: str | None = None
        self.last_seq = 0
        self.count = 0
        self.checkpoints = 0
        self.last_cp: Checkpoint | None = None
        self.cp_every: int | None = None
        self.since_cp = 0
        self.stretch_reported = False
        self.first_seq = 0

    def checkpoint(self, rec: dict[str, Any], where: str, seq: int, digest: str) -> bool:
        """Check one checkpoint; True if its signature holds (or there is no key)."""
        if self.keys is None:
            return True
        try:
            signed_seq, signed_hash = int(rec["signed_seq"]), str(rec["signed_hash"])
            ts, every = str(rec["signed_ts"]), int(rec["every"])
            sig = base64.b64decode(str(rec["sig"]), validate=True)
            node = str(rec["node"])
        except (KeyError, ValueError, TypeError):
            self.found.append(Problem(where, seq, "checkpoint without its signed fields", digest))
            return False
        expected_hash = self.prev_hash if self.prev_hash is not None else str(rec["prev"])
        expected_seq = self.last_seq if self.prev_hash is not None else seq - 1
        if (signed_seq, signed_hash) != (expected_seq, expected_hash):
            self.found.append(
                Problem(
                    where,
                    seq,
                    f"checkpoint signs seq {signed_seq} {signed_hash[:12]}..., but the chain "
                    f"before it is seq {expected_seq} {expected_hash[:12]}...: records changed",
                    digest,
                )
            )
            return False
        key = self.keys.get(str(rec.get("key_id")))
        if key is None:
            self.found.append(
                Problem(
                    where,
                    seq,
                    f"checkpoint signed by key {rec.get('key_id')}, not by "
                    + ", ".join(sorted(self.keys)),
                    digest,
                )
            )
            return False
        try:
            key.verify(sig, checkpoint_message(node, signed_seq, signed_hash, ts, every))
        except InvalidSignature:
            self.found.append(
                Problem(where, seq, "checkpoint signature does not verify (forged)", digest)
            )
            return False
        self.checkpoints += 1
        self.last_cp = Checkpoint(signed_seq, ts, where)
        self.cp_every = every
        self.since_cp = 0
        self.stretch_reported = False
        return True

    def line(self, where: str, line: bytes) -> None:
        self.count += 1
        digest = hashlib.sha256(line).hexdigest()
        fast = _HEAD_RE.match(line)
        rec: dict[str, Any] | None = None
        if fast is None or _SPECIAL in line:
            rec = _record(line)
            if rec is None:
                self.found.append(
                    Problem(where, None, f"not an audit record (after seq {self.last_seq})")
                )
                self.prev_hash = digest
                return
            seq, prev = int(rec["seq"]), str(rec["prev"])
        else:
            seq, prev = int(fast[1]), fast[2].decode()
        event = rec.get("event") if rec is not None else None
        if event == RETENTION and rec is not None and isinstance(rec.get("files"), list):
            self.retained.update(str(f).removesuffix(".gz") for f in rec["files"])
        if event == ACKNOWLEDGED and rec is not None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.acks.add((int(rec["acknowledged_seq"]), str(rec["acknowledged_hash"])))
        reanchor = event == DISCONTINUITY and seq > self.last_seq
        if reanchor and rec is not None:
            self.found.append(
                Problem(
                    where,
                    seq,
                    f"the chain was re-anchored at start: {rec.get('message', 'records lost')}",
                    digest,
                    gap=True,
                )
            )
        signed_start = False
        if event == CHECKPOINT and rec is not None:
            signed_start = self.checkpoint(rec, where, seq, digest) and self.prev_hash is None
        elif self.cp_every is not None:
            self.since_cp += 1
            if self.since_cp > self.cp_every + CHECKPOINT_SLACK and not self.stretch_reported:
                self.stretch_reported = True
                self.found.append(
                    Problem(
                        where,
                        seq,
                        f"more than {self.cp_every} records after the checkpoint at "
                        f"{self.last_cp.where if self.last_cp else '?'} without another: "
                        "checkpoints removed",
                        digest,
                    )
                )
        if self.prev_hash is None:
            self.first_seq = seq
            # The trail starts at seq 1, or (after retention) at a checkpoint whose
            # signature holds.
            starts_well = (seq == 1 and prev == GENESIS) or (reanchor and prev == GENESIS)
            if signed_start and self.key and rec is not None and not starts_well:
                self.start_previous = str(rec.get("previous") or "")
                self.start_where, self.start_digest = where, digest
            if not starts_well and not (signed_start and self.key):
                self.found.append(
                    Problem(
                        where,
                        seq,
                        "the trail does not start at seq 1 (records removed)",
                        digest,
                        gap=seq > 1 and prev != GENESIS,
                    )
                )
        else:
            if seq != self.last_seq + 1 and not reanchor:
                self.found.append(
                    Problem(
                        where,
                        seq,
                        f"expected seq {self.last_seq + 1} (removed or moved)",
                        digest,
                        gap=seq > self.last_seq + 1,
                    )
                )
            if prev != self.prev_hash:
                self.found.append(
                    Problem(
                        where,
                        seq,
                        "the record before it was changed, removed or moved",
                        digest,
                        # Part of a gap of missing records; an edit alone is never acknowledged.
                        gap=seq > self.last_seq + 1 and not reanchor,
                    )
                )
        self.prev_hash = digest
        self.last_seq = seq


def _seq_of(line: bytes) -> int | None:
    m = _HEAD_RE.match(line)
    return int(m[1]) if m is not None else None


def _verify_block(v: _Verifier, name: str, first: int, lines: list[bytes], block: bytes) -> None:
    """Check a block of lines: each run of ordinary records at once (the first follows
    the chain, each prev is the hash of the line before, the seqs count up), records of
    the chain's own (``audit.*``) and any run that fails a line at a time, so every
    problem is still named with its file, line and seq.

    Within a run whose hashes all link, a record cannot have been changed without the
    key's checkpoint or the head failing, so seq is read only at its ends.
    """
    sha256 = hashlib.sha256
    specials: list[int] = []
    pos, at, index = block.find(_SPECIAL), 0, 0
    while pos != -1:
        index += block.count(b"\n", at, pos)
        at = pos
        if not specials or specials[-1] != index:
            specials.append(index)
        pos = block.find(_SPECIAL, pos + 1)
    start = 0
    for stop in [*specials, len(lines)]:
        if stop > start and v.prev_hash is not None:
            run = lines[start:stop]
            n = stop - start
            prevs = [x[(j := x.find(b',"prev":"', 34, 80)) + 9 : j + 73] for x in run]
            digests = [sha256(line).digest() for line in run]
            try:
                linked = bytes.fromhex(b"".join(prevs).decode("ascii")) == (
                    bytes.fromhex(v.prev_hash) + b"".join(digests[:-1])
                )
            except ValueError:  # not hex where prev should be: line by line
                linked = False
            if (
                linked
                and _seq_of(run[0]) == v.last_seq + 1
                and _seq_of(run[-1]) == v.last_seq + n
                and (v.cp_every is None or v.since_cp + n <= v.cp_every + CHECKPOINT_SLACK)
            ):
                v.count += n
                if v.cp_every is not None:
                    v.since_cp += n
                v.prev_hash = digests[-1].hex()
                v.last_seq += n
                start = stop
        for i in range(start, stop):
            v.line(f"{name} line {first + i}", lines[i])
        if stop < len(lines):
            v.line(f"{name} line {first + stop}", lines[stop])
        start = stop + 1


def verify(
    path: Path, key: Ed25519PublicKey | list[Ed25519PublicKey] | None = None
) -> VerifyResult:
    """Check the chain over the whole trail, the head file and (with ``key``) every checkpoint.

    A gap in the sequence numbers and a re-anchor (``audit.discontinuity``) are
    problems until an ``audit.acknowledged`` record later in the chain names that
    record by sequence number and hash. With the gateway's public key, each
    ``audit.checkpoint`` must sign exactly the chain before it, the trail must hold at
    least one, and no stretch after one may be longer than the ``every`` it states;
    a trail that begins after rotated files were deleted must begin with one.
    """
    v = _Verifier([key] if isinstance(key, Ed25519PublicKey) else key)
    read_errors: list[Problem] = []
    where = f"{path.name} (empty)"
    for file, first, lines, block in numbered_blocks(path, read_errors):
        if read_errors:
            v.found.extend(read_errors)
            read_errors.clear()
        _verify_block(v, file.name, first, lines, block)
        where = f"{file.name} line {first + len(lines) - 1}"
    v.found.extend(read_errors)
    found = v.found
    head = read_head(path)
    if head is None:
        if v.count:
            found.append(Problem(where, None, "head file missing: truncation cannot be ruled out"))
    elif head.seq > v.last_seq:
        found.append(
            Problem(
                where,
                None,
                f"the log ends at seq {v.last_seq} but the head says {head.seq}: truncated",
            )
        )
    elif head.seq == v.last_seq and head.hash != (v.prev_hash or GENESIS):
        found.append(Problem(where, v.last_seq, "the last record was changed"))
    if v.start_previous is not None and v.start_previous.removesuffix(".gz") not in v.retained:
        before = f"after {v.start_previous}" if v.start_previous else f"at seq {v.first_seq}"
        found.append(
            Problem(
                v.start_where,
                v.first_seq,
                f"the trail begins {before}, which no audit.retention record deleted "
                "(files removed by hand?)",
                v.start_digest,
                gap=True,
            )
        )
    if v.key and v.count and v.last_cp is None:
        found.append(
            Problem(where, None, "no checkpoint signed by this key: the trail cannot be trusted")
        )
    still: list[Problem] = []
    done: list[Problem] = []
    for p in found:
        (done if p.gap and (p.seq, p.hash) in v.acks else still).append(p)
    return VerifyResult(
        not still,
        v.count,
        [str(p) for p in still],
        still,
        done,
        checkpoints=v.checkpoints,
        last_checkpoint=v.last_cp,
        unsigned=v.since_cp if v.last_cp is not None else v.count,
        first_seq=v.first_seq,
    )
