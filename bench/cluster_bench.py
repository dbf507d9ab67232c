#!/usr/bin/env python3
"""One gatewayd node against three: tunnels opened per second, and agents held.

For each size (1 node, then 3), a fresh cluster on loopback (:class:`gatewayd.demo_cluster.
Cluster`: a real Mosquitto and real gatewayd nodes sharing one directory, in a real
PostgreSQL where it is installed, ``--store sqlite`` for one SQLite file):

- **agents held**: ``--agents`` enrolled agents, run in this process (the product's own
  :class:`relay.agent.Agent`, one asyncio task each), every one given every node; they
  spread over the nodes as they start (each picks a random node). Reported: the time
  until all are online, how many each node holds (its ``gw admin status``), and the
  nodes' RSS in all and per agent (RSS with the agents online minus RSS before, over
  the agents);
- **tunnels opened per second**: three ``gw connect -L`` clients, logged in to the
  nodes in turn (all to the one node, or one to each of three), each to an agent held
  by *another* node where there is one (a tunnel across nodes: the agent dials the
  client's node), then ``--concurrency`` threads open ``--tunnels``
  new tunnels in all through those clients (TCP connect to the ``-L`` port, one line
  echoed through the agent's service, close), spread over the clients; the rate is
  tunnels over the wall time, with the median time of one.

Everything runs on this machine (the agents and the clients too), so on a small
machine the nodes compete with them for the same cores: read the two rows side by
side, from one run. Every process is stopped at the end, also on an error::

    .venv/bin/python bench/cluster_bench.py                 # 200 agents, 300 tunnels
    .venv/bin/python bench/cluster_bench.py --quick         # 50 agents, 90 tunnels
    .venv/bin/python bench/cluster_bench.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatewayd.admin import request
from gatewayd.demo import EchoServer, round_trip
from gatewayd.demo_cluster import Cluster, postgres_bin
from relay.agent import Agent, AgentState, enroll
from relay.approval import Approvals

PASSWORD = "cluster bench pass phrase"
#: Enrollments in flight at once: each costs the node a certificate signature.
PARALLEL = 16
#: ``gw connect -L`` clients the tunnels go through, for one node as for three.
CLIENTS = 3
Say = Callable[[str], None]


class QuietApprovals(Approvals):
    """No local approvals socket per agent (the sessions are unattended access)."""

    async def start(self) -> None:
        return None


def quiet(_event: str, **_fields: Any) -> None:
    return None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Run:
    """One cluster of ``size`` nodes, its agents and its clients."""

    def __init__(self, size: int, root: Path, agents: int, say: Say, postgres: bool) -> None:
        self.size = size
        self.cluster = Cluster(root, size, say, postgres=postgres)
        self.n_agents = agents
        self.say = say
        self.echo = EchoServer()
        self.agents: list[Agent] = []
        self.tasks: list[asyncio.Task[None]] = []

    def nodes_rss(self) -> int:
        return sum(rss_kib(p.popen.pid) for p in self.cluster.procs.values())

    def held(self) -> dict[str, int]:
        """How many agents each node says it holds."""
        status = json.loads(self.cluster.admin(self.cluster.names[0], "status"))
        counts = dict.fromkeys(self.cluster.names, 0)
        for node in status.get("cluster", {}).get("agents", {}).values():
            counts[node] = counts.get(node, 0) + 1
        return counts

    async def enroll_all(self) -> list[AgentState]:
        c = self.cluster
        sock = c.config(c.names[0]).parent / f"admin-{c.names[0]}.sock"
        gate = asyncio.Semaphore(PARALLEL)

        async def one(i: int) -> AgentState:
            name = f"a{i:05d}"
            async with gate:
                added = await request(sock, "agent.add", {"agent": name, "org": "clinic"})
                folder = c.root / "agents" / name
                await enroll(c.gateway(c.names[0]), c.lab.ca_file, added["token"], folder)
                return AgentState.load(folder)

        return list(await asyncio.gather(*(one(i) for i in range(self.n_agents))))

    async def agents_held(self, states: list[AgentState]) -> dict[str, Any]:
        c = self.cluster
        gateways = [c.gateway(n) for n in c.names]
        before = self.nodes_rss()
        seeds = random.Random(12)
        for state in states:
            self.agents.append(
                Agent(
                    state,
                    {"echo": ("127.0.0.1", self.echo.port)},
                    gateways=gateways,
                    log=quiet,
                    approvals=QuietApprovals(state.state_dir / "s", terminal=False, log=quiet),
                    rand=random.Random(seeds.random()).random,
                )
            )
        t0 = time.monotonic()
        self.tasks = [asyncio.create_task(a.run()) for a in self.agents]
        deadline = time.monotonic() + 300
        while sum(a.connected.is_set() for a in self.agents) < len(self.agents):
            if time.monotonic() > deadline:
                raise RuntimeError("the agents did not all come online in 300 s")
            await asyncio.sleep(0.05)
        online_s = time.monotonic() - t0
        # Presence reaches every node over the bus; then the nodes' memory settles.
        deadline = time.monotonic() + 60
        while True:
            held = await asyncio.to_thread(self.held)
            if sum(held.values()) == len(self.agents) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)
        after = self.nodes_rss()
        return {
            "agents": len(self.agents),
            "online_s": round(online_s, 2),
            "held_per_node": held,
            "nodes_rss_mib": round(after / 1024, 1),
            "rss_per_agent_kib": round((after - before) / max(1, len(self.agents)), 1),
        }

    def tunnels(self, count: int, concurrency: int) -> dict[str, Any]:
        c = self.cluster
        held = self.held()
        by_node: dict[str, list[str]] = {}
        status = json.loads(c.admin(c.names[0], "status"))
        for agent, node in status.get("cluster", {}).get("agents", {}).items():
            by_node.setdefault(node, []).append(agent)
        ports: list[int] = []
        across = 0
        # Three clients whatever the size (the client is one process: as many of them on
        # one node as on three), client i logged in to node i modulo the size.
        for i in range(CLIENTS):
            node = c.names[i % len(c.names)]
            # An agent held by another node where there is one: a tunnel across nodes.
            others = [a for n, agents in by_node.items() if n != node for a in agents]
            agent = sorted(others or by_node.get(node, []))[0]
            across += bool(others)
            user = f"v{i + 1}"
            _, port = c.lab.connect_local(
                agent, user, PASSWORD, "echo", "--gateway", c.gateway(node)
            )
            ports.append(port)
        times: list[float] = []
        failures: list[str] = []
        lock = threading.Lock()
        jobs = iter(range(count))

        def worker() -> None:
            while True:
                with lock:
                    job = next(jobs, None)
                if job is None:
                    return
                port = ports[job % len(ports)]
                t0 = time.perf_counter()
                try:
                    reply = round_trip(port, b"tunnel\n", timeout=30)
                except OSError as exc:
                    reply, err = b"", str(exc)
                else:
                    err = "" if reply == b"TUNNEL\n" else f"reply {reply!r}"
                took = time.perf_counter() - t0
                with lock:
                    (failures.append(err) if err else times.append(took))

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        return {
            "tunnels": len(times),
            "failed": len(failures),
            "first_failures": failures[:3],
            "per_second": round(len(times) / wall, 1),
            "median_ms": round(statistics.median(times) * 1000, 1) if times else None,
            "clients": len(ports),
            "clients_across_nodes": across,
            "concurrency": concurrency,
            "held_per_node": held,
        }

    async def run(self, tunnels: int, concurrency: int) -> dict[str, Any]:
        c = self.cluster
        await asyncio.to_thread(c.start)
        c.admin(c.names[0], "org", "add", "clinic", "--name", "Clinic")
        c.admin(c.names[0], "vendor", "add", "acme", "--name", "Acme")
        c.lab.agreement("acme", "clinic", "access", unattended=True)
        for i in range(CLIENTS):
            c.lab.vendor_user(f"v{i + 1}", "acme", PASSWORD)
        self.say(f"{self.size} node(s): enrolling {self.n_agents} agents")
        states = await self.enroll_all()
        try:
            self.say(f"{self.size} node(s): connecting the agents (every node given to each)")
            res: dict[str, Any] = {"nodes": self.size}
            res["held"] = await self.agents_held(states)
            self.say(f"{self.size} node(s): {tunnels} tunnels, {concurrency} at a time")
            res["open"] = await asyncio.to_thread(self.tunnels, tunnels, concurrency)
            return res
        finally:
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def close(self) -> None:
        self.cluster.close()
        self.echo.close()


def run(
    agents: int,
    tunnels: int,
    concurrency: int,
    say: Say,
    keep: bool = False,
    postgres: bool = False,
) -> dict[str, Any]:
    out: dict[str, Any] = {"agents": agents, "tunnels": tunnels, "concurrency": concurrency}
    out["store"] = "postgresql" if postgres else "sqlite"
    for size in (1, 3):
        folder = Path(tempfile.mkdtemp(prefix=f"cluster-bench-{size}-"))
        one = Run(size, folder, agents, say, postgres)
        try:
            out[f"nodes_{size}"] = asyncio.run(one.run(tunnels, concurrency))
        finally:
            one.close()
            if keep:
                say(f"kept {folder}")
            else:
                shutil.rmtree(folder, ignore_errors=True)
    return out


def report(res: dict[str, Any]) -> str:
    one, three = res["nodes_1"], res["nodes_3"]
    rows = [
        ("tunnels opened per second", "open", "per_second"),
        ("one new tunnel, median ms", "open", "median_ms"),
        ("tunnels failed", "open", "failed"),
        ("agents held (all online)", "held", "agents"),
        ("seconds until all online", "held", "online_s"),
        ("nodes' RSS in all, MiB", "held", "nodes_rss_mib"),
        ("RSS per agent, KiB", "held", "rss_per_agent_kib"),
    ]
    lines = [f"directory: {res['store']}", "", "| | 1 node | 3 nodes |", "|---|---|---|"]
    for title, part, key in rows:
        lines.append(f"| {title} | {one[part][key]} | {three[part][key]} |")
    spread = ", ".join(f"{n} {k}" for n, k in three["held"]["held_per_node"].items())
    lines.append(f"| agents per node | {one['held']['agents']} | {spread} |")
    lines.append(
        f"| clients, of which across nodes | {one['open']['clients']}, "
        f"{one['open']['clients_across_nodes']} | {three['open']['clients']}, "
        f"{three['open']['clients_across_nodes']} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--agents", type=int, default=200, help="agents (200)")
    p.add_argument("--tunnels", type=int, default=300, help="tunnels to open (300)")
    p.add_argument("--concurrency", type=int, default=6, help="tunnels at a time (6)")
    p.add_argument("--quick", action="store_true", help="50 agents, 90 tunnels")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp folders")
    p.add_argument(
        "--store",
        choices=["postgresql", "sqlite"],
        default="postgresql" if postgres_bin() is not None else "sqlite",
        help="the nodes' directory: one PostgreSQL (default where installed) or one SQLite file",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.agents, args.tunnels = 50, 90
    if args.agents < 3 or args.tunnels < 1 or args.concurrency < 1:
        p.error("at least 3 agents, 1 tunnel and a concurrency of 1")

    def say(text: str) -> None:
        print(f"cluster_bench: {text}", file=sys.stderr, flush=True)

    try:
        res = run(
            args.agents,
            args.tunnels,
            args.concurrency,
            say,
            keep=args.keep,
            postgres=args.store == "postgresql",
        )
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"cluster_bench: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=1) if args.json else report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
