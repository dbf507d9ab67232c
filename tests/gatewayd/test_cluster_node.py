"""A cluster node's directory in process: what it does with each note from the bus,
and what it publishes. The bus is a fake that records publications; no broker, no
sockets, no sleeps. Malformed notes are dropped, never raised."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from gatewayd.agent import AgentConn, Agents
from gatewayd.cluster import wire
from gatewayd.cluster.directory import ClusterDirectory, ClusterUnavailable, RemoteAgent
from gatewayd.cluster.workers import check, worker_config
from gatewayd.config import ClusterSection, parse
from gatewayd.event import AdminChanged, AgentConnected, AgentDisconnected, Event
from gatewayd.session import Approvals, SessionDirectory
from gatewayd.tunnel import DialError, DialPairing
from relay import message as m
from relay.errors import ConfigError, ProtocolError

ME, OTHER = "n3", "n1"
SECTION = ClusterSection(node_id=ME, mqtt=("127.0.0.1", 1883), data_address=("127.0.0.1", 9003))


class FakeBus:
    def __init__(self) -> None:
        self.up = True
        self.connections = 1
        self.direct_topic = wire.direct_topic(ME)
        self.sent: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        if not self.up:
            return False
        self.sent.append((topic, payload, retain))
        return True

    async def flush(self, timeout: float) -> None:
        pass

    def notes(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _ in self.sent if t == topic]


class FakeEvents:
    def __init__(self) -> None:
        self.subscribers: list[Any] = []

    def subscribe(self, subscriber: Any) -> None:
        self.subscribers.append(subscriber)

    def publish(self, event: Event) -> None:
        for s in self.subscribers:
            s(event)


class AgentLink:
    def __init__(self) -> None:
        self.sent: list[m.Message] = []

    def send(self, msg: m.Message) -> None:
        self.sent.append(msg)


class Node:
    def __init__(self) -> None:
        self.dials = DialPairing()
        self.approvals = Approvals()
        self.events = FakeEvents()
        self.revalidated: list[str] = []
        self.agents = Agents(
            None,  # type: ignore[arg-type]  # the store: not asked here
            self.events,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            on_dial_failed=self.dials.fail,
            on_approval=self.approvals.answer,
        )
        self.dir = ClusterDirectory(
            self.agents,
            SECTION,
            events=self.events,  # type: ignore[arg-type]
            dials=self.dials,
            approvals=self.approvals,
            revalidate=self.revalidate,
        )
        self.bus = FakeBus()
        self.dir.bus = self.bus  # type: ignore[assignment]

    async def revalidate(self, why: str) -> int:
        self.revalidated.append(why)
        return 0

    def hold(self, agent: str, since: float = 100.0) -> AgentLink:
        link = AgentLink()
        conn = AgentConn(agent, "clinic", link, frozenset({"echo"}), since, "192.0.2.1:1")  # type: ignore[arg-type]
        self.agents.online[agent] = conn
        return link

    def note(self, topic: str, payload: dict[str, Any] | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.dir.receive(topic, data)


def presence(node: str, since: float = 50.0) -> dict[str, Any]:
    return {"node": node, "targets": ["echo"], "since": since}


def dial(token: str = "tok") -> m.Dial:
    return m.Dial(token, "echo", "s1", "k" * 43, "vera", "access")


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


# -- the wire ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        b'{"node": "n1"}',
        b'{"node": "n 1", "state": "up"}',
        b'{"node": "n1", "state": "zombie"}',
        b"{" + b'"x": "' + b"a" * wire.MAX_PAYLOAD + b'"}',
    ],
)
def test_a_malformed_node_state_is_refused(payload: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.NodeState.decode(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"node": "n1", "targets": "echo", "since": 1}',
        b'{"node": "n1", "targets": ["a b"], "since": 1}',
        b'{"node": "n1", "targets": [], "since": NaN}',
        b'{"node": "n1", "targets": [], "since": true}',
        b'{"node": "n1", "targets": [], "since": 1, "ciphers": "AESGCM"}',
        b'{"node": "n1", "targets": [], "since": 1, "ciphers": ["AES GCM"]}',
        b'{"node": "n1", "targets": [], "since": 1, "ciphers": [1]}',
    ],
)
def test_a_malformed_presence_is_refused(payload: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.Presence.decode(payload)


def test_topics_name_only_identifiers() -> None:
    assert wire.topic_id("gw/v1/agents/pc1", "agents") == "pc1"
    assert wire.topic_id("gw/v1/agents/a/b", "agents") is None
    assert wire.topic_id("gw/v1/agents/+", "agents") is None
    assert wire.topic_id("gw/v2/agents/pc1", "agents") is None
    assert wire.hostport(("::1", 8443)) == "[::1]:8443"


def test_garbage_from_the_bus_is_dropped_without_raising() -> None:
    node = Node()
    for topic, payload in [
        (wire.BROADCAST_TOPIC, b"\xff\xfe"),
        (wire.BROADCAST_TOPIC, b'{"kind": "kill", "from": "n1"}'),
        (wire.direct_topic(ME), b'{"kind": "agent", "from": "n1", "agent": "pc1", "msg": 5}'),
        (wire.direct_topic(ME), b'{"kind": "answer", "from": "n1", "msg": {"t": "dial"}}'),
        (wire.direct_topic(ME), b'{"kind": "shutdown", "from": "n1"}'),
        ("gw/v1/agents/pc1", b'{"node": 1}'),
        ("gw/v1/nodes/n2", b'{"node": "n9", "state": "up"}'),
        ("somewhere/else", b"{}"),
    ]:
        node.dir.receive(topic, payload)
    assert node.bus.sent == []


# -- presence ------------------------------------------------------------------------------


def test_an_agent_held_elsewhere_is_located_with_its_node_and_targets() -> None:
    node = Node()
    node.note("gw/v1/agents/pc1", presence(OTHER))
    place = node.dir.locate("pc1")
    assert place == RemoteAgent(OTHER, frozenset({"echo"}))
    node.bus.up = False
    place = node.dir.locate("pc1")
    assert place is not None and "cluster bus is down" in place.unreachable


def test_an_agents_ciphers_cross_nodes_with_its_presence() -> None:
    # A session opened on this node for an agent held by another runs the cipher the
    # agent said in its hello there; and a session opened while the agent was here
    # keeps its cipher's tunnels when the agent moves to another node.
    node = Node()
    link = node.hold("pc1")
    node.agents.online["pc1"] = dataclasses.replace(
        node.agents.online["pc1"], ciphers=("AESGCM", "ChaChaPoly")
    )
    assert link is not None
    node.events.publish(AgentConnected(agent="pc1", org="clinic", source="x", targets=["echo"]))
    assert node.bus.notes(wire.agent_topic("pc1"))[-1]["ciphers"] == ["AESGCM", "ChaChaPoly"]
    other = Node()
    other.note("gw/v1/agents/pc1", {**presence(OTHER), "ciphers": ["AESGCM", "ChaChaPoly"]})
    place = other.dir.locate("pc1")
    assert place is not None and place.ciphers == ("AESGCM", "ChaChaPoly")
    # An older node says none: ChaChaPoly, which every agent runs.
    other.note("gw/v1/agents/pc2", presence(OTHER))
    place = other.dir.locate("pc2")
    assert place is not None and place.ciphers == ()


def test_a_dead_node_takes_its_agents_offline_and_their_presence_is_cleared() -> None:
    node = Node()
    node.note("gw/v1/agents/pc1", presence(OTHER))
    node.note("gw/v1/nodes/n1", {"node": OTHER, "state": "dead"})
    assert node.dir.locate("pc1") is None
    assert (wire.agent_topic("pc1"), b"", True) in node.bus.sent
    # A presence still naming the dead node (retained, read late) does not bring it back.
    node.note("gw/v1/agents/pc1", presence(OTHER))
    assert node.dir.locate("pc1") is None


def test_a_node_says_it_is_up_over_an_old_will_but_not_while_it_stops() -> None:
    async def main() -> None:
        node = Node()
        dead = {"node": ME, "state": "dead"}
        node.note(wire.node_topic(ME), dead)  # its will from before a restart
        assert json.loads(node.bus.sent[-1][1])["state"] == "up"
        await node.dir.close()  # says dead itself...
        node.bus.sent.clear()
        node.note(wire.node_topic(ME), dead)  # ...and reads it back: no contradiction
        assert node.bus.sent == []

    run(main())


def test_a_presence_of_this_node_for_an_agent_it_does_not_hold_is_cleared() -> None:
    node = Node()
    node.note("gw/v1/agents/pc1", presence(ME))  # from before a restart
    assert node.bus.sent == [(wire.agent_topic("pc1"), b"", True)]
    assert node.dir.locate("pc1") is None


def test_an_agent_held_here_is_claimed_again_when_cleared_or_taken_by_an_older_one() -> None:
    node = Node()
    node.hold("pc1", since=100.0)
    node.note("gw/v1/agents/pc1", b"")
    node.note("gw/v1/agents/pc1", presence(OTHER, since=50.0))
    claims = node.bus.notes(wire.agent_topic("pc1"))
    assert [c["node"] for c in claims] == [ME, ME]
    # A newer connection elsewhere wins: this node does not fight it.
    node.bus.sent.clear()
    node.note("gw/v1/agents/pc1", presence(OTHER, since=200.0))
    assert node.bus.sent == []


def test_this_nodes_agents_are_announced_and_withdrawn() -> None:
    node = Node()
    node.hold("pc1")
    node.events.publish(AgentConnected(agent="pc1", org="clinic", source="x", targets=["echo"]))
    assert node.bus.notes(wire.agent_topic("pc1"))[-1]["node"] == ME
    del node.agents.online["pc1"]
    node.events.publish(AgentDisconnected(agent="pc1", source="x", reason="eof"))
    assert node.bus.sent[-1] == (wire.agent_topic("pc1"), b"", True)


# -- dial routing ------------------------------------------------------------------------


def test_a_dial_for_an_agent_elsewhere_goes_to_its_node_with_this_nodes_address() -> None:
    async def main() -> None:
        node = Node()
        node.note("gw/v1/agents/pc1", presence(OTHER))
        token, waiter = node.dials.expect("pc1")
        assert node.dir.ask_to_dial("pc1", dial(token))
        (note,) = node.bus.notes(wire.direct_topic(OTHER))
        assert note["kind"] == "agent" and note["agent"] == "pc1" and note["from"] == ME
        assert note["msg"]["address"] == "127.0.0.1:9003"
        # A refusal from a node that was not asked is ignored; from the node asked, it counts.
        node.note(
            wire.direct_topic(ME), {"kind": "failed", "from": "n2", "token": token, "reason": "x"}
        )
        assert not waiter.done()
        node.note(
            wire.direct_topic(ME),
            {"kind": "failed", "from": OTHER, "token": token, "reason": "no target echo"},
        )
        with pytest.raises(DialError, match="no target echo"):
            await waiter

    run(main())


def test_a_node_that_does_not_acknowledge_fails_the_dial_saying_so() -> None:
    async def main() -> None:
        node = Node()
        node.note("gw/v1/agents/pc1", presence(OTHER))
        token, waiter = node.dials.expect("pc1")
        node.dir.ask_to_dial("pc1", dial(token))
        node.dir._no_answer(token)  # the reply_timeout's timer
        with pytest.raises(DialError, match="gateway node n1 holding agent pc1 did not answer"):
            await waiter
        # An acknowledgement cancels it.
        token2, waiter2 = node.dials.expect("pc1")
        node.dir.ask_to_dial("pc1", dial(token2))
        node.note(wire.direct_topic(ME), {"kind": "ack", "from": OTHER, "token": token2})
        node.dir._no_answer(token2)
        assert not waiter2.done()

    run(main())


def test_with_the_bus_down_a_dial_across_nodes_fails_clearly() -> None:
    async def main() -> None:
        node = Node()
        node.note("gw/v1/agents/pc1", presence(OTHER))
        node.bus.up = False
        with pytest.raises(DialError, match="cluster bus is down"):
            node.dir.ask_to_dial("pc1", dial())

    run(main())


def test_a_relayed_dial_reaches_the_agent_here_and_its_refusal_goes_back() -> None:
    async def main() -> None:
        node = Node()
        link = node.hold("pc1")
        relayed = m.Dial("tok", "echo", "s1", "k" * 43, "vera", "access", "127.0.0.1:9001")
        note = {"kind": "agent", "from": OTHER, "agent": "pc1", "msg": relayed.to_json()}
        node.note(wire.direct_topic(ME), note)
        assert link.sent == [relayed]
        assert node.bus.notes(wire.direct_topic(OTHER)) == [
            {"kind": "ack", "from": ME, "token": "tok"}
        ]
        node.agents.on_dial_failed("tok", "pc1", "target echo unreachable")
        assert node.bus.notes(wire.direct_topic(OTHER))[-1]["kind"] == "failed"
        # A relayed dial for an agent not here: refused at once, and a dial without an
        # address (the agent would dial the wrong node) is dropped.
        node.note(wire.direct_topic(ME), {**note, "agent": "pc2"})
        assert (
            "not connected to gateway node n3"
            in node.bus.notes(wire.direct_topic(OTHER))[-1]["reason"]
        )
        local = {**note, "msg": dial().to_json()}
        node.note(wire.direct_topic(ME), local)
        assert link.sent == [relayed]

    run(main())


def test_an_approval_answer_goes_back_to_the_node_that_asked() -> None:
    async def main() -> None:
        node = Node()
        link = node.hold("pc1")
        approve = m.Approve("r1", "s1", "vera", "acme", "Acme", "access", "echo", "", "k", 60.0)
        node.note(
            wire.direct_topic(ME),
            {"kind": "agent", "from": OTHER, "agent": "pc1", "msg": approve.to_json()},
        )
        assert link.sent == [approve]
        node.agents.on_approval("pc1", m.ApprovalAnswer("r1", True, "nurse", ""))
        back = node.bus.notes(wire.direct_topic(OTHER))[-1]
        assert back["kind"] == "answer" and back["msg"]["by"] == "nurse"
        # On the asking side: an answer is taken only from the node the request went to.
        asker = Node()
        asker.note("gw/v1/agents/pc1", presence(OTHER))
        request, waiter = asker.approvals.expect("pc1")
        ask = m.Approve(request, "s1", "vera", "acme", "Acme", "access", "echo", "", "k", 60.0)
        assert asker.dir.send_to_agent("pc1", ask)
        answer = m.ApprovalAnswer(request, True, "nurse", "").to_json()
        asker.note(
            wire.direct_topic(ME), {"kind": "answer", "from": "n2", "agent": "pc1", "msg": answer}
        )
        assert not waiter.done()
        asker.note(
            wire.direct_topic(ME), {"kind": "answer", "from": OTHER, "agent": "pc1", "msg": answer}
        )
        assert waiter.done() and waiter.result().by == "nurse"

    run(main())


# -- revocation and kills ----------------------------------------------------------------


def test_an_admin_change_is_told_to_every_node_and_theirs_revalidate_here() -> None:
    async def main() -> None:
        node = Node()
        node.events.publish(AdminChanged(by="root", op="user.disable", touched={"user": "vera"}))
        (note,) = node.bus.notes(wire.BROADCAST_TOPIC)
        assert note["kind"] == "changed" and "user.disable by root on node n3" in note["why"]
        node.note(wire.BROADCAST_TOPIC, note)  # its own: nothing to do
        node.note(wire.BROADCAST_TOPIC, {**note, "from": OTHER})
        await asyncio.gather(*node.dir.tasks)
        assert node.revalidated == [note["why"]]
        # Made while the bus is down: told when it is back.
        node.bus.up = False
        node.events.publish(AdminChanged(by="root", op="grant.remove", touched={}))
        node.bus.up, node.bus.connections = True, 2
        node.dir._bus_up()
        assert "while the bus was down" in node.bus.notes(wire.BROADCAST_TOPIC)[-1]["why"]
        await asyncio.gather(*node.dir.tasks)
        assert node.revalidated[-1] == "the cluster bus is back"

    run(main())


def test_a_kill_reaches_the_node_that_holds_the_session() -> None:
    async def main() -> None:
        node = Node()
        ended: list[tuple[str, str]] = []
        node.dir.end = lambda sid, reason: ended.append((sid, reason)) or sid == "s1"  # type: ignore[method-assign]
        kill = {
            "kind": "kill",
            "from": OTHER,
            "session": "s1",
            "reason": "killed by root",
            "req": "q",
        }
        node.note(wire.BROADCAST_TOPIC, kill)
        assert ended == [("s1", "killed by root")]
        assert node.bus.notes(wire.direct_topic(OTHER)) == [
            {"kind": "killed", "from": ME, "req": "q"}
        ]
        node.note(wire.BROADCAST_TOPIC, {**kill, "session": "s2"})  # not here: no answer
        assert len(node.bus.notes(wire.direct_topic(OTHER))) == 1
        node.bus.up = False
        with pytest.raises(ClusterUnavailable, match="cluster bus is down"):
            await node.dir.end_anywhere("s9", "killed by root")

    run(main())


def test_a_node_alone_answers_as_before() -> None:
    alone = SessionDirectory(Node().agents)
    assert alone.status() is None and alone.tunnel_address == ""
    assert run(alone.end_anywhere("nope", "x")) is False


# -- the config and the workers ----------------------------------------------------------

BASE = """
[gateway]
listen = "0.0.0.0:8443"
node_id = "gw"
[tls]
cert_file = "a"
key_file = "b"
ca_file = "c"
ca_key_file = "d"
[store]
path = "state/directory.db"
secrets_key_file = "k"
[audit]
path = "audit/audit.jsonl"
[admin]
socket = "run/admin.sock"
"""


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('mqtt = "h"', "cluster.mqtt: expected HOST:PORT"),
        ('mqtt = "h:1883"', "cluster.data_address: missing"),
        ('mqtt = "h:1883"\ndata_address = "0.0.0.0:9"', "cluster.data_address: must be an address"),
        ('mqtt = "h:1883"\ndata_address = "g:9"\nmqtt_version = "4"', "cluster.mqtt_version"),
        ('mqtt = "h:1883"\ndata_address = "g:9"\nmqtt_cert_file = "c"', "cluster.mqtt_key_file"),
        (
            'mqtt = "h:1883"\ndata_address = "g:9"\nmqtt_password_file = "p"',
            "cluster.mqtt_username",
        ),
        ('mqtt = "h:1883"\ndata_address = "g:9"\nnode_id = "other"', "cluster.node_id: differs"),
        ('mqtt = "h:1883"\ndata_address = "g:9"\nreply_timeout = 0', "cluster.reply_timeout"),
        (
            'mqtt = "h:1883"\ndata_address = "g:9"\nmqtt_pasword_file = "p"',
            "cluster.mqtt_pasword_file",
        ),
    ],
)
def test_every_cluster_key_is_checked(table: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("[", r"\[")):
        parse(BASE + "[cluster]\n" + table + "\n", Path("/etc/gatewayd/gatewayd.toml"))


def test_unreadable_broker_files_are_config_errors_naming_the_key(tmp_path: Path) -> None:
    from gatewayd.cluster.bus import password, tls_context

    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=r"cluster\.mqtt_ca_file: cannot load"):
        tls_context(dataclasses.replace(SECTION, mqtt_ca_file=missing))
    with pytest.raises(ConfigError, match=r"cluster\.mqtt_password_file: cannot read"):
        password(dataclasses.replace(SECTION, mqtt_username="u", mqtt_password_file=missing))
    secret = tmp_path / "pw"
    secret.write_text("first line\nsecond\n")
    assert password(dataclasses.replace(SECTION, mqtt_password_file=secret)) == "first line"
    assert tls_context(SECTION) is None


def test_check_config_names_a_missing_broker_file(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gatewayd.main import main

    for name in ("a", "b", "c", "d", "k"):
        (tmp_path / name).write_text("x")
    config = tmp_path / "gatewayd.toml"
    table = 'mqtt = "h:1883"\ndata_address = "g:9"\nmqtt_ca_file = "mqtt-ca.pem"'
    config.write_text(f"{BASE}[cluster]\n{table}\n")
    result = CliRunner().invoke(main, ["check-config", "--config", str(config)])
    assert result.exit_code != 0
    assert f"files not found: {tmp_path / 'mqtt-ca.pem'}" in result.output


def test_a_connection_the_broker_closed_is_seen_without_reading_from_it() -> None:
    import socket

    from gatewayd.cluster.bus import _closed_by_peer

    ours, broker = socket.socketpair()
    with ours, broker:
        assert not _closed_by_peer(ours)
        broker.sendall(b"\x30")  # a message paho has not read yet: not closed
        assert not _closed_by_peer(ours)
        assert ours.recv(1) == b"\x30"
        broker.close()
        assert _closed_by_peer(ours)


def test_workers_each_get_a_node_of_their_own() -> None:
    table = 'mqtt = "h:1883"\ndata_listen = "0.0.0.0:9000"\ndata_address = "gw.example.org:9000"'
    text = f"{BASE}[cluster]\n{table}\n"
    cfg = parse(text, Path("/etc/gatewayd/gatewayd.toml"))
    check(cfg, 4)
    one, three = worker_config(cfg, 1), worker_config(cfg, 3)
    assert (one.gateway.node_id, three.gateway.node_id) == ("gw-1", "gw-3")
    assert three.cluster is not None and three.cluster.node_id == "gw-3"
    assert three.cluster.data_listen == ("0.0.0.0", 9002)
    assert three.cluster.data_address == ("gw.example.org", 9002)
    assert three.gateway.reuse_port and three.gateway.listen == cfg.gateway.listen
    assert three.audit.path == Path("/etc/gatewayd/audit/gw-3/audit.jsonl")
    assert one.admin.socket == cfg.admin.socket
    assert three.admin.socket == Path("/etc/gatewayd/run/admin-gw-3.sock")
    assert three.store == cfg.store  # the directory is shared
    with pytest.raises(ConfigError, match="--workers: must be between"):
        check(cfg, 0)
    alone = parse(BASE, Path("/etc/gatewayd/gatewayd.toml"))
    check(alone, 1)
    with pytest.raises(ConfigError, match=r"--workers: needs \[cluster\]"):
        check(alone, 2)
    no_data = parse(BASE + '[cluster]\nmqtt = "h:1883"\ndata_address = "g:9"\n', Path("/x.toml"))
    with pytest.raises(ConfigError, match=r"cluster\.data_listen: missing"):
        check(no_data, 2)


def test_a_session_names_its_tunnel_address_only_in_a_cluster() -> None:
    opened = m.SessionOpened("s", "t", "pc1", "echo", "k", 1.0, tunnel_address="127.0.0.1:9003")
    assert m.from_json(opened.to_json()) == opened
    assert "tunnel_address" not in m.SessionOpened("s", "t", "pc1", "echo", "k", 1.0).to_json()
    with pytest.raises(ProtocolError, match=r"session\.tunnel_address"):
        m.SessionOpened("s", "t", "pc1", "echo", "k", 1.0, tunnel_address="nowhere")
    assert "address" not in dial().to_json()
