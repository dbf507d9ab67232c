"""What nodes say to each other over MQTT: topics and payloads, without I/O.

Topics (``PREFIX`` is ``gw/v1``)
--------------------------------

======================== ======== ====================================================
topic                    retained payload
======================== ======== ====================================================
``gw/v1/nodes/NODE``     yes      :class:`NodeState`: ``up`` with the node's data
                                  address, or ``dead`` (the node's last will, or its
                                  goodbye at a clean stop)
``gw/v1/agents/AGENT``   yes      :class:`Presence`: the node holding the agent's
                                  control connection and its targets; empty: offline
``gw/v1/to/NODE``        no       requests to one node and their replies
                                  (:class:`Note` kinds ``agent``, ``ack``, ``failed``,
                                  ``answer``, ``killed``)
``gw/v1/all``            no       to every node: ``kill`` (end a session wherever it
                                  is) and ``changed`` (the directory changed: re-check
                                  the live sessions)
======================== ======== ====================================================

Every payload is one JSON object of at most :data:`MAX_PAYLOAD` bytes. A payload
that does not parse as what its topic carries raises :class:`WireError`; the bus
logs it and drops it (a node never acts on, or dies of, a malformed note).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from relay.errors import GatewayError
from relay.message import valid_id

PREFIX = "gw/v1"
#: Largest payload a node reads: a relayed agent message (an approval request with a
#: 1 KiB reason and a hybrid key) is well under this.
MAX_PAYLOAD = 64 * 1024
#: What a note's ``kind`` may be on ``to/NODE`` and on ``all``.
DIRECT_KINDS = frozenset({"agent", "ack", "failed", "answer", "killed"})
BROADCAST_KINDS = frozenset({"kill", "changed"})


class WireError(GatewayError):
    """A payload on the bus is not what its topic carries."""


def hostport(address: tuple[str, int]) -> str:
    """``HOST:PORT``, an IPv6 host in brackets."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def node_topic(node: str) -> str:
    return f"{PREFIX}/nodes/{node}"


def agent_topic(agent: str) -> str:
    return f"{PREFIX}/agents/{agent}"


def direct_topic(node: str) -> str:
    return f"{PREFIX}/to/{node}"


BROADCAST_TOPIC = f"{PREFIX}/all"
SUBSCRIPTIONS = (f"{PREFIX}/nodes/+", f"{PREFIX}/agents/+", BROADCAST_TOPIC)


def topic_id(topic: str, kind: str) -> str | None:
    """The node or agent id a ``nodes/ID`` or ``agents/ID`` topic names, else None."""
    head = f"{PREFIX}/{kind}/"
    if not topic.startswith(head):
        return None
    ident = topic[len(head) :]
    return ident if valid_id(ident) else None


def _object(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD:
        raise WireError(f"payload of {len(payload)} bytes (at most {MAX_PAYLOAD})")
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError("payload is not JSON") from exc
    if not isinstance(obj, dict):
        raise WireError("payload is not a JSON object")
    return obj


def _text(obj: dict[str, Any], key: str, *, ident: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > 1024:
        raise WireError(f"{key}: expected text")
    if ident and not valid_id(value):
        raise WireError(f"{key}: not an identifier")
    return value


def _number(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"{key}: expected a number")
    if not math.isfinite(value):
        raise WireError(f"{key}: expected a finite number")
    return float(value)


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True, slots=True)
class NodeState:
    node: str
    state: str
    """``up`` or ``dead``."""
    data: str = ""
    """``HOST:PORT`` where agents dial this node's data connections (when up)."""

    def encode(self) -> bytes:
        return encode({"node": self.node, "state": self.state, "data": self.data})

    @classmethod
    def decode(cls, payload: bytes) -> NodeState:
        obj = _object(payload)
        state = _text(obj, "state")
        if state not in ("up", "dead"):
            raise WireError(f"state: up or dead, not {state[:20]!r}")
        return cls(_text(obj, "node", ident=True), state, str(obj.get("data", ""))[:300])


@dataclass(frozen=True, slots=True)
class Presence:
    node: str
    targets: frozenset[str]
    since: float
    """When the node accepted the agent's control connection (the newest one wins)."""
    ciphers: tuple[str, ...] = ()
    """The end-to-end ciphers the agent said in its hello, preferred first; unsaid by
    older nodes and for an agent that runs ChaChaPoly alone."""

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "node": self.node,
            "targets": sorted(self.targets),
            "since": self.since,
        }
        if self.ciphers:
            obj["ciphers"] = list(self.ciphers)
        return encode(obj)

    @classmethod
    def decode(cls, payload: bytes) -> Presence | None:
        """The presence, or None for an empty (cleared) payload."""
        if not payload:
            return None
        obj = _object(payload)
        targets = obj.get("targets")
        if not isinstance(targets, list) or len(targets) > 256:
            raise WireError("targets: expected a list")
        if not all(isinstance(t, str) and valid_id(t) for t in targets):
            raise WireError("targets: expected identifiers")
        ciphers = obj.get("ciphers", [])
        if not isinstance(ciphers, list) or len(ciphers) > 8:
            raise WireError("ciphers: expected a list")
        if not all(isinstance(c, str) and 0 < len(c) <= 32 and valid_id(c) for c in ciphers):
            raise WireError("ciphers: expected cipher names")
        return cls(
            _text(obj, "node", ident=True),
            frozenset(targets),
            _number(obj, "since"),
            tuple(ciphers),
        )


@dataclass(frozen=True, slots=True)
class Note:
    """A request or reply between nodes: ``kind``, the sender, and the kind's fields."""

    kind: str
    sender: str
    fields: dict[str, Any]

    def encode(self) -> bytes:
        return encode({**self.fields, "kind": self.kind, "from": self.sender})

    def text(self, key: str, *, ident: bool = False) -> str:
        return _text(self.fields, key, ident=ident)

    def message(self) -> dict[str, Any]:
        """The relayed protocol message (a JSON object), for ``agent`` and ``answer``."""
        value = self.fields.get("msg")
        if not isinstance(value, dict):
            raise WireError("msg: expected an object")
        return value

    @classmethod
    def decode(cls, payload: bytes, kinds: frozenset[str]) -> Note:
        obj = _object(payload)
        kind = _text(obj, "kind")
        if kind not in kinds:
            raise WireError(f"kind: unknown {kind[:20]!r}")
        sender = _text(obj, "from", ident=True)
        fields = {k: v for k, v in obj.items() if k not in ("kind", "from")}
        return cls(kind, sender, fields)
