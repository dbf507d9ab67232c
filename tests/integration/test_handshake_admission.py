"""Attacks on the TLS handshake admission (gatewayd/admission.py) against a real gatewayd.

(a) Slowloris: many TCP peers of one source that never send a ClientHello must not keep
a client of another source (127.0.0.2) from its handshake and login. The proof is causal,
not timed: the client gets its answer while every stalled peer is still connected, that
is, before any of them timed out and freed a slot.

(b) A crowd: N connections at once from one process (one source) all get through, each
retrying with the agents' own jittered backoff when it fails. With a handshake timeout of
one second, unbounded handshakes share the loop so thinly that most are started and then
dropped at their deadline (work thrown away: the collapse, which at 10,000 agents left
none online); admitted, a connection that gets no slot in time is closed before any TLS
work is done for it, and the dropped ones stay few.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import random
import socket
import ssl
from collections import Counter
from collections.abc import Iterator

import pytest

from gatewayd.admission import WAITING_PER_SLOT
from gatewayd.demo import Lab
from relay import message as m
from relay.agent import Backoff
from relay.aio import ConnectionClosed, FramedLink
from relay.aio import run as aio_run
from relay.errors import RemoteError
from relay.protocol import Side
from relay.tls import client_context

pytestmark = pytest.mark.integration

STALLED = 120  # more than the global cap (64) and many times the per-source cap (8)
CROWD = 300
HANG_GUARD = 120.0  # a bound on a hang, not a measure


def lab_with(root: object, gateway_keys: str) -> Lab:
    lab = Lab(root)  # type: ignore[arg-type]
    lab.init(gateway_keys=gateway_keys, extra_config=f"[limits]\nauth_per_minute = {10 * CROWD}\n")
    lab.start_gateway()
    return lab


@pytest.fixture(scope="module")
def slow_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    # Stalled peers stay in their handshake for a minute: long past this test's answer.
    lab = lab_with(tmp_path_factory.mktemp("admission_slow"), "handshake_timeout = 60")
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def crowd_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = lab_with(tmp_path_factory.mktemp("admission_crowd"), "handshake_timeout = 1")
    try:
        yield lab
    finally:
        lab.close()


_users = itertools.count(1)
_contexts: dict[int, ssl.SSLContext] = {}


def context(lab: Lab) -> ssl.SSLContext:
    """One client context per lab, as one agent process has (a context per connection
    would make this process, not the gateway, the bottleneck)."""
    if lab.port not in _contexts:
        _contexts[lab.port] = client_context(lab.ca_file)
    return _contexts[lab.port]


async def hello(lab: Lab, source: str, timeout: float) -> str:
    """TLS from ``source``, a ClientHello: "asked" when the gateway asks for a factor."""
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(
        lambda: FramedLink(Side.CONNECTOR, handshake_timeout=timeout),
        "127.0.0.1",
        lab.port,
        ssl=context(lab),
        server_hostname="127.0.0.1",
        ssl_handshake_timeout=timeout,
        local_addr=(source, 0),
    )
    try:
        key = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
        link.send(
            m.ClientHello(
                user=f"u{next(_users)}", agent="", target="", mode="access", client_key=key
            )
        )
        try:
            await link.expect(m.AuthRequest)
        except RemoteError as exc:
            return exc.code
        return "asked"
    finally:
        await link.aclose()


def still_connected(sock: socket.socket) -> bool:
    """True while the gateway has neither closed nor reset this connection."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_stalled_peers_of_one_source_do_not_delay_another_source(slow_lab: Lab) -> None:
    stalled = [socket.create_connection(("127.0.0.1", slow_lab.port)) for _ in range(STALLED)]
    try:

        async def client() -> str:
            return await asyncio.wait_for(hello(slow_lab, "127.0.0.2", 60.0), HANG_GUARD)

        assert aio_run(client()) == "asked"
        # Answered before any stalled peer was let go: no slot was freed by a timeout.
        # The source's 8 slots and its bounded queue (4 per slot) are all still held;
        # the rest were turned away at once, so that they back off.
        held = 8 * (1 + WAITING_PER_SLOT)
        assert sum(still_connected(s) for s in stalled) == held
    finally:
        for s in stalled:
            s.close()


def test_a_crowd_at_once_gets_through_with_backoff(crowd_lab: Lab) -> None:
    backoff = Backoff(first=0.5, cap=4.0)
    outcomes: Counter[str] = Counter()

    async def one() -> str:
        failures = 0
        while True:
            try:
                answer = await hello(crowd_lab, "127.0.0.1", 5.0)
            except ConnectionResetError:  # waited for a slot past the timeout: no TLS work
                answer = "turned away"
            except (ConnectionClosed, TimeoutError, ssl.SSLError, OSError) as exc:
                answer = f"dropped: {type(exc).__name__}"  # handshake work thrown away
            if answer not in ("asked", "turned away") and not answer.startswith("dropped"):
                answer = f"dropped: {answer}"  # the gateway's own 'timeout' answer
            outcomes[answer] += 1
            if answer == "asked":
                return answer
            failures += 1
            await asyncio.sleep(backoff.wait(failures, random.random))

    async def crowd() -> list[str]:
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(CROWD))), HANG_GUARD)

    assert aio_run(crowd()) == ["asked"] * CROWD
    # Handshakes are not started and then dropped wholesale (the collapse): a connection
    # that gets no slot in time is turned away before any TLS work is done for it.
    dropped = sum(n for k, n in outcomes.items() if k.startswith("dropped"))
    assert dropped <= CROWD // 2, outcomes
