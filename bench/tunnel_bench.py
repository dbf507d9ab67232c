#!/usr/bin/env python3
"""Tunnel benchmark: gw (gatewayd + gw connect + gw agent) against haproxy and ssh -J.

Everything runs on loopback in a temporary folder and is torn down at the end (also
on Ctrl-C or an error). Run it with the Python of the venv the project is installed
in, so that ``gatewayd`` and ``gw`` are found beside it (``make bench`` does)::

    .venv/bin/python bench/tunnel_bench.py                  # 256 MiB x 5 runs, ~3 min
    .venv/bin/python bench/tunnel_bench.py --mib 1024 --agents 10000   # the issue's run
    .venv/bin/python bench/tunnel_bench.py --quick          # ~1 min, no agents
    .venv/bin/python bench/tunnel_bench.py --json > a.json  # results as JSON
    .venv/bin/python bench/tunnel_bench.py --check --baseline a.json

It prints one table, each row for gw and both references measured in the same run
(medians of runs interleaved across the tools, so that drift hits all alike), the
issue's target as a ratio to a reference or an absolute limit, and PASS or MISS:

- bulk MB/s up and down through one tunnel;
- round trip of 100 B messages, p50 and p99 (one message in flight: keystrokes);
- a new tunnel in an open session (connect to the -L port until the first echo);
- opening a session (start the client, log in, first echoed byte);
- CPU seconds per GB of every process on the path, and of this benchmark's sending or
  receiving thread (the TLS client itself for haproxy, which has no client process);
- gatewayd's RSS idle after start and its peak during the bulk runs;
- idle agents one gatewayd holds, from ``bench/agents_scale.py --agents N --json``.

``--check`` exits 1 when gw misses a target; ``--baseline FILE`` (an earlier ``--json``)
exits 1 when a ratio to a reference got worse by more than ``--tolerance``: a
regression check that needs no fixed figures, only the references of the same run.
A slow reader (1 MiB/s) also checks that nobody buffers what the client does not read.

The paths:

- gw:      client -> gw connect (Noise + TLS) -> gatewayd (TLS splice) -> gw agent -> target
- ssh -J:  client -> ssh (two SSH layers) -> jump sshd -> target sshd -> target
- haproxy: python TLS client -> haproxy (TLS -> TLS) -> haproxy (TLS terminator) -> target
  (a relay without an end-to-end layer).

Needs root for sshd (``/run/sshd``). A reference whose binary is missing is skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp

MIB = 1 << 20
CHUNK = MIB
PASSWORD = "bench-password"
PAYLOAD = os.urandom(CHUNK)
CLK_TCK = os.sysconf("SC_CLK_TCK")
TOOLS = ("gw", "haproxy", "ssh")
#: The role of this process's sending or receiving thread in the CPU figures.
LOAD = "load generator"
#: Size of the round-trip probe's messages, and how many go unmeasured first.
PING_SIZE = 100
PING_WARMUP = 50
#: Idle agents one gatewayd must hold (the issue's target).
AGENTS_TARGET = 10_000


class BenchError(Exception):
    """Something the benchmark needs did not work; the message says what."""


# -- target service -----------------------------------------------------------------------
#
# One TCP port, one command per connection: a 9-byte header, kind (1 byte) and a
# 64-bit count.
#
#   U n: reply b"R", read n bytes, reply b"K" + count (upload; the timer stops at K)
#   D n: reply b"R", wait for b"G", write n bytes as fast as the socket takes them
#   E 0: echo everything until EOF (tunnel open time: the first echoed byte)


@dataclass
class Download:
    sent: int = 0
    done: bool = False


class Target:
    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port: int = self.sock.getsockname()[1]
        self.downloads: list[Download] = []
        self.errors: list[str] = []
        self._stop = False
        threading.Thread(target=self._accept, name="target", daemon=True).start()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            header = conn.recv(9, socket.MSG_WAITALL)
            if not header:  # a readiness probe (ssh -L forwards it): nothing to do
                return
            if len(header) < 9:
                raise BenchError(f"short header {header!r}")
            kind, n = header[:1], int.from_bytes(header[1:], "big")
            if kind == b"U":
                conn.sendall(b"R")
                got, buf = 0, bytearray(CHUNK)
                while got < n:
                    k = conn.recv_into(buf, min(CHUNK, n - got))
                    if not k:
                        break
                    got += k
                conn.sendall(b"K" + got.to_bytes(8, "big"))
            elif kind == b"D":
                d = Download()
                self.downloads.append(d)
                conn.sendall(b"R")
                if recv_exact(conn, 1) != b"G":
                    raise BenchError("download: expected G")
                view = memoryview(PAYLOAD)
                try:
                    while d.sent < n:
                        d.sent += conn.send(view[: min(CHUNK, n - d.sent)])
                finally:
                    d.done = True
            elif kind == b"E":
                while data := conn.recv(65536):
                    conn.sendall(data)
            else:
                raise BenchError(f"unknown command {kind!r}")
            conn.settimeout(30)
            while conn.recv(65536):  # wait for the client to close
                pass
        except (OSError, BenchError) as exc:
            if not isinstance(exc, ConnectionResetError | BrokenPipeError | TimeoutError):
                self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise BenchError(f"connection closed after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


# -- processes -------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := proc_stat(int(entry))) is not None:
            out.setdefault(int(st[1]), []).append(int(entry))
    return out


def tree(*roots: int) -> list[int]:
    """The roots and all their living descendants."""
    kids = children_map()
    seen: list[int] = []
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in seen and Path(f"/proc/{pid}").exists():
            seen.append(pid)
            stack.extend(kids.get(pid, []))
    return seen


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        if (st := proc_stat(pid)) is not None:
            total += int(st[11]) + int(st[12])
    return total / CLK_TCK


def status_kib(pid: int, key: str = "VmRSS") -> int:
    """VmRSS, VmHWM, ... of a process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mib(pids: list[int], key: str = "VmRSS") -> float:
    return sum(status_kib(p, key) for p in pids) / 1024


class Procs:
    """Every process the benchmark starts, each in its own session, stopped at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.items: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.env = dict(os.environ, XDG_CONFIG_HOME=str(logdir.parent / "xdg"))

    def log(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def start(
        self, name: str, argv: list[str], stdin: bytes | None = None
    ) -> subprocess.Popen[bytes]:
        with open(self.log(name), "ab") as logf:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        self.items.append((name, p))
        if stdin is not None:
            assert p.stdin is not None
            p.stdin.write(stdin)
            p.stdin.close()
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        """SIGTERM the process, its group and its descendants (sshd's sessions); then KILL."""
        pids = tree(p.pid) if p.poll() is None else []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.items = [(n, q) for n, q in self.items if q is not p]

    def stop_all(self) -> None:
        for _, p in reversed(list(self.items)):
            # gatewayd drains open tunnels for up to 10 s; its peers are stopped first.
            self.stop(p, timeout=12.0)

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float = 60) -> str:
        """A short command; its stdout, or BenchError with its stderr."""
        r = subprocess.run(
            argv, input=stdin, capture_output=True, timeout=timeout, env=self.env, check=False
        )
        if r.returncode != 0:
            raise BenchError(
                f"{' '.join(argv[:4])}... exited {r.returncode}: {r.stderr.decode()[-800:]}"
            )
        return r.stdout.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    procs: Sequence[subprocess.Popen[bytes]] = (),
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for p in procs:
            if p.poll() is not None:
                raise BenchError(f"{what}: the process exited with {p.returncode}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.01)


def can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def log_has(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(errors="replace")
    except OSError:
        return False


# -- measurements -------------------------------------------------------------------------


@dataclass
class Path_:
    """One way from the client to the target: a local port, maybe with TLS on it."""

    tool: str
    port: int
    tls: ssl.SSLContext | None = None
    #: the tool's processes by role (relay, client, far end), for CPU and memory
    roles: dict[str, Callable[[], list[int]]] = field(default_factory=dict)

    def pids(self) -> dict[str, list[int]]:
        return {role: f() for role, f in self.roles.items()}

    def connect(self, timeout: float = 60.0) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            s = self.tls.wrap_socket(s)
        return s


class Sampler:
    """Samples the RSS of the processes of the transfer under way, every 50 ms."""

    def __init__(self) -> None:
        self.peak: dict[str, float] = {}
        self._groups: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="sampler", daemon=True).start()

    @contextlib.contextmanager
    def watch(self, tool: str, groups: dict[str, list[int]]) -> Iterator[None]:
        with self._lock:
            self._groups = {f"{tool}.{role}": pids for role, pids in groups.items()}
        self._sample()
        try:
            yield
        finally:
            self._sample()
            with self._lock:
                self._groups = {}

    def _sample(self) -> None:
        with self._lock:
            for key, pids in self._groups.items():
                self.peak[key] = max(self.peak.get(key, 0.0), rss_mib(pids))

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def close(self) -> None:
        self._stop.set()


@dataclass
class Transfer:
    seconds: float
    cpu: dict[str, float]  # CPU seconds by role


class Meter:
    """CPU seconds of each role of a path across a transfer, and its RSS meanwhile."""

    def __init__(self, path: Path_, sampler: Sampler | None) -> None:
        self.path, self.sampler = path, sampler
        self.groups = path.pids()
        self.watch = sampler.watch(path.tool, self.groups) if sampler else contextlib.nullcontext()

    def __enter__(self) -> Meter:
        self.watch.__enter__()
        self.cpu0 = {role: cpu_seconds(pids) for role, pids in self.groups.items()}
        self.load0 = time.thread_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu = {r: cpu_seconds(pids) - self.cpu0[r] for r, pids in self.groups.items()}
        # This thread is the application at the client end: plain TCP for gw and ssh,
        # the TLS client itself for haproxy (which has no client process of its own).
        self.cpu[LOAD] = time.thread_time() - self.load0
        self.watch.__exit__(None, None, None)

    def result(self) -> Transfer:
        return Transfer(self.seconds, self.cpu)


def upload(path: Path_, n: int, sampler: Sampler | None = None) -> Transfer:
    with path.connect() as s:
        s.sendall(b"U" + n.to_bytes(8, "big"))
        if recv_exact(s, 1) != b"R":
            raise BenchError("upload: no R")
        with Meter(path, sampler) as meter:
            view, left = memoryview(PAYLOAD), n
            while left:
                k = min(left, CHUNK)
                s.sendall(view[:k])
                left -= k
            ack = recv_exact(s, 9)
    if ack[:1] != b"K" or int.from_bytes(ack[1:], "big") != n:
        raise BenchError(f"upload: target acknowledged {ack!r}, expected {n} bytes")
    return meter.result()


def download(path: Path_, n: int, sampler: Sampler | None = None) -> Transfer:
    with path.connect() as s:
        s.sendall(b"D" + n.to_bytes(8, "big"))
        if recv_exact(s, 1) != b"R":
            raise BenchError("download: no R")
        with Meter(path, sampler) as meter:
            s.sendall(b"G")
            got, buf = 0, bytearray(CHUNK)
            while got < n:
                k = s.recv_into(buf, min(CHUNK, n - got))
                if not k:
                    raise BenchError(f"download: closed after {got} of {n} bytes")
                got += k
    return meter.result()


def echo_once(path: Path_) -> float:
    """Connect until the first echoed byte, in seconds."""
    t0 = time.perf_counter()
    with path.connect(timeout=15) as s:
        s.sendall(b"E" + bytes(8) + b"x")
        if s.recv(1) != b"x":
            raise BenchError(f"{path.tool}: echo did not come back")
        return time.perf_counter() - t0


def round_trips(path: Path_, count: int) -> list[float]:
    """Ping-pong ``PING_SIZE`` bytes through the echo service; each round trip in us.

    One tunnel, one message in flight at a time: the latency an interactive session
    (a keystroke, its screen update) sees through each hop and both end points.
    """
    msg = PAYLOAD[:PING_SIZE]
    buf = bytearray(PING_SIZE)
    view = memoryview(buf)
    times: list[float] = []
    with path.connect(timeout=15) as s:
        s.sendall(b"E" + bytes(8))
        for i in range(PING_WARMUP + count):
            t0 = time.perf_counter_ns()
            s.sendall(msg)
            got = 0
            while got < PING_SIZE:
                k = s.recv_into(view[got:], PING_SIZE - got)
                if not k:
                    raise BenchError(f"{path.tool}: echo closed during the round-trip probe")
                got += k
            if i >= PING_WARMUP:
                times.append((time.perf_counter_ns() - t0) / 1000)
    if buf != msg:
        raise BenchError(f"{path.tool}: the round-trip probe's echo differs")
    return times


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def first_echo_from_start(
    start: Callable[[str, int], subprocess.Popen[bytes]], name: str, port: int
) -> tuple[float, float]:
    """Start a client process; (seconds until its port accepts, until the first echoed byte)."""
    t0 = time.perf_counter()
    p = start(name, port)
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=15)
            break
        except ConnectionRefusedError:
            if p.poll() is not None:
                raise BenchError(f"client exited with {p.returncode} before listening") from None
            if time.perf_counter() - t0 > 30:
                raise BenchError("client not listening after 30 s") from None
            time.sleep(0.002)
    listening = time.perf_counter() - t0
    with s:
        s.sendall(b"E" + bytes(8) + b"x")
        if s.recv(1) != b"x":
            raise BenchError("echo did not come back")
    return listening, time.perf_counter() - t0


def slow_read(path: Path_, target: Target, seconds: float, rate: float) -> dict[str, Any]:
    """Read a never-ending download at ``rate`` B/s; watch every role's memory."""
    groups = path.pids()
    with path.connect() as s:
        s.sendall(b"D" + (1 << 50).to_bytes(8, "big"))
        if recv_exact(s, 1) != b"R":
            raise BenchError("slow read: no R")
        d = target.downloads[-1]
        base = {r: rss_mib(pids) for r, pids in groups.items()}
        peak = dict(base)
        s.sendall(b"G")
        s.settimeout(0.05)
        t0 = time.monotonic()
        read, buf, next_sample, mid = 0, bytearray(64 * 1024), t0, 0.0
        while (now := time.monotonic()) - t0 < seconds:
            allowed = int(rate * (now - t0)) - read
            if allowed > 0:
                with contextlib.suppress(TimeoutError):
                    read += s.recv_into(buf, min(allowed, len(buf)))
            else:
                time.sleep(0.01)
            if now >= next_sample:
                next_sample = now + 0.1
                for r, pids in groups.items():
                    peak[r] = max(peak[r], rss_mib(pids))
                if not mid and now - t0 >= seconds / 2:
                    mid = (d.sent - read) / MIB
        for r, pids in groups.items():
            peak[r] = max(peak[r], rss_mib(pids))
        inflight = (d.sent - read) / MIB
    # Let the teardown reach the target before the next test.
    deadline = time.monotonic() + 10
    while not d.done and time.monotonic() < deadline:
        time.sleep(0.02)
    return {
        "seconds": seconds,
        "read_mib": read / MIB,
        "target_wrote_mib": d.sent / MIB,
        "inflight_mib_mid": mid,
        "inflight_mib_end": inflight,
        "rss_start_mib": base,
        "rss_max_mib": peak,
        "rss_growth_mib": {r: peak[r] - base[r] for r in groups},
    }


def tls_handshake_ms(port: int, count: int) -> float:
    """Median TCP connect + TLS 1.3 handshake from this Python process, without verification."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)):
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def audit_commit_ms(folder: Path, count: int) -> dict[str, float]:
    """What gatewayd's audit does before each tunnel starts: fsync, then replace a head file."""
    log, head = folder / "probe.jsonl", folder / "probe.head"
    head.write_text("{}")
    fsyncs, renames = [], []
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for i in range(count):
            os.write(fd, b"x" * 300 + b"\n")
            t0 = time.perf_counter()
            os.fsync(fd)
            t1 = time.perf_counter()
            tmp = folder / "probe.head.tmp"
            tmp.write_text(json.dumps({"seq": i, "hash": "0" * 64}))
            os.replace(tmp, head)
            renames.append((time.perf_counter() - t1) * 1000)
            fsyncs.append((t1 - t0) * 1000)
    finally:
        os.close(fd)
    return {"fsync_ms": statistics.median(fsyncs), "head_replace_ms": statistics.median(renames)}


# -- the setups -----------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.size = args.mib * MIB
        self.dir = Path(tempfile.mkdtemp(prefix="tunnel-bench-"))
        (self.dir / "logs").mkdir()
        self.procs = Procs(self.dir / "logs")
        self.target = Target()
        self.paths: dict[str, Path_] = {}
        self.notes: list[str] = []
        self.started = time.monotonic()
        bindir = Path(sys.executable).parent
        self.gatewayd = str(bindir / "gatewayd") if (bindir / "gatewayd").exists() else "gatewayd"
        self.gw = str(bindir / "gw") if (bindir / "gw").exists() else "gw"
        self.users: list[tuple[str, str]] = []  # (user, totp secret), one login each

    def say(self, text: str) -> None:
        if not self.args.json:
            print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def cleanup(self) -> None:
        self.procs.stop_all()
        self.target.close()
        if self.args.keep:
            print(f"kept {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    # gw ----------------------------------------------------------------------------------

    def setup_references(self) -> None:
        if shutil.which("ssh") and os.path.exists("/usr/sbin/sshd"):
            self.setup_ssh()
        else:
            self.notes.append("ssh or /usr/sbin/sshd missing: ssh -J skipped")
        if shutil.which("haproxy"):
            self.setup_haproxy()
        else:
            self.notes.append("haproxy missing: haproxy skipped")

    def init_gw(self) -> None:
        d = self.dir
        self.gw_port = free_port()
        self.procs.run(
            [self.gatewayd, "init", "--dir", str(d / "gw"), "--listen", f"127.0.0.1:{self.gw_port}"]
        )
        self.config = d / "gw" / "gatewayd.toml"
        self.ca = d / "gw" / "tls" / "ca.pem"

    def setup_gw(self, logins: int) -> None:
        d = self.dir
        self.gatewayd_p = self.procs.start(
            "gatewayd", [self.gatewayd, "--config", str(self.config)]
        )
        sock_path = str(d / "gw" / "admin.sock")

        def admin_up() -> bool:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock_path)
            except OSError:
                return False
            return True

        wait_for("gatewayd", admin_up, 30, [self.gatewayd_p])
        admin = [self.gw, "admin", "--config", str(self.config)]
        self.procs.run([*admin, "status"])
        self.procs.run([*admin, "org", "add", "clinic", "--name", "Clinic"])
        self.procs.run([*admin, "vendor", "add", "acme", "--name", "Acme"])
        agreement = self.procs.run(
            [
                *admin,
                "agreement",
                "add",
                "--vendor",
                "acme",
                "--org",
                "clinic",
                "--modes",
                "access",
                "--unattended",
            ]
        )
        for side in ("vendor", "org"):
            self.procs.run([*admin, "agreement", "accept", agreement.strip(), "--side", side])

        def add_user(user: str) -> tuple[str, str]:
            self.procs.run(
                [*admin, "user", "add", user, "--vendor", "acme", "--password-stdin"],
                stdin=f"{PASSWORD}\n".encode(),
            )
            out = self.procs.run([*admin, "totp", "enroll", user, "--json"])
            return user, json.loads(out)["secret"]

        # One user per login: a TOTP code is good for one login per user.
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            self.users = list(pool.map(add_user, [f"bench{i}" for i in range(logins)]))
        token = self.procs.run([*admin, "agent", "add", "pc1", "--org", "clinic"]).strip()
        self.procs.run(
            [
                self.gw,
                "agent",
                "enroll",
                "--gateway",
                f"127.0.0.1:{self.gw_port}",
                "--ca-file",
                str(self.ca),
                "--token",
                token,
                "--state-dir",
                str(d / "agent"),
            ]
        )
        self.agent_p = self.procs.start(
            "agent",
            [
                self.gw,
                "agent",
                "run",
                "--state-dir",
                str(d / "agent"),
                "--target",
                f"sink=127.0.0.1:{self.target.port}",
            ],
        )
        wait_for(
            "gw agent", lambda: log_has(self.procs.log("agent"), "connected"), 30, [self.agent_p]
        )
        self.gw_lport = free_port()
        self.connect_p = self.gw_connect("connect", self.gw_lport, verbose=False)
        wait_for(
            "gw connect",
            lambda: log_has(self.procs.log("connect"), "gw: listening on"),
            60,
            [self.connect_p],
        )
        gatewayd, connect, agent = self.gatewayd_p.pid, self.connect_p.pid, self.agent_p.pid
        self.paths["gw"] = Path_(
            "gw",
            self.gw_lport,
            roles={
                "relay": lambda: [gatewayd],
                "client": lambda: [connect],
                "far end": lambda: [agent],
            },
        )

    def gw_connect(self, name: str, lport: int, verbose: bool = True) -> subprocess.Popen[bytes]:
        user, secret = self.users.pop(0)
        argv = [
            self.gw, "connect", "pc1", "--reason", "benchmark",
            "--gateway", f"127.0.0.1:{self.gw_port}",
            "--ca-file", str(self.ca), "--user", user, "--target", "sink", "--mode", "access",
            "-L", f"127.0.0.1:{lport}", "--password-stdin", "--totp", pyotp.TOTP(secret).now(),
            "--known-agents", str(self.dir / "known.json"), "--identity", str(self.dir / "id.key"),
        ]  # fmt: skip
        if verbose:
            argv.append("-v")
        return self.procs.start(name, argv, stdin=f"{PASSWORD}\n".encode())

    # ssh ---------------------------------------------------------------------------------

    def setup_ssh(self) -> None:
        d = self.dir / "ssh"
        d.mkdir()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        key = d / "id_ed25519"
        self.procs.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        self.procs.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")])
        shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
        self.sshd_p: dict[str, subprocess.Popen[bytes]] = {}
        self.sshd_port: dict[str, int] = {}
        # Two sshd: the jump host and the target host, so that each one's CPU is its own.
        for role in ("jump", "target"):
            port = free_port()
            cfg = d / f"sshd_{role}.conf"
            cfg.write_text(
                f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
                "PidFile none\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
                f"PubkeyAuthentication yes\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "AllowTcpForwarding yes\nUseDNS no\nLogLevel ERROR\n"
            )
            self.sshd_p[role] = self.procs.start(
                f"sshd-{role}", ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)]
            )
            self.sshd_port[role] = port
        for role, p in self.sshd_p.items():
            wait_for(f"sshd {role}", lambda port=self.sshd_port[role]: can_connect(port), 15, [p])
        self.ssh_cfg = d / "ssh_config"
        self.ssh_cfg.write_text(
            f"Host *\n  IdentityFile {key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n"
            "  ExitOnForwardFailure yes\n"
        )
        self.ssh_lport = free_port()
        self.ssh_main = self.ssh_start("ssh", self.ssh_lport)
        wait_for("ssh -J", lambda: can_connect(self.ssh_lport), 30, [self.ssh_main])
        main, jump, tgt = self.ssh_main.pid, self.sshd_p["jump"].pid, self.sshd_p["target"].pid
        self.paths["ssh"] = Path_(
            "ssh",
            self.ssh_lport,
            roles={
                "relay": lambda: tree(jump),
                "client": lambda: tree(main),
                "far end": lambda: tree(tgt),
            },
        )
        # Which cipher the two layers negotiate (a separate, verbose login).
        out = subprocess.run(
            [*self.ssh_argv(None), "-v", "true"], capture_output=True, timeout=30, check=False
        ).stderr.decode(errors="replace")
        ciphers = sorted(set(re.findall(r"kex: server->client cipher: (\S+)", out)))
        self.ssh_cipher = ",".join(ciphers) or "?"

    def ssh_argv(self, lport: int | None) -> list[str]:
        argv = [
            "ssh", "-F", str(self.ssh_cfg),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-i", str(self.dir / "ssh" / "id_ed25519"),
            "-J", f"root@127.0.0.1:{self.sshd_port['jump']}",
            "-p", str(self.sshd_port["target"]),
        ]  # fmt: skip
        if lport is not None:
            argv += ["-N", "-L", f"{lport}:127.0.0.1:{self.target.port}"]
        return [*argv, "root@127.0.0.1"]

    def ssh_start(self, name: str, lport: int) -> subprocess.Popen[bytes]:
        return self.procs.start(name, self.ssh_argv(lport))

    # haproxy -----------------------------------------------------------------------------

    def setup_haproxy(self) -> None:
        d = self.dir / "haproxy"
        d.mkdir()
        tls = self.dir / "gw" / "tls"
        pem = d / "server.pem"  # gatewayd's server certificate and key, as haproxy wants them
        pem.write_bytes((tls / "server.pem").read_bytes() + (tls / "server.key").read_bytes())
        relay_port, term_port = free_port(), free_port()
        common = (
            "global\n  maxconn 1000\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n"
            "  timeout server 120s\n"
        )
        (d / "relay.cfg").write_text(
            common + f"frontend fe\n  bind 127.0.0.1:{relay_port} ssl crt {pem}\n"
            f"  default_backend be\nbackend be\n  server s 127.0.0.1:{term_port} ssl verify none\n"
        )
        (d / "term.cfg").write_text(
            common + f"frontend fe\n  bind 127.0.0.1:{term_port} ssl crt {pem}\n"
            f"  default_backend be\nbackend be\n  server s 127.0.0.1:{self.target.port}\n"
        )
        self.hap_term = self.procs.start(
            "haproxy-term", ["haproxy", "-db", "-f", str(d / "term.cfg")]
        )
        self.hap_relay = self.procs.start(
            "haproxy-relay", ["haproxy", "-db", "-f", str(d / "relay.cfg")]
        )
        wait_for("haproxy", lambda: can_connect(term_port), 15, [self.hap_term])
        wait_for("haproxy", lambda: can_connect(relay_port), 15, [self.hap_relay])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        relay, term = self.hap_relay.pid, self.hap_term.pid
        self.paths["haproxy"] = Path_(
            "haproxy",
            relay_port,
            tls=ctx,
            roles={"relay": lambda: [relay], "far end": lambda: [term]},
        )

    # the run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        a = self.args
        res: dict[str, Any] = {"machine": machine(), "versions": versions()}
        res["params"] = {
            "mib": a.mib, "runs": a.runs, "reconnects": a.reconnects, "full_opens": a.full_opens,
            "slow_seconds": a.slow_seconds, "slow_rate_mib_s": 1, "quick": a.quick,
            "budget_s": a.budget, "pings": a.pings, "agents": a.agents,
        }  # fmt: skip
        self.say(f"temp dir {self.dir}; target port {self.target.port}")
        self.say("setting up gatewayd, agent, gw connect; two sshd, ssh -J; two haproxy")
        self.init_gw()
        # The references start meanwhile (haproxy borrows gatewayd's server certificate).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            refs = pool.submit(self.setup_references)
            self.setup_gw(logins=1 + a.full_opens)
            refs.result()
        if "ssh" in self.paths:
            res["versions"]["ssh_cipher"] = self.ssh_cipher
        tools = [t for t in TOOLS if t in self.paths]
        paths = self.paths
        mem: dict[str, Any] = {
            "idle_rss_mib": {
                t: {r: rss_mib(pids) for r, pids in paths[t].pids().items()} for t in tools
            }
        }
        for t in tools:  # warm-up: first tunnels, caches, TCP autotuning
            upload(paths[t], 4 * MIB)
            download(paths[t], 4 * MIB)

        # 1. throughput; runs interleaved across tools, so that drift hits all alike
        self.say(f"throughput: {a.runs} runs x {a.mib} MiB each way, per tool")
        sampler = Sampler()
        samples: dict[str, dict[str, list[Transfer]]] = {t: {"up": [], "down": []} for t in tools}
        for run in range(a.runs):
            if run >= 3 and time.monotonic() - self.started > a.budget * 0.6:
                self.notes.append(f"time budget: throughput stopped after {run} runs")
                break
            for t in tools:
                for direction, fn in (("up", upload), ("down", download)):
                    tr = fn(paths[t], self.size, sampler)
                    samples[t][direction].append(tr)
                    self.say(
                        f"  run {run + 1} {t:8} {direction:4} "
                        f"{self.size / tr.seconds / 1e6:7.1f} MB/s  "
                        f"cpu {sum(tr.cpu.values()):.2f} s"
                    )
        sampler.close()
        thr: dict[str, Any] = {}
        for t in tools:
            thr[t] = {}
            for direction in ("up", "down"):
                rates = [self.size / x.seconds / 1e6 for x in samples[t][direction]]
                thr[t][direction] = {"mb_s": statistics.median(rates), "samples_mb_s": rates}
            every = samples[t]["up"] + samples[t]["down"]
            gb = len(every) * self.size / 1e9
            per_role = {r: sum(x.cpu[r] for x in every) / gb for r in every[0].cpu}
            thr[t]["cpu_s_per_gb"] = {"all": sum(per_role.values()), **per_role}
        res["throughput"] = thr
        mem["peak_rss_during_throughput_mib"] = {
            t: {r: sampler.peak.get(f"{t}.{r}") for r in paths[t].roles} for t in tools
        }

        # 1b. round trips of small messages (keystrokes, screen updates), runs interleaved
        self.say(f"round trip {PING_SIZE} B: {a.runs} runs x {a.pings} per tool")
        pings: dict[str, list[list[float]]] = {t: [] for t in tools}
        for _ in range(a.runs):
            for t in tools:
                pings[t].append(round_trips(paths[t], a.pings))
        res["round_trip_us"] = {
            t: {
                "p50": statistics.median(percentile(r, 0.50) for r in runs),
                "p99": statistics.median(percentile(r, 0.99) for r in runs),
                "runs_p50": [percentile(r, 0.50) for r in runs],
                "runs_p99": [percentile(r, 0.99) for r in runs],
            }
            for t, runs in pings.items()
        }

        # 2b. a new tunnel in an established session (what an RDP reconnect costs)
        self.say(f"tunnel open in a session: {a.reconnects} per tool")
        reconn: dict[str, list[float]] = {t: [] for t in tools}
        for _ in range(a.reconnects):
            for t in tools:
                reconn[t].append(echo_once(paths[t]) * 1000)
                time.sleep(0.02)
        res["reconnect_ms"] = {
            t: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
            for t, v in reconn.items()
        }

        # 2a. full open: start the client, log in, first echoed byte
        self.say(f"full tunnel open: {a.full_opens} per tool (gw: password + TOTP)")
        full: dict[str, dict[str, list[float]]] = {
            t: {"listening_ms": [], "first_byte_ms": [], "session_ms": []}
            for t in tools
            if t != "haproxy"
        }
        for i in range(a.full_opens):
            for t in full:
                lport, name = free_port(), f"{t}-open{i}"
                start = self.gw_connect if t == "gw" else self.ssh_start
                listening, first = first_echo_from_start(start, name, lport)
                full[t]["listening_ms"].append(listening * 1000)
                full[t]["first_byte_ms"].append(first * 1000)
                if t == "gw":
                    m = re.search(r"open in ([\d.]+)s", self.procs.log(name).read_text())
                    if m:
                        full[t]["session_ms"].append(float(m.group(1)) * 1000)
                for pname, p in list(self.procs.items):
                    if pname == name:
                        self.procs.stop(p)
        res["full_open_ms"] = {
            t: {k: {"median": statistics.median(v), "samples": v} for k, v in d.items() if v}
            for t, d in full.items()
        }

        # 4. slow reader: nobody may buffer what the client does not read
        self.say(f"slow reader: 1 MiB/s for {a.slow_seconds:g} s per tool")
        res["slow_reader"] = {
            t: slow_read(paths[t], self.target, a.slow_seconds, MIB) for t in tools
        }
        mem["vmhwm_at_end_mib"] = {
            t: {r: rss_mib(pids, "VmHWM") for r, pids in paths[t].pids().items()} for t in tools
        }
        res["memory"] = mem
        echo_once(paths["gw"])  # the main gw session still works after all this
        # context for the open times: what a TLS handshake and an audit commit cost here
        res["probes"] = {
            "tls_handshake_ms": {
                t: tls_handshake_ms(p.port if t == "haproxy" else self.gw_port, 10)
                for t, p in paths.items()
                if t != "ssh"
            },
            "audit_commit": audit_commit_ms(self.dir, 20),
        }
        res["agents"] = self.agents_scale()
        res["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        res["seconds"] = round(time.monotonic() - self.started, 1)
        res["target_errors"] = self.target.errors[:10]
        res["log_findings"] = self.log_findings()
        res["notes"] = self.notes
        return res

    def agents_scale(self) -> dict[str, Any] | None:
        """``bench/agents_scale.py --agents N --json`` (idle agents one gatewayd holds)."""
        script = Path(__file__).with_name("agents_scale.py")
        if self.args.agents <= 0:
            return None
        if not script.exists():
            self.notes.append("bench/agents_scale.py missing: idle agents not measured")
            return None
        self.say(f"idle agents: bench/agents_scale.py --agents {self.args.agents}")
        argv = [sys.executable, str(script), "--agents", str(self.args.agents), "--json"]
        try:
            r = subprocess.run(
                argv, capture_output=True, timeout=self.args.agents_timeout, check=False
            )
            out: dict[str, Any] = json.loads(r.stdout.decode())
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self.notes.append(f"agents_scale.py failed: {exc}")
            return None
        if r.returncode != 0:
            tail = r.stderr.decode(errors="replace").strip().splitlines()[-1:]
            self.notes.append(f"agents_scale.py exited {r.returncode}: {' '.join(tail)}")
        return out

    def log_findings(self) -> dict[str, list[str]]:
        """Lines in the product's logs that look like trouble, and the audit events."""
        out: dict[str, list[str]] = {}
        bad = re.compile(r"error|warn|traceback|exception|fail|refused|reject|fatal", re.I)
        for log in sorted(self.procs.logdir.glob("*.log")):
            if not log.stem.startswith(("gatewayd", "agent", "connect", "gw-")):
                continue
            lines = [x for x in log.read_text(errors="replace").splitlines() if bad.search(x)]
            if lines:
                out[log.stem] = [f"{len(lines)} such lines; first: {lines[0][:300]}"]
                out[log.stem] += [x[:300] for x in lines[1:3]]
        events: dict[str, int] = {}
        for f in sorted((self.dir / "gw" / "audit").glob("*.jsonl")):
            for line in f.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    ev = json.loads(line).get("event", "?")
                    events[ev] = events.get(ev, 0) + 1
        out["audit events"] = [json.dumps(events, sort_keys=True)]
        return out


# -- machine, versions, report ------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = status_like("/proc/meminfo", "MemTotal")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_total_mib": round(mem / 1024) if mem else None,
        "kernel": platform.release(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def status_like(path: str, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def versions() -> dict[str, Any]:
    def cmd(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, timeout=10, check=False)
        except OSError:
            return "missing"
        return (r.stdout or r.stderr).decode(errors="replace").splitlines()[0].strip()

    def pkg(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    return {
        "python": platform.python_version(),
        "uvloop": pkg("uvloop"),
        "cryptography": pkg("cryptography"),
        "gatewayd": pkg("gatewayd"),
        "python_openssl": ssl.OPENSSL_VERSION,
        "openssh": cmd(["ssh", "-V"]),
        "haproxy": cmd(["haproxy", "-v"]),
    }


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def get(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


@dataclass
class Row:
    """One line of the table: gw and the references, the target and whether gw meets it."""

    label: str
    values: dict[str, float | None]
    digits: int
    target: str
    ref: str | None  # the reference the target is a ratio of; None: an absolute limit
    limit: float
    higher_is_better: bool = False
    #: Shown instead of PASS/MISS when the row cannot say (measured short of the target's scale).
    unjudged: str | None = None

    def ratio(self) -> float | None:
        gw = self.values.get("gw")
        base = self.values.get(self.ref) if self.ref else None
        return None if gw is None or not base else gw / base

    def met(self) -> bool | None:
        gw = self.values.get("gw")
        if self.unjudged is not None:
            return None
        value = self.ratio() if self.ref else gw
        if value is None:
            return None
        return value >= self.limit if self.higher_is_better else value <= self.limit

    def cells(self) -> list[str]:
        ratio = self.ratio()
        met = self.met()
        return [
            self.label,
            *(fmt(self.values.get(t), self.digits) for t in TOOLS),
            self.target,
            f"{ratio:.2f}x {self.ref}" if ratio is not None else "",
            self.unjudged or ("-" if met is None else "PASS" if met else "MISS"),
        ]


def rows(res: dict[str, Any]) -> list[Row]:
    thr, rtt, rec = res["throughput"], res["round_trip_us"], res["reconnect_ms"]
    full, mem = res["full_open_ms"], res["memory"]

    def each(d: dict[str, Any], *keys: str) -> dict[str, float | None]:
        return {t: get(d, t, *keys) for t in TOOLS}

    bulk = (0, ">= 1.0x haproxy", "haproxy", 1.0, True)
    out = [
        Row("bulk upload MB/s", each(thr, "up", "mb_s"), *bulk),
        Row("bulk download MB/s", each(thr, "down", "mb_s"), *bulk),
        Row(f"round trip {PING_SIZE} B p50 us", each(rtt, "p50"), 0, "<= 0.8x ssh", "ssh", 0.8),
        Row(f"round trip {PING_SIZE} B p99 us", each(rtt, "p99"), 0, "<= 1.0x ssh", "ssh", 1.0),
        Row("new tunnel in an open session ms", each(rec, "median"), 1, "<= 2x ssh", "ssh", 2.0),
        Row(
            "open a session, start to 1st echo ms",
            {t: get(full, t, "first_byte_ms", "median") for t in TOOLS},
            0, "<= 1.0x ssh", "ssh", 1.0,
        ),
        Row(
            "CPU s per GB, whole path (1)",
            each(thr, "cpu_s_per_gb", "all"), 2, "<= 1.3x haproxy", "haproxy", 1.3,
        ),
        Row(
            "gatewayd RSS idle MiB (2)",
            {t: get(mem, "idle_rss_mib", t, "relay") for t in TOOLS}, 1, "<= 35", None, 35.0,
        ),
        Row(
            "gatewayd RSS under load MiB (2)",
            {t: get(mem, "peak_rss_during_throughput_mib", t, "relay") for t in TOOLS},
            1, "<= 45", None, 45.0,
        ),
    ]  # fmt: skip
    agents = res.get("agents") or {}
    if agents.get("agents"):
        n, per = agents["agents"], agents.get("rss_per_agent_kib")
        short = f"only {n} held" if n < AGENTS_TARGET else None
        label = f"idle agents: gatewayd KiB each, {n:,} held"
        target = f"<= 20 at {AGENTS_TARGET:,}"
        out.append(Row(label, {"gw": per}, 1, target, None, 20.0, unjudged=short))
    return out


def table(res: dict[str, Any]) -> list[str]:
    head = ["", "gw", "haproxy TLS relay", "ssh -J", "target", "gw is", ""]
    body = [r.cells() for r in rows(res)]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = []
    for r in [head, ["-" * w for w in widths], *body]:
        cells = [
            c.ljust(widths[i]) if i in (0, 4, 5) else c.rjust(widths[i]) for i, c in enumerate(r)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def misses(res: dict[str, Any]) -> list[str]:
    return [r.label for r in rows(res) if r.met() is False]


def regressions(res: dict[str, Any], base: dict[str, Any], tolerance: float) -> list[str]:
    """Rows whose gw/reference ratio is worse than in ``base`` by more than ``tolerance``."""
    before = {r.label: r for r in rows(base)}
    found = []
    for row in rows(res):
        old = before.get(row.label)
        new_r, old_r = row.ratio(), old.ratio() if old else None
        if new_r is None or old_r is None:
            continue
        worse = old_r / new_r if row.higher_is_better else new_r / old_r
        if worse > 1 + tolerance:
            found.append(f"{row.label}: {old_r:.2f}x -> {new_r:.2f}x {row.ref}")
    return found


def report(res: dict[str, Any]) -> str:
    m, v = res["machine"], res["versions"]
    p = res["params"]
    lines = [
        f"machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['mem_total_mib']} MiB, "
        f"Linux {m['kernel']}; load avg {' '.join(m['loadavg_start'])} at start, "
        f"{' '.join(m.get('loadavg_end', []))} at end",
        f"versions: python {v['python']}, uvloop {v['uvloop']}, cryptography {v['cryptography']}, "
        f"{v['python_openssl']}",
        f"          {v['openssh']} (cipher {v.get('ssh_cipher', '?')}); {v['haproxy']}",
        f"bulk: {p['mib']} MiB per transfer; round trip: {p['pings']} per run; medians of "
        f"{len(res['throughput']['gw']['up']['samples_mb_s'])} runs, interleaved; "
        f"MB = 10^6 bytes; run took {res['seconds']} s",
        "",
        *table(res),
        "",
        "(1) CPU seconds of every process on the path per GB moved, and of this benchmark's",
        "    thread at the client end: plain TCP for gw and ssh, the TLS client for haproxy",
        "    (haproxy has no client process; its relay and TLS end are counted as processes).",
        "(2) the relay process: gatewayd, the haproxy relay, the jump host's sshd.",
    ]
    thr = res["throughput"]
    for t in thr:
        cpu = thr[t]["cpu_s_per_gb"]
        lines.append(
            f"CPU s per GB {t}: " + ", ".join(f"{r} {x:.2f}" for r, x in cpu.items() if r != "all")
        )
    idle = res["memory"]["idle_rss_mib"]
    hwm = res["memory"]["vmhwm_at_end_mib"]
    for t in idle:
        lines.append(
            f"RSS {t}: idle after start "
            + ", ".join(f"{r} {x:.1f}" for r, x in idle[t].items())
            + " MiB; VmHWM at end "
            + ", ".join(f"{r} {x:.1f}" for r, x in hwm[t].items())
            + " MiB"
        )
    pr = res["probes"]
    lines.append(
        "context: TLS 1.3 connect+handshake from Python to "
        + ", ".join(f"{t} {x:.1f} ms" for t, x in pr["tls_handshake_ms"].items())
        + f"; on the temp folder's file system fsync {pr['audit_commit']['fsync_ms']:.2f} ms, "
        f"head-file replace {pr['audit_commit']['head_replace_ms']:.2f} ms (gatewayd does both "
        "before each tunnel starts)"
    )
    for t, sr in res["slow_reader"].items():
        lines.append(
            f"slow reader {t}: read {sr['read_mib']:.1f} MiB in {sr['seconds']:g} s; in flight "
            f"{sr['inflight_mib_mid']:.1f} MiB at half time, {sr['inflight_mib_end']:.1f} at the "
            "end; RSS growth "
            + ", ".join(f"{r} {x:+.1f}" for r, x in sr["rss_growth_mib"].items())
            + " MiB"
        )
    for t in thr:
        rt = res["round_trip_us"][t]
        lines.append(
            f"samples {t}: up "
            + " ".join(f"{x:.0f}" for x in thr[t]["up"]["samples_mb_s"])
            + " / down "
            + " ".join(f"{x:.0f}" for x in thr[t]["down"]["samples_mb_s"])
            + " MB/s; round trip p50 "
            + " ".join(f"{x:.0f}" for x in rt["runs_p50"])
            + " / p99 "
            + " ".join(f"{x:.0f}" for x in rt["runs_p99"])
            + " us; in-session open ms "
            + " ".join(f"{x:.1f}" for x in res["reconnect_ms"][t]["samples"])
        )
    for t, d in res["full_open_ms"].items():
        lines.append(
            f"samples {t} full open ms: "
            + " ".join(f"{x:.0f}" for x in d["first_byte_ms"]["samples"])
        )
    if res.get("agents"):
        lines.append("agents_scale: " + json.dumps(res["agents"], sort_keys=True))
    for name, found in res["log_findings"].items():
        lines += [f"log {name}: {line}" for line in found]
    lines += [f"target error: {e}" for e in res["target_errors"]]
    lines += [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="about 30 s: 64 MiB, 3 runs, fewer opens")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--mib", type=int, help="payload per transfer (256; 64 with --quick)")
    p.add_argument("--runs", type=int, help="throughput runs per tool and direction (5; 3)")
    p.add_argument("--reconnects", type=int, help="in-session tunnel opens per tool (20; 10)")
    p.add_argument("--full-opens", type=int, help="full opens (new login) per tool (5; 3)")
    p.add_argument("--slow-seconds", type=float, help="slow-reader duration per tool (6; 3)")
    p.add_argument("--budget", type=float, help="seconds; past 60%% of it, no run after the 3rd")
    p.add_argument("--pings", type=int, help="round trips per run and tool (1000; 300)")
    p.add_argument(
        "--agents", type=int, help="idle agents for bench/agents_scale.py (1000; 0 skips it)"
    )
    p.add_argument("--agents-timeout", type=float, default=900.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if gw misses a target against the references measured in this run",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="a --json result of an earlier run: exit 1 if a gw/reference ratio got "
        "worse than there by more than --tolerance",
    )
    p.add_argument("--tolerance", type=float, default=0.15, help="for --baseline (0.15)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, audit)")
    args = p.parse_args(argv)
    defaults = {
        "mib": (256, 64),
        "runs": (5, 3),
        "reconnects": (20, 10),
        "full_opens": (5, 3),
        "slow_seconds": (5.0, 2.0),
        "pings": (1000, 300),
        "agents": (1000, 0),
        "budget": (900.0, 60.0),
    }
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    bench = Bench(args)
    try:
        res = bench.run()
    except KeyboardInterrupt:
        print("tunnel_bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        print(f"tunnel_bench: {exc}", file=sys.stderr)
        for name in ("gatewayd", "agent", "connect"):
            with contextlib.suppress(OSError):
                tail = bench.procs.log(name).read_text(errors="replace").splitlines()[-5:]
                print(f"--- {name}.log (tail)\n" + "\n".join(tail), file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            bench.cleanup()
    print(json.dumps(res, indent=1) if args.json else report(res))
    failed = []
    if args.check:
        failed += [f"target missed: {label}" for label in misses(res)]
    if args.baseline is not None:
        base = json.loads(args.baseline.read_text())
        failed += [f"regression: {x}" for x in regressions(res, base, args.tolerance)]
    for line in failed:
        print(f"tunnel_bench: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
