#!/usr/bin/env python3
"""Agents at scale: N enrolled agents hold their control connections to one gatewayd.

The agents all run in this one process (the product's own :class:`relay.agent.Agent`,
one asyncio task each on the agent's own event loop, uvloop, not N processes);
gatewayd runs as the real daemon. Reported:

- gatewayd's RSS per connected agent (RSS with all N online, minus RSS before any
  connected, over N) and its RSS in all;
- the processor time gatewayd (and this process) spent per agent taken in as they first
  connect (TLS handshake with the agent's certificate, the directory check, the
  records), and so how many agents a second one core of this machine admits;
- CPU while idle: gatewayd's (and this process's) CPU time over a quiet interval as
  long as the heartbeat interval, so every connection pings and answers once;
- a gatewayd restart: the time until every agent is online again (the agents'
  reconnect backoff with full jitter spreads them; no thundering herd), with the
  times the first, the median and the last agent came back;
- a tunnel to the last agent enrolled: ``gw connect -L`` (password + TOTP) to it,
  then the median of new tunnels in that session (TCP connect to the -L port until
  the first echoed byte), as ``bench/tunnel_bench.py`` measures it.

Everything runs on loopback in a temporary folder, torn down at the end::

    .venv/bin/python bench/agents_scale.py                 # 1,000 agents
    .venv/bin/python bench/agents_scale.py --agents 10000  # raises the file limit
    .venv/bin/python bench/agents_scale.py --json

:func:`run` returns the results as a dict (``make bench`` puts them in its table).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyotp
from tunnel_bench import status_kib  # bench/, this script's folder

from gatewayd.admin import request
from gatewayd.demo import EchoServer, free_port
from relay import aio
from relay.agent import Agent, AgentState, enroll
from relay.approval import Approvals
from relay.protocol import PING_INTERVAL

AGENTS = 1000
#: Enrollments and admin requests in flight at once: the gateway signs one certificate
#: per enrollment; more in parallel only queue on its two cores.
PARALLEL = 16
PASSWORD = "scale-password"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Descriptors this process needs besides one per agent (echo server, pipes, files).
SPARE_FDS = 512
#: Bounded waits (seconds): a setup step that takes longer than this is a failure.
DEADLINE = 600.0
#: Agents started at once when they first connect: machines come up over time, not in
#: one instant (the restart below is the crowd that does arrive at once).
START_BATCH = 250
#: How long the agents have to come back after the restart before the benchmark gives up
#: on the rest and reports how many made it.
RESTART_DEADLINE = 300.0

Say = Callable[[str], None]


class BenchError(Exception):
    """Something the benchmark needs did not work; the message says what."""


class QuietApprovals(Approvals):
    """The agents' approvals without the local socket each would listen on: nobody
    approves here (the sessions are unattended access), and 10,000 sockets would only
    measure this process."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def quiet(_event: str, **_fields: Any) -> None:
    """The agents' log: silent (10,000 agents would flood the terminal)."""


def raise_file_limit(agents: int) -> int:
    """One descriptor per agent here and one per agent in gatewayd (a child inherits it)."""
    want = agents + SPARE_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    if hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError) as exc:
            raise BenchError(
                f"{agents} agents need {want} open files; the limit is {hard}"
            ) from exc
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def echo_ms(port: int) -> float:
    """TCP connect to the -L port until the first echoed (upper-cased) byte, in ms."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(b"x")
        if s.recv(1) != b"X":
            raise BenchError("the echo did not come back")
    return (time.perf_counter() - t0) * 1000


async def wait_until(check: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise BenchError(f"{what}: not within {deadline:g} s")
        await asyncio.sleep(0.05)


class Scale:
    def __init__(self, agents: int, folder: Path, say: Say) -> None:
        self.n = agents
        self.dir = folder
        self.say = say
        bindir = Path(sys.executable).parent
        self.gatewayd = str(bindir / "gatewayd") if (bindir / "gatewayd").exists() else "gatewayd"
        self.gw = str(bindir / "gw") if (bindir / "gw").exists() else "gw"
        self.port = free_port()
        self.config = folder / "gw" / "gatewayd.toml"
        self.ca = folder / "gw" / "tls" / "ca.pem"
        self.admin_sock = folder / "gw" / "admin.sock"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.echo = EchoServer()

    # -- processes ----------------------------------------------------------------------

    def run_cmd(self, *argv: str, stdin: str | None = None) -> str:
        out = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=120, check=False
        )
        if out.returncode != 0:
            raise BenchError(f"{' '.join(argv[:4])}: {out.stderr.strip()[-500:]}")
        return out.stdout

    def admin(self, *args: str, stdin: str | None = None) -> str:
        return self.run_cmd(self.gw, "admin", "--config", str(self.config), *args, stdin=stdin)

    async def start_gatewayd(self) -> float:
        """Start the daemon; seconds until its admin socket answers."""
        log = (self.dir / "gatewayd.log").open("ab")
        t0 = time.monotonic()
        self.daemon = subprocess.Popen(  # noqa: ASYNC220 - returns at once; polled below
            [self.gatewayd, "--config", str(self.config)], stdout=log, stderr=log
        )
        self.procs.append(self.daemon)

        def up() -> bool:
            assert self.daemon is not None
            if self.daemon.poll() is not None:
                raise BenchError(f"gatewayd exited; see {self.dir / 'gatewayd.log'}")
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(self.admin_sock))
                except OSError:
                    return False
            return True

        await wait_until(up, "gatewayd to start", 60)
        return time.monotonic() - t0

    def stop_gatewayd(self) -> None:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(30)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.echo.close()

    # -- the run --------------------------------------------------------------------------

    async def enroll_all(self) -> list[AgentState]:
        names = [f"a{i:05d}" for i in range(self.n)]
        gate = asyncio.Semaphore(PARALLEL)

        async def one(name: str) -> AgentState:
            async with gate:
                added = await request(
                    self.admin_sock, "agent.add", {"agent": name, "org": "clinic"}
                )
                folder = self.dir / "agents" / name
                await enroll(f"127.0.0.1:{self.port}", self.ca, added["token"], folder)
                return AgentState.load(folder)

        return list(await asyncio.gather(*(one(n) for n in names)))

    def agent(self, state: AgentState) -> Agent:
        folder = state.state_dir
        return Agent(
            state,
            {"echo": ("127.0.0.1", self.echo.port)},
            log=quiet,
            approvals=QuietApprovals(folder / "approval.sock", terminal=False, log=quiet),
        )

    def online(self, agents: list[Agent]) -> int:
        return sum(a.connected.is_set() for a in agents)

    def _all_online(self, agents: list[Agent], n: int) -> Callable[[], bool]:
        return lambda: self.online(agents) == n

    def add_user(self) -> str:
        """A vendor user with an agreement for unattended access; its TOTP secret."""
        self.admin("vendor", "add", "acme", "--name", "Acme")
        agreement = self.admin(
            "agreement", "add", "--vendor", "acme", "--org", "clinic",
            "--modes", "access", "--unattended",
        ).strip()  # fmt: skip
        for side in ("vendor", "org"):
            self.admin("agreement", "accept", agreement, "--side", side)
        self.admin("user", "add", "bob", "--vendor", "acme", "--password-stdin", stdin=PASSWORD)
        return str(json.loads(self.admin("totp", "enroll", "bob", "--json"))["secret"])

    async def connect_user(self, agent: str) -> tuple[subprocess.Popen[bytes], int]:
        # In a thread: the agents in this process keep answering meanwhile.
        secret = await asyncio.to_thread(self.add_user)
        lport = free_port()
        log = (self.dir / "connect.log").open("ab")
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; polled below
            [
                self.gw, "connect", agent, "--reason", "scale benchmark",
                "--gateway", f"127.0.0.1:{self.port}", "--ca-file", str(self.ca),
                "--user", "bob", "--target", "echo", "--mode", "access",
                "-L", f"127.0.0.1:{lport}", "--password-stdin", "--totp", pyotp.TOTP(secret).now(),
                "--known-agents", str(self.dir / "known.json"),
                "--identity", str(self.dir / "id.key"),
            ],
            stdin=subprocess.PIPE, stdout=log, stderr=log,
        )  # fmt: skip
        self.procs.append(proc)
        assert proc.stdin is not None
        proc.stdin.write(PASSWORD.encode() + b"\n")
        proc.stdin.close()

        def listening() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"gw connect exited; see {self.dir / 'connect.log'}")
            return "listening on" in (self.dir / "connect.log").read_text(errors="replace")

        await wait_until(listening, "gw connect to listen", 60)
        return proc, lport

    async def run(self, idle_seconds: float, opens: int) -> dict[str, Any]:
        res: dict[str, Any] = {"agents": self.n}
        self.run_cmd(
            self.gatewayd, "init", "--dir", str(self.dir / "gw"),
            "--listen", f"127.0.0.1:{self.port}",
        )  # fmt: skip
        # Every agent here comes from 127.0.0.1, which the per-source handshake cap
        # counts as one source; in the field each is a machine of its own.
        text = self.config.read_text()
        self.config.write_text(
            text.replace("[gateway]\n", "[gateway]\nmax_handshakes_per_source = 64\n", 1)
        )
        await self.start_gatewayd()
        self.admin("org", "add", "clinic", "--name", "Clinic")
        self.say(f"enrolling {self.n} agents ({PARALLEL} at a time)")
        t0 = time.monotonic()
        states = await self.enroll_all()
        res["enroll_s"] = round(time.monotonic() - t0, 1)

        # RSS before any agent is connected, from a fresh daemon: enrollment's own
        # allocations are not what an idle agent costs.
        self.stop_gatewayd()
        await self.start_gatewayd()
        assert self.daemon is not None
        await asyncio.sleep(1.0)
        rss_before = status_kib(self.daemon.pid)
        agents = [self.agent(s) for s in states]
        self.say(f"connecting {self.n} agents from this process")
        t0 = time.monotonic()
        me = os.getpid()
        gw_cpu, my_cpu = cpu_seconds(self.daemon.pid), cpu_seconds(me)
        tasks: list[asyncio.Task[None]] = []
        try:
            for i in range(0, self.n, START_BATCH):
                tasks += [asyncio.create_task(a.run()) for a in agents[i : i + START_BATCH]]
                await wait_until(self._all_online(agents, len(tasks)), "agents online")
            res["first_connect_s"] = round(time.monotonic() - t0, 2)
            # Processor time per agent taken in (TLS handshake with its certificate, the
            # directory check, the records): its inverse is what one core can admit.
            per_agent = (cpu_seconds(self.daemon.pid) - gw_cpu) / self.n
            res["connect_cpu_ms_per_agent"] = {
                "gatewayd": round(1000 * per_agent, 2),
                "agents_process": round(1000 * (cpu_seconds(me) - my_cpu) / self.n, 2),
            }
            res["gatewayd_agents_per_core_s"] = round(1 / per_agent) if per_agent > 0 else None
            await asyncio.sleep(2.0)  # the daemon's work for the connections settles
            rss_after = status_kib(self.daemon.pid)
            res["gatewayd_rss_mib"] = {
                "before": round(rss_before / 1024, 1),
                "with_agents": round(rss_after / 1024, 1),
            }
            res["rss_per_agent_kib"] = round((rss_after - rss_before) / self.n, 1)

            self.say(f"idle: {idle_seconds:g} s with every agent connected")
            c0, l0, w0 = cpu_seconds(self.daemon.pid), cpu_seconds(me), time.monotonic()
            await asyncio.sleep(idle_seconds)
            wall = time.monotonic() - w0
            res["idle_cpu"] = {
                "gatewayd": round(100 * (cpu_seconds(self.daemon.pid) - c0) / wall, 2),
                "agents_process": round(100 * (cpu_seconds(me) - l0) / wall, 2),
                "seconds": round(wall, 1),
            }
            res["gatewayd_rss_mib"]["idle_peak"] = round(
                status_kib(self.daemon.pid, "VmHWM") / 1024, 1
            )

            self.say("a tunnel to the last agent")
            proc, lport = await self.connect_user(states[-1].agent)
            times = [await asyncio.to_thread(echo_ms, lport) for _ in range(opens + 1)][1:]
            res["tunnel_to_last_agent_ms"] = {
                "median": round(statistics.median(times), 2),
                "samples": [round(t, 2) for t in times],
            }
            proc.terminate()
            proc.wait(10)

            self.say("restarting gatewayd; the agents come back with their backoff")
            await asyncio.to_thread(self.stop_gatewayd)
            await wait_until(lambda: self.online(agents) == 0, "every agent to notice", 60)
            t0 = time.monotonic()
            res["restart"] = {"gatewayd_ready_s": round(await self.start_gatewayd(), 2)}
            back: list[float] = []
            seen: set[int] = set()

            def all_back() -> bool:
                for i, a in enumerate(agents):
                    if i not in seen and a.connected.is_set():
                        seen.add(i)
                        back.append(time.monotonic() - t0)
                return len(seen) == self.n

            with contextlib.suppress(BenchError):  # reported below: how many came back
                await wait_until(all_back, "every agent back after the restart", RESTART_DEADLINE)
            res["restart"].update(
                back=len(back),
                first_s=round(back[0], 2) if back else None,
                median_s=round(statistics.median(back), 2) if back else None,
                all_online_s=round(back[-1], 2) if len(back) == self.n else None,
            )
            # The flat figures ``make bench`` puts in its table.
            res["idle_cpu_percent"] = res["idle_cpu"]["gatewayd"]
            res["online_after_restart_s"] = res["restart"]["all_online_s"]
            res["last_agent_tunnel_ms"] = res["tunnel_to_last_agent_ms"]["median"]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return res


def run(
    agents: int = AGENTS,
    *,
    idle_seconds: float = PING_INTERVAL,
    opens: int = 10,
    say: Say = lambda text: print(text, file=sys.stderr, flush=True),
    keep: bool = False,
) -> dict[str, Any]:
    """Run the benchmark with ``agents`` agents; the results as a dict."""
    raise_file_limit(agents)
    folder = Path(tempfile.mkdtemp(prefix="agents-scale-"))
    scale = Scale(agents, folder, say)
    started = time.monotonic()
    try:
        # The agents' own event loop (uvloop, as `gw agent run` has): on asyncio's default
        # loop each TLS connection here cost a zero-filled 256 KiB buffer and the crowd
        # of agents reconnecting after the restart was bound by this process, not gatewayd.
        res = aio.run(scale.run(idle_seconds, opens))
    finally:
        scale.close()
        if keep:
            say(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    res["seconds"] = round(time.monotonic() - started, 1)
    return res


def report(res: dict[str, Any]) -> str:
    rss, cpu, rs = res["gatewayd_rss_mib"], res["idle_cpu"], res["restart"]
    tun = res["tunnel_to_last_agent_ms"]
    return "\n".join(
        [
            f"agents held by one gatewayd: {res['agents']} (enrolled in {res['enroll_s']} s)",
            f"gatewayd RSS: {rss['before']} MiB before, {rss['with_agents']} MiB with every "
            f"agent online: {res['rss_per_agent_kib']} KiB per agent (target <= 20)",
            f"taking an agent in: gatewayd {res['connect_cpu_ms_per_agent']['gatewayd']} ms of "
            f"processor time (at most {res['gatewayd_agents_per_core_s']} a second per core), "
            f"the agents' process {res['connect_cpu_ms_per_agent']['agents_process']} ms",
            f"idle CPU over {cpu['seconds']} s: gatewayd {cpu['gatewayd']} %, "
            f"the agents' process {cpu['agents_process']} %",
            f"restart: gatewayd ready in {rs['gatewayd_ready_s']} s; {rs['back']} agents back "
            f"within {RESTART_DEADLINE:g} s: first {rs['first_s']} s, median {rs['median_s']} s, "
            f"all {rs['all_online_s']} s",
            f"new tunnel to the last agent in an open session: median {tun['median']} ms",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=AGENTS, help=f"agents ({AGENTS})")
    p.add_argument(
        "--idle-seconds", type=float, default=PING_INTERVAL, help="idle CPU interval (s)"
    )
    p.add_argument("--opens", type=int, default=10, help="tunnels to the last agent")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = p.parse_args(argv)
    if args.agents < 1:
        p.error("--agents: at least 1")
    try:
        res = run(args.agents, idle_seconds=args.idle_seconds, opens=args.opens, keep=args.keep)
    except BenchError as exc:
        print(f"agents_scale: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("agents_scale: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(res, indent=2) if args.json else report(res))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
