"""An agent that knows several gateway nodes moves to another when its node dies.

Two real gatewayd processes on loopback serve the same directory (the second started
from a copy of the first's state: same CA, same enrolled agent, same users), each with
its own audit trail and signing key. A real ``gw agent run`` reads its nodes, targets
and backoff from its config file. The node that holds the agent is killed with
SIGKILL (no goodbye on the wire); the agent is back on the other node, which records
its ``agent.connect``, and a vendor's tunnel through that node reaches the service.
"""

from __future__ import annotations

import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.demo import EchoServer, Lab, free_port, wait_for

PASSWORD = "failover pass phrase"


def connects(lab: Lab, agent: str) -> int:
    return sum(1 for r in lab.events("agent.connect") if r.get("agent") == agent)


def second_node(first: Lab, root: Path) -> Lab:
    """A node on another port from a copy of ``first``'s state (``first`` is stopped),
    with its own node id, audit trail and audit signing key."""
    lab = Lab(root, port=free_port())
    src, dst = first.root / "gw", root / "gw"
    shutil.copytree(
        src,
        dst,
        ignore=shutil.ignore_patterns("audit", "audit.key*", "*.sock", "*-wal", "*-shm"),
    )
    text = (dst / "gatewayd.toml").read_text()
    text = text.replace(first.gateway, lab.gateway)
    text = re.sub(r"(?m)^node_id = .*$", 'node_id = "gw2"', text)
    (dst / "gatewayd.toml").write_text(text)
    lab.totp_secrets = dict(first.totp_secrets)
    return lab


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Lab, EchoServer]]:
    root = tmp_path_factory.mktemp("failover")
    one = Lab(root / "n1")
    one.init()
    text = one.config.read_text()
    one.config.write_text(re.sub(r"(?m)^node_id = .*$", 'node_id = "gw1"', text))
    gateway = one.start_gateway()
    one.admin("org", "add", "clinic", "--name", "Clinic")
    one.admin("vendor", "add", "acme", "--name", "Acme")
    one.agreement("acme", "clinic", "access", unattended=True)
    one.vendor_user("vera", "acme", PASSWORD)
    one.enroll_agent("pc1", "clinic")
    # A consistent copy of the state: the first node stopped while it is taken.
    assert gateway.stop() == 0
    one.procs.remove(gateway)
    two = second_node(one, root / "n2")
    one.start_gateway()
    two.start_gateway()
    echo = EchoServer()
    try:
        yield one, two, echo
    finally:
        one.close()
        two.close()
        echo.close()


def agent_config(one: Lab, two: Lab, echo: EchoServer) -> Path:
    path = one.root / "agent.toml"
    path.write_text(
        f"""
state_dir = "agent-pc1"
gateways = ["{one.gateway}", "{two.gateway}"]
prompt = false

[targets]
echo = "127.0.0.1:{echo.port}"

[reconnect]
first = 0.2
max = 2
"""
    )
    return path


def test_agent_moves_to_the_other_node_when_its_node_is_killed(
    nodes: tuple[Lab, Lab, EchoServer],
) -> None:
    one, two, echo = nodes
    config = agent_config(one, two, echo)
    agent = one.start("agent-pc1", "gw", "agent", "run", "--config", str(config))

    def holder() -> Lab | None:
        held = [lab for lab in (one, two) if connects(lab, "pc1")]
        return held[0] if len(held) == 1 else None

    wait_for(lambda: holder() is not None, 20, "the agent to connect to a node")
    first = holder()
    assert first is not None
    other = two if first is one else one
    assert f"connected gateway={first.gateway}" in agent.output()
    before = connects(other, "pc1")

    # The node dies without a word: no TLS close, no error frame, no last record.
    node = next(p for p in first.procs if p.name == "gatewayd")
    node.stop(signal.SIGKILL)
    wait_for(lambda: connects(other, "pc1") > before, 20, "the agent on the other node")
    assert agent.popen.poll() is None
    log = agent.output()
    assert f"connected gateway={other.gateway}" in log.split("reconnecting")[-1]
    waits = [float(w) for w in re.findall(r"reconnecting seconds=([\d.]+)", log)]
    assert waits and all(0 <= w <= 2 for w in waits)  # full jitter under the cap

    # A vendor's tunnel through the surviving node reaches the service at the agent.
    result = other.connect_stdio("pc1", "vera", PASSWORD, "echo", "failover\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "FAILOVER\n"
    starts = [r for r in other.events("tunnel.start") if r.get("agent") == "pc1"]
    assert starts and starts[-1]["node"] == ("gw1" if other is one else "gw2")
