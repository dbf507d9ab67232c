"""An agent that knows every node of the cluster moves to another when its node dies.

Three real gatewayd nodes on loopback joined by a real Mosquitto, sharing one
directory, each with its own audit trail. A real ``gw agent run`` reads the three
nodes, its target and its backoff from its config file. The node that holds the agent
is killed with SIGKILL (no goodbye on the wire): the agent is back on another node
(its presence says so on the third), and a vendor logged in to the third node reaches
the service through it: a tunnel across nodes after the failover. Every node's trail
then reads as one with ``gw audit --trail``, and each chain verifies.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mosquitto import Mosquitto, mosquitto  # noqa: F401 - the module's broker fixture

from gatewayd.demo import EchoServer, Lab, Proc, free_port, wait_for

pytest.importorskip("aiomqtt", reason="aiomqtt (the cluster extra) is missing")

PASSWORD = "failover pass phrase"
NODES = ("n1", "n2", "n3")


@dataclass
class Nodes:
    lab: Lab
    echo: EchoServer
    ports: dict[str, int] = field(default_factory=dict)
    configs: dict[str, Path] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)

    def gateway(self, node: str) -> str:
        return f"127.0.0.1:{self.ports[node]}"

    def trail(self, node: str) -> Path:
        return self.lab.config.parent / f"audit-{node}" / "audit.jsonl"

    def admin(self, node: str, *args: str, input: str | None = None) -> str:
        cfg = str(self.configs[node])
        return self.lab.run("gw", "admin", "--config", cfg, *args, input=input).stdout

    def holder(self, node: str, agent: str) -> str | None:
        """Where ``node`` says the agent's control connection is (cluster presence)."""
        try:
            status: dict[str, Any] = json.loads(self.admin(node, "status"))
        except RuntimeError:
            return None
        cluster = status.get("cluster", {})
        if cluster.get("bus") != "up":
            return None
        held = cluster.get("agents", {}).get(agent)
        return str(held) if held else None

    def start(self, node: str) -> None:
        proc = self.lab.start(f"gatewayd-{node}", "gatewayd", "--config", str(self.configs[node]))
        self.procs[node] = proc
        sock = self.configs[node].parent / f"admin-{node}.sock"

        def ready() -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"gatewayd {node} exited: {proc.output()[-2000:]}")
            return sock.exists() and self.trail(node).exists()

        wait_for(ready, 20, f"gatewayd {node} to start")


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory,
    mosquitto: Mosquitto,  # noqa: F811
) -> Iterator[Nodes]:
    root = tmp_path_factory.mktemp("failover")
    lab = Lab(root)
    lab.init(extra_config=f'[cluster]\nmqtt = "{mosquitto.address}"\nreply_timeout = 2\n')
    base = lab.config.read_text()
    n = Nodes(lab, EchoServer())
    for i, node in enumerate(NODES):
        n.ports[node] = lab.port if i == 0 else free_port()
        text = re.sub(r'(?m)^node_id = "[^"]*"', f'node_id = "{node}"', base, count=1)
        text = text.replace(f'listen = "{lab.gateway}"', f'listen = "{n.gateway(node)}"', 1)
        text = text.replace('path = "audit/audit.jsonl"', f'path = "audit-{node}/audit.jsonl"')
        text = text.replace('socket = "admin.sock"', f'socket = "admin-{node}.sock"')
        n.configs[node] = lab.config.with_name(f"gatewayd-{node}.toml")
        n.configs[node].write_text(text)
    # Lab's own helpers (enrollment, users) talk to node 1.
    lab.config.write_text(n.configs["n1"].read_text())
    try:
        for node in NODES:
            n.start(node)
        n.admin("n1", "org", "add", "clinic", "--name", "Clinic")
        n.admin("n1", "vendor", "add", "acme", "--name", "Acme")
        lab.agreement("acme", "clinic", "access", unattended=True)
        lab.vendor_user("vera", "acme", PASSWORD)
        lab.enroll_agent("pc1", "clinic")
        yield n
    finally:
        lab.close()
        n.echo.close()


def agent_config(n: Nodes) -> Path:
    path = n.lab.root / "agent.toml"
    gateways = ", ".join(f'"{n.gateway(node)}"' for node in NODES)
    path.write_text(
        f"""
state_dir = "agent-pc1"
gateways = [{gateways}]
prompt = false

[targets]
echo = "127.0.0.1:{n.echo.port}"

[reconnect]
first = 0.2
max = 2
"""
    )
    return path


def test_agent_moves_to_another_node_when_its_node_is_killed(nodes: Nodes) -> None:
    n = nodes
    agent = n.lab.start("agent-pc1", "gw", "agent", "run", "--config", str(agent_config(n)))
    wait_for(lambda: "connected" in agent.output(), 20, "the agent to connect")
    first = next(node for node in NODES if f"connected gateway={n.gateway(node)}" in agent.output())
    watcher = next(node for node in NODES if node != first)
    wait_for(lambda: n.holder(watcher, "pc1") == first, 15, f"{watcher} to see pc1 on {first}")

    # The node dies without a word: no TLS close, no error frame, no last record.
    n.procs[first].stop(signal.SIGKILL)
    alive = [node for node in NODES if node != first]
    wait_for(lambda: n.holder(alive[0], "pc1") in alive, 30, "pc1 on a surviving node")
    second = n.holder(alive[0], "pc1")
    assert second in alive
    third = next(node for node in alive if node != second)
    assert agent.popen.poll() is None
    log = agent.output()
    assert f"connected gateway={n.gateway(second)}" in log.split("reconnecting")[-1]
    waits = [float(w) for w in re.findall(r"reconnecting seconds=([\d.]+)", log)]
    assert waits and all(0 <= w <= 2 for w in waits)  # full jitter, under the cap

    # A vendor logged in to the third node reaches the service through the agent's
    # new node: the agent dials its data connection straight to the third node.
    wait_for(lambda: n.holder(third, "pc1") == second, 15, f"{third} to see pc1 on {second}")
    args = n.lab.connect_args(
        "pc1", "vera", "echo", "access", "--stdio", "--password-stdin", "--totp", n.lab.totp("vera")
    )
    args[args.index("--gateway") + 1] = n.gateway(third)
    result = n.lab.run(*args, input=f"{PASSWORD}\nfailover\n", check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "FAILOVER\n"

    def records(node: str, event: str) -> list[dict[str, Any]]:
        lines = n.trail(node).read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["event"] == event]

    assert [r for r in records(second, "agent.connect") if r["agent"] == "pc1"]
    assert [r for r in records(third, "tunnel.start") if r.get("agent") == "pc1"]

    # The three trails read as one, merged by time, and each chain verifies on its own.
    trails = [a for node in NODES for a in ("--trail", str(n.trail(node).parent))]
    merged = n.lab.run("gw", "audit", *trails, "--agent", "pc1", "--json").stdout
    recs = [json.loads(line) for line in merged.splitlines()]
    assert [r["ts"] for r in recs] == sorted(r["ts"] for r in recs)
    connects = [r["node"] for r in recs if r["event"] == "agent.connect"]
    assert connects[0] == first and connects[-1] == second
    verify = n.lab.run("gw", "audit", *trails, "verify", check=False)
    for node in alive:
        assert f"node {node} ({n.trail(node)}): ok:" in verify.stdout, verify.stderr
