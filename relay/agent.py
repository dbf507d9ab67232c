"""The agent: dials out to the gateway, exposes named local services, nothing else.

State folder (``--state-dir``), written by :func:`enroll`:

- ``agent.json``: agent id and gateway address;
- ``agent.key`` / ``agent.pem``: the TLS key and the certificate the gateway CA issued;
- ``ca.pem``: the gateway CA;
- ``noise.key``: the agent's Noise static private key (the end-to-end identity);
- ``pq.key``: the seed of its ML-KEM-768 key (the hybrid handshake's half of that
  identity; absent in folders enrolled before it, whose tunnels stay classic).

:class:`Agent` keeps a control connection up to one of the gateway's nodes,
announces its target *names*, and answers each dial request by connecting to the
named local service and dialling a fresh data connection, inside which it runs the
Noise responder. While it knows a session, it keeps one data connection dialled
ahead (``spare``): the gateway sends the session's next dial on it, and the agent
answers on it at once, so a new tunnel costs it no TLS handshake; the next spare is
dialled right after, and none is kept once its last session ended.

Several gateway addresses (``HOST:PORT`` each; a name may resolve to several
addresses, each a node): the agent starts on a random one and, when its connection
fails or ends, moves to a random *other* one after a wait drawn by :class:`Backoff`
(full jitter, capped), so the agents of a node that died spread over the survivors
and over time instead of arriving together (:class:`Reconnect`).

The agent answers a dial only for a session it knows, and runs the handshake only
with that session's client key: the key of the approval request the person here
approved (``approve``), or the key the gateway announced when an unattended session
started (``notice``). A dial that names another key, or a session never approved
nor announced, is refused and logged. So a gateway cannot swap in its own client
key after the person compared the session's code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import message as m
from . import noise, platform, tunnel
from .aio import ConnectionClosed, FramedLink, PausedProtocol, Pipe, open_link, reset
from .approval import Approvals
from .errors import GatewayError, NoiseError, ProtocolError, RemoteError
from .text import parse_hostport
from .tls import client_context

#: Reconnect backoff: the ceiling of the first wait and the cap, in seconds. A minute at
#: most: an agent is back within a minute of its gateway, and thousands of agents
#: retrying at most once a minute each are no load for a gateway.
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
#: A control connection that stayed up this long (seconds), or carried a request, was a
#: success: the backoff starts again from its first wait. One refused at once was not.
STABLE_AFTER = 10.0
#: Seconds after a tunnel opened before the next spare data connection is dialled:
#: dialled at once, its TLS handshake delayed the new tunnel's first echoed byte from
#: 2 ms to 14 ms on a busy two-core machine.
SPARE_AFTER = 0.01
#: Sessions whose client key the agent remembers; the oldest is forgotten beyond this
#: (an ``end`` notice lost with a dropped connection must not grow memory for ever).
MAX_KNOWN_SESSIONS = 4096

Log = Callable[..., None]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _write_private(path: Path, data: bytes) -> None:
    """A key file only this user can read (0600; an owner-only ACL on Windows)."""
    platform.write_private(path, data)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter, capped.

    The wait before attempt ``n + 1`` after ``n`` failures in a row is drawn uniformly
    from ``[0, min(cap, first * 2**n))`` ("Exponential Backoff And Jitter", AWS
    Architecture Blog, 2015: full jitter spreads a crowd of clients that failed at the
    same moment best, at the fewest attempts). ``rand`` is a source of floats in
    ``[0, 1)``, passed in so the schedule can be tested.
    """

    first: float = BACKOFF_FIRST
    cap: float = BACKOFF_MAX

    def ceiling(self, failures: int) -> float:
        """The longest wait after ``failures`` failures in a row."""
        # 2**64 seconds is past any cap: no need to grow the float further.
        return min(self.cap, self.first * 2.0 ** min(max(failures, 0), 64))

    def wait(self, failures: int, rand: Callable[[], float]) -> float:
        return self.ceiling(failures) * rand()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One gateway node: the address dialled, and the name its certificate must carry."""

    host: str
    port: int
    name: str

    def __str__(self) -> str:
        if self.host == self.name:
            return f"{self.name}:{self.port}"
        return f"{self.name}:{self.port} ({self.host})"


async def resolve(gateways: Sequence[str]) -> tuple[list[Endpoint], list[str]]:
    """Every node the ``HOST:PORT`` entries name, in order, and what could not be resolved.

    An address literal is one node; a name is as many nodes as it has addresses (each
    dialled by address, its certificate checked against the name). Resolved again at
    each attempt, so a name's addresses may change while the agent runs.
    """
    loop = asyncio.get_running_loop()
    found: list[Endpoint] = []
    problems: list[str] = []
    for entry in gateways:
        host, port = parse_hostport(entry)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if Endpoint(host, port, host) not in found:
                found.append(Endpoint(host, port, host))
            continue
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            problems.append(f"{entry}: {exc}")
            continue
        for info in infos:
            endpoint = Endpoint(str(info[4][0]), port, host)
            if endpoint not in found:
                found.append(endpoint)
    return found, problems


class Reconnect:
    """Which gateway node to try next, and how long to wait before it.

    The first attempt goes to a random node; after a failure or a lost connection,
    to a random node other than the one just tried (the same one when it is the only
    one). The wait comes from ``backoff`` with ``failures`` counting the attempts in
    a row that did not give a stable connection.
    """

    def __init__(self, backoff: Backoff, rand: Callable[[], float]) -> None:
        self.backoff = backoff
        self.rand = rand
        self.failures = 0
        self.last: Endpoint | None = None

    def choose(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        others = [e for e in endpoints if e != self.last] or list(endpoints)
        self.last = others[min(int(self.rand() * len(others)), len(others) - 1)]
        return self.last

    def succeeded(self) -> None:
        """The connection was stable: the next wait starts from the first again."""
        self.failures = 0

    def refused(self) -> None:
        """The gateway refused this agent's identity: wait the longest from now on."""
        self.failures = max(self.failures, 64)

    def next_wait(self) -> float:
        """The wait before the next attempt; counts one more failure."""
        wait = self.backoff.wait(self.failures, self.rand)
        self.failures += 1
        return wait


async def enroll(gateway: str, ca_file: Path, token: str, state_dir: Path) -> str:
    """Trade an enrollment token for a certificate; write the state folder. Returns the agent id."""
    # Only enrollment builds keys and a CSR: ``gw agent run`` starts without x509.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    host, port = parse_hostport(gateway)
    # Small local files, read once before any network I/O: no need for a thread.
    if (state_dir / "agent.json").exists():
        raise GatewayError(f"{state_dir} already holds an enrolled agent")
    try:
        ca_pem = ca_file.read_bytes()  # noqa: ASYNC240
        x509.load_pem_x509_certificate(ca_pem)
    except (OSError, ValueError) as exc:
        raise GatewayError(f"cannot read the CA file {ca_file}: {exc}") from exc
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    noise_private, noise_public = noise.generate_keypair()
    pq_seed, pq_public = noise.generate_kem_keypair()
    try:
        link = await open_link(host, port, client_context(ca_file))
    except (OSError, TimeoutError) as exc:
        raise GatewayError(f"cannot reach the gateway at {gateway}: {exc}") from exc
    try:
        link.send(
            m.EnrollRequest(
                token=token,
                csr=csr.public_bytes(serialization.Encoding.PEM).decode(),
                noise_key=_b64(noise_public),
                pq_key=_b64(pq_public),
            )
        )
        reply = await link.expect(m.Enrolled)
        assert isinstance(reply, m.Enrolled)
    except RemoteError as exc:
        raise GatewayError(f"enrollment refused: {exc.message or exc.code}") from exc
    finally:
        link.close()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # noqa: ASYNC240
    _write_private(
        state_dir / "agent.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    (state_dir / "agent.pem").write_text(reply.certificate)
    (state_dir / "ca.pem").write_bytes(ca_pem)
    _write_private(state_dir / "noise.key", noise_private)
    _write_private(state_dir / "pq.key", pq_seed)
    (state_dir / "agent.json").write_text(
        json.dumps(
            {
                "agent": reply.agent,
                "gateway": gateway,
                "noise_key": _b64(noise_public),
                "pq_key": _b64(pq_public),
            }
        )
    )
    return reply.agent


@dataclass(frozen=True, slots=True)
class AgentState:
    agent: str
    gateway: str
    state_dir: Path
    noise_private: bytes
    #: The seed of the agent's ML-KEM-768 key; None for an agent enrolled before it.
    kem_seed: bytes | None = None

    @property
    def identity(self) -> bytes:
        """The agent's whole static public key: X25519, then ML-KEM-768 if it has one."""
        kem = None if self.kem_seed is None else noise.kem_public_key(self.kem_seed)
        return noise.hybrid_key(noise.public_key(self.noise_private), kem)

    @classmethod
    def load(cls, state_dir: Path) -> AgentState:
        try:
            info = json.loads((state_dir / "agent.json").read_text())
            noise_private = (state_dir / "noise.key").read_bytes()
        except (OSError, ValueError) as exc:
            raise GatewayError(
                f"{state_dir} is not an enrolled agent's state folder "
                f"(run `gw agent enroll`): {exc}"
            ) from exc
        if len(noise_private) != 32:
            raise GatewayError(f"{state_dir / 'noise.key'} is damaged")
        try:
            kem_seed: bytes | None = (state_dir / "pq.key").read_bytes()
        except FileNotFoundError:
            kem_seed = None
        except OSError as exc:
            raise GatewayError(f"cannot read {state_dir / 'pq.key'}: {exc}") from exc
        if kem_seed is not None and len(kem_seed) != noise.KEM_SEED_LEN:
            raise GatewayError(f"{state_dir / 'pq.key'} is damaged")
        return cls(str(info["agent"]), str(info["gateway"]), state_dir, noise_private, kem_seed)


class SessionKeys:
    """The sessions this agent knows, each with the only client key its tunnels may use.

    A session becomes known when the person here approves it (the approval request's
    key) or when the gateway announces it (``notice`` start, unattended access and home
    office); it is forgotten at its ``end`` notice. A dial for an unknown session, or
    naming another key, is refused.
    """

    def __init__(self, limit: int = MAX_KNOWN_SESSIONS) -> None:
        self.limit = limit
        #: session id -> client key (None: announced by a gateway that does not send the
        #: key; the first dial's key is then pinned for the rest of the session).
        self.keys: dict[str, bytes | None] = {}
        #: sessions announced here at their start, whose end is announced too.
        self.announced: set[str] = set()

    def check_new(self, session_id: str) -> None:
        """GatewayError if the session is known already: its key is never replaced (a
        second approval request or announcement for it is the gateway trying)."""
        if session_id in self.keys:
            raise GatewayError(f"session {session_id} is known already; its key stays")

    def bind(self, session_id: str, client_key: bytes | None, *, announced: bool) -> None:
        """Remember the only client key this session's tunnels may use."""
        self.check_new(session_id)
        self.keys[session_id] = client_key
        if announced:
            self.announced.add(session_id)
        while len(self.keys) > self.limit:
            oldest = next(iter(self.keys))
            del self.keys[oldest]
            self.announced.discard(oldest)

    def forget(self, session_id: str) -> bool:
        """Forget a session that ended; True if it had been announced here."""
        self.keys.pop(session_id, None)
        if session_id in self.announced:
            self.announced.discard(session_id)
            return True
        return False

    def key_for(self, session_id: str, client_key: str) -> bytes:
        """The client key a dial's handshake must present; GatewayError says why not."""
        if session_id not in self.keys:
            raise GatewayError("unknown session: neither approved nor announced here")
        try:
            named = _unb64(client_key)
        except ValueError:
            named = b""
        if len(named) != 32:
            raise GatewayError("the dial's client key is malformed")
        bound = self.keys[session_id]
        if bound is None:  # announced without a key: the first dial's key stays
            self.keys[session_id] = bound = named
        if not hmac.compare_digest(bound, named):
            raise GatewayError(
                "the dial names another client key than the one approved or announced "
                "for this session"
            )
        return bound


class Agent:
    def __init__(
        self,
        state: AgentState,
        targets: dict[str, tuple[str, int]],
        *,
        gateway: str | None = None,
        gateways: Sequence[str] = (),
        log: Log,
        approvals: Approvals | None = None,
        backoff: Backoff | None = None,
        rand: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        for name in targets:
            if not m.valid_id(name):
                raise GatewayError(f"target name {name!r}: letters, digits, . _ - only")
        self.state = state
        self.targets = targets
        #: The gateway's nodes as given (``HOST:PORT`` each), the enrollment's by default.
        self.gateways = tuple(gateways) or (gateway or state.gateway,)
        for entry in self.gateways:
            parse_hostport(entry)
        host, port = parse_hostport(self.gateways[0])
        #: The node the control connection is on (or was last tried).
        self.endpoint = Endpoint(host, port, host)
        self.reconnect = Reconnect(
            backoff or Backoff(),
            rand or random.SystemRandom().random,
        )
        #: How the reconnect loop waits (a parameter, so its schedule can be tested).
        self.sleep = sleep
        d = state.state_dir
        self.ssl_context = client_context(d / "ca.pem", d / "agent.pem", d / "agent.key")
        self.log = log
        self.approvals = approvals or Approvals(d / "approval.sock", terminal=False, log=log)
        self.connected = asyncio.Event()
        #: The current control connection proved good (stayed up, or carried a request).
        self.stable = False
        self.tasks: set[asyncio.Task[Any]] = set()
        #: session id -> open tunnels, so an ended session's tunnels close here too.
        self.session_pipes: dict[str, set[Pipe]] = {}
        #: The client key each known session's tunnels must present.
        self.session_keys = SessionKeys()
        #: First handshake messages answered: a replayed one is refused.
        self.replay = tunnel.ReplayGuard()
        #: The end-to-end ciphers this agent runs (said in its hello), preferred first.
        self.ciphers = tunnel.local_ciphers()
        #: The data connection dialled ahead while a session is known (``spare``), so
        #: the session's next tunnel costs no TLS handshake here; None without one.
        self.spare: asyncio.Task[None] | None = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> None:
        """Stay connected forever: reconnect with jittered exponential backoff."""
        await self.approvals.start()
        try:
            await self._run()
        finally:
            await self.approvals.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.stable = False
            try:
                endpoints, problems = await resolve(self.gateways)
                for problem in problems:
                    self.log("cannot resolve a gateway address", error=problem)
                if not endpoints:
                    raise GatewayError("no gateway address could be resolved")
                self.endpoint = self.reconnect.choose(endpoints)
                started = loop.time()
                try:
                    await self._control(self.endpoint)
                finally:
                    if loop.time() - started >= STABLE_AFTER:
                        self.stable = True
            except RemoteError as exc:
                if self._older_gateway(exc):
                    continue  # at once: the gateway answered the hello and asked nothing
                self.log(
                    "gateway refused the agent",
                    gateway=str(self.endpoint),
                    code=exc.code,
                    message=exc.message,
                )
                if exc.code == "auth_failed":
                    self.reconnect.refused()
            except (GatewayError, OSError, TimeoutError) as exc:
                self.log(
                    "connection to the gateway failed",
                    gateway=str(self.endpoint),
                    error=str(exc) or type(exc).__name__,
                )
            self.connected.clear()
            if self.stable:
                self.reconnect.succeeded()
            wait = self.reconnect.next_wait()
            self.log("reconnecting", seconds=round(wait, 2))
            await self.sleep(wait)

    def _older_gateway(self, exc: RemoteError) -> bool:
        """True when a gateway older than the end-to-end cipher choice refused the hello's
        ``ciphers``: the agent then runs ChaChaPoly alone, which is unsaid in a hello
        (an agent upgraded before its gateway still comes online)."""
        if set(self.ciphers) <= {noise.CHACHAPOLY}:
            return False
        if exc.code != "protocol_error" or "unknown member 'ciphers'" not in exc.message:
            return False
        self.log(
            "the gateway does not take the agent's ciphers: ChaChaPoly only",
            gateway=str(self.endpoint),
        )
        self.ciphers = (noise.CHACHAPOLY,)
        return True

    async def _control(self, endpoint: Endpoint) -> None:
        link = await open_link(
            endpoint.host, endpoint.port, self.ssl_context, server_hostname=endpoint.name
        )
        try:
            link.send(m.AgentHello(targets=tuple(self.targets), ciphers=self.ciphers))
            self.log("connected", gateway=str(endpoint), targets=sorted(self.targets))
            self.connected.set()
            while True:
                msg = await link.expect(m.Dial, m.Approve, m.Notice)
                self.stable = True  # the gateway took this agent: a request came
                if isinstance(msg, m.Dial):
                    self._spawn(self._dial(link, msg, endpoint))
                elif isinstance(msg, m.Approve):
                    self._spawn(self._approve(link, msg))
                elif isinstance(msg, m.Notice):
                    self._receive_notice(msg)
        except ConnectionClosed as exc:
            raise GatewayError(f"control connection closed ({exc})") from exc
        finally:
            self._drop_spare()
            link.close()

    def _want_spare(self) -> None:
        """Dial a spare data connection ahead if a session is known and none is up."""
        if self.spare is None and self.session_keys.keys and self.connected.is_set():
            self.spare = asyncio.get_running_loop().create_task(self._spare(self.endpoint))

    def _drop_spare(self) -> None:
        if self.spare is not None:
            self.spare.cancel()
            self.spare = None

    async def _spare(self, node: Endpoint) -> None:
        """One spare: dial it, wait for the gateway's dial on it, serve that dial.

        It is replaced as soon as it is used; one that fails is not dialled again until
        the next dial or session (no busy loop against a gateway that refuses it)."""
        task = asyncio.current_task()
        try:
            link = await open_link(
                node.host, node.port, self.ssl_context, server_hostname=node.name
            )
        except (OSError, TimeoutError) as exc:
            self.log("spare data connection failed", error=str(exc) or type(exc).__name__)
            if self.spare is task:
                self.spare = None
            return
        try:
            link.send(m.SpareHello())
            self.log("spare data connection ready", gateway=str(node))
            msg = await link.expect(m.Dial)
        except (GatewayError, ConnectionClosed) as exc:
            link.close()
            if self.spare is task:
                self.spare = None
            if not isinstance(exc, ConnectionClosed) or exc.code != "eof":
                self.log("spare data connection closed", reason=str(exc))
            return
        except asyncio.CancelledError:
            link.close()
            raise
        if self.spare is task:
            self.spare = None
        assert isinstance(msg, m.Dial)
        # Served in a task of its own, so that dropping the next spare never cuts it.
        self._spawn(self._dial(link, msg, node, data=link))

    async def _approve(self, control: Any, req: m.Approve) -> None:
        """Ask the person at this machine; answer the gateway with who decided.

        An approved session's client key is bound before the answer leaves, so the
        gateway's first dial for it already finds it.
        """
        try:
            client_key = _unb64(req.client_key)
        except ValueError:
            client_key = b""
        try:
            if len(client_key) != 32:
                raise GatewayError("malformed client key")
            self.session_keys.check_new(req.session_id)
        except GatewayError as exc:
            self.log("approval refused", id=req.request, reason=str(exc))
            with contextlib.suppress(GatewayError):
                control.send(m.ApprovalAnswer(req.request, False, "agent", str(exc)[:200]))
            return
        sas = tunnel.session_sas(req.session_id, client_key, self.state.identity)
        approved, by, reason = await self.approvals.ask(
            req.request,
            timeout=max(1.0, req.timeout),
            user=req.user,
            vendor=req.vendor,
            vendor_name=req.vendor_name,
            mode=req.mode,
            target=req.target,
            reason=req.reason,
            sas=sas,
        )
        self.log(
            "approval answered",
            id=req.request,
            approved=approved,
            by=by or "-",
            reason=reason or "-",
        )
        if approved:
            try:
                self.session_keys.bind(req.session_id, client_key, announced=False)
                self._want_spare()
            except GatewayError as exc:  # bound meanwhile (by a second request)
                self.log("approval refused", id=req.request, reason=str(exc))
                approved, by, reason = False, "agent", str(exc)
        with contextlib.suppress(GatewayError):
            control.send(m.ApprovalAnswer(req.request, approved, by[:200], reason[:200]))

    def _receive_notice(self, notice: m.Notice) -> None:
        """Bind or forget the session's client key at once (before any later dial is
        read), then announce the start or end at the machine."""
        if notice.event == "start":
            try:
                key: bytes | None = _unb64(notice.client_key) if notice.client_key else None
            except ValueError:
                key = b""
            try:
                if key is not None and len(key) != 32:
                    raise GatewayError("malformed client key")
                self.session_keys.bind(notice.session_id, key, announced=True)
            except GatewayError as exc:
                self.log("notice refused", session=notice.session_id, reason=str(exc))
                return
            self._want_spare()
        elif notice.event == "end":
            for pipe in self.session_pipes.pop(notice.session_id, set()):
                pipe.abort("session ended")  # the target sees a reset: its stream was cut
            announced = self.session_keys.forget(notice.session_id)
            if not self.session_keys.keys and self.spare is not None:
                self._drop_spare()  # no session left to open a tunnel in
                self.log("spare data connection closed", reason="no session left")
            if not announced:
                return  # an approved session: its end needs no announcement
        self._spawn(self._notice(notice))

    async def _notice(self, notice: m.Notice) -> None:
        await self.approvals.announce(
            notice.event,
            session=notice.session_id,
            user=notice.user,
            vendor_name=notice.vendor_name,
            mode=notice.mode,
            target=notice.target,
            reason=notice.reason,
        )

    async def _dial(
        self, control: Any, dial: m.Dial, node: Endpoint, data: FramedLink | None = None
    ) -> None:
        """Serve one dial: the data connection goes to ``node``, whose control
        connection carried the request; or it is ``data``, the spare the request came
        on (which then also carries a refusal)."""
        address = self.targets.get(dial.target)
        if address is None:
            control.send(m.DialFailed(dial.token, f"no target {dial.target}"))
            return
        try:
            expected = self.session_keys.key_for(dial.session_id, dial.client_key)
            if (dial.cipher or noise.CHACHAPOLY) not in self.ciphers:
                raise GatewayError(f"cipher {dial.cipher[:40]!r} is not one this agent runs")
        except GatewayError as exc:
            self.log(
                "REFUSED a tunnel",
                session=dial.session_id,
                user=dial.user,
                target=dial.target,
                reason=str(exc),
            )
            control.send(m.DialFailed(dial.token, f"refused by the agent: {exc}"))
            return
        loop = asyncio.get_running_loop()
        try:
            local_t, local = await asyncio.wait_for(
                loop.create_connection(PausedProtocol, *address), 10
            )
        except (OSError, TimeoutError) as exc:
            self.log("target unreachable", target=dial.target, error=str(exc))
            control.send(m.DialFailed(dial.token, f"target {dial.target} unreachable"))
            return
        if data is not None:
            link = data
        try:
            # A cluster names the node that holds the client: the data connection goes
            # straight there (its certificate is checked against the gateway CA as ever).
            host, port, name = node.host, node.port, node.name
            if dial.address:
                host, port = parse_hostport(dial.address)
                name = host
            if data is None:
                link = await open_link(host, port, self.ssl_context, server_hostname=name)
            link.send(m.DataHello(dial.token))
            await link.expect(m.Spliced)
            remote_t, leftover = link.detach()
            est = await tunnel.respond(
                remote_t,
                leftover,
                static_private=self.state.noise_private,
                expected_client_key=expected,
                session_id=dial.session_id,
                kem_seed=self.state.kem_seed,
                replay=self.replay,
                cipher=dial.cipher or noise.CHACHAPOLY,
                ciphers=self.ciphers,
            )
        except (GatewayError, OSError, TimeoutError, NoiseError, ProtocolError) as exc:
            self.log("tunnel failed", target=dial.target, error=str(exc))
            reset(local_t)  # the target must not take a failed tunnel for an empty stream
            return
        self.log(
            "tunnel open",
            session=dial.session_id,
            user=dial.user,
            mode=dial.mode,
            target=dial.target,
            sas=est.sas,
            e2e="hybrid" if est.hybrid else "classic",
            cipher=est.cipher,
            via="new" if data is None else "spare",
        )
        pipe = Pipe(
            local_t, remote_t, codec_a=est.sealer, codec_b=est.opener, names=("target", "tunnel")
        )
        pipes = self.session_pipes.setdefault(dial.session_id, set())
        pipes.add(pipe)
        # No await between taking what the tunnel delivered past the handshake and the
        # pipe's start: nothing can fall between (the target's first bytes are in its buffer).
        tunnel_pending, tunnel_eof = est.take_pending()
        pipe.start(bytes(local.buffer), tunnel_pending, eof_a=local.eof, eof_b=tunnel_eof)
        # The session's next tunnel finds a spare ready; dialled a moment after this one
        # opened, so that its TLS handshake does not take the processor from this tunnel's
        # first bytes.
        asyncio.get_running_loop().call_later(SPARE_AFTER, self._want_spare)
        result = await pipe.done
        pipes.discard(pipe)
        if not pipes:
            self.session_pipes.pop(dial.session_id, None)
        self.log(
            "tunnel closed",
            session=dial.session_id,
            target=dial.target,
            bytes_in=result.bytes_b_to_a,
            bytes_out=result.bytes_a_to_b,
            reason=result.reason,
        )
        if result.cut:
            self.log(
                "tunnel cut before its end; the target connection was reset",
                session=dial.session_id,
                target=dial.target,
                reason=result.reason,
            )
