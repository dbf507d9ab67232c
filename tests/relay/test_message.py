"""Messages that a hostile peer shapes: each is refused with a ProtocolError, never a crash."""

from __future__ import annotations

import pytest

from relay import message as m
from relay.errors import ProtocolError


def test_agent_list_accepts_what_the_gateway_sends() -> None:
    msg = m.AgentList(
        {"pc1": {"org": "clinic", "modes": ["access"], "online": True, "targets": ["rdp"]}}
    )
    assert msg.agents["pc1"]["targets"] == ["rdp"]
    assert m.AgentList({"pc1": {"online": False}}).agents["pc1"] == {"online": False}


@pytest.mark.parametrize(
    "agents",
    [
        {"pc1": "not an object"},
        {"pc1": ["org"]},
        {"bad id\x1b": {"org": "clinic"}},
        {"pc1": {"org": 7}},
        {"pc1": {"modes": "access"}},
        {"pc1": {"modes": [1, 2]}},
        {"pc1": {"online": "yes"}},
        {"pc1": {"targets": [{"x": 1}]}},
        {"pc1": {"org": "x" * (m.MAX_STRING + 1)}},
    ],
)
def test_agent_list_from_a_lying_gateway_is_a_protocol_error(agents: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        m.AgentList(agents)
