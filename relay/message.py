"""Message types of the gateway wire protocol (version 1).

Every message is a frozen, slotted dataclass that validates its fields on
construction, so a message that exists is a message that is well formed. On the
wire a message is a JSON object whose ``"t"`` member names the type; see
``docs/protocol.md`` for the whole exchange.

Binary values (keys, tokens, auth payload members) travel base64url-encoded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ProtocolError
from .text import is_printable

#: Longest string member accepted from a peer. Certificates and CSRs in PEM are
#: the largest values (a few KiB); 16 KiB leaves room without letting one field
#: take the whole frame budget.
MAX_STRING = 16 * 1024

#: Most items in a list member (target names an agent announces).
MAX_LIST = 256

#: Longest reason a client may give for a session (a ticket number, a sentence or two).
MAX_REASON = 1024

#: Identifier syntax for users, agents, orgs, vendors and targets.
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
MAX_ID = 128


def valid_id(value: str) -> bool:
    """True when ``value`` is a usable identifier (user, agent, org, vendor, target name)."""
    return 0 < len(value) <= MAX_ID and set(value) <= _ID_CHARS and value[0] not in ".-"


MODES = ("access", "support", "homeoffice")


#: The end-to-end cipher every agent and client runs: said by leaving it unsaid.
BASE_CIPHER = "ChaChaPoly"


def _check_cipher(name: str, where: str) -> None:
    """A cipher name as in Noise protocol names (``AESGCM``); unknown ones pass."""
    if not 0 < len(name) <= 32 or not valid_id(name):
        raise ProtocolError(f"{where}: not a cipher name")


def split_address(value: str, where: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``) into (host, port); ProtocolError naming ``where``."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    ok = sep and host and len(value) <= 300 and port.isascii() and port.isdigit()
    if not ok or not 0 < int(port[:6]) < 65536:
        raise ProtocolError(f"{where}: expected HOST:PORT")
    return host, int(port)


@dataclass(frozen=True, slots=True)
class Message:
    """Base of all messages. ``TYPE`` is the wire name."""

    TYPE: ClassVar[str] = ""
    #: Members that must be identifiers (see :func:`valid_id`) when non-empty.
    IDS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_value(self.TYPE, f.name, getattr(self, f.name), _hints(type(self))[f.name])
        for name in self.IDS:
            value = getattr(self, name)
            if value and not valid_id(value):
                raise ProtocolError(f"{self.TYPE}.{name}: not a valid identifier")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.TYPE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _check_value(mtype: str, name: str, value: object, hint: Any) -> None:
    where = f"{mtype}.{name}"
    origin = typing.get_origin(hint)
    if origin is tuple:  # tuple[str, ...]
        if not isinstance(value, tuple) or len(value) > MAX_LIST:
            raise ProtocolError(f"{where}: expected a list of at most {MAX_LIST} strings")
        for item in value:
            if not isinstance(item, str) or len(item) > MAX_STRING:
                raise ProtocolError(f"{where}: expected a list of strings")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected an object")
        return
    if origin in (types.UnionType, typing.Union):  # X | None
        if value is None:
            return
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif hint is str:
        ok = isinstance(value, str) and len(value) <= MAX_STRING
    else:  # pragma: no cover - a message class uses a type this checker does not know
        raise TypeError(f"{where}: unsupported field type {hint!r}")
    if not ok:
        raise ProtocolError(f"{where}: expected {hint.__name__}")


# -- connection set-up: the first message of every connection ----------------------


@dataclass(frozen=True, slots=True)
class ClientHello(Message):
    """``gw connect`` opens a session: who, to which agent and target, in which mode."""

    TYPE = "client_hello"
    IDS = ("user", "agent", "target")
    user: str
    agent: str
    target: str
    mode: str
    client_key: str
    """The client's Noise static public key (base64url, 32 bytes)."""
    reason: str = ""
    """Why the session is wanted (ticket number, sentence); kept on its audit records."""
    factors: tuple[str, ...] = ()
    """Factors the client can prove, in order of preference (e.g. totp or fido2)."""
    credential: str = ""
    """A login credential's id (``gw login``): the client proves it holds the
    credential's key instead of the mode's factors (a smartcard mode that ends on card
    removal still asks for the card)."""
    login_key: str = ""
    """``gw login``: the client's new Ed25519 public key (base64url, 32 bytes); after the
    mode's factors the gateway answers ``logged_in`` with a credential bound to it."""
    logout: bool = False
    """``gw logout``: with ``credential``, the gateway ends that credential
    (``logged_out``)."""
    ciphers: tuple[str, ...] = ()
    """The end-to-end ciphers the client runs (every client since they exist says them,
    ChaChaPoly alone too): the gateway then says the agent's in ``session``
    (``agent_ciphers``, a member older clients refuse)."""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if self.mode not in MODES:
            raise ProtocolError(f"client_hello.mode: must be one of {', '.join(MODES)}")
        if len(self.credential) > MAX_ID or not set(self.credential) <= _ID_CHARS:
            raise ProtocolError("client_hello.credential: not a credential id")
        if len(self.login_key) > 64:
            raise ProtocolError("client_hello.login_key: not an Ed25519 public key")
        if (self.login_key or self.logout) and self.agent:
            raise ProtocolError("client_hello: login and logout name no agent")
        if self.logout and not self.credential:
            raise ProtocolError("client_hello.logout: needs the credential to end")
        if len(self.reason) > MAX_REASON:
            raise ProtocolError(f"client_hello.reason: longer than {MAX_REASON} characters")
        if not is_printable(self.reason):
            # It is shown at the machine and passed to its approval command.
            raise ProtocolError(
                "client_hello.reason: control, line break or bidi characters are not allowed"
            )
        for name in self.ciphers:
            _check_cipher(name, "client_hello.ciphers")

    def to_json(self) -> dict[str, Any]:
        out = Message.to_json(self)
        for name in ("credential", "login_key", "logout"):  # unsaid unless used:
            if not out[name]:  # older gateways refuse members they do not know
                del out[name]
        if not self.ciphers:
            del out["ciphers"]
        return out


@dataclass(frozen=True, slots=True)
class AgentHello(Message):
    """An enrolled agent's control connection (identity from its TLS certificate)."""

    TYPE = "agent_hello"
    targets: tuple[str, ...]
    """Names of the services this agent exposes; never addresses."""
    ciphers: tuple[str, ...] = ()
    """The end-to-end ciphers this agent runs (``AESGCM``, ``ChaChaPoly``). Unsaid by
    agents that run ChaChaPoly alone (all older ones)."""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        for name in self.targets:
            if not valid_id(name):
                raise ProtocolError(f"agent_hello.targets: {name[:40]!r} is not a valid name")
        for name in self.ciphers:
            _check_cipher(name, "agent_hello.ciphers")

    def to_json(self) -> dict[str, Any]:
        out = Message.to_json(self)
        if set(self.ciphers) <= {BASE_CIPHER}:  # older gateways refuse members they do not know
            del out["ciphers"]
        return out


@dataclass(frozen=True, slots=True)
class EnrollRequest(Message):
    """A new agent trades its one-time token for a certificate."""

    TYPE = "enroll"
    token: str
    csr: str
    """PEM certificate signing request for the agent's TLS key."""
    noise_key: str
    """The agent's Noise static public key (base64url)."""
    pq_key: str = ""
    """The agent's ML-KEM-768 public key (base64url, 1184 bytes) for the hybrid
    end-to-end handshake; absent from agents that have none."""

    def to_json(self) -> dict[str, Any]:
        out = Message.to_json(self)
        if not self.pq_key:
            del out["pq_key"]
        return out


def _check_tunnel_request(kind: str, cipher: str) -> None:
    """``tunnel`` and ``tunnel_open``: a cipher, when one is named, is a cipher name."""
    if cipher:
        _check_cipher(cipher, f"{kind}.cipher")


def _tunnel_request_json(out: dict[str, Any]) -> dict[str, Any]:
    """``tunnel`` and ``tunnel_open`` leave out what older gateways do not know when it
    says nothing: ChaChaPoly (or no cipher) and no ``early`` message."""
    if out["cipher"] in ("", BASE_CIPHER):
        del out["cipher"]
    if not out["early"]:
        del out["early"]
    return out


@dataclass(frozen=True, slots=True)
class TunnelHello(Message):
    """``gw connect`` opens one tunnel of its session (a fresh connection).

    ``early``: the end-to-end handshake's first message (base64url), sent with the
    request instead of after ``spliced``; the gateway holds it until the tunnel is on
    record and hands it to the agent first."""

    TYPE = "tunnel"
    ticket: str
    early: str = ""
    cipher: str = ""
    """The end-to-end cipher the client runs in this tunnel, one the session's
    ``agent_ciphers`` listed; unsaid (older clients): ChaChaPoly."""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_tunnel_request(self.TYPE, self.cipher)

    def to_json(self) -> dict[str, Any]:
        return _tunnel_request_json(Message.to_json(self))


@dataclass(frozen=True, slots=True)
class TunnelSpare(Message):
    """``gw connect``'s connection dialled ahead for its session's next tunnel, bound to
    the session by its ticket: kept with heartbeats (at most a few per session, closed
    when the session ends) until ``tunnel_open`` makes it a tunnel; the next tunnel then
    costs the client no TLS handshake."""

    TYPE = "tunnel_spare"
    ticket: str


@dataclass(frozen=True, slots=True)
class TunnelOpen(Message):
    """On a ``tunnel_spare`` connection: open the tunnel now (as ``tunnel`` would,
    every check made again); ``early`` and ``cipher`` as in :class:`TunnelHello`."""

    TYPE = "tunnel_open"
    early: str = ""
    cipher: str = ""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_tunnel_request(self.TYPE, self.cipher)

    def to_json(self) -> dict[str, Any]:
        return _tunnel_request_json(Message.to_json(self))


@dataclass(frozen=True, slots=True)
class DataHello(Message):
    """The agent answers a dial request with a fresh connection."""

    TYPE = "data"
    token: str


@dataclass(frozen=True, slots=True)
class SpareHello(Message):
    """The agent's data connection dialled ahead of a dial request: the gateway keeps it
    and sends the next ``dial`` for this agent on it, which the agent then answers on it
    (``data`` with the dial's token, or ``dial_failed``). A new tunnel then costs no
    TLS handshake on the agent's side."""

    TYPE = "spare"


@dataclass(frozen=True, slots=True)
class RegisterHello(Message):
    """``gw fido2 register``: bind a new credential of ``method`` to ``user`` with a one-time code.

    The gateway answers with one ``auth_request`` (the registration challenge), the
    client with one ``auth_response``, then the gateway sends ``registered`` or ``error``.
    """

    TYPE = "register"
    IDS = ("user",)
    user: str
    method: str
    """The factor whose credential is registered (``fido2``)."""
    code: str
    """The one-time registration code an administrator handed out (``gw admin fido2 invite``)."""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if not valid_id(self.user):
            raise ProtocolError("register.user: not a valid identifier")
        if not 0 < len(self.method) <= 32 or len(self.code) > 256:
            raise ProtocolError("register: method or code has an impossible length")


# -- authentication ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthRequest(Message):
    """The gateway asks the client to prove one factor."""

    TYPE = "auth_request"
    method: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuthResponse(Message):
    """The client's proof of one factor."""

    TYPE = "auth_response"
    method: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SessionOpened(Message):
    """Authentication and policy passed: the session exists."""

    TYPE = "session"
    IDS = ("agent", "target")
    session_id: str
    ticket: str
    """Opens tunnels of this session while its control connection stays up."""
    agent: str
    target: str
    agent_key: str
    """The agent's enrolled Noise static public key (base64url)."""
    expires: float
    """POSIX time at which the gateway ends the session."""
    watch_card: bool = True
    """If a smartcard proved the login, the client ends the session when the card leaves
    its reader (the mode's ``end_on_card_removal``). Absent from older gateways: True."""
    card_heartbeat: float = 0.0
    """Seconds between the client's :class:`CardPresent` messages while it watches the
    card; the gateway ends the session when they stop. 0 (absent): none expected."""
    agent_pq_key: str = ""
    """The agent's enrolled ML-KEM-768 public key (base64url): the tunnels then run the
    hybrid handshake. Absent for an agent enrolled without one (classic handshake)."""
    tunnel_address: str = ""
    """``HOST:PORT`` of the gateway node holding the session, where its tunnels go (a
    cluster: another node would not know the ticket). Absent: where the client logged in."""
    agent_ciphers: tuple[str, ...] = ()
    """The end-to-end ciphers the agent said it runs when it connected (``ChaChaPoly``
    alone for an agent that said none), sent to clients that said theirs
    (``client_hello.ciphers``). Absent: a client that said none, or an older gateway."""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if not 0 <= self.card_heartbeat <= 3600:
            raise ProtocolError("session.card_heartbeat: must be 0 to 3600 seconds")
        if self.tunnel_address:
            split_address(self.tunnel_address, "session.tunnel_address")
        for name in self.agent_ciphers:
            _check_cipher(name, "session.agent_ciphers")

    def to_json(self) -> dict[str, Any]:
        out = Message.to_json(self)
        if self.watch_card:  # the default goes unsaid, so that older clients still parse
            del out["watch_card"]
        if not self.card_heartbeat:
            del out["card_heartbeat"]
        if not self.agent_pq_key:
            del out["agent_pq_key"]
        if not self.tunnel_address:
            del out["tunnel_address"]
        if not self.agent_ciphers:  # sent only to a client that said its own ciphers
            del out["agent_ciphers"]
        return out


@dataclass(frozen=True, slots=True)
class LoggedIn(Message):
    """``gw login`` passed: a login credential bound to the hello's ``login_key``."""

    TYPE = "logged_in"
    IDS = ("credential",)
    credential: str
    """The credential's id; the client keeps it with its key."""
    expires: float
    """POSIX time at which the credential ends, used or not (the mode's ``login_lifetime``)."""
    idle_timeout: float
    """Seconds without use (no login, no session traffic) after which it ends."""


@dataclass(frozen=True, slots=True)
class LoggedOut(Message):
    """``gw logout``: the gateway ended the credential; the connection ends."""

    TYPE = "logged_out"
    IDS = ("credential",)
    credential: str


@dataclass(frozen=True, slots=True)
class Registered(Message):
    """The gateway stored the credential of a :class:`RegisterHello`; the connection ends."""

    TYPE = "registered"
    method: str
    credential: dict[str, Any]
    """What was registered, for the person to see (fido2: id, name, aaguid...; no key material)."""


@dataclass(frozen=True, slots=True)
class Enrolled(Message):
    """The gateway's answer to :class:`EnrollRequest`."""

    TYPE = "enrolled"
    IDS = ("agent",)
    agent: str
    certificate: str
    """PEM chain: the agent's certificate issued by the gateway CA."""


# -- agent control -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dial(Message):
    """The gateway asks the agent to open a data connection to one of its targets."""

    TYPE = "dial"
    IDS = ("target", "user")
    token: str
    target: str
    session_id: str
    client_key: str
    """The Noise static key the agent must see in the tunnel's handshake."""
    user: str
    mode: str
    address: str = ""
    """``HOST:PORT`` of the gateway node to dial the data connection to (a cluster: the
    node that holds the client); empty: the node of the control connection."""
    cipher: str = ""
    """The end-to-end cipher the client named for this tunnel, the only one the agent
    answers; unsaid: ChaChaPoly."""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if len(self.address) > 300:
            raise ProtocolError("dial.address: longer than 300 characters")
        if self.cipher:
            _check_cipher(self.cipher, "dial.cipher")

    def to_json(self) -> dict[str, Any]:
        out = Message.to_json(self)
        if not out["address"]:  # unsaid unless used: older agents refuse unknown members
            del out["address"]
        if self.cipher in ("", BASE_CIPHER):
            del out["cipher"]
        return out


@dataclass(frozen=True, slots=True)
class DialFailed(Message):
    """The agent could not serve a dial request."""

    TYPE = "dial_failed"
    token: str
    reason: str


@dataclass(frozen=True, slots=True)
class Spliced(Message):
    """Last framed message on a tunnel connection: raw bytes follow."""

    TYPE = "spliced"


# -- approval at the machine, listing ------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApprovalPending(Message):
    """Gateway to client: the person at the machine is being asked; wait."""

    TYPE = "approval_pending"
    request: str
    session_id: str
    agent_key: str
    """The agent's Noise static key, so the client can show the session's SAS now."""
    timeout: float
    """Seconds the person has to answer."""
    agent_pq_key: str = ""
    """The agent's ML-KEM-768 key, if it has one: the session's SAS covers it too."""

    def to_json(self) -> dict[str, Any]:
        out = Message.to_json(self)
        if not self.agent_pq_key:
            del out["agent_pq_key"]
        return out


@dataclass(frozen=True, slots=True)
class Approve(Message):
    """Gateway to agent: ask the person at the machine to approve a session."""

    TYPE = "approve"
    IDS = ("user", "vendor", "target")
    request: str
    session_id: str
    user: str
    vendor: str
    vendor_name: str
    mode: str
    target: str
    reason: str
    client_key: str
    timeout: float


@dataclass(frozen=True, slots=True)
class ApprovalAnswer(Message):
    """Agent to gateway: the answer, and who gave it."""

    TYPE = "approval"
    request: str
    approved: bool
    by: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if len(self.by) > 200 or len(self.reason) > 200:
            raise ProtocolError("approval: by and reason are at most 200 characters")


@dataclass(frozen=True, slots=True)
class Notice(Message):
    """Gateway to agent: a session that was not approved here started, or a session ended.

    ``event`` is ``start`` (unattended access and home office, announced at the
    machine) or ``end`` (every session)."""

    TYPE = "notice"
    event: str
    session_id: str
    user: str
    vendor_name: str
    mode: str
    target: str
    reason: str = ""
    client_key: str = ""
    """With ``start``: the client's Noise static key, the only one the agent accepts in
    this session's tunnels (base64url). Older gateways leave it out."""


@dataclass(frozen=True, slots=True)
class AgentList(Message):
    """Gateway to client: the agents this user may reach (answer to a hello without agent)."""

    TYPE = "agent_list"
    agents: dict[str, Any]
    """agent id -> {"org", "modes": [...], "online": bool, "targets": [...]}"""

    #: The entry fields a client reads, each with the type it must have when present.
    ENTRY: ClassVar[dict[str, type]] = {"org": str, "modes": list, "online": bool, "targets": list}

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        # A gateway's answer is remote input: every entry is checked before anyone prints it.
        for agent, entry in self.agents.items():
            if not valid_id(agent):
                raise ProtocolError("agent_list: an agent id is not a valid identifier")
            if not isinstance(entry, dict):
                raise ProtocolError(f"agent_list.{agent}: expected an object")
            for name, kind in self.ENTRY.items():
                value = entry.get(name)
                items = value if isinstance(value, list) else [value]
                if value is not None and not (
                    isinstance(value, kind)
                    and all(isinstance(i, str | bool) and len(str(i)) <= MAX_STRING for i in items)
                    and (kind is not list or all(isinstance(i, str) for i in items))
                ):
                    raise ProtocolError(f"agent_list.{agent}.{name}: expected {kind.__name__}")


@dataclass(frozen=True, slots=True)
class CardPresent(Message):
    """Client to gateway, on a session's control connection: the smartcard that proved
    the login was seen in its reader just now (see ``SessionOpened.card_heartbeat``)."""

    TYPE = "card_present"


@dataclass(frozen=True, slots=True)
class Bye(Message):
    """The client ends its session and says why (``card removed``, ``user quit``)."""

    TYPE = "bye"
    reason: str = ""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if len(self.reason) > 200:
            raise ProtocolError("bye.reason: longer than 200 characters")


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE = "ping"
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE = "pong"
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Error(Message):
    """The sender is closing the connection, and says why.

    ``code`` is one of :data:`ERROR_CODES`; ``message`` is for the person at the
    other end and carries no secrets (auth failures are always the generic
    ``auth_failed``).
    """

    TYPE = "error"
    code: str
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


ERROR_CODES = {
    "protocol_error": "the peer broke the protocol",
    "frame_too_large": "a frame exceeded the size limit",
    "unsupported_version": "the peer speaks another protocol version",
    "timeout": "the peer went silent",
    "auth_failed": "authentication failed",
    "denied": "policy denied the request",
    "agent_offline": "the agent is not connected",
    "target_unknown": "the agent does not expose that target",
    "dial_failed": "the agent could not reach its target",
    "rate_limited": "too many attempts from this source",
    "unavailable": "the gateway cannot accept new sessions now",
    "session_ended": "the session ended",
    "login_ended": "the login credential expired, idled out or was ended",
    "shutdown": "the gateway is shutting down",
    "internal": "internal error",
}

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        ClientHello,
        AgentHello,
        EnrollRequest,
        TunnelHello,
        TunnelSpare,
        TunnelOpen,
        DataHello,
        SpareHello,
        RegisterHello,
        Registered,
        LoggedIn,
        LoggedOut,
        AuthRequest,
        AuthResponse,
        SessionOpened,
        Enrolled,
        Dial,
        DialFailed,
        Spliced,
        CardPresent,
        Bye,
        ApprovalPending,
        Approve,
        ApprovalAnswer,
        Notice,
        AgentList,
        Ping,
        Pong,
        Error,
    )
}


def from_json(obj: object) -> Message:
    """Build a message from a decoded JSON value; ProtocolError if it is not one."""
    if not isinstance(obj, dict):
        raise ProtocolError("a message must be a JSON object")
    mtype = obj.get("t")
    cls = MESSAGE_TYPES.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {str(mtype)[:40]!r}")
    kwargs: dict[str, Any] = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in obj.items():
        if key == "t":
            continue
        if key not in names:
            raise ProtocolError(f"{mtype}: unknown member {key[:40]!r}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    missing = [
        n
        for n, f in names.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ProtocolError(f"{mtype}: missing {', '.join(missing)}")
    return cls(**kwargs)
