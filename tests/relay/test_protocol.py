"""The sans-I/O wire protocol (relay/protocol.py) and its messages (relay/message.py).

A client or agent (``Side.CONNECTOR``) and a gateway (``Side.ACCEPTOR``) are paired
in memory: what one queues in ``data_to_send()`` is fed to the other's
``receive_data()``. Time is a number passed in; nothing here sleeps or opens a socket.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import message as m
from relay.errors import ProtocolError
from relay.protocol import (
    IDLE_TIMEOUT,
    MAX_FRAME,
    PING_INTERVAL,
    PREAMBLE,
    VERSION,
    Closed,
    Connection,
    Event,
    Side,
    State,
)

T0 = 1000.0
KEY = "A" * 43  # a base64url-shaped 32-byte key; the protocol does not decode it

CLIENT_HELLO = m.ClientHello(
    user="alice@acme",
    agent="pc-1",
    target="rdp",
    mode="access",
    client_key=KEY,
    reason="ticket 4711",
    factors=("totp",),
)
AUTH_REQUEST = m.AuthRequest("totp", {"digits": 6, "step": 30})
AUTH_RESPONSE = m.AuthResponse("totp", {"code": "123456"})
SESSION = m.SessionOpened(
    session_id="s-1", ticket="tk", agent="pc-1", target="rdp", agent_key=KEY, expires=T0 + 3600
)
AGENT_HELLO = m.AgentHello(targets=("rdp", "ssh"))
DIAL = m.Dial(
    token="dt", target="rdp", session_id="s-1", client_key=KEY, user="alice@acme", mode="access"
)
DIAL_FAILED = m.DialFailed(token="dt", reason="connection refused")
ENROLL = m.EnrollRequest(token="et", csr="-----BEGIN CERTIFICATE REQUEST-----", noise_key=KEY)
ENROLLED = m.Enrolled(agent="pc-1", certificate="-----BEGIN CERTIFICATE-----")
REGISTER = m.RegisterHello(user="alice@acme", method="fido2", code="K7Q2-9XZA")
REGISTERED = m.Registered(method="fido2", credential={"id": "cred-1", "name": "YubiKey"})


# -- helpers ------------------------------------------------------------------------------


def encode(obj: m.Message | dict[str, Any]) -> bytes:
    """One frame, built here rather than by the code under test."""
    body = json.dumps(obj.to_json() if isinstance(obj, m.Message) else obj).encode()
    return len(body).to_bytes(4, "big") + body


def raw_frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def decode(data: bytes) -> list[dict[str, Any]]:
    """Split bytes a Connection queued into the JSON objects of its frames."""
    out = []
    while data:
        length = int.from_bytes(data[:4], "big")
        out.append(json.loads(data[4 : 4 + length]))
        data = data[4 + length :]
    return out


def pair(
    *, ping_interval: float = PING_INTERVAL, idle_timeout: float = IDLE_TIMEOUT
) -> tuple[Connection, Connection]:
    """A connector (client or agent) and a gateway, both started at T0."""

    def make(side: Side) -> Connection:
        return Connection(side, now=T0, ping_interval=ping_interval, idle_timeout=idle_timeout)

    return make(Side.CONNECTOR), make(Side.ACCEPTOR)


def transfer(src: Connection, dst: Connection, now: float = T0) -> list[Event]:
    dst.receive_data(src.data_to_send(), now)
    return dst.events_received()


def gateway_in(state: State) -> Connection:
    """A gateway brought into ``state`` by what a peer sends; its output is drained."""
    gateway = Connection(Side.ACCEPTOR, now=T0)
    if state is not State.EXPECT_PREAMBLE:
        gateway.receive_data(PREAMBLE, T0)
    hello = {
        State.EXPECT_AUTH: CLIENT_HELLO,
        State.SESSION: CLIENT_HELLO,
        State.AGENT: AGENT_HELLO,
        State.EXPECT_ENROLLED: ENROLL,
        State.EXPECT_REGISTERED: REGISTER,
        State.EXPECT_SPLICE: m.TunnelHello("tk"),
    }.get(state)
    if hello is not None:
        gateway.receive_data(encode(hello), T0)
    if state is State.SESSION:
        gateway.send(SESSION)
    assert gateway.state is state
    gateway.events_received()
    gateway.data_to_send()
    return gateway


def client_in(state: State) -> Connection:
    """A connector that has sent the hello leading to ``state``."""
    client = Connection(Side.CONNECTOR, now=T0)
    hello = {
        State.EXPECT_AUTH: CLIENT_HELLO,
        State.SESSION: CLIENT_HELLO,
        State.AGENT: AGENT_HELLO,
        State.EXPECT_ENROLLED: ENROLL,
        State.EXPECT_REGISTERED: REGISTER,
        State.EXPECT_SPLICE: m.TunnelHello("tk"),
    }.get(state)
    if hello is not None:
        client.send(hello)
    if state is State.SESSION:
        client.receive_data(encode(SESSION), T0)
    assert client.state is state
    client.events_received()
    client.data_to_send()
    return client


def assert_failed(conn: Connection, events: list[Event], code: str) -> dict[str, Any]:
    """The connection answered with one error frame of ``code`` and closed; returns the frame."""
    assert events, "expected a Closed event"
    closed = events[-1]
    assert isinstance(closed, Closed)
    assert closed.code == code
    assert not closed.by_peer
    assert not any(isinstance(e, Closed) for e in events[:-1])
    assert conn.state is State.CLOSED
    assert conn.close_code == code
    frames = decode(conn.data_to_send())
    assert len(frames) == 1
    assert frames[0]["t"] == "error"
    assert frames[0]["code"] == code
    return frames[0]


# -- happy paths -------------------------------------------------------------------------


def test_client_session_happy_path() -> None:
    client, gateway = pair()
    assert client.state is State.EXPECT_HELLO
    assert gateway.state is State.EXPECT_PREAMBLE

    client.send(CLIENT_HELLO)
    assert client.state is State.EXPECT_AUTH
    assert transfer(client, gateway) == [CLIENT_HELLO]
    assert gateway.state is State.EXPECT_AUTH

    gateway.send(AUTH_REQUEST)
    assert transfer(gateway, client) == [AUTH_REQUEST]
    client.send(AUTH_RESPONSE)
    assert transfer(client, gateway) == [AUTH_RESPONSE]

    # The protocol does not judge the response: the daemon decides and sends session.
    gateway.send(SESSION)
    assert gateway.state is State.SESSION
    assert transfer(gateway, client) == [SESSION]
    assert client.state is State.SESSION

    # Established: keepalives both ways, pong answered by the protocol itself.
    client.send(m.Ping(7))
    assert transfer(client, gateway) == [m.Ping(7)]
    assert transfer(gateway, client) == [m.Pong(7)]
    gateway.send(m.Ping(8))
    assert transfer(gateway, client) == [m.Ping(8)]
    assert transfer(client, gateway) == [m.Pong(8)]
    assert client.state is gateway.state is State.SESSION


def test_several_factors_are_asked_in_turn() -> None:
    client, gateway = pair()
    client.send(CLIENT_HELLO)
    transfer(client, gateway)
    for method in ("password", "totp"):
        gateway.send(m.AuthRequest(method, {}))
        assert transfer(gateway, client) == [m.AuthRequest(method, {})]
        client.send(m.AuthResponse(method, {"x": 1}))
        assert transfer(client, gateway) == [m.AuthResponse(method, {"x": 1})]
    assert gateway.state is client.state is State.EXPECT_AUTH


def test_auth_rejected_with_error_frame() -> None:
    client, gateway = pair()
    client.send(CLIENT_HELLO)
    transfer(client, gateway)
    gateway.send_error("auth_failed", "authentication failed")
    assert gateway.state is State.CLOSED
    assert gateway.events_received() == [Closed("auth_failed", "authentication failed")]
    events = transfer(gateway, client)
    assert events == [
        m.Error("auth_failed", "authentication failed"),
        Closed("auth_failed", "authentication failed", by_peer=True),
    ]
    assert client.state is State.CLOSED
    assert client.data_to_send() == b""  # no error frame in answer to an error frame


def test_agent_dial_and_dial_failed() -> None:
    agent, gateway = pair()
    agent.send(AGENT_HELLO)
    assert agent.state is State.AGENT
    assert transfer(agent, gateway) == [AGENT_HELLO]
    assert gateway.state is State.AGENT

    gateway.send(DIAL)
    assert transfer(gateway, agent) == [DIAL]
    agent.send(DIAL_FAILED)
    assert transfer(agent, gateway) == [DIAL_FAILED]
    assert agent.state is gateway.state is State.AGENT


def test_bye_ends_the_session() -> None:
    client, gateway = pair()
    client.send(CLIENT_HELLO)
    transfer(client, gateway)
    gateway.send(SESSION)
    transfer(gateway, client)
    client.send(m.Bye("card removed"))
    assert client.state is State.CLOSED
    assert transfer(client, gateway) == [m.Bye("card removed")]
    assert gateway.state is State.CLOSED
    assert gateway.data_to_send() == b""


def test_register_a_credential_with_a_code() -> None:
    client, gateway = pair()
    client.send(REGISTER)
    assert client.state is State.EXPECT_REGISTERED
    assert transfer(client, gateway) == [REGISTER]
    gateway.send(AUTH_REQUEST)
    assert transfer(gateway, client) == [AUTH_REQUEST]
    client.send(AUTH_RESPONSE)
    assert transfer(client, gateway) == [AUTH_RESPONSE]
    gateway.send(REGISTERED)
    assert gateway.state is State.CLOSED
    assert transfer(gateway, client) == [REGISTERED]
    assert client.state is State.CLOSED


def test_enroll_then_enrolled_ends_the_connection() -> None:
    agent, gateway = pair()
    agent.send(ENROLL)
    assert agent.state is State.EXPECT_ENROLLED
    assert transfer(agent, gateway) == [ENROLL]
    gateway.send(ENROLLED)
    assert gateway.state is State.CLOSED
    assert transfer(gateway, agent) == [ENROLLED]
    assert agent.state is State.CLOSED
    with pytest.raises(ProtocolError):
        agent.send(m.Ping(1))


@pytest.mark.parametrize("hello", [m.TunnelHello("ticket"), m.DataHello("token")])
def test_spliced_hands_over_trailing_raw_bytes(hello: m.Message) -> None:
    peer, gateway = pair()
    peer.send(hello)
    assert peer.state is State.EXPECT_SPLICE
    assert transfer(peer, gateway) == [hello]
    assert gateway.state is State.EXPECT_SPLICE

    gateway.send(m.Spliced())
    assert gateway.state is State.RAW
    # The first Noise bytes may arrive in the same read as the spliced frame.
    peer.receive_data(gateway.data_to_send() + b"\x00\x20noise", T0)
    assert peer.events_received() == [m.Spliced()]
    assert peer.state is State.RAW
    peer.receive_data(b" more", T0)
    assert peer.events_received() == []
    assert peer.take_raw() == b"\x00\x20noise more"
    assert peer.take_raw() == b""

    # The gateway side buffers what arrives after it spliced, unparsed.
    gateway.receive_data(b"\x00\x00raw", T0)
    assert gateway.events_received() == []
    assert gateway.take_raw() == b"\x00\x00raw"
    assert gateway.get_timer() is None and peer.get_timer() is None
    gateway.receive_eof()
    assert gateway.events_received() == []


def test_take_raw_before_spliced_is_a_local_error() -> None:
    with pytest.raises(ProtocolError):
        gateway_in(State.EXPECT_SPLICE).take_raw()


def test_send_in_raw_state_is_a_local_error() -> None:
    peer, gateway = pair()
    peer.send(m.TunnelHello("t"))
    transfer(peer, gateway)
    gateway.send(m.Spliced())
    transfer(gateway, peer)
    for conn in (peer, gateway):
        with pytest.raises(ProtocolError):
            conn.send(m.Ping(1))
        conn.send_error("internal")  # a no-op once raw
        assert conn.data_to_send() == b""


def test_eof_closes() -> None:
    gateway = gateway_in(State.SESSION)
    gateway.receive_eof()
    assert gateway.events_received() == [Closed("eof", "connection closed by peer", by_peer=True)]
    assert gateway.data_to_send() == b""
    gateway.receive_eof()
    assert gateway.events_received() == []


# -- preamble ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00", b"X", b"GX", b"GWX\x01"],
    ids=["http", "tls", "one-byte", "two-bytes", "wrong-magic"],
)
def test_garbage_instead_of_preamble(data: bytes) -> None:
    gateway = Connection(Side.ACCEPTOR, now=T0)
    gateway.receive_data(data, T0)
    assert_failed(gateway, gateway.events_received(), "protocol_error")


def test_partial_preamble_waits() -> None:
    gateway = Connection(Side.ACCEPTOR, now=T0)
    for byte in PREAMBLE[:3]:
        gateway.receive_data(bytes([byte]), T0)
        assert gateway.events_received() == []
        assert gateway.state is State.EXPECT_PREAMBLE
    gateway.receive_data(PREAMBLE[3:], T0)
    assert gateway.state is State.EXPECT_HELLO
    assert gateway.data_to_send() == b""


@pytest.mark.parametrize("version", [0, VERSION + 1, 255])
def test_wrong_version(version: int) -> None:
    gateway = Connection(Side.ACCEPTOR, now=T0)
    gateway.receive_data(b"GWP" + bytes([version]) + encode(CLIENT_HELLO), T0)
    frame = assert_failed(gateway, gateway.events_received(), "unsupported_version")
    assert str(version) in frame["message"]


def test_connector_sends_preamble_first() -> None:
    client = Connection(Side.CONNECTOR, now=T0)
    client.send(CLIENT_HELLO)
    data = client.data_to_send()
    assert data[:4] == PREAMBLE == b"GWP\x01"
    assert decode(data[4:]) == [CLIENT_HELLO.to_json()]


# -- frame and message errors ------------------------------------------------------------


def test_oversized_frame_is_refused_before_its_body_arrives() -> None:
    gateway = gateway_in(State.EXPECT_HELLO)
    gateway.receive_data((MAX_FRAME + 1).to_bytes(4, "big"), T0)
    assert_failed(gateway, gateway.events_received(), "frame_too_large")


def test_frame_of_exactly_max_frame_is_accepted() -> None:
    body = json.dumps(CLIENT_HELLO.to_json()).encode()
    body += b" " * (MAX_FRAME - len(body))  # JSON allows trailing white space
    gateway = gateway_in(State.EXPECT_HELLO)
    gateway.receive_data(raw_frame(body), T0)
    assert gateway.events_received() == [CLIENT_HELLO]


def test_max_frame_is_configurable() -> None:
    gateway = Connection(Side.ACCEPTOR, now=T0, max_frame=100)
    gateway.receive_data(PREAMBLE + (101).to_bytes(4, "big"), T0)
    assert_failed(gateway, gateway.events_received(), "frame_too_large")


def test_sending_more_than_max_frame_is_a_local_error() -> None:
    client = Connection(Side.CONNECTOR, now=T0, max_frame=100)
    with pytest.raises(ProtocolError, match="frame limit"):
        client.send(CLIENT_HELLO)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"{'t': 'ping'}",
        b"\xff\xfe\xfd\xfc",
        b"\x80abc",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"t":' * 30_000,
    ],
    ids=["empty", "truncated", "single-quotes", "binary", "bad-utf8", "deep-list", "deep-obj"],
)
def test_invalid_json(body: bytes) -> None:
    gateway = gateway_in(State.EXPECT_HELLO)
    gateway.receive_data(raw_frame(body[:MAX_FRAME]), T0)
    assert_failed(gateway, gateway.events_received(), "protocol_error")


@pytest.mark.parametrize(
    "obj",
    [[1, 2], "client_hello", None, 42],
    ids=["list", "string", "null", "number"],
)
def test_json_that_is_not_an_object(obj: object) -> None:
    gateway = gateway_in(State.EXPECT_HELLO)
    gateway.receive_data(raw_frame(json.dumps(obj).encode()), T0)
    frame = assert_failed(gateway, gateway.events_received(), "protocol_error")
    assert "JSON object" in frame["message"]


@pytest.mark.parametrize(
    "obj",
    [{"t": "bogus"}, {}, {"t": 5}, {"t": None}, {"t": ["ping"]}, {"type": "ping"}],
)
def test_unknown_message_type(obj: dict[str, Any]) -> None:
    gateway = gateway_in(State.EXPECT_HELLO)
    gateway.receive_data(encode(obj), T0)
    frame = assert_failed(gateway, gateway.events_received(), "protocol_error")
    assert "unknown message type" in frame["message"]


def test_unknown_member() -> None:
    gateway = gateway_in(State.EXPECT_HELLO)
    gateway.receive_data(encode({**CLIENT_HELLO.to_json(), "admin": True}), T0)
    frame = assert_failed(gateway, gateway.events_received(), "protocol_error")
    assert "unknown member 'admin'" in frame["message"]


def test_missing_member() -> None:
    obj = CLIENT_HELLO.to_json()
    del obj["client_key"]
    gateway = gateway_in(State.EXPECT_HELLO)
    gateway.receive_data(encode(obj), T0)
    frame = assert_failed(gateway, gateway.events_received(), "protocol_error")
    assert "missing client_key" in frame["message"]


def test_optional_members_may_be_left_out() -> None:
    obj = {k: v for k, v in CLIENT_HELLO.to_json().items() if k not in ("reason", "factors")}
    assert m.from_json(obj) == m.ClientHello("alice@acme", "pc-1", "rdp", "access", KEY)
    assert m.from_json({"t": "ping"}) == m.Ping(0)
    assert m.from_json({"t": "error", "code": "x"}) == m.Error("x", "", {})


def test_wrong_member_type_on_the_wire() -> None:
    gateway = gateway_in(State.SESSION)
    gateway.receive_data(encode({"t": "ping", "seq": True}), T0)
    frame = assert_failed(gateway, gateway.events_received(), "protocol_error")
    assert "ping.seq: expected int" in frame["message"]


HELLO_JSON = CLIENT_HELLO.to_json()
SESSION_JSON = SESSION.to_json()


@pytest.mark.parametrize(
    ("obj", "where"),
    [
        ({"t": "ping", "seq": True}, "ping.seq"),  # bool is not an int
        ({"t": "ping", "seq": 1.0}, "ping.seq"),
        ({"t": "ping", "seq": "1"}, "ping.seq"),
        ({"t": "ping", "seq": 2**63}, "ping.seq"),
        ({"t": "ping", "seq": None}, "ping.seq"),
        ({**SESSION_JSON, "expires": False}, "session.expires"),  # bool is not a float
        ({**SESSION_JSON, "expires": "soon"}, "session.expires"),
        ({**HELLO_JSON, "user": 5}, "client_hello.user"),
        ({**HELLO_JSON, "user": ["alice"]}, "client_hello.user"),
        ({**HELLO_JSON, "reason": None}, "client_hello.reason"),
        ({**HELLO_JSON, "factors": "totp"}, "client_hello.factors"),
        ({**HELLO_JSON, "factors": [1]}, "client_hello.factors"),
        ({**HELLO_JSON, "factors": [["totp"]]}, "client_hello.factors"),
        ({**HELLO_JSON, "factors": ["x"] * (m.MAX_LIST + 1)}, "client_hello.factors"),
        ({**HELLO_JSON, "client_key": "k" * (m.MAX_STRING + 1)}, "client_hello.client_key"),
        ({"t": "auth_response", "method": "totp", "payload": []}, "auth_response.payload"),
        ({"t": "auth_response", "method": "totp", "payload": "x"}, "auth_response.payload"),
        ({"t": "auth_response", "method": 1, "payload": {}}, "auth_response.method"),
        ({"t": "error", "code": "x", "extra": None}, "error.extra"),
        ({"t": "agent_hello", "targets": {"rdp": 1}}, "agent_hello.targets"),
    ],
)
def test_wrong_member_types(obj: dict[str, Any], where: str) -> None:
    with pytest.raises(ProtocolError, match=rf"^{where}: expected"):
        m.from_json(obj)


def test_int_is_accepted_for_float() -> None:
    msg = m.from_json({**SESSION_JSON, "expires": 5000})
    assert isinstance(msg, m.SessionOpened)
    assert msg.expires == 5000


@pytest.mark.parametrize(
    "value",
    ["alice", "alice@acme.example", "pc-1", "a_b.c", "A" * m.MAX_ID, "9"],
)
def test_valid_ids(value: str) -> None:
    assert m.valid_id(value)


@pytest.mark.parametrize(
    "value",
    ["", ".hidden", "-flag", "a b", "a/b", "../etc", "ü", "a\x00", "a" * (m.MAX_ID + 1), "a:b"],
)
def test_invalid_ids(value: str) -> None:
    assert not m.valid_id(value)


@pytest.mark.parametrize(
    "obj",
    [
        {**HELLO_JSON, "user": "alice smith"},
        {**HELLO_JSON, "agent": "../pc"},
        {**HELLO_JSON, "target": "-rdp"},
        {"t": "agent_hello", "targets": ["rdp", "not a name"]},
        {"t": "agent_hello", "targets": [""]},
        {**SESSION_JSON, "agent": "pc/1"},
        {**DIAL.to_json(), "user": "bob\n"},
        {**ENROLLED.to_json(), "agent": ".x"},
    ],
)
def test_invalid_identifiers_are_rejected(obj: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        m.from_json(obj)


def test_invalid_identifier_on_the_wire() -> None:
    gateway = gateway_in(State.EXPECT_HELLO)
    gateway.receive_data(encode({**HELLO_JSON, "user": "alice smith"}), T0)
    frame = assert_failed(gateway, gateway.events_received(), "protocol_error")
    assert "client_hello.user: not a valid identifier" in frame["message"]


@pytest.mark.parametrize("mode", ["", "admin", "ACCESS"])
def test_unknown_mode(mode: str) -> None:
    with pytest.raises(ProtocolError, match="mode"):
        m.from_json({**HELLO_JSON, "mode": mode})


def test_reason_is_bounded() -> None:
    with pytest.raises(ProtocolError, match="reason"):
        m.from_json({**HELLO_JSON, "reason": "x" * 1025})


@pytest.mark.parametrize("msg_type", sorted(m.MESSAGE_TYPES))
def test_every_message_type_round_trips_json(msg_type: str) -> None:
    examples = {
        msg.TYPE: msg
        for msg in (
            CLIENT_HELLO,
            AGENT_HELLO,
            ENROLL,
            m.TunnelHello("tk", early="ZWFybHk", cipher="AESGCM"),
            m.TunnelSpare("tk"),
            m.TunnelOpen(early="ZWFybHk"),
            m.DataHello("dt"),
            m.SpareHello(),
            AUTH_REQUEST,
            AUTH_RESPONSE,
            SESSION,
            ENROLLED,
            DIAL,
            DIAL_FAILED,
            m.Spliced(),
            REGISTER,
            REGISTERED,
            m.Bye("user quit"),
            m.CardPresent(),
            m.ApprovalPending("r1", "s1", "key", 120.0),
            m.Approve(
                "r1", "s1", "alice", "acme", "Acme AS", "support", "rdp", "ticket", "k", 120.0
            ),
            m.ApprovalAnswer("r1", True, "root", ""),
            m.Notice("start", "s1", "alice", "Acme AS", "access", "rdp", "ticket"),
            m.AgentList({"pc1": {"org": "clinic", "modes": ["access"], "online": True}}),
            m.Ping(3),
            m.Pong(3),
            m.Error("denied", "no", {"why": "policy"}),
            m.LoggedIn("0123abcd", 1_800_000_000.0, 1800.0),
            m.LoggedOut("0123abcd"),
        )
    }
    msg = examples[msg_type]
    assert m.from_json(json.loads(json.dumps(msg.to_json()))) == msg


# -- order: what may be received and sent in each state ------------------------------------


@pytest.mark.parametrize(
    ("state", "msg"),
    [
        (State.EXPECT_HELLO, AUTH_RESPONSE),
        (State.EXPECT_HELLO, m.Ping(1)),
        (State.EXPECT_HELLO, SESSION),  # a gateway-only message
        (State.EXPECT_AUTH, CLIENT_HELLO),  # a second hello
        (State.EXPECT_AUTH, AUTH_REQUEST),
        (State.EXPECT_AUTH, m.Spliced()),
        (State.SESSION, AUTH_RESPONSE),  # factors after the session exists
        (State.SESSION, m.TunnelHello("tk")),
        (State.EXPECT_REGISTERED, SESSION),
        (State.EXPECT_REGISTERED, m.Bye()),
        (State.AGENT, AGENT_HELLO),
        (State.AGENT, DIAL),
        (State.EXPECT_ENROLLED, m.Ping(1)),
        (State.EXPECT_ENROLLED, ENROLL),
        (State.EXPECT_SPLICE, m.Ping(1)),
        (State.EXPECT_SPLICE, m.DataHello("dt")),
    ],
)
def test_gateway_refuses_message_not_allowed_in_state(state: State, msg: m.Message) -> None:
    gateway = gateway_in(state)
    gateway.receive_data(encode(msg), T0)  # never raises
    frame = assert_failed(gateway, gateway.events_received(), "protocol_error")
    assert f"unexpected {msg.TYPE}" in frame["message"]
    # Anything later is ignored.
    gateway.receive_data(encode(m.Ping(2)), T0)
    assert gateway.events_received() == []
    assert gateway.data_to_send() == b""


@pytest.mark.parametrize(
    ("state", "msg"),
    [
        (State.EXPECT_HELLO, AUTH_REQUEST),  # before the client said hello
        (State.EXPECT_AUTH, DIAL),
        (State.EXPECT_AUTH, CLIENT_HELLO),
        (State.SESSION, SESSION),
        (State.SESSION, AUTH_REQUEST),
        (State.AGENT, SESSION),
        (State.EXPECT_ENROLLED, SESSION),
        (State.EXPECT_REGISTERED, SESSION),
        (State.SESSION, m.Bye()),  # only the client ends a session with bye
        (State.EXPECT_SPLICE, SESSION),
        (State.EXPECT_SPLICE, m.Ping(1)),
    ],
)
def test_connector_refuses_message_not_allowed_in_state(state: State, msg: m.Message) -> None:
    client = client_in(state)
    client.receive_data(encode(msg), T0)
    assert_failed(client, client.events_received(), "protocol_error")


def test_messages_before_the_bad_one_are_delivered() -> None:
    gateway = gateway_in(State.EXPECT_HELLO)
    gateway.receive_data(encode(CLIENT_HELLO) + encode(AGENT_HELLO) + encode(AUTH_RESPONSE), T0)
    events = gateway.events_received()
    assert events[0] == CLIENT_HELLO
    assert len(events) == 2
    assert_failed(gateway, events, "protocol_error")


@pytest.mark.parametrize(
    ("conn", "msg"),
    [
        (lambda: client_in(State.EXPECT_AUTH), AUTH_REQUEST),  # gateway-only
        (lambda: client_in(State.EXPECT_AUTH), SESSION),
        (lambda: client_in(State.EXPECT_AUTH), CLIENT_HELLO),  # twice
        (lambda: client_in(State.EXPECT_HELLO), m.Ping(1)),  # before the hello
        (lambda: client_in(State.EXPECT_HELLO), AUTH_RESPONSE),
        (lambda: client_in(State.AGENT), DIAL),
        (lambda: client_in(State.SESSION), AUTH_RESPONSE),
        (lambda: client_in(State.EXPECT_SPLICE), m.Ping(1)),
        (lambda: gateway_in(State.EXPECT_PREAMBLE), AUTH_REQUEST),
        (lambda: gateway_in(State.EXPECT_HELLO), CLIENT_HELLO),  # a connector's message
        (lambda: gateway_in(State.EXPECT_HELLO), SESSION),  # no hello yet
        (lambda: gateway_in(State.EXPECT_AUTH), DIAL),
        (lambda: gateway_in(State.SESSION), AUTH_REQUEST),
        (lambda: gateway_in(State.AGENT), SESSION),
        (lambda: gateway_in(State.EXPECT_ENROLLED), m.Spliced()),
        (lambda: gateway_in(State.EXPECT_SPLICE), ENROLLED),
    ],
)
def test_sending_a_message_not_allowed_raises(conn: Any, msg: m.Message) -> None:
    c: Connection = conn()
    state = c.state
    with pytest.raises(ProtocolError):
        c.send(msg)
    assert c.state is state
    assert c.data_to_send() == b""
    assert c.events_received() == []


def test_send_after_close_raises_and_send_error_is_a_no_op() -> None:
    gateway = gateway_in(State.SESSION)
    gateway.send_error("shutdown", "bye")
    assert decode(gateway.data_to_send()) == [
        {"t": "error", "code": "shutdown", "message": "bye", "extra": {}}
    ]
    assert gateway.events_received() == [Closed("shutdown", "bye")]
    with pytest.raises(ProtocolError):
        gateway.send(m.Ping(1))
    gateway.send_error("shutdown")
    assert gateway.data_to_send() == b""
    assert gateway.events_received() == []


def test_error_frame_may_be_sent_in_any_open_state() -> None:
    gateway = Connection(Side.ACCEPTOR, now=T0)  # still expecting the preamble
    gateway.send_error("rate_limited")
    assert decode(gateway.data_to_send())[0]["code"] == "rate_limited"
    assert gateway.state is State.CLOSED


# -- timers (a fake clock: now is a number) ------------------------------------------------


def test_handshake_timeout() -> None:
    gateway = Connection(Side.ACCEPTOR, now=T0, handshake_timeout=10)
    assert gateway.get_timer() == T0 + 10
    gateway.handle_timer(T0 + 9.99)
    assert gateway.events_received() == []
    gateway.receive_data(PREAMBLE + encode(CLIENT_HELLO), T0 + 5)
    gateway.events_received()
    assert gateway.get_timer() == T0 + 10  # receiving does not extend the handshake
    gateway.handle_timer(T0 + 10)
    assert_failed(gateway, gateway.events_received(), "timeout")
    assert gateway.get_timer() is None


@pytest.mark.parametrize("state", [State.EXPECT_AUTH, State.EXPECT_ENROLLED, State.EXPECT_SPLICE])
def test_handshake_timeout_on_connector(state: State) -> None:
    client = client_in(state)
    assert client.get_timer() == T0 + 10.0
    client.handle_timer(T0 + 10.0)
    assert_failed(client, client.events_received(), "timeout")


def test_extend_handshake_never_shortens() -> None:
    gateway = Connection(Side.ACCEPTOR, now=T0, handshake_timeout=10)
    gateway.extend_handshake(T0 + 5, 60)
    assert gateway.get_timer() == T0 + 65
    gateway.extend_handshake(T0 + 6, 1)
    assert gateway.get_timer() == T0 + 65
    gateway.handle_timer(T0 + 30)
    assert gateway.events_received() == []
    gateway.handle_timer(T0 + 65)
    assert gateway.events_received()[-1] == Closed("timeout", "handshake not completed in time")


def test_established_session_has_no_handshake_deadline() -> None:
    gateway = gateway_in(State.SESSION)
    gateway.handle_timer(T0 + 10)  # the handshake deadline, but the session exists
    assert gateway.events_received() == []
    assert gateway.state is State.SESSION


def test_ping_after_interval_and_idle_close() -> None:
    agent, gateway = pair(ping_interval=25, idle_timeout=60)
    agent.send(AGENT_HELLO, T0)
    transfer(agent, gateway, T0)
    assert gateway.get_timer() == T0 + 25

    gateway.handle_timer(T0 + 24)
    assert gateway.data_to_send() == b""
    gateway.handle_timer(T0 + 25)
    assert decode(gateway.data_to_send()) == [{"t": "ping", "seq": 1}]
    assert gateway.get_timer() == T0 + 50
    gateway.handle_timer(T0 + 50)
    assert decode(gateway.data_to_send()) == [{"t": "ping", "seq": 2}]
    # The peer stays silent: the next timer is the idle limit, not another ping.
    assert gateway.get_timer() == T0 + 60
    gateway.handle_timer(T0 + 60)
    frame = assert_failed(gateway, gateway.events_received(), "timeout")
    assert frame["message"] == "peer silent for too long"


def test_anything_received_resets_idle() -> None:
    agent, gateway = pair(ping_interval=20, idle_timeout=60)
    agent.send(AGENT_HELLO, T0)
    transfer(agent, gateway, T0)
    gateway.handle_timer(T0 + 20)  # ping 1
    agent.receive_data(gateway.data_to_send(), T0 + 21)
    assert agent.events_received() == [m.Ping(1)]
    gateway.receive_data(agent.data_to_send(), T0 + 50)  # the pong
    assert gateway.events_received() == [m.Pong(1)]
    gateway.handle_timer(T0 + 60)
    assert gateway.state is State.AGENT
    gateway.handle_timer(T0 + 109.9)
    assert gateway.state is State.AGENT
    gateway.handle_timer(T0 + 110)
    assert gateway.state is State.CLOSED


def test_sending_with_a_time_delays_the_ping() -> None:
    agent, gateway = pair(ping_interval=20, idle_timeout=60)
    agent.send(AGENT_HELLO, T0)
    transfer(agent, gateway, T0)
    gateway.send(DIAL, T0 + 15)
    gateway.data_to_send()
    assert gateway.get_timer() == T0 + 35
    gateway.handle_timer(T0 + 20)
    assert gateway.data_to_send() == b""


# -- parsers: whole, one byte at a time, with trailing data --------------------------------


def _prepare(side: Side, sends: Iterable[m.Message]) -> Connection:
    conn = Connection(side, now=T0)
    for msg in sends:
        conn.send(msg)
    conn.data_to_send()
    return conn


# (our side, what we send first, what the peer sends us)
CONVERSATIONS: dict[str, tuple[Side, list[m.Message], list[m.Message]]] = {
    "gateway-client": (Side.ACCEPTOR, [], [CLIENT_HELLO, AUTH_RESPONSE, AUTH_RESPONSE]),
    "gateway-agent": (Side.ACCEPTOR, [], [AGENT_HELLO, m.Ping(1), DIAL_FAILED, m.Pong(2)]),
    "gateway-enroll": (Side.ACCEPTOR, [], [ENROLL]),
    "gateway-register": (Side.ACCEPTOR, [], [REGISTER, m.Ping(3), AUTH_RESPONSE]),
    "gateway-tunnel": (Side.ACCEPTOR, [], [m.TunnelHello("tk")]),
    "gateway-tunnel-spare": (
        Side.ACCEPTOR,
        [],
        [m.TunnelSpare("tk"), m.Ping(1), m.TunnelOpen(early="ZWFybHk")],
    ),
    "client": (Side.CONNECTOR, [CLIENT_HELLO], [AUTH_REQUEST, AUTH_REQUEST, SESSION, m.Ping(4)]),
    "agent": (Side.CONNECTOR, [AGENT_HELLO], [DIAL, m.Ping(9), DIAL]),
    "enroll": (Side.CONNECTOR, [ENROLL], [ENROLLED]),
    "register": (Side.CONNECTOR, [REGISTER], [AUTH_REQUEST, REGISTERED]),
    "tunnel": (Side.CONNECTOR, [m.TunnelHello("tk")], [m.Spliced()]),
    "data": (Side.CONNECTOR, [m.DataHello("dt")], [m.Spliced()]),
}


def _wire(side: Side, msgs: list[m.Message]) -> bytes:
    return (PREAMBLE if side is Side.ACCEPTOR else b"") + b"".join(encode(x) for x in msgs)


def _feed(conn: Connection, data: bytes, chunk: int) -> list[Event]:
    for i in range(0, len(data), chunk):
        conn.receive_data(data[i : i + chunk], T0)
    return conn.events_received()


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_parser_same_events_whatever_the_chunking(name: str, chunk: int) -> None:
    side, sends, received = CONVERSATIONS[name]
    conn = _prepare(side, sends)
    data = _wire(side, received)
    assert _feed(conn, data, chunk) == received
    assert conn.state is not State.CLOSED or name in ("enroll", "register")
    # Automatic pongs come out the same whatever the chunking.
    pongs = [x.seq for x in received if isinstance(x, m.Ping)]
    assert [f["seq"] for f in decode(conn.data_to_send())] == pongs


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("chunk", [1, 1 << 20])
def test_parser_with_trailing_data(name: str, chunk: int) -> None:
    side, sends, received = CONVERSATIONS[name]
    conn = _prepare(side, sends)
    trailing = encode(m.Ping(99))[:6]  # the start of a frame that has not fully arrived
    assert _feed(conn, _wire(side, received) + trailing, chunk) == received
    if conn.state is State.RAW:
        assert conn.take_raw() == trailing
    else:
        assert conn.state is not State.CLOSED or name in ("enroll", "register")


# -- fuzzing: arbitrary input never raises ------------------------------------------------


def _check_events(conn: Connection, events: list[Event]) -> None:
    closes = [i for i, e in enumerate(events) if isinstance(e, Closed)]
    assert closes in ([], [len(events) - 1])
    if closes:
        closed = events[-1]
        assert isinstance(closed, Closed)
        # Our own closes use a documented code; a peer's error frame carries its own.
        assert closed.by_peer or closed.code in m.ERROR_CODES
        assert conn.state is State.CLOSED
    for e in events:
        assert isinstance(e, m.Message | Closed)


FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ
@given(chunks=st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_bytes_after_preamble(chunks: list[bytes]) -> None:
    gateway = Connection(Side.ACCEPTOR, now=T0)
    gateway.receive_data(PREAMBLE, T0)
    events: list[Event] = []
    for chunk in chunks:
        gateway.receive_data(chunk, T0)
        events += gateway.events_received()
    _check_events(gateway, events)
    gateway.handle_timer(T0 + 1e6)
    gateway.receive_eof()
    assert gateway.state in (State.CLOSED, State.RAW)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
_member = st.sampled_from(
    sorted({f for cls in m.MESSAGE_TYPES.values() for f in cls.__dataclass_fields__} | {"t"})
)
_messageish = st.builds(
    lambda t, members: {**members, "t": t},
    st.sampled_from(sorted(m.MESSAGE_TYPES)) | st.text(max_size=5),
    st.dictionaries(_member, _json, max_size=7),
)


@FUZZ
@given(
    side=st.sampled_from([Side.ACCEPTOR, Side.CONNECTOR]),
    hello=st.sampled_from([CLIENT_HELLO, AGENT_HELLO, ENROLL, REGISTER, m.TunnelHello("tk")]),
    objs=st.lists(_messageish, max_size=5),
)
def test_fuzz_message_shaped_json(side: Side, hello: m.Message, objs: list[Any]) -> None:
    if side is Side.ACCEPTOR:
        conn = Connection(side, now=T0)
        data = PREAMBLE
    else:
        conn = _prepare(side, [hello])
        data = b""
    data += b"".join(raw_frame(json.dumps(o).encode()) for o in objs)
    conn.receive_data(data, T0)
    _check_events(conn, conn.events_received())


# -- gw connect's spare tunnel connection ---------------------------------------------------


def test_a_client_spare_waits_live_then_opens_one_tunnel() -> None:
    """``tunnel_spare`` waits with heartbeats (no hello deadline) until ``tunnel_open``,
    whose splice then has a handshake deadline of its own; nothing else is taken."""
    gateway = Connection(Side.ACCEPTOR, now=T0, handshake_timeout=2.0)
    gateway.receive_data(PREAMBLE + encode(m.TunnelSpare("tk")), T0)
    assert gateway.events_received() == [m.TunnelSpare("tk")]
    assert gateway.state is State.CLIENT_SPARE
    gateway.handle_timer(T0 + 5.0)  # past the hello deadline: still there
    assert gateway.state is State.CLIENT_SPARE
    gateway.receive_data(encode(m.TunnelOpen()), T0 + 5.0)
    assert gateway.events_received() == [m.TunnelOpen()]
    assert gateway.state is State.EXPECT_SPLICE
    gateway.handle_timer(T0 + 7.5)
    assert gateway.state is State.CLOSED and gateway.close_code == "timeout"


@pytest.mark.parametrize("msg", [m.TunnelHello("tk"), m.DataHello("dt"), m.Spliced(), DIAL])
def test_a_client_spare_takes_nothing_but_tunnel_open(msg: m.Message) -> None:
    gateway = Connection(Side.ACCEPTOR, now=T0)
    gateway.receive_data(PREAMBLE + encode(m.TunnelSpare("tk")), T0)
    gateway.events_received()
    gateway.data_to_send()
    gateway.receive_data(encode(msg), T0)
    frame = assert_failed(gateway, gateway.events_received(), "protocol_error")
    assert f"unexpected {msg.TYPE}" in frame["message"]
