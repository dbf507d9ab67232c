"""The client side of a session: what ``gw connect`` runs.

:func:`open_session` dials the gateway, answers each factor the gateway asks for
through the ``prove`` callback (the CLI wires it to ``auth`` provers, so this
module never imports ``auth``), and returns a :class:`ClientSession`. Each
:meth:`ClientSession.open_tunnel` is a TLS connection presenting the session
ticket, spliced by the gateway to a connection from the agent, inside which the
Noise IK handshake runs end to end. With ``-L`` the session keeps the next
tunnel's connection dialled ahead (``tunnel_spare``, replaced as it is used), so a
new tunnel costs no TLS handshake; and the handshake's first message goes with the
request (``early``) instead of waiting for ``spliced``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import os
import signal
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from . import message as m
from . import noise, tunnel
from .aio import ConnectionClosed, FramedLink, PausedProtocol, Pipe, open_link
from .errors import (
    AuthError,
    GatewayError,
    NoiseError,
    ProtocolError,
    RemoteError,
    TunnelCut,
)
from .stdio import finish_output, open_stdio  # pipes, or threads for files and ttys
from .text import printable

#: Seconds after a tunnel opened before the next one's connection and handshake are
#: prepared (``-L``): at once, their work would delay this tunnel's first bytes.
SPARE_AFTER = 0.01
#: The deadline of a handshake prepared ahead: none in practice (a day); once its tunnel
#: is asked for, the answer is awaited for tunnel.HANDSHAKE_TIMEOUT.
PREPARED_FOR = 86400.0

#: Most characters of a gateway's error message shown to the person.
MAX_SAID = 500

Prove = Callable[[str, dict[str, Any], bytes], Awaitable[dict[str, Any]]]


class AgentKeyMismatch(GatewayError):
    """The gateway handed us another key than the one we trust for this agent."""


class AgentKeySwapped(AgentKeyMismatch):
    """The key the gateway gives for the session is not the key the session's code came from."""


class AgentKeyDowngrade(AgentKeyMismatch):
    """The gateway handed a classic key for an agent trusted with its post-quantum key."""


class UnknownAgent(AgentKeyMismatch):
    """``--strict-agent-key``: no key is known for this agent, and none was given to check."""


@dataclass(frozen=True, slots=True)
class Gateway:
    host: str
    port: int
    ssl_context: ssl.SSLContext

    async def dial(self, handshake_timeout: float = 10.0) -> FramedLink:
        try:
            return await open_link(
                self.host, self.port, self.ssl_context, handshake_timeout=handshake_timeout
            )
        except ssl.SSLCertVerificationError as exc:
            raise GatewayError(
                f"the gateway's certificate does not verify with the CA file: {exc.verify_message}"
            ) from exc
        except (OSError, TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            raise GatewayError(
                f"cannot reach the gateway at {self.host}:{self.port}: {reason}"
            ) from exc


class KnownAgents:
    """The agent keys this client trusts, like SSH's known_hosts.

    One JSON object per file: ``{"<gateway host:port> <agent>": "<value>"}``, where the
    value is the agent's Noise key (base64url; pinned on first use) or its fingerprint
    (``SHA256:...``; added by ``gw known-agents add`` from what the machine showed).
    Either way the check compares fingerprints. An agent with the hybrid handshake has
    one key of X25519 then ML-KEM-768 (1216 bytes), and one fingerprint covering both:
    a classic key offered for it is a downgrade and refused. Writes replace the file
    atomically.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise GatewayError(f"cannot read known agents file {self.path}: {exc}") from exc
        if not isinstance(data, dict):
            raise GatewayError(f"known agents file {self.path} is not a JSON object")
        return {str(k): str(v) for k, v in data.items()}

    def _save(self, entries: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A name of this process's own: two gw processes pinning at once never write
        # into one temporary file (the last replace wins, whole).
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def lookup(self, gateway: str, agent: str) -> str | None:
        """The fingerprint trusted for ``agent`` at ``gateway``, or None."""
        value = self._load().get(f"{gateway} {agent}")
        return None if value is None else _as_fingerprint(value, self.path)

    def entries(self) -> list[tuple[str, str, str]]:
        """Every entry as ``(gateway, agent, fingerprint)``, sorted."""
        out = []
        for name, value in sorted(self._load().items()):
            gateway, _, agent = name.partition(" ")
            out.append((gateway, agent, _as_fingerprint(value, self.path)))
        return out

    def add(self, gateway: str, agent: str, value: str) -> bool:
        """Trust ``value`` (a key or fingerprint); False if it was already trusted.

        Raises AgentKeyMismatch if another key is trusted for that agent: forget it first.
        """
        entries = self._load()
        name = f"{gateway} {agent}"
        wanted = _as_fingerprint(value, self.path)
        pinned = entries.get(name)
        if pinned is not None:
            if _as_fingerprint(pinned, self.path) == wanted:
                return False
            raise AgentKeyMismatch(
                f"another key is already trusted for agent {agent} at {gateway} "
                f"({_as_fingerprint(pinned, self.path)}); `gw known-agents forget` it first"
            )
        entries[name] = value
        self._save(entries)
        return True

    def forget(self, gateway: str, agent: str) -> bool:
        """Drop the entry; False if there was none."""
        entries = self._load()
        if entries.pop(f"{gateway} {agent}", None) is None:
            return False
        self._save(entries)
        return True

    def remove(self, agent: str, gateway: str | None = None) -> list[tuple[str, str]]:
        """Like ``ssh-keygen -R``: drop every entry of ``agent`` (only ``gateway``'s if
        given), keeping the file as it was in ``<file>.old``; the ``(gateway,
        fingerprint)`` pairs dropped (none: the file is left alone)."""
        entries = self._load()
        dropped = []
        for name in sorted(entries):
            at, _, who = name.partition(" ")
            if who == agent and gateway in (None, at):
                dropped.append((at, _as_fingerprint(entries.pop(name), self.path)))
        if dropped:
            old = self.path.with_name(f"{self.path.name}.old")
            old.write_bytes(self.path.read_bytes())
            self._save(entries)
        return dropped

    def check(self, gateway: str, agent: str, key: str) -> bool:
        """True if ``key`` was pinned before, False if pinned now; raises on a change."""
        self.verify(gateway, agent, agent_key_bytes(key))
        return not self.add(gateway, agent, key)

    def verify(self, gateway: str, agent: str, key: bytes) -> bool:
        """True if ``key`` is the trusted one, False if none is trusted; raises on a change."""
        raw = self._load().get(f"{gateway} {agent}")
        if raw is None:
            return False
        pinned = _as_fingerprint(raw, self.path)
        if pinned != noise.fingerprint(key) and len(key) == noise.DH_LEN and _is_hybrid(raw):
            raise AgentKeyDowngrade(
                f"agent {agent} at {gateway} is trusted with its post-quantum key "
                "(X25519 + ML-KEM-768), but the gateway offers only a classic X25519 key.\n"
                f"  trusted: {pinned}\n  now:     {noise.fingerprint(key)}\n"
                "Someone may be trying to downgrade the end-to-end encryption; no byte was sent."
            )
        if pinned != noise.fingerprint(key):
            raise AgentKeyMismatch(
                f"the key of agent {agent} at {gateway} has CHANGED since it was first seen.\n"
                f"  trusted: {pinned}\n  now:     {noise.fingerprint(key)}\n"
                "Someone may be intercepting the connection, or the agent was re-enrolled.\n"
                "If you know it was re-enrolled, check the new fingerprint at the machine "
                f"(gw agent fingerprint), then run "
                f"`gw known-agents forget {agent} --gateway {gateway}`."
            )
        return True


def _is_hybrid(value: str) -> bool:
    """True for a pinned key that covers an ML-KEM-768 key (not for a fingerprint)."""
    try:
        return len(agent_key_bytes(value)) > noise.DH_LEN
    except ProtocolError:
        return False


def _as_fingerprint(value: str, path: Path) -> str:
    try:
        if value.startswith("SHA256:"):
            return noise.parse_fingerprint(value)
        return noise.fingerprint(agent_key_bytes(value))
    except (ValueError, ProtocolError, NoiseError) as exc:
        raise GatewayError(f"known agents file {path}: bad entry {value[:60]!r}: {exc}") from exc


@dataclass
class AgentKeyCheck:
    """Which agent key the client accepts, checked the moment the gateway names one.

    ``expected`` is a fingerprint given out of band (``--agent-key``); ``strict``
    refuses an agent with no trusted key instead of pinning the first one seen.
    """

    known: KnownAgents
    gateway: str
    agent: str
    expected: str | None = None
    strict: bool = False

    def check(self, key: bytes) -> None:
        """Raise AgentKeyMismatch unless ``key`` may be used for this agent."""
        got = noise.fingerprint(key)
        if self.expected is not None and got != self.expected:
            raise AgentKeyMismatch(
                f"the key the gateway gives for agent {self.agent} does not match --agent-key:\n"
                f"  expected: {self.expected}\n  got:      {got}\n"
                "Someone may be intercepting the connection; no byte was sent."
            )
        trusted = self.known.verify(self.gateway, self.agent, key)
        if not trusted and self.expected is None and self.strict:
            raise UnknownAgent(
                f"unknown agent {self.agent} at {self.gateway} (--strict-agent-key): its key "
                f"{got} is not in {self.known.path}. Check it at the machine "
                "(gw agent fingerprint), then give it with --agent-key or `gw known-agents add`."
            )

    def pin(self, key: bytes) -> bool:
        """Trust ``key`` from now on (after :meth:`check`); True if it was not trusted yet."""
        text = base64.urlsafe_b64encode(key).rstrip(b"=").decode()
        return self.known.add(self.gateway, self.agent, text)


class ClientSession:
    def __init__(
        self, gateway: Gateway, link: FramedLink, opened: m.SessionOpened, static_private: bytes
    ) -> None:
        self.gateway = gateway
        self.link = link
        self.opened = opened
        self.static_private = static_private
        self.agent_key = noise_key(opened.agent_key)
        #: The agent's ML-KEM-768 key: tunnels then run the hybrid handshake.
        self.agent_pq_key = pq_key(opened.agent_pq_key) if opened.agent_pq_key else None
        #: The agent's whole static key (X25519, then ML-KEM-768 if any): what is
        #: pinned, fingerprinted and covered by the session's code.
        self.agent_identity = noise.hybrid_key(self.agent_key, self.agent_pq_key)
        #: The end-to-end cipher of this session's tunnels: the first of ours the agent
        #: said it runs (named to the gateway with each tunnel, which tells the agent).
        self.cipher = tunnel.choose_cipher(opened.agent_ciphers, tunnel.local_ciphers())
        #: True when this session's agent key was trusted for the first time (pinned).
        self.pinned = False
        self.on_tunnel: Callable[[tunnel.Established], None] | None = None
        #: Called as each tunnel starts to dial (``gw connect`` shows it on a terminal).
        self.on_dial: Callable[[], None] | None = None
        self.tunnels: set[Pipe] = set()
        self._local_tasks: set[asyncio.Task[None]] = set()
        #: Keep the next tunnel's connection dialled ahead (``-L``: many tunnels).
        self.keep_spare = False
        self._spare: asyncio.Task[FramedLink] | None = None
        #: The next tunnel's end-to-end handshake, its first message computed ahead.
        self._ready: tuple[_Unspliced, asyncio.Task[tunnel.Established]] | None = None

    async def open_tunnel(self) -> tuple[asyncio.Transport, tunnel.Established]:
        """A new spliced, end-to-end encrypted tunnel to the session's target.

        On the spare connection when there is one (``-L``), else on a new one. The
        handshake's first message goes with the request (``early``): the gateway holds
        it until the tunnel is on record, so no round trip waits for ``spliced``.
        """
        if self.on_dial is not None:
            self.on_dial()
        link = await self._take_spare()
        if link is not None:
            try:
                return await self._request(link, spare=True)
            except (ConnectionClosed, ProtocolError):
                pass  # the spare went away unused (its gateway restarted): a new one
        return await self._request(await self._gateway().dial(), spare=False)

    def _gateway(self) -> Gateway:
        """Where this session's tunnels go: in a cluster, the node that holds the session."""
        if not self.opened.tunnel_address:
            return self.gateway
        host, port = m.split_address(self.opened.tunnel_address, "session.tunnel_address")
        return replace(self.gateway, host=host, port=port)

    async def _request(
        self, link: FramedLink, *, spare: bool
    ) -> tuple[asyncio.Transport, tunnel.Established]:
        """Ask for the tunnel on ``link`` (a spare or a new connection) and run the
        end-to-end handshake through it (its first message prepared ahead, if it was)."""
        unspliced, handshake = self._take_prepared()
        try:
            await asyncio.wait((unspliced.first, handshake), return_when=asyncio.FIRST_COMPLETED)
            if not unspliced.first.done():
                handshake.result()  # raises why it ended before its first message
                raise NoiseError("the end-to-end handshake sent no first message")
            first = unspliced.first.result()
            # A gateway that named the agent's ciphers takes ``early``; an older one
            # refuses the member: the first message then follows ``spliced``.
            early = b64(first) if self.opened.agent_ciphers else ""
            if spare:
                link.send(m.TunnelOpen(early=early, cipher=self.cipher))
            else:
                link.send(m.TunnelHello(self.opened.ticket, early=early, cipher=self.cipher))
            await link.expect(m.Spliced)
        except BaseException:
            handshake.cancel()
            link.close()
            raise
        transport, leftover = link.detach()
        if not early:
            transport.write(first)
        unspliced.attach(transport, leftover)
        try:
            established = await asyncio.wait_for(handshake, tunnel.HANDSHAKE_TIMEOUT)
        except TimeoutError:
            transport.abort()
            raise NoiseError("the agent did not answer the end-to-end handshake") from None
        except NoiseError:
            transport.abort()
            raise
        # The next tunnel's connection and first message, a moment after this one opened
        # (so that their work does not take the processor from this tunnel's first bytes).
        asyncio.get_running_loop().call_later(SPARE_AFTER, self._want_spare)
        if self.on_tunnel is not None:
            self.on_tunnel(established)
        return transport, established

    def _prepare(self) -> tuple[_Unspliced, asyncio.Task[tunnel.Established]]:
        """Start a tunnel's end-to-end handshake: its first message (an ephemeral key,
        and an ML-KEM encapsulation for the hybrid one) is computed at once, and taken
        by :class:`_Unspliced` to go with the request; the answer is read once spliced.
        Its own deadline is far: a tunnel's wait is bounded once it is asked for."""
        unspliced = _Unspliced()
        handshake = asyncio.get_running_loop().create_task(
            tunnel.initiate(
                unspliced,
                b"",
                static_private=self.static_private,
                agent_key=self.agent_key,
                agent_kem_key=self.agent_pq_key,
                session_id=self.opened.session_id,
                cipher=self.cipher,
                timeout=PREPARED_FOR,
            )
        )
        return unspliced, handshake

    def _take_prepared(self) -> tuple[_Unspliced, asyncio.Task[tunnel.Established]]:
        """The handshake prepared ahead (``-L``), once; else one started now."""
        ready, self._ready = self._ready, None
        if ready is not None and not ready[1].done():
            return ready
        if ready is not None and not ready[1].cancelled():
            ready[1].exception()  # it failed on its own: a new one
        return self._prepare()

    def _want_spare(self) -> None:
        """Dial the next tunnel's connection ahead, unless one is there or on its way.

        Only after a tunnel opened (or as ``-L`` starts): one that fails is not dialled
        again before the next tunnel (no loop against a gateway that refuses it)."""
        if not self.keep_spare or self.link.closed.done():
            return
        if self._spare is None:
            self._spare = asyncio.get_running_loop().create_task(self._dial_spare())
        if self._ready is None:
            self._ready = self._prepare()

    async def _dial_spare(self) -> FramedLink:
        link = await self._gateway().dial()
        try:
            link.send(m.TunnelSpare(self.opened.ticket))
        except ProtocolError:  # closed meanwhile
            link.close()
            raise
        return link

    async def _take_spare(self) -> FramedLink | None:
        """The spare connection, once (awaited if still being dialled); None when there
        is none, it failed, or the gateway closed it."""
        task, self._spare = self._spare, None
        if task is None:
            return None
        try:
            link = await task
        except (GatewayError, OSError, TimeoutError):
            return None
        if link.closed.done():
            return None
        return link

    def _drop_spare(self) -> None:
        ready, self._ready = self._ready, None
        if ready is not None:
            ready[1].cancel()
        task, self._spare = self._spare, None
        if task is None:
            return
        if task.done() and not task.cancelled() and task.exception() is None:
            task.result().close()
        else:
            task.cancel()

    async def splice(self, local: PausedProtocol) -> None:
        """Carry one local stream through a new tunnel until either side ends.

        Raises TunnelCut when the tunnel ended without the agent's end of stream (the
        local connection is then reset, not closed, so its application knows).
        """
        remote, est = await self.open_tunnel()
        assert local.transport is not None
        pipe = Pipe(
            local.transport,
            remote,
            codec_a=est.sealer,
            codec_b=est.opener,
            names=("local", "tunnel"),
        )
        await self._run_pipe(pipe, bytes(local.buffer), local.eof, est)

    async def _run_pipe(
        self, pipe: Pipe, local_pending: bytes, local_eof: bool, est: tunnel.Established
    ) -> None:
        self.tunnels.add(pipe)  # so that end() stops it too
        try:
            # What the local side sent while the tunnel opened is in its buffer, and
            # what the agent's side sent since the handshake is with the handshake.
            # No await between taking it and the pipe's start: nothing falls between.
            tunnel_pending, tunnel_eof = est.take_pending()
            pipe.start(local_pending, tunnel_pending, eof_a=local_eof, eof_b=tunnel_eof)
            result = await pipe.done
        finally:
            self.tunnels.discard(pipe)
        if result.cut:
            raise TunnelCut(f"tunnel cut before the end of the stream ({result.reason})")

    async def serve_local(
        self, host: str, port: int, on_error: Callable[[str], None], ready: Callable[[str], None]
    ) -> str:
        """``-L``: accept local connections, each its own tunnel, until the session ends.

        Returns why the session ended, as the gateway said (empty when it just closed).
        """
        loop = asyncio.get_running_loop()

        def accepted() -> PausedProtocol:
            proto = PausedProtocol()
            # asyncio holds tasks weakly: keep each until its tunnel is over.
            task = loop.create_task(self._serve_one(proto, on_error))
            self._local_tasks.add(task)
            task.add_done_callback(self._local_tasks.discard)
            return proto

        server = await loop.create_server(accepted, host, port)
        bound = server.sockets[0].getsockname()
        self.keep_spare = True
        self._want_spare()
        ready(f"{bound[0]}:{bound[1]}")
        try:
            return await self.wait_closed()
        finally:
            server.close()
            self.keep_spare = False
            self._drop_spare()
            for pipe in list(self.tunnels):
                pipe.abort("session ended")

    async def _serve_one(self, proto: PausedProtocol, on_error: Callable[[str], None]) -> None:
        await asyncio.sleep(0)  # let connection_made run
        local = proto.transport
        assert local is not None
        try:
            await self.splice(proto)
        except TunnelCut as exc:
            on_error(f"{exc}; the local connection was reset")
        except (GatewayError, OSError, TimeoutError) as exc:
            on_error(describe(exc))
            local.close()

    async def stdio(self) -> None:
        """``--stdio``: one tunnel on standard input and output (ssh ProxyCommand style).

        Both pipes are taken before the tunnel opens; standard input is held still
        (and kept) until the pipe starts. Raises TunnelCut when the tunnel ended
        without the agent's end of stream: what was written to standard output is
        then incomplete.
        """
        reader = PausedProtocol()
        stdin_t, stdout_t = await open_stdio(reader)
        joined = _Duplex(stdin_t, stdout_t)
        try:
            remote, est = await self.open_tunnel()
        except BaseException:
            joined.close()
            raise
        pipe = Pipe(
            joined, remote, codec_a=est.sealer, codec_b=est.opener, names=("local", "tunnel")
        )
        undo = _end_input_on_hangup(asyncio.get_running_loop(), pipe)
        try:
            await self._run_pipe(pipe, bytes(reader.buffer), reader.eof, est)
        except TunnelCut as exc:
            raise TunnelCut(f"{exc}; the output is incomplete") from None
        finally:
            undo()
            await finish_output(stdout_t)

    async def wait_closed(self) -> str:
        """Wait for the session's control connection to end; returns the gateway's reason."""
        try:
            while True:
                await self.link.expect()
        except RemoteError as exc:
            return printable(exc.message or exc.code)
        except ConnectionClosed:
            return ""

    def card_present(self) -> None:
        """Tell the gateway that the login's smartcard is still in its reader.

        ``gw connect`` calls this while it watches the card, at most every
        ``opened.card_heartbeat`` seconds; the gateway ends the session when it stops.
        """
        with contextlib.suppress(GatewayError):
            self.link.send(m.CardPresent())

    def end(self, reason: str) -> None:
        """Tell the gateway why the session ends (audited), then close."""
        with contextlib.suppress(GatewayError):
            self.link.send(m.Bye(reason[:200]))
        for pipe in list(self.tunnels):
            pipe.abort(reason)
        self._drop_spare()
        self.link.close()

    def close(self) -> None:
        self._drop_spare()
        self.link.close()


#: After SIGHUP, how long ``--stdio`` waits for the agent's side to end its stream.
HANGUP_GRACE = 5.0


def _end_input_on_hangup(loop: asyncio.AbstractEventLoop, pipe: Pipe) -> Callable[[], None]:
    """Make SIGHUP end standard input in-band; returns the function that undoes it.

    ssh sends SIGHUP to its ProxyCommand as soon as it is done with it. Dying of it
    would end the tunnel without its END record, and the service would see a reset.
    Instead our stream ends in-band, the agent's side has HANGUP_GRACE seconds to end
    its own, and only then is the tunnel cut.
    """
    hup = getattr(signal, "SIGHUP", None)
    timers: list[asyncio.TimerHandle] = []

    def hung_up() -> None:
        pipe.end_input(pipe.a)
        if not timers:
            timers.append(loop.call_later(HANGUP_GRACE, pipe.abort, "hung up"))

    try:
        loop.add_signal_handler(hup, hung_up)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError, RuntimeError, ValueError):
        return lambda: None  # no SIGHUP here (Windows), or not the main thread

    def undo() -> None:
        for timer in timers:
            timer.cancel()
        loop.remove_signal_handler(hup)  # type: ignore[arg-type]

    return undo


class _Unspliced(asyncio.Transport):
    """A tunnel's transport before the gateway spliced it, for the end-to-end handshake
    to start on: its first message is taken (``first``) to go with the request, and the
    rest runs on the real transport once :meth:`attach` hands it over."""

    def __init__(self) -> None:
        super().__init__()
        self.first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._protocol: Any = None
        self._real: asyncio.Transport | None = None

    def attach(self, transport: asyncio.Transport, leftover: bytes) -> None:
        """The spliced transport, and what it carried past ``spliced`` already."""
        self._real = transport
        transport.set_protocol(self._protocol)
        if leftover:
            self._protocol.data_received(leftover)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        if self._real is not None:
            self._real.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[no-any-return]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._real is not None:
            self._real.write(data)
        elif not self.first.done():
            self.first.set_result(bytes(data))
        else:
            raise ProtocolError("the tunnel is not spliced yet")

    def pause_reading(self) -> None:
        if self._real is not None:
            self._real.pause_reading()

    def resume_reading(self) -> None:
        if self._real is not None:
            self._real.resume_reading()

    def is_closing(self) -> bool:
        return self._real is not None and self._real.is_closing()

    def close(self) -> None:
        if self._real is not None:
            self._real.close()

    def abort(self) -> None:
        if self._real is not None:
            self._real.abort()


class _Duplex(asyncio.Transport):
    """Standard input and output seen as one transport, for the pipe."""

    def __init__(self, read: asyncio.ReadTransport, write: asyncio.WriteTransport) -> None:
        super().__init__()
        self._r, self._w = read, write
        self._protocol: Any = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._r.set_protocol(protocol)
        self._w.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[no-any-return]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._w.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._w.close()

    def pause_reading(self) -> None:
        self._r.pause_reading()

    def resume_reading(self) -> None:
        self._r.resume_reading()

    def is_closing(self) -> bool:
        return self._r.is_closing() and self._w.is_closing()

    def close(self) -> None:
        self._r.close()
        self._w.close()

    def abort(self) -> None:
        self._r.close()
        self._w.abort()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def noise_key(text: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise ProtocolError("agent key is not base64url") from exc
    if len(key) != 32:
        raise ProtocolError("agent key must be 32 bytes")
    return key


def pq_key(text: str) -> bytes:
    """An agent's ML-KEM-768 public key from base64url; ProtocolError if it is not one."""
    try:
        key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        noise.hybrid_key(bytes(noise.DH_LEN), key)  # checks it as an ML-KEM-768 key
    except (ValueError, NoiseError) as exc:
        raise ProtocolError(f"agent ML-KEM key: {exc}") from exc
    return key


def agent_key_bytes(text: str) -> bytes:
    """An agent's whole static key from base64url: X25519 (32 bytes) or hybrid (1216)."""
    try:
        key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise ProtocolError("agent key is not base64url") from exc
    if len(key) not in (noise.DH_LEN, noise.DH_LEN + noise.KEM_PUBLIC_LEN):
        raise ProtocolError("agent key must be 32 (X25519) or 1216 (X25519 + ML-KEM) bytes")
    return key


def _agent_identity(key: str, pq: str) -> bytes:
    """The whole key a session message names: X25519, then ML-KEM-768 if given."""
    return noise.hybrid_key(noise_key(key), pq_key(pq) if pq else None)


async def open_session(
    gateway: Gateway,
    *,
    user: str,
    agent: str,
    target: str,
    mode: str,
    reason: str,
    static_private: bytes,
    prove: Prove,
    factors: tuple[str, ...] = (),
    on_pending: Callable[[float, str], None] | None = None,
    agent_keys: AgentKeyCheck | None = None,
    credential: str = "",
) -> ClientSession:
    """Authenticate and open a session; raises RemoteError with the gateway's reason.

    When the session needs approval at the machine, ``on_pending(seconds, sas)`` is
    called while the person there is asked; ``sas`` is the session's short
    authentication string, which the person sees too.

    The agent key is checked with ``agent_keys`` the moment the gateway names it,
    before a code is shown; a session whose key is not the one its code was computed
    from raises :class:`AgentKeySwapped`. Only then is the key pinned
    (``ClientSession.pinned`` says whether it was new). No tunnel exists before that.

    With ``credential`` (a ``gw login`` credential's id), ``prove`` is asked for the
    possession proof (method ``credential``) instead of the mode's factors.
    """
    link, opened = await _login(
        gateway,
        user=user,
        agent=agent,
        target=target,
        mode=mode,
        reason=reason,
        static_private=static_private,
        prove=prove,
        factors=factors,
        on_pending=on_pending,
        agent_keys=agent_keys,
        credential=credential,
    )
    assert isinstance(opened, m.SessionOpened)
    session = ClientSession(gateway, link, opened, static_private)
    if agent_keys is not None:
        try:
            session.pinned = agent_keys.pin(session.agent_identity)
        except BaseException:
            session.end("client refused the agent key")
            raise
    return session


async def list_agents(
    gateway: Gateway,
    *,
    user: str,
    mode: str,
    static_private: bytes,
    prove: Prove,
    factors: tuple[str, ...] = (),
    credential: str = "",
) -> dict[str, Any]:
    """Log in and ask which agents this user may reach, with the modes allowed for each."""
    reply = await _ask(
        gateway,
        m.AgentList,
        user=user,
        mode=mode,
        static_private=static_private,
        prove=prove,
        factors=factors,
        credential=credential,
    )
    return reply.agents


async def login(
    gateway: Gateway,
    *,
    user: str,
    mode: str,
    static_private: bytes,
    prove: Prove,
    login_key: str,
    factors: tuple[str, ...] = (),
) -> m.LoggedIn:
    """``gw login``: prove the mode's factors once; the gateway answers with a login
    credential bound to ``login_key`` (an Ed25519 public key whose private half stays
    with the caller)."""
    return await _ask(
        gateway,
        m.LoggedIn,
        user=user,
        mode=mode,
        static_private=static_private,
        prove=prove,
        factors=factors,
        login_key=login_key,
    )


async def logout(
    gateway: Gateway,
    *,
    user: str,
    mode: str,
    static_private: bytes,
    prove: Prove,
    credential: str,
) -> None:
    """``gw logout``: prove the credential's key once more and have the gateway end it."""
    await _ask(
        gateway,
        m.LoggedOut,
        user=user,
        mode=mode,
        static_private=static_private,
        prove=prove,
        factors=(),
        credential=credential,
        logout=True,
    )


_Answer = TypeVar("_Answer", bound=m.Message)


async def _ask(gateway: Gateway, answer: type[_Answer], **login: Any) -> _Answer:
    """Log in for one answer (no agent, target or reason): the link ends once it is read."""
    link, reply = await _login(gateway, agent="", target="", reason="", **login)
    link.close()
    assert isinstance(reply, answer)
    return reply


async def _login(gateway: Gateway, **login: Any) -> tuple[FramedLink, m.Message]:
    """:func:`_login_once`, saying the client's end-to-end ciphers when it opens a
    session; once more without them if the gateway is older and refuses the member
    (it answers the hello at once: no factor was asked for)."""
    ciphers = tunnel.local_ciphers() if login.get("agent") else ()
    try:
        return await _login_once(gateway, ciphers=ciphers, **login)
    except RemoteError as exc:
        if not ciphers or "unknown member 'ciphers'" not in exc.message:
            raise
    return await _login_once(gateway, ciphers=(), **login)


async def _login_once(
    gateway: Gateway,
    *,
    user: str,
    agent: str,
    target: str,
    mode: str,
    reason: str,
    static_private: bytes,
    prove: Prove,
    factors: tuple[str, ...],
    on_pending: Callable[[float, str], None] | None = None,
    agent_keys: AgentKeyCheck | None = None,
    credential: str = "",
    login_key: str = "",
    logout: bool = False,
    ciphers: tuple[str, ...] = (),
) -> tuple[FramedLink, m.Message]:
    link = await gateway.dial(handshake_timeout=30.0)
    client_key = base64.urlsafe_b64encode(noise.public_key(static_private)).rstrip(b"=").decode()
    link.send(
        m.ClientHello(
            user=user,
            agent=agent,
            target=target,
            mode=mode,
            client_key=client_key,
            reason=reason,
            factors=factors,
            credential=credential,
            login_key=login_key,
            logout=logout,
            ciphers=ciphers,
        )
    )
    binding = link.channel_binding()
    #: The agent key the session's code was computed from (shown to the person), if any.
    shown: bytes | None = None
    try:
        while True:
            msg = await link.expect(
                m.AuthRequest,
                m.ApprovalPending,
                m.SessionOpened,
                m.AgentList,
                m.LoggedIn,
                m.LoggedOut,
            )
            if isinstance(msg, m.AgentList | m.LoggedIn | m.LoggedOut):
                return link, msg
            if isinstance(msg, m.SessionOpened):
                _check_session_key(link, msg, shown, agent_keys)
                return link, msg
            if isinstance(msg, m.ApprovalPending):
                link.extend_handshake(msg.timeout + 10)
                key = _agent_identity(msg.agent_key, msg.agent_pq_key)
                if shown is not None and key != shown:
                    raise AgentKeySwapped("the gateway named two agent keys for one session")
                if agent_keys is not None:
                    agent_keys.check(key)  # before the code is shown: a wrong key has none
                shown = key
                if on_pending is not None:
                    mine = noise.public_key(static_private)
                    on_pending(msg.timeout, tunnel.session_sas(msg.session_id, mine, key))
                continue
            assert isinstance(msg, m.AuthRequest)
            link.extend_handshake(300.0)
            try:
                payload = await prove(msg.method, msg.payload, binding)
            except AuthError as exc:
                if exc.payload is not None:
                    await _give_up(link, msg.method, exc.payload)
                raise
            link.send(m.AuthResponse(msg.method, payload))
    except BaseException:
        link.close()
        raise


def _check_session_key(
    link: FramedLink,
    opened: m.SessionOpened,
    shown: bytes | None,
    agent_keys: AgentKeyCheck | None,
) -> None:
    """Refuse the session (telling the gateway why, for its audit) unless its agent key
    is the one the code was computed from and the one this client trusts."""
    key = _agent_identity(opened.agent_key, opened.agent_pq_key)
    try:
        if shown is not None and not hmac.compare_digest(key, shown):
            raise AgentKeySwapped(
                "the gateway opened the session with an agent key that is not the key the "
                "code you compared was computed from:\n"
                f"  code computed from: {noise.fingerprint(shown)}\n"
                f"  session key:        {noise.fingerprint(key)}\n"
                "Someone may be intercepting the connection; no byte was sent."
            )
        if agent_keys is not None:
            agent_keys.check(key)
    except AgentKeyMismatch:
        with contextlib.suppress(GatewayError):
            link.send(m.Bye("client refused the agent key"))
        raise


#: Seconds a client that gave up a factor waits for the gateway to take note of why.
GIVE_UP_WAIT = 5.0


async def _give_up(link: FramedLink, method: str, payload: dict[str, Any]) -> None:
    """Send a prover's last word (why it gave up) for the gateway's audit; await the verdict."""
    with contextlib.suppress(GatewayError, TimeoutError):
        link.send(m.AuthResponse(method, payload))
        async with asyncio.timeout(GIVE_UP_WAIT):
            await link.expect(m.AuthRequest, m.SessionOpened)


def describe(exc: BaseException) -> str:
    """One line for a person, from any error this module raises.

    What the gateway said is escaped (:func:`relay.text.printable`): a gateway, or a
    vendor or agent whose words it passes on, cannot write escape sequences to the
    person's terminal.
    """
    if isinstance(exc, RemoteError):
        said = printable(exc.message, MAX_SAID)
        return {
            "auth_failed": "authentication failed",
            "denied": f"denied by policy: {said}",
            "agent_offline": said or "the agent is offline",
            "rate_limited": said or "too many attempts; try again later",
            "login_ended": said or "your gw login has ended; run gw login again",
        }.get(exc.code, said or printable(exc.code, MAX_SAID))
    if isinstance(exc, ConnectionClosed):
        return f"the gateway closed the connection ({printable(str(exc), MAX_SAID)})"
    if isinstance(exc, NoiseError):
        return f"end-to-end handshake failed: {exc}"
    return str(exc) or type(exc).__name__
