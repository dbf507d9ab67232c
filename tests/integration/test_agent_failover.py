"""An agent that knows every node of the cluster moves to another when its node dies.

Three real gatewayd nodes on loopback joined by a real Mosquitto, sharing one
directory in a real PostgreSQL, each with its own audit trail. A real ``gw agent
run`` reads the three nodes, its target and its backoff from its config file. The
node that holds the agent is killed with SIGKILL (no goodbye on the wire): the agent
is back on another node (its presence says so on the third), and a vendor logged in
to the third node reaches the service through it: a tunnel across nodes after the
failover. Every node's trail then reads as one with ``gw audit --trail``, and each
chain verifies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.demo import EchoServer, wait_for
from gatewayd.demo_cluster import MOSQUITTO, Cluster, postgres_bin

pytest.importorskip("aiomqtt", reason="aiomqtt (the cluster extra) is missing")

PASSWORD = "failover pass phrase"
NODES = ("n1", "n2", "n3")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (Debian package mosquitto; make test installs it)")
    # The directory in PostgreSQL where it is installed (make test installs it).
    c = Cluster(tmp_path_factory.mktemp("failover"), 3, postgres=postgres_bin() is not None)
    try:
        c.start()
        c.admin("n1", "org", "add", "clinic", "--name", "Clinic")
        c.admin("n1", "vendor", "add", "acme", "--name", "Acme")
        c.lab.agreement("acme", "clinic", "access", unattended=True)
        c.lab.vendor_user("vera", "acme", PASSWORD)
        c.lab.enroll_agent("pc1", "clinic")
        yield c
    finally:
        c.close()


def test_agent_moves_to_another_node_when_its_node_is_killed(nodes: Cluster) -> None:
    n = nodes
    echo = EchoServer()
    cfg = n.agent_config("pc1", {"echo": echo.port}, NODES, backoff=(0.2, 2.0))
    agent = n.lab.start("agent-pc1", "gw", "agent", "run", "--config", str(cfg))
    # Where the agent is, as the cluster sees it (its presence, read through n1).
    wait_for(lambda: n.holder("n1", "pc1") is not None, 60, "the agent on a node")
    first = n.holder("n1", "pc1")
    assert first is not None and first in NODES
    assert f"connected gateway={n.gateway(first)}" in agent.output()

    # The node dies without a word: no TLS close, no error frame, no last record.
    n.kill(first)
    alive = [node for node in NODES if node != first]
    wait_for(lambda: n.holder(alive[0], "pc1") in alive, 60, "pc1 on a surviving node")
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
    wait_for(lambda: n.holder(third, "pc1") == second, 60, f"{third} to see pc1 on {second}")
    result = n.connect_stdio(third, "pc1", "vera", PASSWORD, "echo", "failover\n")
    echo.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == "FAILOVER\n"

    def records(node: str, event: str) -> list[dict[str, Any]]:
        lines = n.trail(node).read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["event"] == event]

    assert [r for r in records(second, "agent.connect") if r["agent"] == "pc1"]
    assert [r for r in records(third, "tunnel.start") if r.get("agent") == "pc1"]

    # The three trails read as one, merged by time, and each chain verifies on its own.
    trails = n.trail_args()
    merged = n.lab.run("gw", "audit", *trails, "--agent", "pc1", "--json").stdout
    recs = [json.loads(line) for line in merged.splitlines()]
    assert [r["ts"] for r in recs] == sorted(r["ts"] for r in recs)
    connects = [r["node"] for r in recs if r["event"] == "agent.connect"]
    assert connects[0] == first and connects[-1] == second
    verify = n.lab.run("gw", "audit", *trails, "verify", check=False)
    for node in alive:
        assert f"node {node} ({n.trail(node)}): ok:" in verify.stdout, verify.stderr
