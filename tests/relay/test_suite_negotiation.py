"""Choosing the end-to-end cipher, attacked at the tunnel layer over real socket pairs.

The agent says which ciphers it runs, the client names its choice, the gateway passes
both on; the agent answers only the cipher named, so a gateway that changes the choice
gets a failed handshake, never a tunnel under a cipher neither end chose. Ends that
run ChaChaPoly alone (every older one) say nothing new on the wire.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from relay import message as m
from relay import noise, tunnel
from relay.errors import GatewayError, NoiseError
from relay.noise import AESGCM_CIPHER, CHACHAPOLY, CIPHERS, HandshakeState

CLIENT_PRIVATE, CLIENT_PUBLIC = noise.generate_keypair()
AGENT_PRIVATE, AGENT_PUBLIC = noise.generate_keypair()
KEM_SEED, KEM_PUBLIC = noise.generate_kem_keypair()
SESSION = "session-1"


class _Sink(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


async def _pair() -> tuple[asyncio.Transport, asyncio.Transport]:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    ta, _ = await loop.create_connection(_Sink, sock=a)
    tb, _ = await loop.create_connection(_Sink, sock=b)
    return ta, tb


async def _tunnel(
    client_cipher: str,
    agent_told: str,
    *,
    agent_runs: tuple[str, ...] = CIPHERS,
    hybrid: bool = False,
    replay: tunnel.ReplayGuard | None = None,
    first: bytes = b"",
) -> tuple[tunnel.Established | BaseException, tunnel.Established | BaseException, bytes]:
    """Client and agent over a socket pair: the client runs ``client_cipher``, the agent
    is told (by the gateway's dial request) ``agent_told``. With ``first``, that first
    message is sent instead of the client's. Returns both results and message 1."""
    ta, tb = await _pair()
    sent = bytearray()
    honest_write = ta.write

    def recording_write(data: bytes | bytearray | memoryview) -> None:
        if not sent:
            sent.extend(data)
        honest_write(noise.frame(first) if first else data)

    ta.write = recording_write  # type: ignore[method-assign]
    try:
        client = asyncio.ensure_future(
            tunnel.initiate(
                ta,
                b"",
                static_private=CLIENT_PRIVATE,
                agent_key=AGENT_PUBLIC,
                agent_kem_key=KEM_PUBLIC if hybrid else None,
                session_id=SESSION,
                cipher=client_cipher,
                timeout=10,
            )
        )
        agent = asyncio.ensure_future(
            tunnel.respond(
                tb,
                b"",
                static_private=AGENT_PRIVATE,
                expected_client_key=CLIENT_PUBLIC,
                session_id=SESSION,
                kem_seed=KEM_SEED if hybrid else None,
                replay=replay,
                cipher=agent_told,
                ciphers=agent_runs,
                timeout=10,
            )
        )
        agent_result: tunnel.Established | BaseException
        try:
            agent_result = await agent
        except NoiseError as exc:
            agent_result = exc
            tb.abort()  # as the agent does: the client sees the tunnel close
        client_result: tunnel.Established | BaseException
        try:
            client_result = await client
        except NoiseError as exc:
            client_result = exc
        return client_result, agent_result, bytes(sent[2:])
    finally:
        ta.abort()
        tb.abort()


def _check_data(client: tunnel.Established, agent: tunnel.Established) -> None:
    (frame,), _ = client.sealer.feed(b"patient record")
    parts, _ = agent.opener.feed(frame)
    assert b"".join(bytes(p) for p in parts) == b"patient record"


# -- the combinations ---------------------------------------------------------------------------


@pytest.mark.parametrize("hybrid", [False, True])
def test_both_new_run_aesgcm(hybrid: bool) -> None:
    cipher = tunnel.choose_cipher(CIPHERS, CIPHERS)
    assert cipher == AESGCM_CIPHER
    client, agent, _ = asyncio.run(_tunnel(cipher, cipher, hybrid=hybrid))
    assert isinstance(client, tunnel.Established) and isinstance(agent, tunnel.Established)
    assert client.cipher == agent.cipher == AESGCM_CIPHER
    assert client.hybrid is hybrid
    assert client.protocol == f"Noise_{'IKpsk2' if hybrid else 'IK'}_25519_AESGCM_BLAKE2s"
    assert client.sealer.cipher.cipher == agent.opener.cipher.cipher == AESGCM_CIPHER
    assert client.handshake_hash == agent.handshake_hash
    _check_data(client, agent)


def test_a_new_client_with_an_old_agent_runs_chachapoly() -> None:
    # An old agent says nothing: the session lists no ciphers, the client names none.
    cipher = tunnel.choose_cipher((), CIPHERS)
    assert cipher == CHACHAPOLY
    assert "cipher" not in m.TunnelHello("t", cipher=cipher).to_json()
    client, agent, _ = asyncio.run(_tunnel(cipher, CHACHAPOLY, agent_runs=(CHACHAPOLY,)))
    assert isinstance(client, tunnel.Established) and isinstance(agent, tunnel.Established)
    assert client.cipher == agent.cipher == CHACHAPOLY
    assert client.protocol == "Noise_IK_25519_ChaChaPoly_BLAKE2s"
    _check_data(client, agent)


def test_an_old_client_with_a_new_agent_runs_chachapoly() -> None:
    # An old client names no cipher: the dial request names none, the agent runs ChaChaPoly.
    dial = m.from_json({"t": "dial", "token": "k", "target": "echo", "session_id": SESSION,
                        "client_key": "a", "user": "u", "mode": "access"})  # fmt: skip
    assert isinstance(dial, m.Dial) and dial.cipher == ""
    client, agent, _ = asyncio.run(_tunnel(CHACHAPOLY, dial.cipher or CHACHAPOLY))
    assert isinstance(client, tunnel.Established) and isinstance(agent, tunnel.Established)
    assert client.cipher == agent.cipher == CHACHAPOLY


# -- a lying gateway ----------------------------------------------------------------------------


@pytest.mark.parametrize(("chosen", "told"), [(AESGCM_CIPHER, CHACHAPOLY), (CHACHAPOLY, "AESGCM")])
@pytest.mark.parametrize("hybrid", [False, True])
def test_a_gateway_that_flips_the_named_cipher_gets_no_tunnel(
    chosen: str, told: str, hybrid: bool
) -> None:
    client, agent, _ = asyncio.run(_tunnel(chosen, told, hybrid=hybrid))
    assert isinstance(agent, NoiseError) and "decryption failed" in str(agent)
    assert isinstance(client, NoiseError)


def test_a_gateway_that_names_a_cipher_the_agent_does_not_run_gets_no_tunnel() -> None:
    client, agent, _ = asyncio.run(_tunnel(AESGCM_CIPHER, AESGCM_CIPHER, agent_runs=(CHACHAPOLY,)))
    assert isinstance(agent, NoiseError) and "this agent runs ChaChaPoly" in str(agent)
    assert isinstance(client, NoiseError)


def test_a_gateway_that_strips_the_agents_ciphers_gets_chachapoly_between_the_ends() -> None:
    # Stripped from the session, the list is empty: both ends run ChaChaPoly, which they
    # both run; the gateway reads nothing either way.
    opened = m.SessionOpened("s", "t", "pc1", "echo", "a", 1.0, agent_ciphers=CIPHERS)
    stripped = {k: v for k, v in opened.to_json().items() if k != "agent_ciphers"}
    parsed = m.from_json(stripped)
    assert isinstance(parsed, m.SessionOpened) and parsed.agent_ciphers == ()
    cipher = tunnel.choose_cipher(parsed.agent_ciphers, CIPHERS)
    client, agent, _ = asyncio.run(_tunnel(cipher, cipher))
    assert isinstance(client, tunnel.Established) and client.cipher == CHACHAPOLY
    assert isinstance(agent, tunnel.Established)


def test_a_first_message_replayed_under_the_other_cipher_is_refused() -> None:
    async def main() -> None:
        guard = tunnel.ReplayGuard()
        _, agent, first = await _tunnel(AESGCM_CIPHER, AESGCM_CIPHER, replay=guard)
        assert isinstance(agent, tunnel.Established)
        for cipher in (CHACHAPOLY, AESGCM_CIPHER):
            _, again, _ = await _tunnel(cipher, cipher, replay=guard, first=first)
            assert isinstance(again, NoiseError) and "replayed" in str(again)

    asyncio.run(main())


def test_a_first_message_remade_under_the_other_cipher_with_the_same_ephemeral_is_refused() -> None:
    # Even the client itself (who alone could remake it) cannot get a second answer
    # to one ephemeral key by switching cipher.
    async def main() -> None:
        guard = tunnel.ReplayGuard()
        e_private, _ = noise.generate_keypair()
        firsts = [
            HandshakeState.initiator(
                CLIENT_PRIVATE,
                AGENT_PUBLIC,
                tunnel.prologue(SESSION),
                ephemeral_private=e_private,
                cipher=cipher,
            ).write_message()
            for cipher in (AESGCM_CIPHER, CHACHAPOLY)
        ]
        _, agent, _ = await _tunnel(AESGCM_CIPHER, AESGCM_CIPHER, replay=guard, first=firsts[0])
        assert isinstance(agent, tunnel.Established)
        _, again, _ = await _tunnel(CHACHAPOLY, CHACHAPOLY, replay=guard, first=firsts[1])
        assert isinstance(again, NoiseError) and "replayed" in str(again)

    asyncio.run(main())


# -- what each end runs, and what goes on the wire ---------------------------------------------


def test_local_ciphers_from_the_environment() -> None:
    assert tunnel.local_ciphers({}) == CIPHERS
    assert tunnel.local_ciphers({"GW_E2E_CIPHERS": "ChaChaPoly"}) == (CHACHAPOLY,)
    assert tunnel.local_ciphers({"GW_E2E_CIPHERS": " AESGCM "}) == (AESGCM_CIPHER, CHACHAPOLY)
    assert tunnel.local_ciphers({"GW_E2E_CIPHERS": "ChaChaPoly,AESGCM"}) == (
        CHACHAPOLY,
        AESGCM_CIPHER,
    )
    with pytest.raises(GatewayError, match="GW_E2E_CIPHERS: unknown cipher 'AES128'"):
        tunnel.local_ciphers({"GW_E2E_CIPHERS": "AES128"})


def test_choose_cipher() -> None:
    assert tunnel.choose_cipher(("ChaChaPoly", "AESGCM"), CIPHERS) == AESGCM_CIPHER
    assert tunnel.choose_cipher(("AESGCM",), (CHACHAPOLY,)) == CHACHAPOLY
    assert tunnel.choose_cipher(("Future",), CIPHERS) == CHACHAPOLY


def test_chachapoly_only_ends_say_nothing_new() -> None:
    """Older peers refuse members they do not know: ChaChaPoly goes unsaid."""
    for msg in (
        m.AgentHello(("echo",), ciphers=(CHACHAPOLY,)),
        m.AgentHello(("echo",)),
        m.TunnelHello("t", cipher=CHACHAPOLY),
        m.Dial("k", "echo", SESSION, "a", "u", "access", cipher=CHACHAPOLY),
        m.SessionOpened("s", "t", "pc1", "echo", "a", 1.0),
    ):
        assert "cipher" not in json.dumps(msg.to_json()), msg
    # To a client that said its ciphers, the gateway names the agent's, ChaChaPoly alone
    # too: the client then knows this gateway takes the new members.
    opened = m.SessionOpened("s", "t", "pc1", "echo", "a", 1.0, agent_ciphers=(CHACHAPOLY,))
    assert opened.to_json()["agent_ciphers"] == ["ChaChaPoly"]
    said = m.AgentHello(("echo",), ciphers=CIPHERS).to_json()
    assert said["ciphers"] == ["AESGCM", "ChaChaPoly"]
    assert m.from_json(said) == m.AgentHello(("echo",), ciphers=CIPHERS)
    assert m.Dial("k", "echo", SESSION, "a", "u", "access", cipher="AESGCM").to_json()["cipher"]


@pytest.mark.parametrize("bad", ["", "x" * 33, "AES GCM", "-x", "a\nb"])
def test_bad_cipher_names_are_protocol_errors(bad: str) -> None:
    for obj in (
        {"t": "agent_hello", "targets": [], "ciphers": [bad]},
        {"t": "tunnel", "ticket": "t", "cipher": bad or "\x00"},
        {"t": "dial", "token": "k", "target": "echo", "session_id": "s", "client_key": "a",
         "user": "u", "mode": "access", "cipher": bad or " "},
    ):  # fmt: skip
        with pytest.raises(GatewayError, match="cipher"):
            m.from_json(obj)


# -- the client says its ciphers at login; an older gateway refuses that: once more without ------


def test_the_client_says_its_ciphers_at_login_and_retries_without_for_an_older_gateway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from relay import client
    from relay.errors import RemoteError

    said: list[tuple[str, ...]] = []

    async def older_gateway(gateway: object, **login: object) -> tuple[object, object]:
        ciphers = login["ciphers"]
        assert isinstance(ciphers, tuple)
        said.append(ciphers)
        hello = m.ClientHello("u", "pc1", "echo", "access", "k", ciphers=ciphers).to_json()
        if "ciphers" in hello:  # what a gateway from before this member answers
            raise RemoteError("protocol_error", "client_hello: unknown member 'ciphers'")
        return "link", "opened"

    monkeypatch.setattr(client, "_login_once", older_gateway)
    monkeypatch.delenv("GW_E2E_CIPHERS", raising=False)
    assert asyncio.run(client._login(object(), agent="pc1")) == ("link", "opened")
    assert said == [CIPHERS, ()]
    # A list of agents, a login or a logout says no ciphers; other errors are not retried.
    said.clear()
    asyncio.run(client._login(object(), agent=""))
    assert said == [()]

    async def refusing(gateway: object, **login: object) -> tuple[object, object]:
        said.append(login["ciphers"])  # type: ignore[arg-type]
        raise RemoteError("denied", "no")

    said.clear()
    monkeypatch.setattr(client, "_login_once", refusing)
    with pytest.raises(RemoteError, match="no"):
        asyncio.run(client._login(object(), agent="pc1"))
    assert said == [CIPHERS]


def test_the_gateway_names_the_agents_ciphers_only_to_a_client_that_said_its_own() -> None:
    hello = m.from_json({"t": "client_hello", "user": "u", "agent": "pc1", "target": "echo",
                         "mode": "access", "client_key": "k"})  # fmt: skip
    assert isinstance(hello, m.ClientHello) and hello.ciphers == ()  # an older client
    new = m.ClientHello("u", "pc1", "echo", "access", "k", ciphers=CIPHERS)
    assert new.to_json()["ciphers"] == ["AESGCM", "ChaChaPoly"]
    assert "ciphers" not in m.ClientHello("u", "pc1", "echo", "access", "k").to_json()
    with pytest.raises(GatewayError, match=r"client_hello\.ciphers"):
        m.ClientHello("u", "pc1", "echo", "access", "k", ciphers=("a b",))
