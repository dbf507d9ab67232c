"""Attacks on the state a login changes: parked logins, parallel guesses, many sources.

The gateway, the agent and ``gw admin`` are real processes on loopback
(:class:`gatewayd.demo.Lab`). The client side runs in this process through
:func:`relay.client.open_session` with a ``prove`` callback that answers as an attacker
would, or stops at a factor's prompt (a login parked while the person types) until the
test lets it go on. Security keys are the software authenticator of
tests/support/soft_authenticator.py behind python-fido2's real client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from soft_authenticator import SoftAuthenticator

import relay.client
from auth import registry
from auth.base import ProverOptions
from auth.password import scrypt_hash
from auth.totp import code_at
from cli.fido2 import register_key
from gatewayd.admin import request as admin_request
from gatewayd.demo import EchoServer, Lab
from gatewayd.store import Store, load_secrets_key
from relay import message as m
from relay import noise
from relay.aio import FramedLink
from relay.aio import run as aio_run
from relay.client import ClientSession, Gateway, open_session
from relay.errors import RemoteError
from relay.protocol import Side, State
from relay.tls import client_context

pytestmark = pytest.mark.integration

T = TypeVar("T")
PASSWORD = "race integration pass phrase"
THRESHOLD = 5  # the default lockout threshold
PER_USER = 25  # login attempts per user name per minute, from all sources
MAX_TUNNELS = 3
REPLAYED = "already used (a replay, or a concurrent login with the same proof)"
CHANGED = "credential changed during the login (by an administrator or another login)"
_n = itertools.count(1)
_LINKS: list[FramedLink] = []

Prove = Callable[[str, dict[str, Any], bytes], Awaitable[dict[str, Any]]]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """``gatewayd init`` (access: password, then TOTP or a security key), agent pc1."""
    the_lab = Lab(tmp_path_factory.mktemp("races"))
    echo = EchoServer()
    try:
        the_lab.init(
            extra_config=(
                "[limits]\nauth_per_minute = 5000\n"
                f"auth_per_user_per_minute = {PER_USER}\n"
                f"max_tunnels_per_session = {MAX_TUNNELS}\n"
            )
        )
        the_lab.start_gateway()
        the_lab.admin("org", "add", "clinic", "--name", "Clinic")
        the_lab.admin("vendor", "add", "acme", "--name", "Acme")
        the_lab.admin("vendor", "add", "fenced", "--name", "Fenced AS")
        the_lab.admin("vendor", "networks", "fenced", "10.0.0.0/8")
        the_lab.agreement("acme", "clinic", "access", unattended=True)
        the_lab.enroll_agent("pc1", "clinic")
        the_lab.start_agent("pc1", {"echo": echo.port})
        yield the_lab
    finally:
        the_lab.close()
        echo.close()


@pytest.fixture(autouse=True)
def _track_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remember every connection a client opens, so that :func:`run` can close it cleanly."""
    dial = relay.client.open_link

    async def tracked(*args: Any, **kwargs: Any) -> FramedLink:
        link = await dial(*args, **kwargs)
        _LINKS.append(link)
        return link

    monkeypatch.setattr(relay.client, "open_link", tracked)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run as gw does; close every connection the coroutine left open before the loop ends."""

    async def main() -> T:
        try:
            return await coro
        finally:
            links, _LINKS[:] = list(_LINKS), []
            for link in links:
                if link.conn.state is State.RAW:  # spliced: aclose() leaves it to a pipe
                    link.abort()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(link.lost), 2.0)
                else:
                    await link.aclose()

    return aio_run(main())


def gateway(lab: Lab) -> Gateway:
    return Gateway("127.0.0.1", lab.port, client_context(lab.ca_file))


async def dial_from(lab: Lab, source: str) -> FramedLink:
    """A client connection from ``source`` (any 127.0.0.0/8 address is this machine's)."""
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(
        lambda: FramedLink(Side.CONNECTOR, handshake_timeout=30.0),
        "127.0.0.1",
        lab.port,
        ssl=client_context(lab.ca_file),
        server_hostname="127.0.0.1",
        local_addr=(source, 0),
    )
    _LINKS.append(link)
    return link


def records(lab: Lab, event: str, **match: object) -> list[dict[str, Any]]:
    return [r for r in lab.events(event) if all(r.get(k) == v for k, v in match.items())]


def new_user(lab: Lab, vendor: str = "acme") -> str:
    user = f"r{next(_n)}-{vendor}"
    lab.vendor_user(user, vendor, PASSWORD)
    return user


class Gate:
    """Stops a login at one factor's prompt until :meth:`release`."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self._go = asyncio.Event()

    async def wait(self) -> None:
        self.reached.set()
        await self._go.wait()

    def release(self) -> None:
        self._go.set()


def answers(
    user: str,
    *,
    password: str = PASSWORD,
    totp: Callable[[], str] | None = None,
    device: SoftAuthenticator | None = None,
    park: dict[str, Gate] | None = None,
) -> Prove:
    """``gw connect``'s prove callback: the factors' own provers; ``park`` stops at a factor."""
    values: dict[str, Any] = {"password": password}
    if device is not None:
        values["fido2_device"] = device
    provers: dict[str, Any] = {}

    async def prove(method: str, payload: dict[str, Any], binding: bytes) -> dict[str, Any]:
        if park and method in park:
            await park[method].wait()
        if method == "totp":
            assert totp is not None
            return {"code": totp()}
        if method not in provers:
            options = ProverOptions(user=user, prompt=lambda _t, _s: "", values=values)
            provers[method] = registry.get(method).prover(options)
        result: dict[str, Any] = await provers[method].respond(payload, binding)
        return result

    return prove


async def login(lab: Lab, user: str, prove: Prove, factors: tuple[str, ...] = ()) -> ClientSession:
    return await open_session(
        gateway(lab),
        user=user,
        agent="pc1",
        target="echo",
        mode="access",
        reason="race test",
        static_private=noise.generate_keypair()[0],
        prove=prove,
        factors=factors,
    )


async def refused(session: Awaitable[ClientSession]) -> str:
    """The error code a login ends with, or "session opened" (the session is then closed)."""
    try:
        opened = await session
    except RemoteError as exc:
        return exc.code
    opened.close()
    return "session opened"


# -- a login parked at a prompt cannot use stale state -------------------------------------


def test_parked_login_cannot_use_a_totp_code_used_meanwhile(lab: Lab) -> None:
    """Park at the TOTP prompt, use the code in another login, then answer with it."""
    user = new_user(lab)
    code = lab.totp(user)

    async def attack() -> str:
        gate = Gate()
        parked = asyncio.ensure_future(
            refused(login(lab, user, answers(user, totp=lambda: code, park={"totp": gate})))
        )
        await gate.reached.wait()
        (await login(lab, user, answers(user, totp=lambda: code))).close()
        gate.release()
        return await parked

    assert run(attack()) == "auth_failed"
    reasons = [r["reason"] for r in records(lab, "auth.attempt", user=user, factor="totp")]
    assert reasons[0] == "ok"
    assert reasons[1].startswith(REPLAYED), reasons


def test_totp_enroll_during_a_parked_login_is_not_reverted(lab: Lab) -> None:
    """An admin gives the user a new seed while a login waits at the TOTP prompt."""
    user = new_user(lab)
    old_secret = lab.totp_secrets[user]
    old_code = code_at(old_secret, time.time())

    async def attack() -> tuple[str, str]:
        gate = Gate()
        parked = asyncio.ensure_future(
            refused(login(lab, user, answers(user, totp=lambda: old_code, park={"totp": gate})))
        )
        await gate.reached.wait()
        enrolled = await asyncio.to_thread(lab.admin, "totp", "enroll", user, "--json")
        gate.release()
        return await parked, json.loads(enrolled)["secret"]

    outcome, new_secret = run(attack())
    assert outcome == "auth_failed"
    (parked,) = records(lab, "auth.attempt", user=user, factor="totp")
    assert parked["reason"] == CHANGED
    # The new seed stands: its code opens a session, the old seed's does not.
    now = time.time()
    assert run(refused(login(lab, user, answers(user, totp=lambda: code_at(old_secret, now))))) == (
        "auth_failed"
    )
    run(login(lab, user, answers(user, totp=lambda: code_at(new_secret, now)))).close()


def test_password_change_during_a_parked_login_defeats_the_old_password(lab: Lab) -> None:
    """The old password, typed into a login opened before the change, no longer counts."""
    user = new_user(lab)
    socket = lab.root / "gw" / "admin.sock"

    async def attack() -> str:
        gate = Gate()
        prove = answers(user, totp=lambda: lab.totp(user), park={"password": gate})
        parked = asyncio.ensure_future(refused(login(lab, user, prove)))
        await gate.reached.wait()
        await admin_request(socket, "user.password", {"user": user, "password": "new passphrase"})
        gate.release()
        return await parked

    assert run(attack()) == "auth_failed"
    (parked,) = records(lab, "auth.attempt", user=user, factor="password")
    assert parked["reason"] == CHANGED
    prove = answers(user, password="new passphrase", totp=lambda: lab.totp(user))
    run(login(lab, user, prove)).close()


def test_scrypt_password_is_rehashed_with_argon2id_at_login(lab: Lab) -> None:
    user = new_user(lab)
    state = lab.root / "gw" / "state"
    store = Store(state / "directory.db", load_secrets_key(state / "secrets.key"))
    try:
        asyncio.run(
            store.set_credential(user, "password", {"hash": scrypt_hash(PASSWORD)}, time.time())
        )
        run(login(lab, user, answers(user, totp=lambda: lab.totp(user)))).close()
        stored = asyncio.run(store.get_credential(user, "password"))
    finally:
        asyncio.run(store.close())
    assert stored is not None and stored["hash"].startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    (attempt,) = records(lab, "auth.attempt", user=user, factor="password")
    assert attempt["outcome"] == "success" and attempt["rehashed"] == "scrypt"
    run(login(lab, user, answers(user, totp=lambda: lab.totp(user)))).close()
    again = records(lab, "auth.attempt", user=user, factor="password")[-1]
    assert again["outcome"] == "success" and "rehashed" not in again


def register(lab: Lab, user: str, device: SoftAuthenticator) -> dict[str, Any]:
    code = lab.admin("fido2", "invite", user).strip()
    return run(
        register_key(gateway(lab), user=user, code=code, prompt=lambda _t, _s: "", device=device)
    )


def keys(lab: Lab, user: str) -> list[str]:
    return [k["id"] for k in json.loads(lab.admin("fido2", "list", user, "--json"))]


def test_fido2_remove_during_a_parked_login_is_not_reverted(lab: Lab) -> None:
    """A stolen key's login waits at the touch while the admin removes the key."""
    user = new_user(lab)
    device = SoftAuthenticator()
    key = register(lab, user, device)["id"]

    async def attack() -> str:
        gate = Gate()
        prove = answers(user, device=device, park={"fido2": gate})
        parked = asyncio.ensure_future(refused(login(lab, user, prove, ("fido2",))))
        await gate.reached.wait()
        await asyncio.to_thread(lab.admin, "fido2", "remove", user, key)
        gate.release()
        return await parked

    assert run(attack()) == "auth_failed"
    assert keys(lab, user) == []
    (parked,) = records(lab, "auth.attempt", user=user, factor="fido2")
    assert parked["outcome"] == "failure" and parked["reason"] == CHANGED


def test_fido2_register_during_a_parked_login_is_not_dropped(lab: Lab) -> None:
    """A second key registered while a login with the first waits stays registered, and
    the waiting login is not failed for it (its own key's counter decides)."""
    user = new_user(lab)
    first, second = SoftAuthenticator(), SoftAuthenticator()
    register(lab, user, first)
    run(login(lab, user, answers(user, device=first), ("fido2",))).close()

    async def race() -> str:
        gate = Gate()
        prove = answers(user, device=first, park={"fido2": gate})
        parked = asyncio.ensure_future(refused(login(lab, user, prove, ("fido2",))))
        await gate.reached.wait()
        code = await asyncio.to_thread(lab.admin, "fido2", "invite", user)
        await register_key(
            gateway(lab), user=user, code=code.strip(), prompt=lambda _t, _s: "", device=second
        )
        gate.release()
        return await parked

    assert run(race()) == "session opened"
    assert len(keys(lab, user)) == 2
    # And the second key logs in.
    run(login(lab, user, answers(user, device=second), ("fido2",))).close()


# -- parallel guesses and many sources ------------------------------------------------------


def test_parallel_wrong_passwords_lock_the_account(lab: Lab) -> None:
    """20 connections: 19 wrong passwords at once, then the right password and code."""
    user = new_user(lab)

    async def attack() -> tuple[list[str], str]:
        gates = [Gate() for _ in range(19)]
        guesses = [
            asyncio.ensure_future(
                refused(
                    login(lab, user, answers(user, password=f"guess {i}", park={"password": g}))
                )
            )
            for i, g in enumerate(gates)
        ]
        for g in gates:  # every connection is at the password prompt
            await g.reached.wait()
        for g in gates:  # then all answer at once
            g.release()
        wrong = await asyncio.gather(*guesses)
        right = await refused(login(lab, user, answers(user, totp=lambda: lab.totp(user))))
        return list(wrong), right

    wrong, right = run(attack())
    assert wrong == ["auth_failed"] * 19
    assert right == "auth_failed"
    (locked,) = records(lab, "auth.locked", user=user)
    assert locked["failures"] == THRESHOLD and locked["seconds"] > 0
    attempts = records(lab, "auth.attempt", user=user, factor="password")
    # No more guesses were checked than the threshold allows; the rest were turned away.
    assert [a["reason"] for a in attempts].count("wrong password") == THRESHOLD
    assert attempts[-1]["reason"].startswith("account locked")
    assert not records(lab, "session.start", user=user)


def test_lock_set_while_a_login_waits_fails_its_right_answer(lab: Lab) -> None:
    """The right password is in; while the login waits at the TOTP prompt, guesses lock
    the account: the right code is then refused too (the lock is checked at each step)."""
    user = new_user(lab)

    async def attack() -> str:
        gate = Gate()
        prove = answers(user, totp=lambda: lab.totp(user), park={"totp": gate})
        parked = asyncio.ensure_future(refused(login(lab, user, prove)))
        await gate.reached.wait()
        for i in range(THRESHOLD):
            assert await refused(login(lab, user, answers(user, password=f"no {i}"))) == (
                "auth_failed"
            )
        gate.release()
        return await parked

    assert run(attack()) == "auth_failed"
    assert records(lab, "auth.locked", user=user)
    (totp,) = records(lab, "auth.attempt", user=user, factor="totp")
    assert totp["reason"].startswith("account locked")
    assert not records(lab, "session.start", user=user)


def test_admin_unlock_is_audited_and_opens_the_account(lab: Lab) -> None:
    user = new_user(lab)

    async def guesses() -> list[str]:
        return [
            await refused(login(lab, user, answers(user, password=f"no {i}")))
            for i in range(THRESHOLD)
        ]

    assert run(guesses()) == ["auth_failed"] * THRESHOLD
    assert records(lab, "auth.locked", user=user)
    prove = answers(user, totp=lambda: lab.totp(user))
    assert run(refused(login(lab, user, prove))) == "auth_failed"
    out = lab.admin("user", "unlock", user)
    assert out.strip() == f"user {user} unlocked (was locked; {THRESHOLD} failures cleared)"
    (change,) = records(lab, "admin.change", op="user.unlock", user=user)
    assert change["failures"] == THRESHOLD and change["admin_locked"] is False
    assert change["locked_until"] > time.time()
    run(login(lab, user, answers(user, totp=lambda: lab.totp(user)))).close()
    unknown = lab.run(
        "gw", "admin", "--config", str(lab.config), "user", "unlock", "ghost", check=False
    )
    assert unknown.returncode == 1 and "no user 'ghost'" in unknown.stderr
    assert "Traceback" not in unknown.stderr


async def hello(lab: Lab, source: str, user: str) -> str:
    """Start a login from ``source``: "asked" if the gateway asks for a factor, else the error."""
    link = await dial_from(lab, source)
    key = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
    link.send(m.ClientHello(user=user, agent="", target="", mode="access", client_key=key))
    try:
        await link.expect(m.AuthRequest)
    except RemoteError as exc:
        return exc.code
    finally:
        await link.aclose()
    return "asked"


def test_per_user_rate_limit_holds_across_sources(lab: Lab) -> None:
    """Guesses at one account spread over many source addresses are still limited."""
    target = f"spread{next(_n)}"  # known or not, the limit is the same

    async def attack() -> list[str]:
        return [await hello(lab, f"127.0.{i // 200}.{2 + i % 200}", target) for i in range(30)]

    answered = run(attack())
    assert answered[:PER_USER] == ["asked"] * PER_USER
    assert set(answered[PER_USER:]) == {"rate_limited"}
    limited = records(lab, "auth.rate_limited", user=target)
    assert len(limited) == 30 - PER_USER and {r["limit"] for r in limited} == {"user"}


def test_vendor_network_answer_is_an_unknown_users(lab: Lab) -> None:
    """A user whose vendor allows other networks is told no more, no sooner, than a stranger."""
    fenced = new_user(lab, "fenced")

    async def exchange(user: str) -> list[str]:
        link = await dial_from(lab, "127.0.0.1")
        key = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
        link.send(
            m.ClientHello(user=user, agent="pc1", target="echo", mode="access", client_key=key)
        )
        seen = []
        try:
            while True:
                msg = await link.expect(m.AuthRequest, m.SessionOpened)
                assert isinstance(msg, m.AuthRequest)
                seen.append(msg.method)
                link.send(m.AuthResponse(msg.method, {"password": PASSWORD}))
        except RemoteError as exc:
            seen.append(exc.code)
        finally:
            await link.aclose()
        return seen

    assert run(exchange(fenced)) == ["password", "auth_failed"]
    assert run(exchange(f"nobody{next(_n)}")) == ["password", "auth_failed"]
    (attempt,) = records(lab, "auth.attempt", user=fenced)
    assert attempt["factor"] == "password"
    assert attempt["reason"] == "source address not allowed for vendor fenced"


# -- tunnels -------------------------------------------------------------------------------


def test_concurrent_tunnels_beyond_the_limit_are_refused(lab: Lab) -> None:
    user = new_user(lab)

    async def attack() -> list[str]:
        session = await login(lab, user, answers(user, totp=lambda: lab.totp(user)))

        async def tunnel() -> str:
            link = await session.gateway.dial()
            _LINKS.append(link)
            link.send(m.TunnelHello(session.opened.ticket))
            try:
                await link.expect(m.Spliced)
            except RemoteError as exc:
                return exc.code
            return "spliced"

        try:
            return list(await asyncio.gather(*(tunnel() for _ in range(12))))
        finally:
            session.close()

    results = run(attack())
    assert results.count("spliced") == MAX_TUNNELS, results
    assert results.count("rate_limited") == 12 - MAX_TUNNELS
    refusals = records(lab, "tunnel.refused", user=user, reason="too many tunnels")
    assert len(refusals) == 12 - MAX_TUNNELS
