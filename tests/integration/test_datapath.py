"""The tunnel's data path under stress: real gatewayd, agent, gw, OpenSSH and services on loopback.

Nothing a service sends may be lost or reordered, whoever speaks first; a tunnel cut at
the gateway must not look like a clean end of stream to either application; a peer that
does not read must not grow the gateway's memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from sshd import Sshd, sshd_fixture  # noqa: F401
from world import PASSWORD, World, build_world

from gatewayd.demo import BIN, wait_for
from relay import message as m
from relay.protocol import PREAMBLE

pytestmark = pytest.mark.integration

BANNER = b"220 banner service ready, speaking first\n"


class BannerServer:
    """Writes a banner the moment a connection is accepted, then echoes, then closes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(BANNER)
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


class StreamServer:
    """``source``: sends without end and never reads; ``sink``: reads and never sends.

    Each connection's end is noted in ``ends``: ``reset`` (ECONNRESET) or ``eof``.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.ends: list[str] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        chunk = bytes(range(256)) * 256
        with conn:
            try:
                if self.mode == "source":
                    while True:
                        conn.sendall(chunk)
                while conn.recv(65536):
                    pass
            except ConnectionResetError:
                self.ends.append("reset")
                return
            except OSError as exc:
                self.ends.append(f"error: {exc}")
                return
            self.ends.append("eof")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(tmp_path_factory.mktemp("datapath"))
    try:
        yield w
    finally:
        w.lab.close()
        w.echo.close()


@pytest.fixture(scope="module")
def banner() -> Iterator[BannerServer]:
    server = BannerServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def streams() -> Iterator[dict[str, StreamServer]]:
    servers = {mode: StreamServer(mode) for mode in ("source", "sink")}
    try:
        yield servers
    finally:
        for server in servers.values():
            server.close()


@pytest.fixture(scope="module")
def pc2(world: World, banner: BannerServer, streams: dict[str, StreamServer]) -> str:
    """A second agent exposing the banner, source, sink and echo services."""
    world.lab.enroll_agent("pc2", "clinic")
    targets = {name: server.port for name, server in streams.items()}
    world.lab.start_agent("pc2", {"banner": banner.port, "echo": world.echo.port, **targets})
    return "pc2"


@pytest.fixture(scope="module")
def pc3(world: World, sshd: Sshd) -> str:
    """A third agent exposing the ssh server."""
    world.lab.enroll_agent("pc3", "clinic")
    world.lab.start_agent("pc3", {"ssh": sshd.port})
    return "pc3"


def _clean(stderr: str) -> bool:
    """Nothing but gw's own one-line messages on stderr."""
    return all(line.startswith("gw: ") for line in stderr.splitlines() if line.strip())


def _proxy_command(world: World, agent: str, user: str, target: str) -> str:
    args = world.lab.connect_args(
        agent, user, target, "access", "--stdio", "--totp", world.lab.totp(user)
    )
    return shlex.join([str(BIN / args[0]), *args[1:]])


def _ssh(world: World, sshd: Sshd, proxy: str, *command: str) -> subprocess.CompletedProcess[str]:
    env = world.lab.env()
    env["GW_PASSWORD"] = PASSWORD
    return subprocess.run(
        [
            "ssh",
            "-F",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "IdentitiesOnly=yes",
            "-i",
            str(sshd.client_key),
            "-o",
            f"ProxyCommand={proxy}",
            "-l",
            os.environ.get("USER") or "root",
            "target",
            *command,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


# The order itself (a record that arrives before the pipes are connected is delivered
# first, once) is proved deterministically in tests/relay/test_aio.py; these runs prove
# the whole path with real programs, each a fresh login: a few suffice, more only repeat.
REPEATS = 3


def test_openssh_through_stdio_repeatedly(world: World, sshd: Sshd, pc3: str) -> None:
    """The ssh server speaks first: its banner must reach the client every time."""
    for run in range(REPEATS):
        user = world.new_user()
        result = _ssh(world, sshd, _proxy_command(world, pc3, user, "ssh"), "echo", f"run-{run}")
        assert result.returncode == 0, f"run {run}: {result.stderr}"
        assert result.stdout == f"run-{run}\n"
        assert _clean(result.stderr), result.stderr
    assert "tunnel cut" not in _agent_log(world, pc3)


def test_service_speaking_first_through_stdio(world: World, pc2: str) -> None:
    """The banner comes first, then the echo of what we sent, in order, every time."""
    for run in range(REPEATS):
        user = world.new_user()
        sent = f"line {run}\n" * 100
        result = world.lab.connect_stdio(pc2, user, PASSWORD, "banner", sent)
        assert result.returncode == 0, f"run {run}: {result.stderr}"
        assert result.stdout == BANNER.decode() + sent
        assert _clean(result.stderr), result.stderr


def test_peer_end_after_local_end_leaves_stderr_clean(world: World, pc2: str) -> None:
    """Standard input ends at once; the service's banner and END come after that."""
    for run in range(REPEATS):
        user = world.new_user()
        result = world.lab.connect_stdio(pc2, user, PASSWORD, "banner", "")
        assert result.returncode == 0, f"run {run}: {result.stderr}"
        assert result.stdout == BANNER.decode()
        assert _clean(result.stderr), result.stderr
    # Every one of those ended whole: the agent reset nothing.
    assert "tunnel cut" not in _agent_log(world, pc2)


def test_hangup_ends_the_stream_in_band(world: World, pc2: str) -> None:
    """ssh sends SIGHUP to its ProxyCommand when done: gw ends its stream with END and
    lets the service end its own, so neither side sees a cut."""
    proc = _stdio_proc(world, pc2, "banner")
    assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
    proc.stdin.write(b"last words\n")
    proc.stdin.flush()
    got = b""
    while len(got) < len(BANNER) + len(b"last words\n"):
        chunk = proc.stdout.read1(65536)
        assert chunk, proc.stderr.read()
        got += chunk
    assert got == BANNER + b"last words\n"
    cuts = _agent_log(world, pc2).count("tunnel cut")
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == b"" and _clean(err.decode())
    assert _agent_log(world, pc2).count("tunnel cut") == cuts


@pytest.mark.timeout(600)  # many logins in a row
def test_service_speaking_first_through_local_forward(world: World, pc2: str) -> None:
    user = world.new_user()
    proc, port = world.lab.connect_local(pc2, user, PASSWORD, "banner")
    try:
        for run in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                got = b""
                while len(got) < len(BANNER):
                    chunk = s.recv(65536)
                    assert chunk, f"run {run}: closed after {got!r}"
                    got += chunk
                assert got == BANNER  # first, before we said anything
                sent = f"connection {run}\n".encode() * 1000
                s.sendall(sent)
                s.shutdown(socket.SHUT_WR)
                rest = b""
                while chunk := s.recv(65536):
                    rest += chunk
                assert rest == sent
    finally:
        proc.stop()
    assert _clean(proc.output()), proc.output()


# -- a tunnel cut at the gateway is not a clean end of stream -------------------------------


def _session_of(world: World, user: str) -> str:
    rows = [r for r in world.lab.audit_records() if r["event"] == "session.start"]
    (row,) = [r for r in rows if r.get("user") == user]
    return str(row["session"])


def _read_until_end(s: socket.socket, started: threading.Event, limit: int) -> str:
    """Read until the stream ends; ``started`` is set after ``limit`` bytes."""
    total = 0
    try:
        while chunk := s.recv(65536):
            total += len(chunk)
            if total >= limit:
                started.set()
        return "eof"
    except ConnectionResetError:
        return "reset"
    finally:
        started.set()


def _write_until_error(s: socket.socket) -> None:
    chunk = b"x" * 65536
    with contextlib.suppress(OSError):
        while True:
            s.sendall(chunk)


def _agent_log(world: World, agent: str) -> str:
    (proc,) = [p for p in world.lab.procs if p.name == f"agent-{agent}"]
    return proc.output()


def test_session_killed_mid_transfer_resets_both_applications(
    world: World, pc2: str, streams: dict[str, StreamServer]
) -> None:
    """Download from the source in one session, upload to the sink in another; kill both."""
    downloader, uploader = world.new_user(), world.new_user()
    down_proc, down_port = world.lab.connect_local(pc2, downloader, PASSWORD, "source")
    up_proc, up_port = world.lab.connect_local(pc2, uploader, PASSWORD, "sink")
    sink = streams["sink"]
    sink_ends = len(sink.ends)
    try:
        with (
            socket.create_connection(("127.0.0.1", down_port), timeout=30) as down,
            socket.create_connection(("127.0.0.1", up_port), timeout=30) as up,
        ):
            writer = threading.Thread(target=_write_until_error, args=(up,), daemon=True)
            writer.start()
            started = threading.Event()
            outcome: list[str] = []
            reader = threading.Thread(
                target=lambda: outcome.append(_read_until_end(down, started, 1 << 20)),
                daemon=True,
            )
            reader.start()
            assert started.wait(30), "no data from the source"
            wait_for(lambda: bool(world.lab.events("tunnel.start")), 60, "the upload tunnel")
            for user in (downloader, uploader):
                world.lab.admin("sessions", "kill", _session_of(world, user))
            reader.join(30)
            writer.join(30)
            # The client application is told the stream was cut: a reset, not an EOF.
            assert outcome == ["reset"]
            # So is the agent's target.
            wait_for(lambda: len(sink.ends) > sink_ends, 60, "the sink to see the end")
            assert sink.ends[sink_ends:] == ["reset"]
    finally:
        down_proc.stop()
        up_proc.stop()
    assert "tunnel cut" in down_proc.output(), down_proc.output()
    assert "tunnel cut" in _agent_log(world, pc2)


def _stdio_proc(world: World, agent: str, target: str) -> subprocess.Popen[bytes]:
    user = world.new_user()
    args = world.lab.connect_args(
        agent, user, target, "access", "--stdio", "--totp", world.lab.totp(user)
    )
    env = world.lab.env()
    env["GW_PASSWORD"] = PASSWORD
    return subprocess.Popen(  # our own command
        [str(BIN / args[0]), *args[1:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def test_gateway_killed_mid_transfer_is_not_a_clean_end(
    tmp_path: Path, streams: dict[str, StreamServer]
) -> None:
    """The gateway process dies: no END record; gw --stdio exits non-zero and says so."""
    w = build_world(tmp_path / "lab")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        w.lab.enroll_agent("pcx", "clinic")
        w.lab.start_agent("pcx", {name: s.port for name, s in streams.items()})
        sink = streams["sink"]
        sink_ends = len(sink.ends)
        down = _stdio_proc(w, "pcx", "source")
        up = _stdio_proc(w, "pcx", "sink")
        procs += [down, up]
        assert down.stdout is not None and down.stderr is not None
        assert up.stdin is not None and up.stderr is not None
        writer = threading.Thread(target=_feed_until_error, args=(up.stdin,), daemon=True)
        writer.start()
        got = 0
        while got < 1 << 20:
            chunk = down.stdout.read1(65536)
            assert chunk, down.stderr.read()
            got += len(chunk)

        def upload_open() -> bool:
            lines = _agent_log(w, "pcx").splitlines()
            return any("tunnel open" in line and "target=sink" in line for line in lines)

        wait_for(upload_open, 60, "the upload tunnel")
        (gateway,) = [p for p in w.lab.procs if p.name == "gatewayd"]
        gateway.stop(signal.SIGKILL)
        _, down_err = down.communicate(timeout=30)
        assert down.returncode != 0
        assert "tunnel cut" in down_err.decode(), down_err
        assert "Traceback" not in down_err.decode()
        wait_for(lambda: len(sink.ends) > sink_ends, 60, "the sink to see the end")
        assert sink.ends[sink_ends:] == ["reset"], _agent_log(w, "pcx")
        # The uploading gw saw its tunnel cut too; its writer then meets a closed pipe.
        assert up.wait(30) != 0
        writer.join(30)
        assert "tunnel cut" in up.stderr.read().decode()
        wait_for(lambda: "tunnel cut" in _agent_log(w, "pcx"), 60, "the agent to log the cut")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        w.lab.close()
        w.echo.close()


def _feed_until_error(stream: IO[bytes]) -> None:
    chunk = b"y" * 65536
    with contextlib.suppress(OSError, ValueError):
        while True:
            stream.write(chunk)
            stream.flush()


# -- a peer that does not read cannot grow the gateway's memory -----------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _frame(msg: m.Message) -> bytes:
    body = json.dumps(msg.to_json(), separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


def _read_message(tls: ssl.SSLSocket) -> m.Message:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = tls.recv(n - len(data))
            assert chunk, "the gateway closed the connection"
            data += chunk
        return data

    length = int.from_bytes(exactly(4), "big")
    return m.from_json(json.loads(exactly(length)))


def _ping_flood(
    world: World, seconds: float, outcome: list[str], user: str | None, ready: threading.Barrier
) -> None:
    """Say hello (and log in as ``user`` when given, to flood the authenticated session
    link), then send pings as fast as TLS takes them and never read; then read what the
    gateway left and note how the connection ended."""
    ctx = ssl.create_default_context(cafile=str(world.lab.ca_file))
    raw = socket.create_connection(("127.0.0.1", world.lab.port), timeout=10)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        hello = m.ClientHello(
            user=user or "flooder",
            agent="pc1",
            target="echo",
            mode="access",
            client_key="A" * 43,
            reason="flood",
            factors=(),
        )
        tls.sendall(PREAMBLE + _frame(hello))
        if user is not None:
            answers = {"password": {"password": PASSWORD}, "totp": {"code": world.lab.totp(user)}}
            while not isinstance(msg := _read_message(tls), m.SessionOpened):
                assert isinstance(msg, m.AuthRequest), msg
                tls.sendall(_frame(m.AuthResponse(msg.method, answers[msg.method])))
        pings = b"".join(_frame(m.Ping(i)) for i in range(1, 101))
        ready.wait(60)  # all logged in: the memory is measured from here
        tls.settimeout(1)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                tls.sendall(pings)
        except TimeoutError:
            pass  # the gateway stopped reading us
        except (OSError, ssl.SSLError):
            outcome.append("closed while sending")
            return
        # Drain: a closed connection ends within the deadline; a live one keeps sending pongs.
        tls.settimeout(5)
        end = time.monotonic() + 30
        try:
            while time.monotonic() < end:
                if not tls.recv(65536):
                    outcome.append("closed")
                    return
        except (OSError, ssl.SSLError):
            outcome.append("closed")
            return
        outcome.append("still open")


@pytest.mark.parametrize("when", ["before login", "logged in"])
def test_ping_flood_without_reading_is_cut_and_memory_stays_bounded(
    world: World, when: str
) -> None:
    """Before authentication and on the authenticated session link alike."""
    (gateway,) = [p for p in world.lab.procs if p.name == "gatewayd"]
    users = [world.new_user() if when == "logged in" else None for _ in range(4)]
    outcome: list[str] = []
    ready = threading.Barrier(len(users) + 1)
    floods = [
        threading.Thread(target=_ping_flood, args=(world, 12.0, outcome, user, ready), daemon=True)
        for user in users
    ]
    for t in floods:
        t.start()
    # Logging in costs memory of its own (the password hash): measure after it.
    ready.wait(60)
    before = _rss_kib(gateway.popen.pid)
    peak = before
    while any(t.is_alive() for t in floods):
        peak = max(peak, _rss_kib(gateway.popen.pid))
        time.sleep(0.2)
    assert len(outcome) == 4 and all(o.startswith("closed") for o in outcome), outcome
    # Four peers at full speed for 12 s (unbounded, this grew by about 1.5 MiB/s each).
    assert peak - before < 8 * 1024, f"gatewayd grew from {before} to {peak} KiB"
    # And the gateway still serves.
    user = world.new_user()
    assert world.lab.connect_stdio("pc1", user, PASSWORD, "echo", "x\n").stdout == "X\n"
