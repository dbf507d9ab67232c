"""The hybrid (X25519 + ML-KEM-768) end-to-end handshake on real processes.

A real ``gatewayd`` (the lying one of ``tests/support/lying_gateway.py``, which tells
no lie until asked), real ``gw agent`` and ``gw connect`` processes: a freshly
enrolled agent gets hybrid tunnels, audited as such; an agent enrolled before the
hybrid handshake keeps working until ``[e2e] require_hybrid``; and a gateway that
hands out the classic key of a hybrid agent (a downgrade) gets no tunnel.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_e2e_binding import PASSWORD, LyingLab, Site, _client_code

from gatewayd.demo import EchoServer, Proc, wait_for

pytestmark = pytest.mark.integration
_bad = itertools.count(1)


class PQSite(Site):
    def __init__(self, lab: LyingLab, echo: EchoServer, agent: Proc, old: Proc) -> None:
        super().__init__(lab, echo, agent)
        self.old = old

    def reload(self, require_hybrid: bool) -> None:
        """Turn ``[e2e] require_hybrid`` on or off with SIGHUP; wait for the reload."""
        text = self.lab.config.read_text()
        head, _, _ = text.partition("\n[e2e]\n")
        self.lab.config.write_text(
            f"{head}\n[e2e]\nrequire_hybrid = {str(require_hybrid).lower()}\n"
        )
        before = len(self.lab.events("gateway.reload"))
        gatewayd = next(p for p in self.lab.procs if p.name == "gatewayd")
        gatewayd.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: len(self.lab.events("gateway.reload")) > before, 60, "gateway.reload")
        assert self.lab.events("gateway.reload")[-1]["outcome"] == "success"

    def tunnel_starts(self, user: str) -> list[dict[str, object]]:
        return [r for r in self.lab.events("tunnel.start") if r["user"] == user]


def _store_path(lab: LyingLab) -> Path:
    for line in lab.config.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "path" and value.strip().strip('"').endswith(".db"):
            path = Path(value.strip().strip('"'))
            return path if path.is_absolute() else lab.config.parent / path
    raise AssertionError("no store path in the config")


@pytest.fixture(scope="module")
def pq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PQSite]:
    lab = LyingLab(tmp_path_factory.mktemp("pq"))
    lab.init(extra_config="[limits]\nauth_per_minute = 5000\n")
    lab.start_gateway()
    echo = EchoServer()
    lab.admin("org", "add", "clinic", "--name", "Clinic")
    lab.admin("vendor", "add", "acme", "--name", "Acme")
    lab.admin("vendor", "add", "attended", "--name", "Attended only AS")
    lab.agreement("acme", "clinic", "access", unattended=True)
    lab.agreement("attended", "clinic", "access", unattended=False)
    lab.enroll_agent("pc1", "clinic")
    # An agent enrolled before the hybrid handshake: no ML-KEM key in its state folder,
    # none in the gateway's store (as the schema upgrade leaves such an agent).
    old_state = lab.enroll_agent("pc-old", "clinic")
    (old_state / "pq.key").unlink()
    info = json.loads((old_state / "agent.json").read_text())
    del info["pq_key"]
    (old_state / "agent.json").write_text(json.dumps(info))
    with sqlite3.connect(_store_path(lab)) as db:
        db.execute("UPDATE agents SET pq_key = NULL WHERE id = 'pc-old'")
    codes = lab.root / "codes"
    approve = f'test "$GW_EVENT" != approve || echo "$GW_SAS" >> {codes}'
    agent = lab.start_agent("pc1", {"echo": echo.port}, "--approval-command", approve)
    old = lab.start_agent("pc-old", {"echo": echo.port})
    try:
        yield PQSite(lab, echo, agent, old)
    finally:
        lab.close()
        echo.close()


def _stdio(pq: PQSite, user: str, agent: str, data: str) -> str:
    result = pq.lab.connect_stdio(
        agent, user, PASSWORD, "echo", data, "--known-agents", str(pq.known(user))
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_new_agent_gets_hybrid_tunnels_and_the_audit_says_so(pq: PQSite) -> None:
    pq.lie()
    user = pq.user("acme")
    assert _stdio(pq, user, "pc1", "patient record\n") == "PATIENT RECORD\n"
    (start,) = pq.tunnel_starts(user)
    assert start["e2e"] == "hybrid"
    assert "tunnel open" in pq.agent.output() and "e2e=hybrid" in pq.agent.output()
    # What the client pinned is the whole key, X25519 and ML-KEM-768: its fingerprint
    # is the one the machine shows.
    (pinned,) = json.loads(pq.known(user).read_text()).values()
    from relay.client import agent_key_bytes
    from relay.noise import fingerprint

    assert len(agent_key_bytes(pinned)) == 32 + 1184
    assert fingerprint(agent_key_bytes(pinned)) == pq.fingerprint().strip()


def test_a_pinned_client_refuses_the_classic_key_of_a_hybrid_agent(pq: PQSite) -> None:
    pq.lie()
    user = pq.user("acme")
    _stdio(pq, user, "pc1", "first\n")  # pins the hybrid key
    pq.lie("classic-key")
    connections = pq.echo.connections
    result = pq.lab.connect_stdio(
        "pc1", user, PASSWORD, "echo", "the secret plans\n", "--known-agents", str(pq.known(user))
    )
    assert result.returncode == 3, result.stderr
    assert "downgrade" in result.stderr and result.stdout == ""
    assert [a for a in pq.attacks() if a["attack"] == "classic-key"], "the gateway did not lie"
    assert pq.echo.connections == connections
    assert len(pq.tunnel_starts(user)) == 1  # only the honest first one


def test_at_first_contact_the_agent_refuses_a_classic_handshake(pq: PQSite) -> None:
    # No pin yet: the client believes the gateway and runs the classic handshake; the
    # agent, which has its ML-KEM key, answers only the hybrid one.
    pq.lie("classic-key")
    user = pq.user("acme")
    result = pq.lab.connect_stdio(
        "pc1", user, PASSWORD, "echo", "the secret plans\n", "--known-agents", str(pq.known(user))
    )
    assert result.returncode != 0 and result.stdout == "", result.stderr
    wait_for(lambda: "classic handshake" in pq.agent.output(), 60, "the agent's refusal")


def test_a_downgrade_changes_the_session_code(pq: PQSite) -> None:
    # With approval, the machine's code covers its ML-KEM key, the client's code the key
    # it was given: a classic key makes the two codes differ.
    pq.lie("classic-key")
    user = pq.user("attended")
    result = pq.lab.connect_stdio(
        "pc1", user, PASSWORD, "echo", "x\n", "--known-agents", str(pq.known(user))
    )
    assert _client_code(result.stderr) != pq.agent_codes()[-1]
    assert result.returncode != 0 and result.stdout == ""
    pq.lie()
    honest = pq.user("attended")
    result = pq.lab.connect_stdio(
        "pc1", honest, PASSWORD, "echo", "x\n", "--known-agents", str(pq.known(honest))
    )
    assert result.returncode == 0, result.stderr
    assert _client_code(result.stderr) == pq.agent_codes()[-1]


def test_an_old_agent_works_until_the_gateway_requires_hybrid(pq: PQSite) -> None:
    pq.lie()
    user = pq.user("acme")
    assert _stdio(pq, user, "pc-old", "old\n") == "OLD\n"
    assert pq.tunnel_starts(user)[-1]["e2e"] == "classic"
    pq.reload(require_hybrid=True)
    try:
        refused = pq.lab.connect_stdio(
            "pc-old", user, PASSWORD, "echo", "x\n", "--known-agents", str(pq.known(user))
        )
        assert refused.returncode != 0 and "no post-quantum key" in refused.stderr
        last = [r for r in pq.lab.events("session.refused") if r["user"] == user][-1]
        assert "require_hybrid" in last["reason"]
        assert len(pq.tunnel_starts(user)) == 1
        # Hybrid agents are unaffected.
        assert _stdio(pq, user, "pc1", "new\n") == "NEW\n"
        assert pq.tunnel_starts(user)[-1]["e2e"] == "hybrid"
    finally:
        pq.reload(require_hybrid=False)


@pytest.mark.parametrize(
    ("pq_key", "why"),
    [
        ("not base64!", "base64"),
        (base64.urlsafe_b64encode(bytes(100)).decode(), "1184 bytes"),
        # Every coefficient 0xfff >= q: FIPS 203's modulus check refuses it.
        (base64.urlsafe_b64encode(b"\xff" * 1184).decode(), "ML-KEM"),
    ],
    ids=["garbage", "short", "not-reduced"],
)
def test_enrollment_with_a_bad_ml_kem_key_is_refused(pq: PQSite, pq_key: str, why: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from relay import message as m
    from relay.aio import open_link
    from relay.errors import RemoteError
    from relay.tls import client_context

    name = f"pc-bad{next(_bad)}"
    token = pq.lab.admin("agent", "add", name, "--org", "clinic").strip()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )

    async def enroll() -> str:
        host, port = pq.lab.gateway.rsplit(":", 1)
        link = await open_link(host, int(port), client_context(pq.lab.ca_file))
        try:
            link.send(
                m.EnrollRequest(token, csr, base64.urlsafe_b64encode(bytes(32)).decode(), pq_key)
            )
            await link.expect(m.Enrolled)
        except RemoteError as exc:
            return f"{exc.code}: {exc.message}"
        finally:
            await link.aclose()
        return "enrolled"

    said = asyncio.run(enroll())
    assert said.startswith("protocol_error") and why in said and "\n" not in said, said
    last = [r for r in pq.lab.events("agent.enroll") if r.get("agent") == name][-1]
    assert last["outcome"] == "failure"
    # The daemon is still there for everyone else.
    user = pq.user("acme")
    assert _stdio(pq, user, "pc1", "still here\n") == "STILL HERE\n"


def test_the_agent_refuses_a_replayed_first_handshake_message(pq: PQSite) -> None:
    # The gateway relays a genuine tunnel, records the client's first handshake
    # message, and sends it again in a new data connection of the same session, with
    # the genuine client key: the agent refuses to answer it a second time.
    pq.lie("replay")
    user = pq.user("acme")
    assert _stdio(pq, user, "pc1", "relayed\n") == "RELAYED\n"
    wait_for(
        lambda: any(a["attack"] == "replay" for a in pq.attacks()), 20, "the attacker's replay"
    )
    (replay,) = [a for a in pq.attacks() if a["attack"] == "replay"]
    assert replay["outcome"].startswith("refused"), replay
    assert "replayed first handshake message" in pq.agent.output()


def test_the_agent_list_says_which_agents_are_hybrid(pq: PQSite) -> None:
    # Before turning require_hybrid on, an operator finds the agents to enroll again.
    rows = json.loads(pq.lab.admin("agent", "list", "--json"))
    e2e = {r["id"]: r["e2e"] for r in rows}
    assert e2e["pc1"] == "hybrid" and e2e["pc-old"] == "classic"
    assert "E2E" in pq.lab.admin("agent", "list")
