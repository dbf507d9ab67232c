"""A gateway, an agent and a vendor on one machine, as real processes: the demo.

:class:`Lab` drives the real commands (``gatewayd``, ``gw admin``, ``gw agent``,
``gw connect``) in a folder of its own, on loopback. ``make demo`` runs
:func:`main`, which prints each step; the integration tests and the benchmark
use the same class, so what they prove is what a person would type.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from auth.totp import code_at

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


class EchoServer:
    """A small TCP service for the agent to expose: answers each line upper-cased."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        # A tunnel cut before its end reaches the service as a reset: the end of it.
        with conn, contextlib.suppress(ConnectionError):
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    def close(self) -> None:
        self.sock.close()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@dataclass
class Lab:
    """Everything in ``root``; every process is stopped by :meth:`close`."""

    root: Path
    say: Callable[[str], None] = lambda _: None
    port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    totp_secrets: dict[str, str] = field(default_factory=dict)
    _last_step: dict[str, int] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.root / "gw" / "gatewayd.toml"

    @property
    def ca_file(self) -> Path:
        return self.root / "gw" / "tls" / "ca.pem"

    @property
    def audit_path(self) -> Path:
        return self.root / "gw" / "audit" / "audit.jsonl"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["XDG_CONFIG_HOME"] = str(self.root / "home")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(BIN / args[0]), *args[1:]]
        result = subprocess.run(  # noqa: S603 - our own commands, no shell
            cmd, input=input, capture_output=True, text=True, env=self.env(), timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def start(self, name: str, *args: str, stdin: int | IO[Any] | None = None) -> Proc:
        log = self.root / f"{name}.log"
        out = log.open("wb")
        popen = subprocess.Popen(  # noqa: S603 - our own commands, no shell
            [str(BIN / args[0]), *args[1:]],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            env=self.env(),
        )
        out.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    # -- the gateway --------------------------------------------------------------------

    def init(self, extra_config: str = "", gateway_keys: str = "") -> None:
        """``gatewayd init``; ``extra_config`` is appended, ``gateway_keys`` go into [gateway]."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.run("gatewayd", "init", "--dir", str(self.root / "gw"), "--listen", self.gateway)
        text = self.config.read_text()
        if gateway_keys:
            text = text.replace("[gateway]\n", f"[gateway]\n{gateway_keys}\n", 1)
        if extra_config:
            text += "\n" + extra_config + "\n"
        self.config.write_text(text)

    def start_gateway(self) -> Proc:
        proc = self.start("gatewayd", "gatewayd", "--config", str(self.config))
        sock = self.root / "gw" / "admin.sock"

        def ready() -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"gatewayd exited: {proc.output()[-2000:]}")
            # "gatewayd ready" is logged once its gateway.start record is on disk: the
            # trail a test reads next is the one a started gateway leaves.
            return sock.exists() and "gatewayd ready" in proc.output()

        wait_for(ready, 60, "gatewayd to start")
        return proc

    def admin(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.run(
            "gw", "admin", "--config", str(self.config), *args, input=input, check=check
        ).stdout

    def agreement(
        self,
        vendor: str,
        org: str,
        modes: str = "access",
        *,
        unattended: bool = True,
        accept: tuple[str, ...] = ("vendor", "org"),
    ) -> str:
        """Add an agreement and record the given sides' acceptance; returns its id."""
        args = ["agreement", "add", "--vendor", vendor, "--org", org, "--modes", modes]
        agreement = self.admin(*args, *(["--unattended"] if unattended else [])).strip()
        for side in accept:
            self.admin("agreement", "accept", agreement, "--side", side)
        return agreement

    def vendor_user(self, user: str, vendor: str, password: str) -> str:
        """A vendor user with a password and TOTP; returns the TOTP secret."""
        self.admin(
            "user", "add", user, "--vendor", vendor, "--password-stdin", input=password + "\n"
        )
        secret: str = json.loads(self.admin("totp", "enroll", user, "--json"))["secret"]
        self.totp_secrets[user] = secret
        return secret

    def totp(self, user: str) -> str:
        """A code of a step not used yet for ``user``: the current step, else the next one
        (the gateway accepts one step of drift each way), else it waits for the next step.
        """
        step = int(time.time()) // 30
        last = self._last_step.get(user)
        if last is not None and last >= step:
            step = last + 1
            if step > int(time.time()) // 30 + 1:  # two ahead: wait until one ahead
                time.sleep(max(0.0, (step - 1) * 30 - time.time() + 0.05))
        self._last_step[user] = step
        return code_at(self.totp_secrets[user], step * 30)

    # -- agents -------------------------------------------------------------------------

    def enroll_agent(self, agent: str, org: str) -> Path:
        token = self.admin("agent", "add", agent, "--org", org).strip()
        state = self.root / f"agent-{agent}"
        self.run(
            "gw",
            "agent",
            "enroll",
            "--gateway",
            self.gateway,
            "--ca-file",
            str(self.ca_file),
            "--token",
            token,
            "--state-dir",
            str(state),
        )
        return state

    def start_agent(self, agent: str, targets: dict[str, int], *extra: str) -> Proc:
        args = [f"--target={name}=127.0.0.1:{port}" for name, port in targets.items()]
        state = self.root / f"agent-{agent}"
        proc = self.start(
            f"agent-{agent}", "gw", "agent", "run", "--state-dir", str(state), *args, *extra
        )
        wait_for(lambda: "connected" in proc.output(), 20, f"agent {agent} to connect")
        return proc

    # -- clients ------------------------------------------------------------------------

    def connect_args(
        self, agent: str, user: str, target: str, mode: str = "access", *extra: str
    ) -> list[str]:
        # access and support need a reason by default; give one unless the caller does.
        reason = [] if "--reason" in extra else ["--reason", "lab session"]
        return [
            "gw",
            "connect",
            agent,
            "--gateway",
            self.gateway,
            "--ca-file",
            str(self.ca_file),
            "--user",
            user,
            "--target",
            target,
            "--mode",
            mode,
            *reason,
            *extra,
        ]

    def connect_stdio(
        self,
        agent: str,
        user: str,
        password: str,
        target: str,
        data: str,
        *extra: str,
        mode: str = "access",
        totp: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        code = totp or self.totp(user)
        args = self.connect_args(
            agent, user, target, mode, "--stdio", "--password-stdin", "--totp", code, *extra
        )
        return self.run(*args, input=f"{password}\n{data}", check=False)

    def connect_local(
        self, agent: str, user: str, password: str, target: str, *extra: str, mode: str = "access"
    ) -> tuple[Proc, int]:
        port = free_port()
        args = self.connect_args(
            agent,
            user,
            target,
            mode,
            "-L",
            f"127.0.0.1:{port}",
            "--password-stdin",
            "--totp",
            self.totp(user),
            *extra,
        )
        pw = self.root / f"pw-{user}-{port}"
        pw.write_text(password + "\n")
        with pw.open("rb") as stdin:
            proc = self.start(f"connect-{user}-{port}", *args, stdin=stdin)

        def ready() -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"gw connect exited: {proc.output()[-2000:]}")
            return "listening on" in proc.output()

        wait_for(ready, 30, "gw connect -L to listen")
        pw.unlink()
        return proc, port

    # -- the trail ----------------------------------------------------------------------

    def audit_records(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.audit_records() if r["event"] == name]

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def round_trip(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` to a local port, half-close, and read everything back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def lab(root: Path, say: Callable[[str], None] = lambda _: None) -> Iterator[Lab]:
    the_lab = Lab(root, say)
    try:
        yield the_lab
    finally:
        the_lab.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``make demo``: the whole path, printed step by step."""
    root = Path(argv[0] if argv else "demo-state").resolve()
    if root.exists():
        shutil.rmtree(root)

    def say(text: str) -> None:
        print(f"\n==> {text}", flush=True)

    def show(text: str) -> None:
        for line in text.rstrip().splitlines():
            print(f"    {line}", flush=True)

    echo = EchoServer()
    with lab(root, say) as the_lab:
        say(f"gatewayd init: a CA, a server certificate and SQLite state in {root / 'gw'}")
        the_lab.init()
        say(f"starting gatewayd on {the_lab.gateway}")
        the_lab.start_gateway()
        say(
            "directory: org 'clinic', vendor 'acme', an agreement for unattended access,"
            " accepted by both sides"
        )
        the_lab.admin("org", "add", "clinic", "--name", "Demo Clinic")
        the_lab.admin("vendor", "add", "acme", "--name", "Acme Records AS")
        the_lab.agreement("acme", "clinic", "access", unattended=True)
        say("vendor user 'alice' with a password and TOTP (an authenticator app scans this URI)")
        secret = the_lab.vendor_user("alice", "acme", "correct horse battery")
        show(f"otpauth://totp/gatewayd:alice?secret={secret[:6]}...&issuer=gatewayd")
        say(
            "agent 'reception-pc' enrolls with a one-time token and exposes "
            f"'echo' (127.0.0.1:{echo.port})"
        )
        the_lab.enroll_agent("reception-pc", "clinic")
        the_lab.start_agent("reception-pc", {"echo": echo.port})
        say("alice: gw connect reception-pc --target echo --mode access -L ... (password + TOTP)")
        proc, port = the_lab.connect_local(
            "reception-pc", "alice", "correct horse battery", "echo", "-v"
        )
        show(proc.output())
        say(f"round trip through the tunnel: 127.0.0.1:{port} -> gatewayd -> agent -> echo")
        for text in (
            b"hello from the vendor's laptop\n",
            b"second tunnel, same session, no new code\n",
        ):
            reply = round_trip(port, text)
            show(f"sent {text!r}\n got {reply!r}")
            if reply != text.upper():
                print("demo failed: the reply is not what the echo service sends", file=sys.stderr)
                return 1
        time.sleep(0.3)
        show("\n".join(line for line in proc.output().splitlines() if "SAS" in line))
        proc.stop()
        time.sleep(0.5)
        say("the audit trail of this session (gw audit)")
        show(the_lab.run("gw", "audit", "--config", str(the_lab.config)).stdout)
        say("gw audit verify: the hash chain is intact")
        show(the_lab.run("gw", "audit", "verify", "--config", str(the_lab.config)).stdout)
    echo.close()
    print(f"\ndemo done; everything it made is in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
