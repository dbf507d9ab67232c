"""gw connect's tunnel connection dialled ahead (``tunnel_spare``), attacked: real
gatewayd and gw agent processes on loopback, with gw connect or a client of our own
that speaks the protocol (relay.client's session, raw messages on top).

A spare is bound to its session by the ticket: refused for a session that is unknown
or ended, at most two per session, closed when the session ends (whatever ended it),
never counted as the session's activity; and using it is served as a new ``tunnel``
request, every check made again then.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import signal
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from world import PASSWORD, World

from auth.base import ProverOptions
from cli.common import gateway_client
from cli.login import prove_with
from gatewayd.demo import EchoServer, Lab, Proc, round_trip, wait_for
from gatewayd.tunnel import MAX_CLIENT_SPARES
from relay import message as m
from relay import noise
from relay.aio import FramedLink
from relay.client import ClientSession, open_session
from relay.errors import RemoteError

pytestmark = pytest.mark.integration

#: Only a guard against a hang: no test here measures time.
HANG_GUARD = 60
_n = itertools.count(1)


@pytest.fixture(scope="module")
def spare_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The usual world, with sessions that idle out after 10 seconds (the least the
    configuration allows) and a 2-second hello timeout."""
    lab = Lab(tmp_path_factory.mktemp("spare"))
    lab.init(gateway_keys="handshake_timeout = 2")
    text = lab.config.read_text()
    lab.config.write_text(text.replace("[modes.access]\n", "[modes.access]\nidle_timeout = 10\n"))
    lab.start_gateway()
    echo = EchoServer()
    lab.admin("org", "add", "clinic", "--name", "Clinic")
    lab.admin("vendor", "add", "acme", "--name", "Acme")
    lab.agreement("acme", "clinic", "access", unattended=True)
    lab.enroll_agent("pc1", "clinic")
    world = World(lab, echo)
    world.agent_proc = lab.start_agent("pc1", {"echo": echo.port})
    try:
        yield world
    finally:
        lab.close()
        echo.close()


#: Every connection an attack opened: closed, and their close awaited, before its loop ends.
_LINKS: list[FramedLink] = []


def run(attack: Coroutine[Any, Any, None]) -> None:
    async def closing() -> None:
        try:
            await attack
        finally:
            links = list(_LINKS)
            _LINKS.clear()
            await asyncio.gather(*(link.aclose() for link in links))

    asyncio.run(closing())


def _no_prompt(text: str, secret: bool) -> str:
    raise AssertionError(f"asked {text!r}")


async def login(world: World, user: str, agent: str = "pc1") -> ClientSession:
    values = {"password": PASSWORD, "totp": world.lab.totp(user)}
    session = await open_session(
        gateway_client(world.lab.gateway, Path(world.lab.ca_file)),
        user=user,
        agent=agent,
        target="echo",
        mode="access",
        reason="spare attack",
        static_private=noise.generate_keypair()[0],
        prove=prove_with({}, ProverOptions(user=user, prompt=_no_prompt, values=values)),
    )
    _LINKS.append(session.link)
    return session


async def ask(session: ClientSession, ticket: str | None = None) -> FramedLink:
    """A spare connection for ``ticket`` (the session's own by default)."""
    link = await session.gateway.dial()
    _LINKS.append(link)
    link.send(m.TunnelSpare(session.opened.ticket if ticket is None else ticket))
    return link


async def park(session: ClientSession, ticket: str | None = None) -> FramedLink:
    """A spare that was not refused, past one ping and pong: by then the gateway has
    read its hello."""
    link = await ask(session, ticket)
    link.send(m.Ping(1))
    async with asyncio.timeout(HANG_GUARD):
        while not isinstance(await link.recv(), m.Pong):
            pass
    return link


async def refusal(link: FramedLink) -> RemoteError:
    """The error the gateway sends on ``link`` (awaited: no test waits for silence)."""
    try:
        async with asyncio.timeout(HANG_GUARD):
            msg = await link.expect(m.Spliced)
    except RemoteError as exc:
        return exc
    raise AssertionError(f"expected a refusal, got {msg}")


def records(world: World, event: str, **match: object) -> list[dict[str, object]]:
    return [r for r in world.lab.events(event) if all(r.get(k) == v for k, v in match.items())]


def client_ports(pid: int, gateway_port: int) -> set[int]:
    """Local ports of ``pid``'s established TCP connections to the gateway."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if found := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(found.group(1))
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == gateway_port:
            ports.add(int(local.split(":")[1], 16))
    return ports


def session_of(world: World, user: str) -> str:
    rows = json.loads(world.lab.admin("sessions", "list", "--json"))
    (row,) = [r for r in rows if r["user"] == user]
    return str(row["session"])


# -- the spare is used -------------------------------------------------------------------


def test_each_tunnel_rides_a_connection_dialled_before_it_was_asked_for(
    spare_world: World,
) -> None:
    """No TLS handshake for a tunnel: its connection (the ``source`` of its
    ``tunnel.start``) is one gw connect had open before the local connection came; a
    spare outlives the gateway's 2-second hello timeout."""
    world = spare_world
    user = world.new_user()
    proc, port = world.lab.connect_local("pc1", user, PASSWORD, "echo", "--reason", "spare")
    gateway_port = int(world.lab.gateway.rsplit(":", 1)[1])
    session = session_of(world, user)
    for i in range(3):
        # The control connection and the spare (and no tunnel: the last one ended).
        wait_for(lambda: len(client_ports(proc.popen.pid, gateway_port)) == 2, 60, "a spare")
        if i == 0:
            time.sleep(2.5)  # longer than the hello timeout: the spare is not reaped
        before = client_ports(proc.popen.pid, gateway_port)
        assert round_trip(port, f"tunnel {i}".encode()) == f"TUNNEL {i}".encode()
        starts = records(world, "tunnel.start", session=session)
        assert len(starts) == i + 1
        assert int(str(starts[-1]["source"]).rsplit(":", 1)[1]) in before
    proc.stop()


# -- attacks -------------------------------------------------------------------------------


def test_a_spare_of_an_ended_session_is_closed_and_none_is_taken_after(
    spare_world: World,
) -> None:
    async def attack() -> None:
        session = await login(spare_world, spare_world.new_user())
        spare = await park(session)
        session.end("done")
        refused = await refusal(spare)
        assert (refused.code, refused.message) == ("session_ended", "client: done")
        late = await ask(session)
        refused = await refusal(late)
        assert (refused.code, refused.message) == ("session_ended", "no such session")

    run(attack())


def test_an_unknown_or_another_sessions_ticket_gets_nothing_of_it(spare_world: World) -> None:
    """A made-up ticket is refused; a spare parked with session A's ticket is A's alone:
    it is closed when A ends, while B (the same person's other session) goes on."""

    async def attack() -> None:
        user = spare_world.new_user()
        a = await login(spare_world, user)
        b = await login(spare_world, user)
        made_up = await ask(a, secrets.token_urlsafe(32))
        assert (await refusal(made_up)).code == "session_ended"
        on_a = await park(b, a.opened.ticket)
        on_b = await park(b)
        a.end("done with A")
        assert (await refusal(on_a)).message == "client: done with A"
        on_b.send(m.TunnelOpen())  # B's spare still serves B
        async with asyncio.timeout(HANG_GUARD):
            await on_b.expect(m.Spliced)
        on_b.close()
        (start,) = records(spare_world, "tunnel.start", session=b.opened.session_id)
        assert start["user"] == user
        assert not records(spare_world, "tunnel.start", session=a.opened.session_id)
        b.end("done")

    run(attack())
    refused = records(spare_world, "tunnel.refused")
    assert any("unknown or ended" in str(r["reason"]) and "session" not in r for r in refused)


def test_a_flood_of_spares_parks_two_and_refuses_the_rest(spare_world: World) -> None:
    async def attack() -> None:
        session = await login(spare_world, spare_world.new_user())
        links = [await ask(session) for _ in range(6)]
        waits = {asyncio.ensure_future(link.expect(m.Spliced)): link for link in links}
        refused: list[RemoteError] = []
        async with asyncio.timeout(HANG_GUARD):
            while len(refused) < len(links) - MAX_CLIENT_SPARES:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    del waits[task]
                    exc = task.exception()
                    assert isinstance(exc, RemoteError)
                    refused.append(exc)
        assert {(e.code, e.message) for e in refused} == {
            ("rate_limited", "too many spare connections in this session")
        }
        for task in waits:  # the two parked ones: each still opens its tunnel
            task.cancel()
        for link in waits.values():
            link.send(m.TunnelOpen())
            async with asyncio.timeout(HANG_GUARD):
                await link.expect(m.Spliced)
            link.close()
        starts = records(spare_world, "tunnel.start", session=session.opened.session_id)
        assert len(starts) == MAX_CLIENT_SPARES
        session.end("done")

    run(attack())


def test_a_revoked_agreement_closes_the_spare_and_refuses_its_use(spare_world: World) -> None:
    """Whatever the spare waited through, its use is judged when it is used: a spare of
    a session whose agreement is suspended is closed, and its ticket opens nothing."""
    lab = spare_world.lab
    vendor = f"short{next(_n)}"
    lab.admin("vendor", "add", vendor, "--name", "Short lived")
    agreement = lab.agreement(vendor, "clinic", "access", unattended=True)
    user = spare_world.new_user(vendor)

    async def attack() -> None:
        session = await login(spare_world, user)
        spare = await park(session)
        await asyncio.to_thread(lab.admin, "agreement", "suspend", agreement)
        refused = await refusal(spare)
        assert refused.code == "session_ended"
        assert refused.message.startswith("no longer allowed")
        assert (await refusal(await ask(session))).message == "no such session"

    run(attack())
    assert not records(spare_world, "tunnel.start", user=user)


def test_using_a_spare_is_judged_when_it_is_used(spare_world: World) -> None:
    """A spare parked while the agent was online, used once it is gone: refused as a
    new tunnel request would be then, with the session's own record."""
    lab = spare_world.lab
    lab.enroll_agent("pc-gone", "clinic")
    agent = lab.start_agent("pc-gone", {"echo": spare_world.echo.port})
    user = spare_world.new_user()

    async def attack() -> None:
        session = await login(spare_world, user, "pc-gone")
        spare = await park(session)
        await asyncio.to_thread(agent.stop)
        await asyncio.to_thread(
            wait_for,
            lambda: bool(records(spare_world, "agent.disconnect", agent="pc-gone")),
            HANG_GUARD,
            "the agent to be gone",
        )
        spare.send(m.TunnelOpen())
        refused = await refusal(spare)
        assert refused.code == "agent_offline"
        (record,) = records(spare_world, "tunnel.refused", session=session.opened.session_id)
        assert record["reason"] == "agent offline" and record["user"] == user
        session.end("done")

    run(attack())


def test_a_spare_keeps_no_session_alive_past_its_idle_timeout(spare_world: World) -> None:
    """A spare that pings all along is not the session's activity: the session idles
    out (10 s here), its spare is closed, and the ticket opens nothing after."""

    async def attack() -> None:
        session = await login(spare_world, spare_world.new_user())
        spare = await park(session)
        ending = asyncio.ensure_future(refusal(spare))
        seq = 1
        async with asyncio.timeout(HANG_GUARD):
            while not ending.done():
                seq += 1
                spare.send(m.Ping(seq))  # within the gateway's limit (10 in 10 s)
                await asyncio.wait({ending}, timeout=1.5)
        assert (ending.result().code, ending.result().message) == (
            "session_ended",
            "idle timeout",
        )
        assert (await refusal(await ask(session))).message == "no such session"
        (end,) = records(spare_world, "session.end", session=session.opened.session_id)
        assert end["reason"] == "idle timeout" and end["tunnels"] == 0

    run(attack())


def test_a_killed_gateway_ends_gw_connect_cleanly(spare_world: World) -> None:
    """Last in this module: it kills the module's gatewayd. gw connect, holding a spare,
    ends as when its gateway closes the session; a later local connection finds
    nothing listening."""
    world = spare_world
    user = world.new_user()
    proc, port = world.lab.connect_local("pc1", user, PASSWORD, "echo", "--reason", "kill")
    assert round_trip(port, b"before") == b"BEFORE"
    gateway_port = int(world.lab.gateway.rsplit(":", 1)[1])
    wait_for(lambda: len(client_ports(proc.popen.pid, gateway_port)) == 2, 60, "a spare")
    gateway: Proc = next(p for p in world.lab.procs if p.name == "gatewayd")
    gateway.stop(signal.SIGKILL)
    proc.popen.wait(HANG_GUARD)
    out = proc.output()
    assert out.rstrip().endswith("gw: session ended")  # the gateway went without a word
    assert "Traceback" not in out and "Task exception" not in out
    with pytest.raises(OSError):
        round_trip(port, b"after")
