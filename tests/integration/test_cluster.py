"""Three gatewayd nodes over a real Mosquitto, sharing one directory on a real PostgreSQL.

One cluster for the module: node 1 holds the agent, clients log in to node 3 (or 2),
the admin acts on node 2. The tests attack what the cluster promises: a tunnel
across nodes goes straight from the agent to the client's node; a revocation or a
kill on one node ends the session on another within a second; a TOTP code used on
one node is refused on another; a broker outage leaves live tunnels flowing and
refuses new cross-node ones clearly, until the broker is back; a node killed outright
has its agents' presence cleared by its last will. The last test kills node 1.
"""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mosquitto import Mosquitto, mosquitto  # noqa: F401 - the module's broker fixture
from postgres import PostgresServer, postgres_server  # noqa: F401 - the session's PostgreSQL
from world import PASSWORD

from gatewayd.demo import EchoServer, Lab, Proc, free_port, round_trip, wait_for

pytestmark = pytest.mark.skipif(
    pytest.importorskip("aiomqtt") is None, reason="aiomqtt (the cluster extra) is missing"
)

NODES = ("n1", "n2", "n3")


@dataclass
class Node:
    name: str
    port: int
    config: Path
    audit: Path
    admin_sock: Path
    proc: Proc | None = None

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.port}"

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        rows = [json.loads(line) for line in self.audit.read_text().splitlines() if line]
        return [r for r in rows if event is None or r["event"] == event]


@dataclass
class Cluster:
    lab: Lab
    broker: Mosquitto
    echo: EchoServer
    nodes: dict[str, Node] = field(default_factory=dict)
    agent: Proc | None = None

    def admin(self, node: str, *args: str, input: str | None = None) -> str:
        cfg = str(self.nodes[node].config)
        return self.lab.run("gw", "admin", "--config", cfg, *args, input=input).stdout

    def status(self, node: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.admin(node, "status"))
        return out

    def start_node(self, name: str) -> None:
        node = self.nodes[name]
        node.proc = self.lab.start(f"gatewayd-{name}", "gatewayd", "--config", str(node.config))

        def ready() -> bool:
            assert node.proc is not None
            if node.proc.popen.poll() is not None:
                raise RuntimeError(f"gatewayd {name} exited: {node.proc.output()[-2000:]}")
            return node.admin_sock.exists() and node.audit.exists()

        wait_for(ready, 60, f"gatewayd {name} to start")

    def knows_agent(self, name: str, agent: str, holder: str) -> bool:
        cluster = self.status(name).get("cluster", {})
        return bool(cluster.get("bus") == "up" and cluster.get("agents", {}).get(agent) == holder)

    def connect_args(self, node: str, user: str, code: str, *extra: str) -> list[str]:
        args = self.lab.connect_args("pc1", user, "echo", "access", "--totp", code, *extra)
        args[args.index("--gateway") + 1] = self.nodes[node].gateway
        return args

    def open_local(self, node: str, user: str) -> tuple[Proc, int]:
        """``gw connect -L`` through ``node``: the process and its local port."""
        port = free_port()
        args = self.connect_args(
            node, user, self.lab.totp(user), "-L", f"127.0.0.1:{port}", "--password-stdin"
        )
        pw = self.lab.root / f"pw-{user}-{port}"
        pw.write_text(PASSWORD + "\n")
        with pw.open("rb") as stdin:
            proc = self.lab.start(f"connect-{user}-{port}", *args, stdin=stdin)

        def ready() -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"gw connect exited: {proc.output()[-2000:]}")
            return "listening on" in proc.output()

        wait_for(ready, 60, "gw connect -L to listen")
        return proc, port

    def session_of(self, node: str, user: str) -> str:
        starts = [r for r in self.nodes[node].records("session.start") if r["user"] == user]
        assert starts, f"no session.start for {user} on {node}"
        return str(starts[-1]["session"])

    def stdio(self, node: str, user: str, code: str, data: str) -> subprocess.CompletedProcess[str]:
        args = self.connect_args(node, user, code, "--stdio", "--password-stdin")
        return self.lab.run(*args, input=f"{PASSWORD}\n{data}", check=False)


#: The three nodes' broker takes TLS (the gateway CA's server certificate) and a password;
#: they speak MQTT 3.1.1 to it (the --workers test speaks 5, in plain text).
MQTT_USER, MQTT_PASSWORD = "gatewayd", "mqtt pass phrase"
CLUSTER_TABLE = """[cluster]
mqtt = "127.0.0.1:{port}"
mqtt_version = "3.1.1"
mqtt_ca_file = "tls/ca.pem"
mqtt_username = "{user}"
mqtt_password_file = "mqtt.password"
reply_timeout = 2
database = "{database}"
"""


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    mosquitto: Mosquitto,  # noqa: F811 - only to skip where mosquitto is missing
    postgres_server: PostgresServer,  # noqa: F811
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    lab = Lab(root)
    database = postgres_server.fresh_dsn()  # the directory the three nodes share
    table = CLUSTER_TABLE.format(port=free_port(), user=MQTT_USER, database=database)
    lab.init(extra_config=table + "[lockout]\nthreshold = 100\n")
    gw = lab.config.parent
    (gw / "mqtt.password").write_text(MQTT_PASSWORD + "\n")
    port = int(re.findall(r'mqtt = "127.0.0.1:(\d+)"', table)[0])
    tls = (gw / "tls" / "ca.pem", gw / "tls" / "server.pem", gw / "tls" / "server.key")
    broker = Mosquitto(root / "mqtt", port, tls=tls, users={MQTT_USER: MQTT_PASSWORD})
    broker.start()
    base = lab.config.read_text()
    echo = EchoServer()
    c = Cluster(lab, broker, echo)
    for i, name in enumerate(NODES):
        port = lab.port if i == 0 else free_port()
        text = re.sub(r'node_id = "[^"]*"', f'node_id = "{name}"', base, count=1)
        text = text.replace(f'listen = "{lab.gateway}"', f'listen = "127.0.0.1:{port}"', 1)
        if i:  # its own audit trail and admin socket; the directory is shared
            text = text.replace('path = "audit/audit.jsonl"', f'path = "audit-{name}/audit.jsonl"')
            text = text.replace('socket = "admin.sock"', f'socket = "admin-{name}.sock"')
        config = lab.config if i == 0 else lab.config.with_name(f"gatewayd-{name}.toml")
        config.write_text(text)
        gw = config.parent
        audit = gw / ("audit/audit.jsonl" if i == 0 else f"audit-{name}/audit.jsonl")
        sock = gw / ("admin.sock" if i == 0 else f"admin-{name}.sock")
        c.nodes[name] = Node(name, port, config, audit, sock)
    try:
        for name in NODES:
            c.start_node(name)
        c.admin("n2", "org", "add", "clinic", "--name", "Clinic")
        c.admin("n2", "vendor", "add", "acme", "--name", "Acme")
        agreement = c.admin(
            "n2", "agreement", "add", "--vendor", "acme", "--org", "clinic", "--modes", "access",
            "--unattended",
        ).strip()  # fmt: skip
        for side in ("vendor", "org"):
            c.admin("n2", "agreement", "accept", agreement, "--side", side)
        lab.enroll_agent("pc1", "clinic")  # through node 1: the agent's gateway
        c.agent = lab.start_agent("pc1", {"echo": echo.port})
        wait_for(lambda: c.knows_agent("n3", "pc1", "n1"), 60, "node 3 to see pc1 on node 1")
        yield c
    finally:
        lab.close()
        echo.close()
        broker.stop()


def _user(c: Cluster, name: str, vendor: str = "acme") -> str:
    """A vendor user with a password and TOTP, made through node 2."""
    c.admin("n2", "user", "add", name, "--vendor", vendor, "--password-stdin", input=PASSWORD)
    c.lab.totp_secrets[name] = json.loads(c.admin("n2", "totp", "enroll", name, "--json"))["secret"]
    return name


# A bound on waits for an event: a guard against a hang, never a speed promise (a loaded
# machine makes every step slower; speed belongs in bench/).
HANG_GUARD = 30.0


def _wait_ended(node: Node, sid: str, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in node.records("session.end"):
            if r["session"] == sid:
                return r
        time.sleep(0.02)
    return None


def test_a_tunnel_across_nodes_goes_straight_to_the_clients_node(cluster: Cluster) -> None:
    user = _user(cluster, "cross1")
    proc, port = cluster.open_local("n3", user)
    assert round_trip(port, b"hello across the cluster\n") == b"HELLO ACROSS THE CLUSTER\n"
    sid = cluster.session_of("n3", user)
    proc.stop()
    # The tunnel was spliced on node 3 (the agent dialled it), never on node 1, and ran
    # the cipher the agent said in its hello on node 1 (carried by its presence).
    starts = [r for r in cluster.nodes["n3"].records("tunnel.start") if r["session"] == sid]
    assert starts and all(r["cipher"] == "AESGCM" for r in starts)
    assert not [r for r in cluster.nodes["n1"].records("tunnel.start") if r["session"] == sid]
    assert all(r["node"] == "n3" for r in cluster.nodes["n3"].records())


def test_a_node_asked_for_an_agent_it_does_not_hold_answers_offline(cluster: Cluster) -> None:
    user = _user(cluster, "offline1")
    result = cluster.lab.run(
        *cluster.connect_args("n2", user, cluster.lab.totp(user), "--stdio", "--password-stdin"),
        input=f"{PASSWORD}\n",
        check=False,
    )
    assert result.returncode == 0, result.stderr  # pc1 is on n1 and reachable from n2
    args = cluster.connect_args("n2", user, cluster.lab.totp(user), "--stdio", "--password-stdin")
    args[args.index("pc1")] = "ghost"
    result = cluster.lab.run(*args, input=f"{PASSWORD}\n", check=False)
    assert result.returncode != 0
    assert "ghost" in result.stderr


def test_a_revocation_on_node_2_ends_the_session_on_node_3(cluster: Cluster) -> None:
    user = _user(cluster, "revoked1")
    proc, port = cluster.open_local("n3", user)
    assert round_trip(port, b"before\n") == b"BEFORE\n"
    sid = cluster.session_of("n3", user)
    cluster.admin("n2", "user", "disable", user)
    ended = _wait_ended(cluster.nodes["n3"], sid, HANG_GUARD)
    assert ended is not None, "node 3 did not end the session"
    assert "no longer allowed" in ended["reason"]
    proc.stop()


def test_an_admin_logout_on_node_2_ends_the_login_session_on_node_3(cluster: Cluster) -> None:
    user = _user(cluster, "loggedout1")
    lab, n3 = cluster.lab, cluster.nodes["n3"]
    where = ["--gateway", n3.gateway, "--ca-file", str(lab.ca_file), "--user", user]
    code = lab.totp(user)
    lab.run("gw", "login", *where, "--password-stdin", "--totp", code, input=PASSWORD + "\n")
    port = free_port()
    args = ["connect", "pc1", *where, "--target", "echo", "-L", f"127.0.0.1:{port}"]
    proc = lab.start(f"connect-{user}", "gw", *args, "--reason", "r")
    wait_for(lambda: "listening on" in proc.output(), HANG_GUARD, "gw connect -L to listen")
    assert round_trip(port, b"before\n") == b"BEFORE\n"
    sid = cluster.session_of("n3", user)
    cluster.admin("n2", "user", "logout", user)
    ended = _wait_ended(n3, sid, HANG_GUARD)
    assert ended is not None, "node 3 did not end the session"
    assert ended["reason"].startswith("login ended: ended by administrator"), ended
    proc.stop()


def test_a_kill_on_node_2_ends_the_session_on_node_3(cluster: Cluster) -> None:
    user = _user(cluster, "killed1")
    proc, port = cluster.open_local("n3", user)
    assert round_trip(port, b"before\n") == b"BEFORE\n"
    sid = cluster.session_of("n3", user)
    out = cluster.admin("n2", "sessions", "kill", sid)
    assert sid in out
    ended = _wait_ended(cluster.nodes["n3"], sid, HANG_GUARD)
    assert ended is not None and ended["reason"].startswith("killed by"), ended
    proc.stop()
    # A session no node holds: a clear refusal, not a hang.
    result = cluster.lab.run(
        "gw", "admin", "--config", str(cluster.nodes["n2"].config), "sessions", "kill",
        "0123456789abcdef", check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "no live session" in result.stderr


def test_an_approval_at_the_machine_crosses_nodes(cluster: Cluster) -> None:
    """The request goes from node 3 to the agent on node 1, the answer comes back."""
    c = cluster
    c.admin("n2", "vendor", "add", "att", "--name", "Attended AS")
    agreement = c.admin(
        "n2", "agreement", "add", "--vendor", "att", "--org", "clinic", "--modes", "access"
    ).strip()
    for side in ("vendor", "org"):
        c.admin("n2", "agreement", "accept", agreement, "--side", side)
    user = _user(c, "attended1", vendor="att")
    args = c.connect_args("n3", user, c.lab.totp(user), "--stdio", "--password-stdin")
    # Standard output a pipe, as ssh gives a ProxyCommand (gw connect --stdio > FILE
    # aborts in uvloop: reported, not this test's subject).
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "gw"), *args[1:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=c.lab.env(),
    )
    assert proc.stdin is not None
    proc.stdin.write(f"{PASSWORD}\nplease\n".encode())
    proc.stdin.close()
    state = str(c.lab.root / "agent-pc1")
    pending: list[dict[str, Any]] = []

    def asked() -> bool:
        out = c.lab.run("gw", "agent", "approvals", "--state-dir", state, "--json").stdout
        pending[:] = json.loads(out) if out.strip().startswith("[") else []
        return bool(pending)

    wait_for(asked, 60, "the approval request at the agent")
    assert pending[0]["user"] == user and pending[0]["vendor_name"] == "Attended AS"
    c.lab.run("gw", "agent", "approve", pending[0]["id"], "--state-dir", state)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.wait(30) == 0, proc.stderr.read().decode()
    assert proc.stdout.read() == b"PLEASE\n"
    proc.stdout.close()
    proc.stderr.close()
    (result,) = [r for r in c.nodes["n3"].records("approval.result") if r["user"] == user]
    assert result["outcome"] == "approved"
    assert not [r for r in c.nodes["n1"].records("approval.result") if r["user"] == user]


def test_a_totp_code_used_on_one_node_is_refused_on_another(cluster: Cluster) -> None:
    user = _user(cluster, "replay1")
    code = cluster.lab.totp(user)
    first = cluster.stdio("n1", user, code, "first\n")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "FIRST\n"
    again = cluster.stdio("n2", user, code, "again\n")
    assert again.returncode != 0
    assert again.stdout == ""
    failures = [
        r
        for r in cluster.nodes["n2"].records("auth.attempt")
        if r["user"] == user and r["factor"] == "totp"
    ]
    assert failures and failures[-1]["outcome"] == "failure", failures


def test_a_node_with_a_wrong_broker_password_stays_off_the_bus(cluster: Cluster) -> None:
    n2 = cluster.nodes["n2"]
    port = free_port()
    text = n2.config.read_text().replace('node_id = "n2"', 'node_id = "n4"')
    text = text.replace(f'listen = "127.0.0.1:{n2.port}"', f'listen = "127.0.0.1:{port}"')
    text = text.replace("audit-n2/", "audit-n4/").replace("admin-n2.sock", "admin-n4.sock")
    text = text.replace('"mqtt.password"', '"wrong.password"')
    gw = n2.config.parent
    (gw / "wrong.password").write_text("not the password\n")
    config = gw / "gatewayd-n4.toml"
    config.write_text(text)
    cluster.nodes["n4"] = Node(
        "n4", port, config, gw / "audit-n4" / "audit.jsonl", gw / "admin-n4.sock"
    )
    try:
        cluster.start_node("n4")
        n4 = cluster.nodes["n4"]
        assert n4.proc is not None
        proc = n4.proc
        wait_for(lambda: "cannot connect to the cluster bus" in proc.output(), 60, "n4's refusal")
        assert cluster.status("n4")["cluster"]["bus"] == "down"
        assert "n4" not in cluster.status("n3")["cluster"]["nodes"]
    finally:
        if cluster.nodes["n4"].proc is not None:
            cluster.nodes["n4"].proc.stop()
        del cluster.nodes["n4"]


def test_a_broker_outage_keeps_live_tunnels_and_refuses_new_cross_node_ones(
    cluster: Cluster,
) -> None:
    user = _user(cluster, "outage1")
    proc, port = cluster.open_local("n3", user)
    live = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        live.sendall(b"one\n")
        assert live.recv(100) == b"ONE\n"
        cluster.broker.stop()
        wait_for(
            lambda: cluster.status("n3")["cluster"]["bus"] == "down", 20, "node 3 to see the outage"
        )
        live.sendall(b"two\n")  # the spliced tunnel never touches the bus
        assert live.recv(100) == b"TWO\n"
        # A new tunnel to an agent of node 1: refused, saying why.
        assert round_trip(port, b"three\n") == b""
        refused = [r for r in cluster.nodes["n3"].records("tunnel.refused") if r["user"] == user]
        assert refused and "cluster bus is down" in refused[-1]["reason"], refused
        # A new session too.
        late = _user_offline(cluster)
        assert late.returncode != 0 and "cluster bus is down" in late.stderr, late.stderr
        cluster.broker.start()
        wait_for(lambda: cluster.knows_agent("n3", "pc1", "n1"), 60, "presence after the outage")
        live.sendall(b"four\n")
        assert live.recv(100) == b"FOUR\n"
        assert round_trip(port, b"five\n") == b"FIVE\n"
    finally:
        live.close()
        proc.stop()
        if not cluster.broker.running:
            cluster.broker.start()


def _user_offline(cluster: Cluster) -> subprocess.CompletedProcess[str]:
    """A login on node 3 while the broker is down (the directory is not on the bus)."""
    user = "outage2"
    if user not in cluster.lab.totp_secrets:
        _user(cluster, user)
    return cluster.stdio("n3", user, cluster.lab.totp(user), "x\n")


def test_a_postgresql_outage_refuses_new_logins_clearly_and_keeps_live_tunnels(
    cluster: Cluster,
    postgres_server: PostgresServer,  # noqa: F811
) -> None:
    user, late = _user(cluster, "pgout1"), _user(cluster, "pgout2")
    proc, port = cluster.open_local("n3", user)
    live = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        live.sendall(b"one\n")
        assert live.recv(100) == b"ONE\n"
        postgres_server.stop()
        live.sendall(b"two\n")  # the spliced tunnel never touches the directory
        assert live.recv(100) == b"TWO\n"
        # A new login fails closed, and the client is told why.
        refused = cluster.stdio("n2", late, cluster.lab.totp(late), "x\n")
        assert refused.returncode != 0
        assert "cannot reach its directory database" in refused.stderr, refused.stderr
        live.sendall(b"three\n")
        assert live.recv(100) == b"THREE\n"
        postgres_server.start()
        # The node's pool reconnects by itself: the next login works.
        wait_for(
            lambda: cluster.stdio("n2", late, cluster.lab.totp(late), "x\n").returncode == 0,
            30,
            "a login after PostgreSQL is back",
        )
        live.sendall(b"four\n")
        assert live.recv(100) == b"FOUR\n"
        assert round_trip(port, b"five\n") == b"FIVE\n"
    finally:
        live.close()
        proc.stop()
        if postgres_server.proc is None:
            postgres_server.start()


def test_a_killed_node_has_its_agents_presence_cleared_by_its_last_will(
    cluster: Cluster,
) -> None:
    paho = pytest.importorskip("paho.mqtt.client")
    n1 = cluster.nodes["n1"]
    assert n1.proc is not None
    assert cluster.knows_agent("n3", "pc1", "n1")
    n1.proc.stop(signal.SIGKILL)
    wait_for(lambda: "pc1" not in cluster.status("n3")["cluster"]["agents"], 60, "pc1 offline")
    assert cluster.status("n2")["cluster"]["nodes"].get("n1") == "dead"
    # What the broker keeps: node 1 dead, pc1's presence gone.
    retained: dict[str, bytes] = {}
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.on_message = lambda _c, _u, msg: retained.__setitem__(msg.topic, msg.payload)
    client.tls_set(ca_certs=str(cluster.lab.config.parent / "tls" / "ca.pem"))
    client.username_pw_set(MQTT_USER, MQTT_PASSWORD)
    client.connect("127.0.0.1", cluster.broker.port)
    client.subscribe([("gw/v1/nodes/+", 1), ("gw/v1/agents/+", 1)])
    # The broker sends what it retains right after the subscription: wait for node 1's.
    deadline = time.monotonic() + HANG_GUARD
    while "gw/v1/nodes/n1" not in retained and time.monotonic() < deadline:
        client.loop(0.05)
    client.loop(0.2)  # and whatever came in the same burst
    client.disconnect()
    assert json.loads(retained["gw/v1/nodes/n1"])["state"] == "dead"
    assert not retained.get("gw/v1/agents/pc1")
    # A client on node 3 now hears that the agent is offline.
    user = _user(cluster, "afterkill1")
    result = cluster.stdio("n3", user, cluster.lab.totp(user), "x\n")
    assert result.returncode != 0 and "not connected" in result.stderr, result.stderr


def test_workers_need_a_cluster(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.init()
    result = lab.run("gatewayd", "--config", str(lab.config), "--workers", "2", check=False)
    assert result.returncode != 0
    assert "--workers: needs [cluster]" in result.stderr, result.stderr


def _free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports, below the ephemeral range.

    ``--workers N`` listens for data on ``data_listen``'s port + i - 1: a port next to
    an ephemeral one is any outgoing connection's to take (a parallel test's did).
    """
    low, _ = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for first in random.sample(range(10000, max(low, 10001 + count) - count), 200):
        held: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


def test_workers_share_the_port_and_each_is_a_node(
    tmp_path_factory: pytest.TempPathFactory,
    mosquitto: Mosquitto,  # noqa: F811 - only to skip where mosquitto is missing
) -> None:
    lab = Lab(tmp_path_factory.mktemp("workers"))
    broker = Mosquitto(lab.root / "mqtt")  # a cluster of its own: one broker per cluster
    broker.start()
    data = _free_port_run(2)  # worker 2 listens on data + 1
    lab.init(
        extra_config=f'[cluster]\nmqtt = "{broker.address}"\ndata_listen = "127.0.0.1:{data}"\n',
        gateway_keys='node_id = "w"',
    )
    text = re.sub(r'node_id = "[^w][^"]*"\n', "", lab.config.read_text(), count=1)
    lab.config.write_text(text)
    echo = EchoServer()
    try:
        proc = lab.start(
            "gatewayd-workers", "gatewayd", "--config", str(lab.config), "--workers", "2"
        )
        gw = lab.config.parent
        trails = [gw / "audit" / f"w-{i}" / "audit.jsonl" for i in (1, 2)]
        wait_for(
            lambda: (gw / "admin.sock").exists() and (gw / "admin-w-2.sock").exists()
            and all(t.exists() for t in trails),
            20,
            "both workers to start",
        )  # fmt: skip
        lab.admin("org", "add", "clinic", "--name", "Clinic")
        lab.admin("vendor", "add", "acme", "--name", "Acme")
        lab.agreement("acme", "clinic", "access", unattended=True)
        lab.enroll_agent("pc1", "clinic")
        lab.start_agent("pc1", {"echo": echo.port})
        status = lambda: json.loads(lab.admin("status"))["cluster"]  # noqa: E731
        wait_for(lambda: "pc1" in status()["agents"], 60, "worker 1 to see pc1")
        assert status()["nodes"] == {"w-2": "up"}
        users = [f"wk{i}" for i in range(2)]
        for user in users:  # each login lands on either worker; its tunnels follow it
            lab.vendor_user(user, "acme", PASSWORD)
            result = lab.connect_stdio("pc1", user, PASSWORD, "echo", f"via {user}\n")
            assert result.returncode == 0, result.stderr
            assert result.stdout == f"VIA {user.upper()}\n"
        records = [json.loads(line) for t in trails for line in t.read_text().splitlines()]
        assert {r["node"] for r in records} == {"w-1", "w-2"}
        assert proc.stop() == 0
    finally:
        lab.close()
        echo.close()
        broker.stop()
