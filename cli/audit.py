"""``gw audit``: read and verify the gateway's audit trail."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import heapq
import ipaddress
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from relay.aio import run
from relay.errors import GatewayError
from relay.text import is_printable, printable

from .common import EXIT_LOCAL, fail

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """``30m``, ``2h``, ``7d`` back from now, or an RFC 3339 / ISO 8601 time (UTC if no zone)."""
    now = now or dt.datetime.now(dt.UTC)
    match = _DURATION.match(value.strip())
    if match:
        return now - dt.timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r}: expected a duration (30m, 2h, 7d) or a time (2026-11-23T10:00:00Z)",
            param_hint="--since",
        ) from exc
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def records(path: Path) -> Iterator[dict[str, Any]]:
    from gatewayd.audit import read_lines

    for line in read_lines(path):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield rec


def parse_until(value: str) -> dt.datetime:
    try:
        return parse_since(value)
    except click.BadParameter as exc:
        raise click.BadParameter(str(exc.message), param_hint="--until") from exc


def ts_text(when: dt.datetime) -> str:
    """A time as records write it (fixed width, so that byte order is time order)."""
    return when.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


#: Events that are failures whatever their fields say.
FAILURE_EVENTS = frozenset(
    {
        "auth.locked",
        "auth.rate_limited",
        "session.refused",
        "tunnel.refused",
        "tunnel.failed",
        "agent.rejected",
        "admin.refused",
        "connection.rejected",
        "connection.rejected.summary",
        "audit.discontinuity",
        "audit.recovered",
    }
)
_FAILED = frozenset({"failure", "denied", "timeout", "abandoned", "failed", "deny"})
_SUCCEEDED = frozenset({"success", "approved", "allow"})


def outcome_of(rec: dict[str, Any]) -> str | None:
    """``success``, ``failure`` or None (a record that is neither, e.g. session.start)."""
    if rec.get("event") in FAILURE_EVENTS:
        return "failure"
    value = rec.get("outcome", rec.get("decision"))
    if value in _FAILED:
        return "failure"
    if value in _SUCCEEDED:
        return "success"
    return None


def _source_ip(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of ``IP:PORT``, ``[V6]:PORT``, a bare address or ``NET/64``."""
    if not isinstance(value, str) or not value:
        return None
    text = value.split("/")[0]
    if text.startswith("["):
        text = text[1 : text.find("]")]
    elif text.count(":") == 1:
        text = text.split(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass
class Filter:
    """What ``gw audit`` selects; :meth:`needles` are what a matching line must contain."""

    since: str | None = None
    until: str | None = None
    user: str | None = None
    org: str | None = None
    org_ids: frozenset[str] = frozenset()
    vendor: str | None = None
    vendor_ids: frozenset[str] = frozenset()
    agent: str | None = None
    session: str | None = None
    event: str | None = None
    outcome: str | None = None
    source: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    def needles(self) -> list[tuple[bytes, ...]]:
        """Byte strings the raw line must hold (one of each tuple) to be worth parsing."""
        out: list[tuple[bytes, ...]] = []
        for value in (self.user, self.agent, self.session):
            if value:
                out.append((json.dumps(value).encode(),))
        if self.event:
            exact = not self.event.endswith(".")
            out.append((b'"event":' + json.dumps(self.event).encode()[: None if exact else -1],))
        for name, ids in ((self.org, self.org_ids), (self.vendor, self.vendor_ids)):
            if name:
                out.append(tuple(json.dumps(v).encode() for v in {name, *ids}))
        if self.source is not None:
            out.append((b'"source":',))
        if self.outcome == "failure":
            outcomes = [b'"outcome":' + json.dumps(v).encode() for v in sorted(_FAILED)]
            evs = [b'"event":' + json.dumps(e).encode() for e in sorted(FAILURE_EVENTS)]
            out.append((*outcomes, b'"decision":"deny"', *evs))
        elif self.outcome == "success":
            out.append((b'"outcome":"success"', b'"outcome":"approved"', b'"decision":"allow"'))
        return out

    def match(self, rec: dict[str, Any]) -> bool:
        ts = rec.get("ts")
        if self.since is not None or self.until is not None:
            if not isinstance(ts, str):
                return False
            if self.since is not None and ts < self.since:
                return False
            if self.until is not None and ts >= self.until:
                return False
        if self.user and self.user not in (rec.get("user"), rec.get("by")):
            return False
        if self.agent and rec.get("agent") != self.agent:
            return False
        if self.session and rec.get("session") != self.session:
            return False
        if self.event:
            ev = str(rec.get("event", ""))
            if not (ev == self.event or (self.event.endswith(".") and ev.startswith(self.event))):
                return False
        if self.org and not _about(rec, self.org, self.org_ids):
            return False
        if self.vendor and not _about(rec, self.vendor, self.vendor_ids):
            return False
        if self.outcome and outcome_of(rec) != self.outcome:
            return False
        if self.source is not None:
            ip = _source_ip(rec.get("source"))
            if ip is None or ip.version != self.source.version or ip not in self.source:
                return False
        return True


def _about(rec: dict[str, Any], name: str, ids: frozenset[str]) -> bool:
    if name in (rec.get("org"), rec.get("vendor")):
        return True
    return any(rec.get(k) in ids for k in ("user", "agent", "agreement", "id", "by"))


def directory_ids(db: Path, org: str | None, vendor: str | None) -> tuple[set[str], set[str]]:
    """Ids of the org's agents, users and agreements, and of the vendor's users and
    agreements, read from the state database (read-only)."""
    import sqlite3

    org_ids: set[str] = set()
    vendor_ids: set[str] = set()
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot read the state database {db}: {exc}") from exc
    try:
        if org:
            for query in (
                "SELECT id FROM agents WHERE org = ?",
                "SELECT id FROM users WHERE org = ?",
                "SELECT id FROM agreements WHERE org = ?",
            ):
                org_ids.update(row[0] for row in conn.execute(query, (org,)))
        if vendor:
            for query in (
                "SELECT id FROM users WHERE vendor = ?",
                "SELECT id FROM agreements WHERE vendor = ?",
            ):
                vendor_ids.update(row[0] for row in conn.execute(query, (vendor,)))
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot read the state database {db}: {exc}") from exc
    finally:
        conn.close()
    return org_ids, vendor_ids


def scan(
    path: Path, flt: Filter, report: Callable[[str], None] | None = None
) -> Iterator[dict[str, Any]]:
    """The matching records of the trail, in order.

    Lines are first tested as bytes and only those that may match are parsed: with an id
    to look for (a user, agent, session, event), a byte search over the whole file finds
    the candidate lines; with a time window, each line's time is compared as bytes. A
    line that is not a record, an unreadable file and a compressed file cut short are
    reported (file and line) and the rest is read.
    """
    from gatewayd.audit import log_files, rotated_stamp

    files = log_files(path)
    if flt.since is not None:
        # A rotated file's stamp is its rotation time, after its last record.
        since_stamp = flt.since.replace("-", "").replace(":", "").replace(".", "")[:15]
        files = [f for f in files if f == path or (rotated_stamp(f, path) or "9") >= since_stamp]
    plan = _Plan(flt)
    for file in files:
        try:
            for region, first in _regions(file, live=file == path):
                for at, line in plan.candidates(region):
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        rec = None
                    if not isinstance(rec, dict):
                        if report is not None:
                            number = first + region.count(b"\n", 0, region.find(line, at))
                            report(f"{file.name} line {number}: not an audit record")
                        continue
                    if flt.match(rec):
                        yield rec
        except _ReadError as exc:
            if report is not None:
                report(f"{file.name} line {exc.line}: cannot read: {exc.what}")


class _ReadError(Exception):
    def __init__(self, line: int, what: str) -> None:
        self.line, self.what = line, what


def _regions(file: Path, live: bool) -> Iterator[tuple[Any, int]]:
    """(bytes or mmap of whole lines, number of its first line) over one file: a rotated
    plain file mapped whole, the live one read whole (a file cut shorter while mapped
    would kill the reader), a compressed one in blocks; a last line still being written
    is left for later."""
    import gzip
    import mmap

    from gatewayd.audit import open_log_file, read_blocks

    base = 1
    try:
        with open_log_file(file) as f:
            if isinstance(f, gzip.GzipFile):
                for block in read_blocks(f):
                    yield block, base
                    base += block.count(b"\n")
                return
            size = os.fstat(f.fileno()).st_size
            if live:
                data = f.read()
                end = data.rfind(b"\n") + 1
                if end:
                    yield (data if end == len(data) else data[:end]), 1
                return
            if size == 0:
                return
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
                end = mm.rfind(b"\n") + 1  # a line still being written is left for later
                if end:
                    yield _Cut(mm, end), 1
    except (OSError, EOFError, ValueError) as exc:
        what = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if isinstance(exc, EOFError):
            what = "compressed file cut short"
        raise _ReadError(base, what) from exc


class _Cut:
    """The first ``end`` bytes of a mapped file, searched without copying."""

    def __init__(self, mm: Any, end: int) -> None:
        self.mm, self.end = mm, end

    def __len__(self) -> int:
        return self.end

    def find(self, sub: bytes, start: int = 0, stop: int | None = None) -> int:
        return int(self.mm.find(sub, start, self.end if stop is None else min(stop, self.end)))

    def rfind(self, sub: bytes, start: int = 0, stop: int | None = None) -> int:
        return int(self.mm.rfind(sub, start, self.end if stop is None else min(stop, self.end)))

    def count(self, sub: bytes, start: int = 0, stop: int | None = None) -> int:
        stop = self.end if stop is None else min(stop, self.end)
        return bytes(self.mm[start:stop]).count(sub)

    def __getitem__(self, key: slice) -> bytes:
        return bytes(self.mm[key.start : min(key.stop, self.end)])

    def finditer(self, rx: re.Pattern[bytes], begin: int) -> Iterator[re.Match[bytes]]:
        return rx.finditer(self.mm, begin, self.end)


class _Plan:
    """How to find the lines worth parsing for a filter."""

    def __init__(self, flt: Filter) -> None:
        needles = flt.needles()
        single = sorted((n[0] for n in needles if len(n) == 1), key=_rarity)
        self.key = single[0] if single else None
        self.single = single[1:]
        self.groups = [n for n in needles if len(n) > 1]
        # Without an id to search for, each line is tested against one pattern of all the
        # values of the first group (the outcome's, or an org's ids) as it is split off.
        self.group_re = _pattern(self.groups[0]) if self.groups else None
        self.since = flt.since.encode() if flt.since is not None else None
        self.until = flt.until.encode() if flt.until is not None else None

    def candidates(self, region: Any) -> Iterator[tuple[int, bytes]]:
        """(offset, line) of each line of the region that may match."""
        start = self._first_since(region) if self.since is not None else 0
        if self.key is not None:
            spans = self._find_lines(region, [self.key], start)
        else:
            spans = self._all_lines(region, start)
        since, until, single = self.since, self.until, self.single
        # The first group was tested already when the lines were split off.
        groups = self.groups if self.key is not None else self.groups[1:]
        for at, line in spans:
            if since is not None and line[7:34] < since and line.startswith(b'{"ts":"'):
                continue
            if until is not None and line[7:34] >= until and line.startswith(b'{"ts":"'):
                return  # the trail is in time order: nothing later is before --until

            if single and not all(n in line for n in single):
                continue
            if groups and not all(any(n in line for n in g) for g in groups):
                continue
            yield at, line

    def _first_since(self, region: Any) -> int:
        """Offset of the first line at or after ``--since``: a binary search, as gatewayd
        writes records in time order (it never stamps one earlier than the last)."""
        assert self.since is not None
        lo, hi = 0, len(region)
        while lo < hi:
            mid = (lo + hi) // 2
            start = max(lo, region.rfind(b"\n", 0, mid) + 1)
            end = region.find(b"\n", start)
            end = len(region) if end == -1 else end
            head = region[start : min(end, start + 34)]
            if head.startswith(b'{"ts":"') and head[7:34] >= self.since:
                hi = start
            else:
                lo = end + 1
        return min(lo, len(region))

    @staticmethod
    def _find_lines(region: Any, needles: list[bytes], begin: int) -> Iterator[tuple[int, bytes]]:
        """Lines holding any of the needles, found by byte search, in order.

        A needle's leading quote is checked after the search, not searched for: quotes
        are everywhere in JSON, and a search that starts at a rarer byte skips faster.
        """
        starts: set[int] = set()
        for needle in needles:
            quoted = needle.startswith(b'"') and len(needle) > 2
            core = needle[1:] if quoted else needle
            rx = re.compile(re.escape(core))
            found = region.finditer(rx, begin) if isinstance(region, _Cut) else None
            last_end = -1
            for m in found if found is not None else rx.finditer(region, begin):
                pos = m.start()
                if pos < last_end or (quoted and (pos == 0 or region[pos - 1 : pos] != b'"')):
                    continue
                start = region.rfind(b"\n", 0, pos) + 1
                end = region.find(b"\n", pos)
                last_end = len(region) if end == -1 else end
                starts.add(start)
        for start in sorted(starts):
            end = region.find(b"\n", start)
            yield start, region[start : end if end != -1 else len(region)]

    def _all_lines(self, region: Any, begin: int) -> Iterator[tuple[int, bytes]]:
        """Every line (with a time window, those in it), a block at a time; the offset
        given is the block's (the line is found in it only to name a bad one)."""
        since, until = self.since, self.until
        at, size = begin, len(region)
        while at < size:
            cut = region.rfind(b"\n", at, at + BLOCK) + 1 if at + BLOCK < size else size
            if cut <= at:  # one line longer than a block
                cut = region.find(b"\n", at + BLOCK) + 1 or size
            lines = region[at:cut].split(b"\n")
            if since is not None:
                lines = [x for x in lines if x[7:34] >= since or not x.startswith(b'{"ts":"')]
            if until is not None:
                lines = [x for x in lines if x[7:34] < until or not x.startswith(b'{"ts":"')]
            if self.group_re is not None:
                search = self.group_re.search
                lines = [x for x in lines if search(x)]
            for line in lines:
                if line:
                    yield at, line
            at = cut


BLOCK = 8 << 20


def _pattern(needles: tuple[bytes, ...]) -> re.Pattern[bytes]:
    """One pattern for any of the needles, ``"key":value`` ones grouped by key (a
    pattern that tries each key once at a quote is faster than a plain alternation)."""
    by_key: dict[bytes, list[bytes]] = {}
    for needle in needles:
        key, sep, value = needle.partition(b'":')
        if sep and key.startswith(b'"') and value:
            by_key.setdefault(key + sep, []).append(value)
        else:
            by_key.setdefault(b"", []).append(needle)
    parts = [
        re.escape(key) + b"(?:" + b"|".join(re.escape(v) for v in values) + b")"
        for key, values in by_key.items()
    ]
    return re.compile(b"|".join(parts))


def _rarity(needle: bytes) -> tuple[int, int]:
    """Event names are common, ids rare: search first for an id, the longest one."""
    return (needle.startswith(b'"event":'), -len(needle))


def follow(
    path: Path,
    *,
    poll: float = 0.5,
    start_at_end: bool = True,
    after_seq: int = 0,
    stop: Callable[[], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Records as they are written, like ``tail -f``, through rotation.

    A renamed file is read to its end through the descriptor still open on it before
    the new live file is opened; records are told apart by ``seq``, so none is shown
    twice, and a file rotated away before it was opened is read from its rotated name.
    """
    from gatewayd.audit import log_files, open_log_file

    last = after_seq
    fd: int | None = None
    ino = 0
    pending = b""
    first_open = True
    checked_gap = False

    def parse(line: bytes) -> dict[str, Any] | None:
        try:
            rec = json.loads(line)
        except ValueError:
            return None
        if isinstance(rec, dict) and isinstance(rec.get("seq"), int):
            return rec
        return None

    def catch_up(below: int) -> Iterator[dict[str, Any]]:
        nonlocal last
        for f in log_files(path):
            if f == path:
                continue
            try:
                with open_log_file(f) as h:
                    for raw in h:
                        rec = parse(raw.rstrip(b"\n"))
                        if rec is not None and last < rec["seq"] < below:
                            last = rec["seq"]
                            yield rec
            except (OSError, EOFError):
                continue

    while stop is None or not stop():
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                time.sleep(poll)
                continue
            ino, pending = os.fstat(fd).st_ino, b""
            if first_open and start_at_end:
                size = os.fstat(fd).st_size
                os.lseek(fd, size, os.SEEK_SET)
                if last == 0:
                    last = _last_seq(path)
            first_open = False
            checked_gap = False
        chunk = os.read(fd, 1 << 20)
        if chunk:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                rec = parse(line)
                if rec is None or rec["seq"] <= last:
                    continue
                if rec["seq"] > last + 1 and not checked_gap:
                    yield from catch_up(rec["seq"])  # a file rotated away unseen
                checked_gap = True
                last = rec["seq"]
                yield rec
            continue
        try:
            renamed = os.stat(path).st_ino != ino
        except FileNotFoundError:
            renamed = True
        if renamed:
            # Drain what was written before the rename, then take the new file.
            while chunk := os.read(fd, 1 << 20):
                pending += chunk
            for line in pending.split(b"\n"):
                rec = parse(line)
                if rec is not None and rec["seq"] > last:
                    last = rec["seq"]
                    yield rec
            os.close(fd)
            fd = None
            continue
        time.sleep(poll)
    if fd is not None:
        os.close(fd)


def _last_seq(path: Path) -> int:
    try:
        data = path.read_bytes()
    except OSError:
        return 0
    for line in reversed(data.splitlines()):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(line)["seq"])
    return 0


def _path(config_path: Path) -> Path:
    from gatewayd import config as config_mod

    try:
        return config_mod.load(config_path).audit.path
    except GatewayError as exc:
        fail(f"config error: {exc}", EXIT_LOCAL)


# -- several nodes' trails ----------------------------------------------------------------


def trail_files(given: Path) -> list[Path]:
    """The live files of the trails ``--trail`` names: a trail's live file itself, or a
    folder, which holds one trail per head file (``<live>.head``) in it."""
    if not given.is_dir():
        if given.exists() or given.with_name(given.name + ".head").exists():
            return [given]
        raise click.BadParameter(f"{given}: no such trail or folder", param_hint="--trail")
    found = sorted(h.with_name(h.name.removesuffix(".head")) for h in given.glob("*.head"))
    if not found:
        raise click.BadParameter(
            f"{given}: no audit trail in this folder (no <trail>.head file)", param_hint="--trail"
        )
    return found


def trails_of(config_path: Path | None, given: tuple[Path, ...]) -> list[Path]:
    """Every trail to read: the config's, then each ``--trail`` (each once); without
    either, the default config's ($GATEWAYD_CONFIG or /etc/gatewayd/gatewayd.toml)."""
    if config_path is None and not given:
        from gatewayd.config import ENV_VAR, default_path

        config_path = default_path()
        if not config_path.exists():
            fail(
                f"config error: cannot read config {config_path}: no such file (give "
                f"--config PATH, set {ENV_VAR}, or --trail DIR for each node's trail)",
                EXIT_LOCAL,
            )
    paths = [_path(config_path)] if config_path is not None else []
    for entry in given:
        for path in trail_files(entry):
            if all(not _same_file(path, p) for p in paths):
                paths.append(path)
    return paths


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def _time_order(rec: dict[str, Any]) -> tuple[str, str, int]:
    seq = rec.get("seq")
    return (str(rec.get("ts", "")), str(rec.get("node", "")), seq if isinstance(seq, int) else 0)


def scan_trails(
    paths: list[Path],
    flt: Filter,
    report: Callable[[str], None] | None = None,
    seen: dict[Path, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """The matching records of every trail, merged by time (each trail is in time order:
    its node never stamps a record earlier than the one before). ``seen`` gets each
    trail's highest sequence number among the records given."""

    def tracked(path: Path) -> Iterator[dict[str, Any]]:
        for rec in scan(path, flt, report):
            if seen is not None and isinstance(rec.get("seq"), int):
                seen[path] = max(seen.get(path, 0), rec["seq"])
            yield rec

    if len(paths) == 1:
        return tracked(paths[0])
    return heapq.merge(*(tracked(p) for p in paths), key=_time_order)


def node_of(path: Path) -> str:
    """The node id the trail's records carry (its first readable record's), or ``?``."""
    for rec in records(path):
        if isinstance(rec.get("node"), str):
            return str(rec["node"])
    return "?"


def follow_trails(
    paths: list[Path], after: dict[Path, int], stop: Callable[[], bool]
) -> Iterator[dict[str, Any]]:
    """New records of every trail as they are written, in the order they are seen: one
    reader thread per trail (each like ``tail -f`` through rotation)."""
    import queue
    import threading

    if len(paths) == 1:
        yield from follow(
            paths[0], poll=0.5, start_at_end=False, after_seq=after[paths[0]], stop=stop
        )
        return
    found: queue.Queue[dict[str, Any]] = queue.Queue()

    def read(path: Path) -> None:
        for rec in follow(path, poll=0.5, start_at_end=False, after_seq=after[path], stop=stop):
            found.put(rec)

    for path in paths:
        threading.Thread(target=read, args=(path,), daemon=True).start()
    while not stop():
        try:
            yield found.get(timeout=0.5)
        except queue.Empty:
            continue


#: ``ctx.meta`` key of the group's --trail values, for its subcommands.
_TRAILS = "gw_audit_trails"

COLUMNS = ["ts", "event", "user", "agent", "target", "mode", "outcome", "reason", "source"]
CSV_COLUMNS = ["ts", "seq", "node", "event", "session", "user", "agent", "target", "mode"]
CSV_COLUMNS += ["outcome", "reason", "source", "details"]


def _summary(rec: dict[str, Any]) -> list[str]:
    outcome = rec.get("outcome") or rec.get("decision") or ""
    reason = rec.get("reason") or rec.get("message") or ""
    if rec.get("event") == "admin.change":
        reason = f"{rec.get('op')} by {rec.get('by')}"
    elif rec.get("factor"):
        reason = f"{rec['factor']}: {reason}"
    if rec.get("event") == "tunnel.end":
        up, down, duration = rec.get("bytes_up"), rec.get("bytes_down"), rec.get("duration")
        reason = f"{reason}; up {up} B, down {down} B, {duration} s"
    elif rec.get("event") == "connection.rejected.summary":
        raw = rec.get("codes")
        codes: dict[str, Any] = raw if isinstance(raw, dict) else {}
        kinds = ", ".join(f"{k} {v}" for k, v in codes.items())
        reason = f"{rec.get('count')} more ({kinds}) from {rec.get('first')} to {rec.get('last')}"
    elif rec.get("event") == "audit.acknowledged":
        reason = f"seq {rec.get('acknowledged_seq')} by {rec.get('by')}: {reason}"
    elif rec.get("event") == "audit.resumed":
        reason = f"{rec.get('failure')}, since {rec.get('since')}"
    values = [
        str(rec.get("ts", ""))[:23].replace("T", " "),
        str(rec.get("event", "")),
        str(rec.get("user") or ""),
        str(rec.get("agent") or ""),
        str(rec.get("target") or ""),
        str(rec.get("mode") or ""),
        str(outcome),
        str(reason),
        str(rec.get("source") or ""),
    ]
    # Fields hold what clients sent (a factor name, a reason): never raw to a terminal.
    return [printable(v) if v else "-" for v in values]


def _csv_row(rec: dict[str, Any]) -> list[str]:
    known = set(CSV_COLUMNS) | {"prev", "decision", "message"}
    row = []
    for column in CSV_COLUMNS[:-1]:
        if column == "outcome":
            value: Any = rec.get("outcome") or rec.get("decision") or outcome_of(rec)
        elif column == "reason":
            value = rec.get("reason") or rec.get("message")
        else:
            value = rec.get(column)
        row.append("" if value is None else str(value))
    rest = {k: v for k, v in rec.items() if k not in known}
    row.append(json.dumps(rest, separators=(",", ":")) if rest else "")
    return row


class Output:
    """Prints records as an aligned table (failures stand out on a terminal), JSON lines
    or CSV. The table is printed in blocks, so ``--follow`` shows records at once."""

    def __init__(self, fmt: str, color: bool, nodes: bool = False) -> None:
        self.fmt = fmt
        self.color = color
        #: Records of several nodes: the table shows each one's node after its time.
        self.nodes = nodes
        self.columns = [COLUMNS[0], "node", *COLUMNS[1:]] if nodes else COLUMNS
        self.count = 0
        self.widths: list[int] | None = None
        self.writer = csv.writer(sys.stdout, lineterminator="\n") if fmt == "csv" else None

    def header(self) -> None:
        if self.writer is not None:
            self.writer.writerow(CSV_COLUMNS)

    def rows(self, recs: list[dict[str, Any]]) -> None:
        for rec in recs:
            self.count += 1
            if self.fmt == "json":
                click.echo(json.dumps(rec, separators=(",", ":")))
            elif self.writer is not None:
                self.writer.writerow(_csv_row(rec))
                sys.stdout.flush()
        if self.fmt != "table" or not recs:
            return
        rows = [(self._summary(r), outcome_of(r) == "failure") for r in recs]
        columns = self.columns
        if self.widths is None:
            self.widths = [
                min(max(len(c), *(len(r[i]) for r, _ in rows)), 60) for i, c in enumerate(columns)
            ]
            title = "  ".join(c.upper().ljust(w) for c, w in zip(columns, self.widths, strict=True))
            title = title.rstrip()
            click.echo(click.style(title, bold=True) if self.color else title, color=self.color)
        for r, failed in rows:
            text = "  ".join(v[:w].ljust(w) for v, w in zip(r, self.widths, strict=True)).rstrip()
            if failed:
                text = click.style(text, fg="red", bold=True) if self.color else text
            click.echo(text, color=self.color)

    def _summary(self, rec: dict[str, Any]) -> list[str]:
        values = _summary(rec)
        if self.nodes:
            values.insert(1, printable(str(rec.get("node") or "")) or "-")
        return values


def _warn(text: str) -> None:
    click.echo(f"gw audit: {printable(text)}", err=True)


def _make_filter(
    config_path: Path | None,
    *,
    since: str | None,
    until: str | None,
    user: str | None,
    org: str | None,
    vendor: str | None,
    agent: str | None,
    session: str | None,
    event: str | None,
    outcome: str | None,
    source: str | None,
) -> Filter:
    from gatewayd import config as config_mod

    net = None
    if source:
        try:
            net = ipaddress.ip_network(source.strip(), strict=False)
        except ValueError as exc:
            raise click.BadParameter(
                f"{source!r}: expected an address or a network (10.0.0.0/8)", param_hint="--source"
            ) from exc
    org_ids: set[str] = set()
    vendor_ids: set[str] = set()
    if (org or vendor) and config_path is None:
        _warn("without --config, --org/--vendor match the records' own fields")
    elif org or vendor:
        assert config_path is not None
        try:
            db = config_mod.load(config_path).store.path
        except GatewayError as exc:
            fail(f"config error: {exc}", EXIT_LOCAL)
        if db.exists():
            org_ids, vendor_ids = directory_ids(db, org, vendor)
        else:
            _warn(f"no state database at {db}: --org/--vendor match the records' own fields")
    return Filter(
        since=ts_text(parse_since(since)) if since else None,
        until=ts_text(parse_until(until)) if until else None,
        user=user,
        org=org,
        org_ids=frozenset(org_ids),
        vendor=vendor,
        vendor_ids=frozenset(vendor_ids),
        agent=agent,
        session=session,
        event=event,
        outcome=outcome,
        source=net,
    )


def _filter_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--since", help="Since a duration ago (30m, 2h, 7d), a date or a time."),
        click.option("--until", help="Before a duration ago, a date or an RFC 3339 time."),
        click.option("--user", help="Records of this user (or admin changes by them)."),
        click.option("--org", help="Records about this org: its agents, users, agreements."),
        click.option("--vendor", help="Records about this vendor: its users and agreements."),
        click.option("--agent", help="Records about this agent."),
        click.option("--session", help="Records of this session."),
        click.option("--event", help="This event, or a prefix ending in '.' (auth.)."),
        click.option(
            "--outcome", type=click.Choice(["success", "failure"]), help="Successes or failures."
        ),
        click.option("--source", help="Records from this address or network (IP/CIDR)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _trail_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--trail",
        "trails",
        multiple=True,
        type=click.Path(path_type=Path),
        help="Another node's trail: its live file, or a folder of trails (repeatable). "
        "Records are merged by time, the node shown.",
    )(f)


@click.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="gatewayd's config.")
@_trail_option
@_filter_options
@click.option("--limit", type=click.IntRange(min=1), help="At most N records (the last N).")
@click.option("--reverse", is_flag=True, help="Newest first.")
@click.option(
    "--follow",
    "-f",
    "keep_following",
    is_flag=True,
    help="Keep printing new records (like tail -f).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON lines.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the records as CSV.")
@click.pass_context
def audit(
    ctx: click.Context,
    /,
    config_path: Path | None,
    trails: tuple[Path, ...],
    limit: int | None,
    reverse: bool,
    keep_following: bool,
    as_json: bool,
    as_csv: bool,
    **filters: Any,
) -> None:
    """Read the audit trail, filtered; `gw audit verify` checks its integrity.

    With several nodes' trails (--trail), records are merged by time and the table
    shows each one's node."""
    ctx.obj = config_path
    ctx.meta[_TRAILS] = trails
    if ctx.invoked_subcommand is not None:
        return
    if as_json and as_csv:
        raise click.UsageError("give --json or --csv, not both")
    if keep_following and reverse:
        raise click.UsageError("--follow shows records as they come: not with --reverse")
    paths = trails_of(config_path, trails)
    flt = _make_filter(config_path, **filters)
    fmt = "json" if as_json else "csv" if as_csv else "table"
    out = Output(fmt, color=sys.stdout.isatty(), nodes=len(paths) > 1)
    out.header()
    seen: dict[Path, int] = {}
    if keep_following:
        from gatewayd.audit import last_seq

        seen = {p: last_seq(p) for p in paths}  # what is written from now on is followed
    found_all = scan_trails(paths, flt, _warn, seen)
    if limit is not None and not reverse:
        found: list[dict[str, Any]] = list(deque(found_all, maxlen=limit))
    else:
        found = list(found_all)
        if reverse:
            found.reverse()
        if limit is not None:
            found = found[:limit]
    out.rows(found)
    if keep_following:
        try:
            for rec in follow_trails(paths, {p: seen.get(p, 0) for p in paths}, lambda: False):
                if flt.match(rec):
                    out.rows([rec])
        except KeyboardInterrupt:
            return
        return
    if not out.count and fmt == "table":
        click.echo("no matching records", err=True)


@audit.command("sessions")
@click.option("--config", "config_path", type=click.Path(path_type=Path))
@_trail_option
@_filter_options
@click.option("--limit", type=click.IntRange(min=1), help="At most N sessions (the last N).")
@click.option("--reverse", is_flag=True, help="Newest first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV.")
@click.pass_obj
def sessions_cmd(
    parent: Path | None,
    /,
    config_path: Path | None,
    trails: tuple[Path, ...],
    limit: int | None,
    reverse: bool,
    as_json: bool,
    as_csv: bool,
    **filters: Any,
) -> None:
    """One row per session: who, vendor/org, agent, target, mode, reason, approved by,
    start, duration, bytes each way, end reason: the view an organisation reviews.
    A session's records may be on several nodes' trails (--trail): they are merged."""
    path_cfg = config_path or parent
    paths = trails_of(path_cfg, (*click.get_current_context().meta.get(_TRAILS, ()), *trails))
    event = filters.pop("event")
    if event:
        raise click.UsageError("gw audit sessions: --event does not apply")
    since, until = filters.pop("since"), filters.pop("until")
    flt = _make_filter(path_cfg, since=None, until=None, event=None, **filters)
    window = Filter(
        since=ts_text(parse_since(since)) if since else None,
        until=ts_text(parse_until(until)) if until else None,
    )
    directory = _org_of_agents(path_cfg) if path_cfg is not None else {}
    rows = session_rows(scan_trails(paths, Filter(), _warn), flt, window, directory)
    if reverse:
        rows.reverse()
    if limit is not None:
        rows = rows[-limit:] if not reverse else rows[:limit]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, separators=(",", ":")))
        return
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(SESSION_COLUMNS)
        for row in rows:
            writer.writerow(["" if row[c] is None else str(row[c]) for c in SESSION_COLUMNS])
        return
    if not rows:
        click.echo("no matching sessions", err=True)
        return
    table = [
        [printable(str(row[c])) if row[c] not in (None, "") else "-" for c in SESSION_COLUMNS]
        for row in rows
    ]
    widths = [
        min(max(len(c), *(len(r[i]) for r in table)), 40) for i, c in enumerate(SESSION_COLUMNS)
    ]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(SESSION_COLUMNS, widths, strict=True)))
    for r in table:
        click.echo("  ".join(v[:w].ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


SESSION_COLUMNS = ["session", "user", "vendor", "org", "agent", "target", "mode", "reason"]
SESSION_COLUMNS += ["approved_by", "start", "duration", "bytes_up", "bytes_down", "end"]


def _org_of_agents(config_path: Path) -> dict[str, dict[str, str]]:
    """{"agent": {id: org}, "user": {id: vendor or org}} from the state database, if readable."""
    import sqlite3

    from gatewayd import config as config_mod

    found: dict[str, dict[str, str]] = {"agent": {}, "vendor": {}}
    try:
        db = config_mod.load(config_path).store.path
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except (GatewayError, sqlite3.Error):
        return found
    try:
        found["agent"] = {a: o for a, o in conn.execute("SELECT id, org FROM agents")}
        found["vendor"] = {
            u: v for u, v in conn.execute("SELECT id, vendor FROM users") if v is not None
        }
    except sqlite3.Error:
        pass
    finally:
        conn.close()
    return found


def session_rows(
    recs: Iterator[dict[str, Any]],
    flt: Filter,
    window: Filter,
    directory: dict[str, dict[str, str]],
) -> list[dict[str, Any]]:
    """Sessions that started within ``window`` and match ``flt``, oldest first."""
    by_id: dict[str, dict[str, Any]] = {}
    agent_org: dict[str, str] = dict(directory.get("agent", {}))
    for rec in recs:
        event = rec.get("event")
        if event == "agent.connect" and isinstance(rec.get("agent"), str):
            agent_org.setdefault(rec["agent"], str(rec.get("org") or ""))
        sid = rec.get("session")
        if not isinstance(sid, str):
            continue
        if event == "session.start":
            if not window.match(rec):
                continue
            by_id[sid] = {
                "session": sid,
                "user": rec.get("user"),
                "vendor": directory.get("vendor", {}).get(str(rec.get("user"))),
                "org": None,
                "agent": rec.get("agent"),
                "target": rec.get("target"),
                "mode": rec.get("mode"),
                "reason": rec.get("reason_given"),
                "approved_by": rec.get("approved_by"),
                "start": rec.get("ts"),
                "duration": None,
                "bytes_up": None,
                "bytes_down": None,
                "end": None,
                "_recs": [rec],
            }
        elif sid in by_id:
            row = by_id[sid]
            row["_recs"].append(rec)
            if event == "session.end":
                row["duration"] = rec.get("duration")
                row["bytes_up"] = rec.get("bytes_up")
                row["bytes_down"] = rec.get("bytes_down")
                row["end"] = rec.get("reason")
    rows = []
    for row in by_id.values():
        row["org"] = agent_org.get(str(row["agent"])) or None
        recs_of = row.pop("_recs")
        if any(flt.match(r) for r in recs_of):
            rows.append(row)
    return rows


def _public_key(config_path: Path, key_file: Path | None) -> Any:
    """The key checkpoints are checked with: ``--key FILE``, else the gateway's own."""
    from gatewayd import config as config_mod
    from gatewayd.audit import AuditError, audit_key_path, load_public_key, public_key_file

    try:
        if key_file is not None:
            return load_public_key(key_file)
        cfg = config_mod.load(config_path)
        key_path = audit_key_path(cfg)
        for pub in (public_key_file(key_path), public_key_file(cfg.audit.path)):
            if os.access(pub, os.R_OK):
                return load_public_key(pub)
        return load_public_key(key_path)
    except GatewayError as exc:
        if isinstance(exc, AuditError) and key_file is None:
            raise click.ClickException(
                f"{exc}; give the gateway's public key with --key FILE (`gw audit key` on it)"
            ) from exc
        raise click.ClickException(str(exc)) from exc


@audit.command("verify")
@click.option("--config", "config_path", type=click.Path(path_type=Path))
@click.option(
    "--key",
    "key_files",
    type=click.Path(path_type=Path),
    multiple=True,
    help="The gateway's public key (as `gw audit key` prints it, or PEM): verify elsewhere. "
    "Repeat for a trail signed by an older key too.",
)
@click.option("--path", "log_path", type=click.Path(path_type=Path), help="The trail's live file.")
@_trail_option
@click.pass_obj
def verify_cmd(
    parent: Path | None,
    /,
    config_path: Path | None,
    key_files: tuple[Path, ...],
    log_path: Path | None,
    trails: tuple[Path, ...],
) -> None:
    """Check the hash chain and every signed checkpoint: finds edits, deletions,
    insertions, reordering, truncation and a whole trail rewritten without the key.

    With several nodes' trails (--trail), each node's chain is checked on its own and
    reported on its own; --key NODE=FILE gives the key of one node."""
    from gatewayd.audit import verify

    path_cfg = config_path or parent
    trails = (*click.get_current_context().meta.get(_TRAILS, ()), *trails)
    if trails:
        if log_path is not None:
            trails = (log_path, *trails)
        sys.exit(_verify_trails(path_cfg, trails, key_files))
    if path_cfg is None and (log_path is None or not key_files):
        from gatewayd.config import default_path

        path_cfg = default_path()  # else --path LOG --key FILE on another host
    if log_path is not None:
        path = log_path
    else:
        assert path_cfg is not None
        path = _path(path_cfg)
    if key_files:
        keys = [_public_key_only(f) for f in key_files]
    else:
        assert path_cfg is not None
        keys = [_public_key(path_cfg, None)]
    if not _report(verify(path, keys), ""):
        sys.exit(1)


def _report(result: Any, label: str, *, node: bool = False) -> bool:
    """Print one trail's verification (each line after ``label``); True if it is intact.
    ``node``: one trail of several, whose checkpoint places the node's block already says."""
    for done in result.acknowledged:
        click.echo(f"{label}acknowledged: {printable(str(done))}")
    cp = result.last_checkpoint
    if cp is not None:
        where = "" if node else f" ({printable(cp.where)})"
        click.echo(
            f"{label}last verified checkpoint: seq {cp.seq} at {cp.ts}{where}; "
            f"{result.checkpoints} checkpoints verified, {result.unsigned} records after it"
        )
    if result.ok:
        start = f" from seq {result.first_seq}" if result.first_seq > 1 else ""
        click.echo(f"{label}ok: {result.records} records{start}, chain intact")
        return True
    for problem in result.problems:
        click.echo(f"{label}FAIL: {printable(problem)}", err=True)
    if any(p.gap for p in result.open):
        click.echo(
            f"{label}a gap or re-anchor may be acknowledged, once looked into, with "
            "`gw audit acknowledge --seq N --reason TEXT`"
            + (" against that node's config" if node else ""),
            err=True,
        )
    return False


def _verify_trails(
    config_path: Path | None, given: tuple[Path, ...], key_files: tuple[Path, ...]
) -> int:
    """Verify each trail on its own; print one block per node; 0 if every one is intact.

    Keys: ``--key NODE=FILE`` for that node's trail only; a plain ``--key FILE`` for any
    trail; otherwise the key the config names for its own trail and the public key
    gatewayd keeps beside each trail (``<trail>.pub``)."""
    from gatewayd.audit import public_key_file, verify

    for_node: dict[str, list[Any]] = {}
    for_any: list[Any] = []
    for entry in key_files:
        node, sep, file = str(entry).partition("=")
        if sep and node and "/" not in node and _valid_node(node):
            for_node.setdefault(node, []).append(_public_key_only(Path(file)))
        else:
            for_any.append(_public_key_only(entry))
    paths = trails_of(config_path, given)
    config_trail = _path(config_path) if config_path is not None else None
    failed = 0
    for path in paths:
        node = node_of(path)
        label = f"node {printable(node)} ({path})"
        keys = for_node.get(node, []) + for_any
        if not keys:
            if config_trail is not None and path == config_trail:
                assert config_path is not None
                keys = [_public_key(config_path, None)]
            elif public_key_file(path).exists():
                keys = [_public_key_only(public_key_file(path))]
            else:
                click.echo(
                    f"{label}: FAIL: no key to check its checkpoints with (no "
                    f"{public_key_file(path).name} beside it): give --key {node}=FILE",
                    err=True,
                )
                failed += 1
                continue
        if not _report(verify(path, keys), f"{label}: ", node=True):
            failed += 1
    if failed:
        click.echo(f"{failed} of {len(paths)} trails failed verification", err=True)
        return 1
    click.echo(f"all {len(paths)} trails intact")
    return 0


def _valid_node(text: str) -> bool:
    from relay.message import valid_id

    return valid_id(text)


def _public_key_only(key_file: Path) -> Any:
    from gatewayd.audit import load_public_key

    try:
        return load_public_key(key_file)
    except GatewayError as exc:
        raise click.ClickException(str(exc)) from exc


@audit.command("key")
@click.option("--config", "config_path", type=click.Path(path_type=Path))
@click.pass_obj
def key_cmd(parent: Path | None, config_path: Path | None) -> None:
    """Print the public key that verifies the trail's checkpoints (keep a copy elsewhere)."""
    from gatewayd.audit import key_id, public_key_text
    from gatewayd.config import default_path

    path_cfg = default_path(config_path or parent)
    key = _public_key(path_cfg, None)
    click.echo(public_key_text(key))
    click.echo(f"key id: {key_id(key)}", err=True)


@audit.command("acknowledge")
@click.option("--config", "config_path", type=click.Path(path_type=Path))
@click.option("--seq", type=click.IntRange(min=1), required=True, help="The record verify names.")
@click.option("--reason", required=True, help="Why it is acknowledged (kept in the trail).")
@click.pass_obj
def acknowledge_cmd(parent: Path | None, config_path: Path | None, seq: int, reason: str) -> None:
    """Acknowledge a gap or re-anchor that `gw audit verify` reports, through the daemon.

    The running gatewayd writes the acknowledgement (``audit.acknowledged``, with
    your user name and the reason) into the chain itself; verify then accepts that
    one place and nothing else.
    """
    from gatewayd import config as config_mod
    from gatewayd.admin import AdminError, request

    from .common import EXIT_FAILED, EXIT_UNREACHABLE

    path_cfg = config_mod.default_path(config_path or parent)
    if not reason.strip() or not is_printable(reason) or len(reason) > 1024:
        raise click.BadParameter(
            "printable text on one line, at most 1024 characters", param_hint="--reason"
        )
    try:
        socket = config_mod.load(path_cfg).admin.socket
    except GatewayError as exc:
        fail(f"config error: {exc}", EXIT_LOCAL)
    try:
        result = run(request(socket, "audit.acknowledge", {"seq": seq, "reason": reason}))
    except AdminError as exc:
        code = EXIT_UNREACHABLE if str(exc).startswith("cannot reach") else EXIT_FAILED
        fail(str(exc), code)
    click.echo(
        f"acknowledged seq {seq} ({printable(str(result.get('problem', '')))}) "
        f"in record {result.get('record')}"
    )
