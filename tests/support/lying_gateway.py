"""A gateway that lies about end-to-end keys: gatewayd with a dishonest broker (tests only).

Run it in place of ``gatewayd``, with the same config::

    python tests/support/lying_gateway.py --config PATH

It is the real daemon (the same TLS, store, audit and factor checks) whose broker
tells the lies a malicious gateway operator could tell. The file ``GW_LIE_FILE``
names them (comma-separated; read at each decision, so a test switches lies without
a restart); ``GW_LIE_LOG`` is a JSON-lines file where the attacker writes down what
it tried and what it got:

- ``agent-key``: ``approval_pending`` shows the genuine agent key (so the code the
  client shows matches the one at the machine), then ``session`` hands out the
  attacker's key. Each tunnel of the session is intercepted: the attacker answers
  the client's Noise handshake with its own agent key, dials the agent with its own
  client key, relays both ways and writes down the plaintext it read (``read``).
- ``pending-key``: ``approval_pending`` shows the attacker's key as well (a
  consistent lie: the code at the two ends then differs).
- ``approve-key``: the approval request shows the person at the machine the
  attacker's client key instead of the client's (the code there then differs).
- ``client-key``: when a session opens (honestly), the attacker dials the agent in
  that session with its own client key and tries to reach the target; then once
  more in a session the agent never heard of.
- ``replay``: each tunnel is relayed byte for byte (honestly), and the client's first
  handshake message is recorded; then the attacker dials the agent once more in the
  same session, with the genuine client key, and sends that message again. Outcome
  ``answered`` if the agent answered it, ``refused: ...`` if it closed unanswered.
- ``cipher-strip``: ``session`` leaves out the agent's end-to-end ciphers
  (``agent_ciphers``), as if it ran ChaChaPoly alone; tunnels are spliced honestly.
- ``cipher-flip``: each ``dial`` names the other end-to-end cipher than the one the
  client named (AESGCM for ChaChaPoly and back); ``note`` says what was told.
- ``cipher-replay``: as ``replay``, but the replayed first message goes in a data
  connection whose ``dial`` names the other cipher.
- ``classic-key``: a downgrade. ``approval_pending`` and ``session`` name the genuine
  agent's X25519 key but leave its ML-KEM-768 key out, as if the agent had only the
  classic handshake; tunnels are then spliced honestly.

Against an agent with the hybrid handshake the attacker's agent key is hybrid too
(X25519 and ML-KEM-768 keys of its own), and it dials the agent with the hybrid
handshake: the lies test the key binding, not a mismatch of handshakes.

Each record has ``attack`` and ``outcome``: ``accepted`` means the attacker holds an
end-to-end channel it should never have; ``refused: ...`` that the agent said no.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from gatewayd import broker as broker_mod
from gatewayd import server as server_mod
from gatewayd.main import main as gatewayd_main
from relay import message as m
from relay import noise, tunnel
from relay.aio import FramedLink
from relay.errors import NoiseError

LIE_FILE = Path(os.environ.get("GW_LIE_FILE", "lies"))
LOG = Path(os.environ.get("GW_LIE_LOG", "lies.jsonl"))
#: The attacker's own Noise keys: one to pose as the agent, one to pose as the client.
AGENT_PRIVATE, AGENT_PUBLIC = noise.generate_keypair()
CLIENT_PRIVATE, CLIENT_PUBLIC = noise.generate_keypair()
AGENT_KEM_SEED, AGENT_KEM_PUBLIC = noise.generate_kem_keypair()
#: What the attacker sends the agent's target when it gets through, and waits for back.
PROBE = b"attacker was here\n"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def lies() -> frozenset[str]:
    try:
        text = LIE_FILE.read_text()
    except FileNotFoundError:
        return frozenset()
    return frozenset(filter(None, text.strip().split(",")))


def note(**fields: Any) -> None:
    with LOG.open("a") as f:
        f.write(json.dumps(fields) + "\n")


class _Tap(asyncio.Protocol):
    """One side of the intercepted tunnel: decrypts, writes the plaintext down, re-encrypts."""

    def __init__(self, name: str, opener: tunnel.Opener, sealer: tunnel.Sealer) -> None:
        self.name, self.opener, self.sealer = name, opener, sealer
        self.other: asyncio.Transport | None = None
        self.read = bytearray()

    def data_received(self, data: bytes) -> None:
        assert self.other is not None
        try:
            parts, ended = self.opener.feed(data)
        except NoiseError:
            self.other.abort()
            return
        plain = b"".join(bytes(p) for p in parts)
        if plain:
            self.read += plain
            note(attack="agent-key", outcome="read", side=self.name, data=plain.decode("latin-1"))
            chunks, _ = self.sealer.feed(plain)
            self.other.write(b"".join(chunks))
        if ended:
            end = self.sealer.end()
            if end:
                self.other.write(end)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None:
            self.other.close()


class _Raw(asyncio.Protocol):
    """Relays bytes to ``other`` as they are (``seen`` is told of each chunk first)."""

    def __init__(self, other: asyncio.Transport, seen: Any) -> None:
        self.other, self.seen = other, seen

    def data_received(self, data: bytes) -> None:
        if self.seen is not None:
            self.seen(data)
        self.other.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.other.close()


class LyingBroker(broker_mod.Broker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._honest_ask_approval = self.clients.ask_approval
        self.clients.ask_approval = self._ask_approval  # type: ignore[method-assign]

    async def _client(self, link: FramedLink, hello: m.ClientHello) -> None:
        honest_send = link.send

        def lying_send(msg: m.Message) -> None:
            told = lies()
            if isinstance(msg, m.ApprovalPending) and "pending-key" in told:
                pq = b64(AGENT_KEM_PUBLIC) if msg.agent_pq_key else ""
                msg = m.ApprovalPending(
                    msg.request, msg.session_id, b64(AGENT_PUBLIC), msg.timeout, pq
                )
                note(attack="pending-key", outcome="sent", session=msg.session_id)
            if isinstance(msg, m.SessionOpened) and told & {"agent-key", "pending-key"}:
                note(attack="agent-key", outcome="sent", session=msg.session_id)
                pq = b64(AGENT_KEM_PUBLIC) if msg.agent_pq_key else ""
                msg = _replace_agent_key(msg, b64(AGENT_PUBLIC), pq)
            if isinstance(msg, m.SessionOpened) and "cipher-strip" in told:
                note(attack="cipher-strip", outcome="sent", listed=list(msg.agent_ciphers))
                msg = dataclasses.replace(msg, agent_ciphers=())
            if isinstance(msg, m.ApprovalPending | m.SessionOpened) and "classic-key" in told:
                note(attack="classic-key", outcome="sent", session=msg.session_id)
                msg = _replace_agent_key(msg, None, "")
            honest_send(msg)
            if isinstance(msg, m.SessionOpened) and "client-key" in told:
                self.spawn(self._impersonate(hello, msg.session_id))

        link.send = lying_send  # type: ignore[method-assign]
        await super()._client(link, hello)

    async def _ask_approval(
        self,
        link: FramedLink,
        hello: m.ClientHello,
        sid: str,
        client_key: bytes,
        context: dict[str, Any],
    ) -> str | None:
        if "approve-key" in lies():
            note(attack="approve-key", outcome="sent", session=sid)
            client_key = CLIENT_PUBLIC
        return await self._honest_ask_approval(link, hello, sid, client_key, context)

    async def _tunnel(self, link: FramedLink, hello: m.TunnelHello) -> bool:
        session = self.sessions.by_ticket(hello.ticket)
        told = lies()
        named = hello.cipher or noise.CHACHAPOLY
        early = getattr(hello, "early", "")
        if session is not None and told & {"replay", "cipher-replay"}:
            again = _other_cipher(named) if "cipher-replay" in told else named
            attack = "cipher-replay" if "cipher-replay" in told else "replay"
            if not early:
                return await self._relay_and_replay(link, session, named, again, attack)
            # The first message (framed) came with the request: splice honestly (the
            # agent gets and answers it first), then replay it.
            frame = base64.urlsafe_b64decode(early + "=" * (-len(early) % 4))
            spliced = await super()._tunnel(link, hello)
            self.spawn(self._replay(session, frame, again, attack))
            return spliced
        if session is None or not lies() & {"agent-key", "pending-key"}:
            return await super()._tunnel(link, hello)
        note(attack="agent-key", outcome="tunnel requested", session=session.id)
        got = await self._dial_agent(
            session.agent, session.target, session.id, session.user, session.mode, cipher=named
        )
        if isinstance(got, str):
            note(attack="agent-key", outcome=got, session=session.id)
            link.send_error("dial_failed", got)
            return False
        agent_link = got
        link.send(m.Spliced())
        agent_link.send(m.Spliced())
        client_t, client_rest = link.detach()
        agent_t, agent_rest = agent_link.detach()
        try:
            to_client = await tunnel.respond(
                client_t,
                client_rest,
                static_private=AGENT_PRIVATE,
                expected_client_key=session.client_key,
                session_id=session.id,
                kem_seed=AGENT_KEM_SEED if await self._agent_pq_key(session.agent) else None,
                cipher=named,
            )
            client_t.pause_reading()  # what the client sends next waits for the relay
            to_agent = await tunnel.initiate(
                agent_t,
                agent_rest,
                static_private=CLIENT_PRIVATE,
                agent_key=await self._agent_key(session.agent),
                agent_kem_key=await self._agent_pq_key(session.agent),
                session_id=session.id,
                cipher=named,
            )
        except NoiseError as exc:
            note(attack="agent-key", outcome=f"refused: {exc}", session=session.id)
            client_t.abort()
            agent_t.abort()
            return True
        note(attack="agent-key", outcome="accepted", session=session.id)
        up = _Tap("client", to_client.opener, to_agent.sealer)
        down = _Tap("agent", to_agent.opener, to_client.sealer)
        up.other, down.other = agent_t, client_t
        client_t.set_protocol(up)
        agent_t.set_protocol(down)
        if to_client.leftover:
            up.data_received(to_client.leftover)
        if to_agent.leftover:
            down.data_received(to_agent.leftover)
        client_t.resume_reading()
        return True

    async def _agent_key(self, agent_id: str) -> bytes:
        agent = await self.store.get_agent(agent_id)
        assert agent is not None and agent.noise_key is not None
        return base64.urlsafe_b64decode(agent.noise_key + "=" * (-len(agent.noise_key) % 4))

    async def _agent_pq_key(self, agent_id: str) -> bytes | None:
        agent = await self.store.get_agent(agent_id)
        assert agent is not None
        if not agent.pq_key:
            return None
        return base64.urlsafe_b64decode(agent.pq_key + "=" * (-len(agent.pq_key) % 4))

    async def _relay_and_replay(
        self, link: FramedLink, session: Any, named: str, again: str, attack: str
    ) -> bool:
        got = await self._dial_agent(
            session.agent,
            session.target,
            session.id,
            session.user,
            session.mode,
            client_key=session.client_key,
            cipher=named,
        )
        if isinstance(got, str):
            link.send_error("dial_failed", got)
            return False
        link.send(m.Spliced())
        got.send(m.Spliced())
        client_t, client_rest = link.detach()
        agent_t, agent_rest = got.detach()
        first = bytearray()

        def recorded(data: bytes) -> None:
            if len(first) >= 2 and len(first) >= 2 + int.from_bytes(first[:2], "big"):
                return
            first.extend(data)
            if len(first) >= 2 and len(first) >= 2 + int.from_bytes(first[:2], "big"):
                frame = bytes(first[: 2 + int.from_bytes(first[:2], "big")])
                self.spawn(self._replay(session, frame, again, attack))

        up, down = _Raw(agent_t, recorded), _Raw(client_t, None)
        client_t.set_protocol(up)
        agent_t.set_protocol(down)
        if client_rest:
            up.data_received(client_rest)
        if agent_rest:
            down.data_received(agent_rest)
        return True

    async def _replay(self, session: Any, frame: bytes, cipher: str, attack: str) -> None:
        got = await self._dial_agent(
            session.agent,
            session.target,
            session.id,
            session.user,
            session.mode,
            client_key=session.client_key,
            cipher=cipher,
        )
        if isinstance(got, str):
            note(attack=attack, outcome=got, session=session.id, cipher=cipher)
            return
        got.send(m.Spliced())
        transport, _ = got.detach()
        answer = bytearray()
        done = asyncio.get_running_loop().create_future()

        class Reader(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                answer.extend(data)
                if not done.done():
                    done.set_result(None)

            def connection_lost(self, exc: Exception | None) -> None:
                if not done.done():
                    done.set_result(None)

        transport.set_protocol(Reader())
        transport.write(frame)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await done
        transport.abort()
        outcome = f"answered ({len(answer)} bytes)" if answer else "refused: closed unanswered"
        note(attack=attack, outcome=outcome, session=session.id, cipher=cipher)

    async def _dial_agent(
        self,
        agent: str,
        target: str,
        session_id: str,
        user: str,
        mode: str,
        client_key: bytes = CLIENT_PUBLIC,
        cipher: str = noise.CHACHAPOLY,
    ) -> FramedLink | str:
        """Ask the agent for a data connection presenting ``client_key`` (the attacker's)
        and naming ``cipher``."""
        online = self.agents.get(agent)
        if online is None:
            return "agent offline"
        token, waiter = self.dials.expect(agent)
        try:
            dial = m.Dial(token, target, session_id, b64(client_key), user, mode, cipher=cipher)
            online.link.send(dial)
            async with asyncio.timeout(10):
                return await waiter
        except broker_mod.DialError as exc:
            return f"refused: {exc}"
        except TimeoutError:
            return "refused: no answer"
        finally:
            self.dials.forget(token)

    async def _impersonate(self, hello: m.ClientHello, session_id: str) -> None:
        """Pose as the client to the agent: in the real session, then in an invented one."""
        for attack, sid in (
            ("client-key", session_id),
            ("unknown-session", secrets.token_hex(8)),
        ):
            outcome = await self._try_agent(hello, sid)
            note(attack=attack, outcome=outcome, session=sid)

    async def _try_agent(self, hello: m.ClientHello, sid: str) -> str:
        got = await self._dial_agent(hello.agent, hello.target, sid, hello.user, hello.mode)
        if isinstance(got, str):
            return got
        got.send(m.Spliced())
        transport, rest = got.detach()
        try:
            est = await tunnel.initiate(
                transport,
                rest,
                static_private=CLIENT_PRIVATE,
                agent_key=await self._agent_key(hello.agent),
                agent_kem_key=await self._agent_pq_key(hello.agent),
                session_id=sid,
            )
        except NoiseError as exc:
            transport.abort()
            return f"refused: {exc}"
        answer = bytearray()
        done = asyncio.get_running_loop().create_future()

        class Reader(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                with contextlib.suppress(NoiseError):
                    parts, _ = est.opener.feed(data)
                    answer.extend(b"".join(bytes(p) for p in parts))
                if len(answer) >= len(PROBE) and not done.done():
                    done.set_result(None)

            def connection_lost(self, exc: Exception | None) -> None:
                if not done.done():
                    done.set_result(None)

        transport.set_protocol(Reader())
        if est.leftover:
            transport.get_protocol().data_received(est.leftover)  # type: ignore[attr-defined]
        chunks, _ = est.sealer.feed(PROBE)
        transport.write(b"".join(chunks))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await done
        transport.abort()
        return f"accepted: target answered {bytes(answer).decode('latin-1')!r}"


def _replace_agent_key(msg: Any, key: str | None, pq: str) -> Any:
    """The same ``session`` or ``approval_pending`` naming other agent keys."""
    fields = {k: v for k, v in msg.to_json().items() if k != "t"}
    if key is not None:
        fields["agent_key"] = key
    fields["agent_pq_key"] = pq
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return type(msg)(**fields)


def _other_cipher(cipher: str) -> str:
    return noise.CHACHAPOLY if cipher == noise.AESGCM_CIPHER else noise.AESGCM_CIPHER


_honest_link_send = FramedLink.send


def _lying_link_send(self: FramedLink, msg: m.Message) -> None:
    """Every message the gateway sends, on any connection: ``cipher-flip`` rewrites dials."""
    if isinstance(msg, m.Dial) and "cipher-flip" in lies():
        named = msg.cipher or noise.CHACHAPOLY
        told = _other_cipher(named)
        note(attack="cipher-flip", outcome="sent", session=msg.session_id, named=named, told=told)
        msg = dataclasses.replace(msg, cipher=told)
    _honest_link_send(self, msg)


if __name__ == "__main__":
    server_mod.Broker = LyingBroker  # type: ignore[misc]
    FramedLink.send = _lying_link_send  # type: ignore[method-assign]
    sys.exit(gatewayd_main())
