"""Which end-to-end keys each end accepts: fingerprints, the client's trusted agent keys,
the agent's per-session client keys. The attacks on real processes are in
tests/integration/test_e2e_binding.py; these are the units under them, without sockets."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from relay import message as m
from relay import noise
from relay.agent import SessionKeys
from relay.client import (
    AgentKeyCheck,
    AgentKeyMismatch,
    AgentKeySwapped,
    KnownAgents,
    UnknownAgent,
    _check_session_key,
)
from relay.errors import GatewayError, NoiseError

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
GW = "gw.example.org:8443"


def b64url(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).rstrip(b"=").decode()


# -- fingerprints -------------------------------------------------------------------------


def test_fingerprint_is_openssh_style_sha256_base64_without_padding() -> None:
    # By definition: SHA-256 of the raw key, standard base64, no "=" padding.
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(KEY).digest()).decode().rstrip("=")
    assert noise.fingerprint(KEY) == expected
    # Independently: printf bytes 0..31 | openssl dgst -sha256 -binary | base64
    assert noise.fingerprint(KEY) == "SHA256:Yw3NKWbEM2aRElRIu7JbT/QSpJxzLbLIq8G4WBvXEN0"
    assert len(noise.fingerprint(KEY)) == len("SHA256:") + 43
    assert noise.fingerprint(KEY) != noise.fingerprint(OTHER)
    with pytest.raises(NoiseError):
        noise.fingerprint(KEY[:31])


def test_parse_fingerprint_normalises_and_refuses() -> None:
    fp = noise.fingerprint(KEY)
    assert noise.parse_fingerprint(f"  {fp}=\n") == fp
    for bad in ("MD5:ab:cd", "SHA256:", "SHA256:!!!!", "SHA256:" + "A" * 20, b64url(KEY)):
        with pytest.raises(ValueError, match="fingerprint"):
            noise.parse_fingerprint(bad)


# -- the client's trusted agent keys ------------------------------------------------------


def test_known_agents_add_list_forget(tmp_path: Path) -> None:
    known = KnownAgents(tmp_path / "gw" / "known_agents.json")
    assert known.lookup(GW, "pc1") is None and known.entries() == []
    assert known.add(GW, "pc1", noise.fingerprint(KEY)) is True
    assert known.add(GW, "pc1", b64url(KEY)) is False  # the same key, written as a key
    assert known.add(GW, "pc2", b64url(OTHER)) is True
    assert known.entries() == [
        (GW, "pc1", noise.fingerprint(KEY)),
        (GW, "pc2", noise.fingerprint(OTHER)),
    ]
    with pytest.raises(AgentKeyMismatch, match="forget"):
        known.add(GW, "pc1", noise.fingerprint(OTHER))
    assert known.verify(GW, "pc1", KEY) is True
    with pytest.raises(AgentKeyMismatch, match="CHANGED"):
        known.verify(GW, "pc1", OTHER)
    assert known.forget(GW, "pc1") is True and known.forget(GW, "pc1") is False
    assert known.verify(GW, "pc1", OTHER) is False
    assert [e[1] for e in known.entries()] == ["pc2"]


def test_known_agents_keeps_files_written_before_fingerprints(tmp_path: Path) -> None:
    path = tmp_path / "known_agents.json"
    path.write_text(json.dumps({f"{GW} pc1": b64url(KEY)}))
    known = KnownAgents(path)
    assert known.check(GW, "pc1", b64url(KEY)) is True
    assert known.check(GW, "pc9", b64url(OTHER)) is False  # pinned now
    with pytest.raises(AgentKeyMismatch):
        known.check(GW, "pc1", b64url(OTHER))


@pytest.mark.parametrize(
    "content", ["[1, 2]", "{not json", json.dumps({f"{GW} pc1": "SHA256:nope"})]
)
def test_known_agents_damaged_file_is_one_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "known_agents.json"
    path.write_text(content)
    with pytest.raises(GatewayError, match=str(path)):
        KnownAgents(path).lookup(GW, "pc1")


def test_agent_key_check_expected_strict_and_pin(tmp_path: Path) -> None:
    known = KnownAgents(tmp_path / "known_agents.json")
    given = AgentKeyCheck(known, GW, "pc1", expected=noise.fingerprint(KEY), strict=True)
    with pytest.raises(AgentKeyMismatch, match="--agent-key"):
        given.check(OTHER)
    given.check(KEY)  # strict is satisfied by a fingerprint given out of band
    strict = AgentKeyCheck(known, GW, "pc1", strict=True)
    with pytest.raises(UnknownAgent, match="strict"):
        strict.check(KEY)
    assert not known.path.exists()  # checking never writes
    assert given.pin(KEY) is True and given.pin(KEY) is False
    strict.check(KEY)
    with pytest.raises(AgentKeyMismatch, match="CHANGED"):
        AgentKeyCheck(known, GW, "pc1").check(OTHER)


class _Link:
    """What the session check needs of a link: send."""

    def __init__(self) -> None:
        self.sent: list[m.Message] = []

    def send(self, msg: m.Message) -> None:
        self.sent.append(msg)


def _opened(key: bytes) -> m.SessionOpened:
    return m.SessionOpened("s1", "ticket", "pc1", "echo", b64url(key), 0.0)


def test_session_key_must_be_the_key_the_code_came_from(tmp_path: Path) -> None:
    link: Any = _Link()
    _check_session_key(link, _opened(KEY), KEY, None)
    _check_session_key(link, _opened(KEY), None, None)  # no code was shown (unattended)
    assert link.sent == []
    with pytest.raises(AgentKeySwapped, match="no byte was sent"):
        _check_session_key(link, _opened(OTHER), KEY, None)
    assert link.sent == [m.Bye("client refused the agent key")]
    known = KnownAgents(tmp_path / "known_agents.json")
    known.add(GW, "pc1", b64url(KEY))
    with pytest.raises(AgentKeyMismatch):
        _check_session_key(_Link(), _opened(OTHER), None, AgentKeyCheck(known, GW, "pc1"))  # type: ignore[arg-type]


# -- the agent's per-session client keys ---------------------------------------------------


def test_session_keys_refuse_unknown_sessions_and_swapped_keys() -> None:
    keys = SessionKeys()
    with pytest.raises(GatewayError, match="unknown session"):
        keys.key_for("s1", b64url(KEY))
    keys.bind("s1", KEY, announced=False)
    assert keys.key_for("s1", b64url(KEY)) == KEY
    with pytest.raises(GatewayError, match="another client key"):
        keys.key_for("s1", b64url(OTHER))
    with pytest.raises(GatewayError, match="malformed"):
        keys.key_for("s1", "not a key")
    with pytest.raises(GatewayError, match="known already"):
        keys.bind("s1", OTHER, announced=True)  # a second request cannot replace the key
    assert keys.key_for("s1", b64url(KEY)) == KEY
    assert keys.forget("s1") is False  # approved, not announced
    with pytest.raises(GatewayError, match="unknown session"):
        keys.key_for("s1", b64url(KEY))


def test_session_keys_announced_without_a_key_pin_the_first_dial() -> None:
    keys = SessionKeys()
    keys.bind("s2", None, announced=True)  # from a gateway that does not send the key
    assert keys.key_for("s2", b64url(OTHER)) == OTHER
    with pytest.raises(GatewayError, match="another client key"):
        keys.key_for("s2", b64url(KEY))
    assert keys.forget("s2") is True


def test_session_keys_are_bounded() -> None:
    keys = SessionKeys(limit=2)
    for sid in ("a", "b", "c"):
        keys.bind(sid, KEY, announced=True)
    assert list(keys.keys) == ["b", "c"] and keys.announced == {"b", "c"}
