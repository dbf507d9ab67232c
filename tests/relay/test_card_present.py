"""The card heartbeat on the wire: ``session.card_heartbeat`` and ``card_present``."""

from __future__ import annotations

import pytest

from relay import message as m
from relay.errors import ProtocolError
from relay.protocol import PEER_MAY_SEND, Side, State

OPENED = {
    "t": "session",
    "session_id": "s1",
    "ticket": "t",
    "agent": "pc1",
    "target": "rdp",
    "agent_key": "A" * 43,
    "expires": 1.0,
}


def test_heartbeat_is_said_only_when_expected() -> None:
    plain = m.from_json(OPENED)
    assert isinstance(plain, m.SessionOpened) and plain.card_heartbeat == 0.0
    assert "card_heartbeat" not in plain.to_json()  # older clients still parse it
    watched = m.from_json({**OPENED, "card_heartbeat": 5})
    assert isinstance(watched, m.SessionOpened)
    assert watched.to_json()["card_heartbeat"] == 5
    assert m.from_json(watched.to_json()) == watched


@pytest.mark.parametrize("value", [-1, 3601, "5", True])
def test_impossible_heartbeat_is_refused(value: object) -> None:
    with pytest.raises(ProtocolError, match="card_heartbeat"):
        m.from_json({**OPENED, "card_heartbeat": value})


def test_card_present_only_on_a_session_control_connection() -> None:
    assert m.from_json({"t": "card_present"}) == m.CardPresent()
    with pytest.raises(ProtocolError):
        m.from_json({"t": "card_present", "card": "x"})
    assert "card_present" in PEER_MAY_SEND[(Side.ACCEPTOR, State.SESSION)]
    for (side, state), allowed in PEER_MAY_SEND.items():
        if (side, state) != (Side.ACCEPTOR, State.SESSION):
            assert "card_present" not in allowed
