"""Security keys end to end: registration codes, registration and login against a real gatewayd.

A subprocess ``gw`` cannot see an in-memory authenticator, so these tests make the
calls ``gw fido2 register`` and ``gw connect --fido2`` make, in this process, with the
software authenticator (tests/support/soft_authenticator.py) driven by python-fido2's
real ``Fido2Client``: :func:`cli.fido2.register_key` and
:func:`relay.client.open_session` with the factor's own prover. The gateway, the agent
and ``gw admin`` are real processes (:class:`gatewayd.demo.Lab`). The subprocess tests
at the end run ``gw`` itself where no key is plugged in and where python-fido2 is
missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from soft_authenticator import SOFT_AAGUID, SoftAuthenticator

import relay.client
from auth import registry
from auth.base import ProverOptions
from cli.fido2 import register_key
from gatewayd.demo import BIN, EchoServer, Lab, round_trip, wait_for
from gatewayd.fido2_registration import normalize_code
from relay import noise
from relay.aio import FramedLink
from relay.aio import run as aio_run
from relay.client import ClientSession, Gateway, open_session
from relay.errors import AuthError, DeviceError, RemoteError
from relay.tls import client_context

pytestmark = pytest.mark.integration

T = TypeVar("T")
PASSWORD = "fido2 integration pass phrase"
CLONE = "signature counter did not increase (cloned key?)"
MISMATCH = "challenge mismatch (stale, replayed, or bound to another TLS channel)"
NO_ANSWER = "no answer from the client (eof)"


_LINKS: list[FramedLink] = []


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
    """Run as gw does (relay.aio.run: uvloop where installed), and let TLS closes finish.

    gw exits right after its loop; a test goes on, and a close still in flight when
    the loop ends would be an unclosed-transport warning (an error here).
    """

    async def main() -> T:
        try:
            return await coro
        finally:
            links, _LINKS[:] = list(_LINKS), []
            for link in links:
                await link.aclose()

    return aio_run(main())


class Person:
    """The person at the terminal: answers PIN prompts, reads notices."""

    def __init__(self, pin: str | None = None) -> None:
        self.pin = pin
        self.prompts: list[str] = []
        self.notices: list[str] = []

    def prompt(self, text: str, secret: bool) -> str:
        self.prompts.append(text)
        return self.pin or ""

    def notify(self, text: str) -> None:
        self.notices.append(text)


def gateway(lab: Lab) -> Gateway:
    return Gateway("127.0.0.1", lab.port, client_context(lab.ca_file))


def records(lab: Lab, event: str, **match: object) -> list[dict[str, Any]]:
    return [r for r in lab.events(event) if all(r.get(k) == v for k, v in match.items())]


def invite(lab: Lab, user: str, *extra: str) -> str:
    """``gw admin fido2 invite USER``: the one-time code, as the CLI prints it."""
    return lab.admin("fido2", "invite", user, *extra).strip()


def register(
    lab: Lab, user: str, device: SoftAuthenticator, code: str | None = None, **kw: Any
) -> dict[str, Any]:
    """What ``gw fido2 register`` does, with ``device`` plugged in."""
    person = kw.pop("person", None) or Person()
    return run(
        register_key(
            gateway(lab),
            user=user,
            code=code or invite(lab, user),
            prompt=person.prompt,
            notify=person.notify,
            device=device,
            **kw,
        )
    )


Prove = Callable[[str, dict[str, Any], bytes], Coroutine[Any, Any, dict[str, Any]]]


def prover_calls(
    user: str,
    device: SoftAuthenticator | None,
    person: Person,
    *,
    totp: str | None = None,
    fido2_pin: str | None = None,
) -> Prove:
    """The ``prove`` callback of ``gw connect``: the factors' own provers, device injected."""
    values: dict[str, Any] = {"password": PASSWORD, "totp": totp, "notify": person.notify}
    if device is not None:
        values["fido2_device"] = device
    if fido2_pin is not None:
        values["fido2_pin"] = fido2_pin
    options = ProverOptions(user=user, prompt=person.prompt, values=values)
    provers: dict[str, Any] = {}

    async def prove(method: str, payload: dict[str, Any], binding: bytes) -> dict[str, Any]:
        if method not in provers:
            provers[method] = registry.get(method).prover(options)
        result: dict[str, Any] = await provers[method].respond(payload, binding)
        return result

    return prove


async def session(
    lab: Lab,
    user: str,
    prove: Prove,
    factors: tuple[str, ...] = ("fido2", "totp"),
) -> ClientSession:
    return await open_session(
        gateway(lab),
        user=user,
        agent="pc1",
        target="echo",
        mode="access",
        reason="fido2 test",
        static_private=noise.generate_keypair()[0],
        prove=prove,
        factors=factors,
    )


def login(
    lab: Lab,
    user: str,
    device: SoftAuthenticator | None,
    *,
    person: Person | None = None,
    factors: tuple[str, ...] = ("fido2", "totp"),
    totp: str | None = None,
    fido2_pin: str | None = None,
    data: bytes | None = None,
    wrap: Callable[[Prove], Prove] | None = None,
) -> bytes | None:
    """``gw connect --fido2``: authenticate; with ``data``, send it through a tunnel and back."""
    prove = prover_calls(user, device, person or Person(), totp=totp, fido2_pin=fido2_pin)
    if wrap is not None:
        prove = wrap(prove)

    async def go() -> bytes | None:
        s = await session(lab, user, prove, factors)
        try:
            if data is None:
                return None
            ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            server = asyncio.ensure_future(
                s.serve_local("127.0.0.1", 0, lambda e: None, ready.set_result)
            )
            where = await asyncio.wait_for(ready, 10)
            port = int(where.rpartition(":")[2])
            reply = await asyncio.to_thread(round_trip, port, data)
            server.cancel()  # gw connect -L runs until it is stopped
            with contextlib.suppress(asyncio.CancelledError):
                await server
            s.end("user quit")
            return reply
        finally:
            s.close()

    return run(go())


def rejected(lab: Lab, user: str, device: SoftAuthenticator, **kw: Any) -> dict[str, Any]:
    """A login the gateway refuses: returns its fido2 ``auth.attempt`` record."""
    with pytest.raises(RemoteError) as caught:
        login(lab, user, device, **kw)
    assert caught.value.code == "auth_failed"
    (attempt,) = records(lab, "auth.attempt", user=user, factor="fido2", outcome="failure")
    return attempt


def successes(lab: Lab, user: str) -> list[dict[str, Any]]:
    return records(lab, "auth.attempt", user=user, factor="fido2", outcome="success")


class World:
    """A gateway as ``gatewayd init`` made it, vendor acme's agreement with org clinic, and
    agent pc1 exposing an echo service.

    Built here rather than imported from tests/integration/conftest.py: with tests/auth
    in the same pytest run, ``from conftest import`` finds tests/auth/conftest.py.
    """

    def __init__(self, root: Path) -> None:
        self.lab = Lab(root)
        self.echo = EchoServer()
        self.users = itertools.count(1)

    def build(self) -> None:
        lab = self.lab
        # Every test logs in from 127.0.0.1: the default 30 a minute would throttle them.
        lab.init(extra_config="[limits]\nauth_per_minute = 5000\n")
        lab.start_gateway()
        lab.admin("org", "add", "clinic", "--name", "Clinic")
        lab.admin("vendor", "add", "acme", "--name", "Acme")
        lab.agreement("acme", "clinic", "access", unattended=True)
        lab.enroll_agent("pc1", "clinic")
        lab.start_agent("pc1", {"echo": self.echo.port})

    def new_user(self) -> str:
        """A vendor user with a password and TOTP (the directory before any key)."""
        user = f"v{next(self.users)}-acme"
        self.lab.vendor_user(user, "acme", PASSWORD)
        return user

    def close(self) -> None:
        self.lab.close()
        self.echo.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("fido2-lab"))
    try:
        w.build()
        yield w
    finally:
        w.close()


@pytest.fixture
def user(world: World) -> str:
    return world.new_user()


# -- configuration --------------------------------------------------------------------


def test_init_writes_fido2_policy_and_check_config_validates_it(world: World) -> None:
    lab = world.lab
    text = lab.config.read_text()
    assert text.count('factors = ["password", ["totp", "fido2"]]') == 2  # access, support
    assert "[auth.fido2]\n" in text and 'rp_id = "localhost"' in text  # listening on 127.0.0.1
    status = json.loads(lab.admin("status"))
    assert status["modes"]["access"] == [["password"], ["totp", "fido2"]]

    bad = lab.config.with_name("no-rp-id.toml")
    bad.write_text(text.replace('rp_id = "localhost"', ""))
    result = lab.run("gatewayd", "check-config", "--config", str(bad), check=False)
    assert result.returncode == 4 and "auth.fido2.rp_id: required" in result.stderr
    bad.write_text(text.replace('rp_id = "localhost"', 'rp_id = "localhost"\nuser_verify = "x"'))
    result = lab.run("gatewayd", "check-config", "--config", str(bad), check=False)
    assert result.returncode == 4 and "auth.fido2.user_verify: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


# -- registration -----------------------------------------------------------------------


def test_register_with_a_code_then_log_in_and_tunnel(world: World, user: str) -> None:
    lab = world.lab
    code = invite(lab, user)
    (change,) = records(lab, "admin.change", op="fido2.invite", user=user)
    assert code not in json.dumps(change) and change["expires"] > time.time() + 86000
    # Only the code's hash is kept.
    with sqlite3.connect(lab.root / "gw" / "state" / "directory.db") as db:
        (stored,) = db.execute(
            "SELECT code_hash FROM registration_codes WHERE user = ?", (user,)
        ).fetchone()
    assert stored == hashlib.sha256(normalize_code(code).encode()).hexdigest()

    key = SoftAuthenticator()
    person = Person()
    info = register(lab, user, key, code.lower(), name="blue key", person=person)
    assert info["name"] == "blue key" and info["aaguid"] == SOFT_AAGUID.hex()
    assert person.notices == ["Touch your security key"]
    (reg,) = records(lab, "fido2.register", user=user)
    assert reg["outcome"] == "success" and reg["reason"] == "ok"
    assert reg["key_id"] == info["id"] and reg["source"].startswith("127.0.0.1:")
    assert reg["attestation"] == "packed" and reg["attestation_verified"] is True

    person = Person()
    assert login(lab, user, key, person=person, data=b"through the key\n") == b"THROUGH THE KEY\n"
    assert person.notices == ["Touch your security key"] and person.prompts == []
    factors = [(a["factor"], a["outcome"]) for a in records(lab, "auth.attempt", user=user)]
    assert factors == [("password", "success"), ("fido2", "success")]
    (ok,) = successes(lab, user)
    assert ok["key_id"] == info["id"] and ok["key_name"] == "blue key"
    assert ok["sign_count"] >= 1 and ok["user_verified"] is False
    assert ok["aaguid"] == SOFT_AAGUID.hex()
    (decision,) = records(lab, "policy.decision", user=user)
    assert decision["decision"] == "allow"
    wait_for(lambda: bool(records(lab, "tunnel.end", user=user)), 60, "tunnel.end")


def test_code_is_single_use(world: World, user: str) -> None:
    lab = world.lab
    code = invite(lab, user)
    register(lab, user, SoftAuthenticator(), code)
    with pytest.raises(RemoteError) as caught:
        register(lab, user, SoftAuthenticator(), code)
    assert caught.value.code == "auth_failed"
    assert caught.value.message == "registration code unknown, used or expired"
    outcomes = [(r["outcome"], r["reason"]) for r in records(lab, "fido2.register", user=user)]
    assert outcomes == [("success", "ok"), ("failure", "code already used")]


def test_unknown_expired_and_foreign_codes_are_refused_and_audited(world: World, user: str) -> None:
    lab = world.lab
    other = world.new_user()
    foreign = invite(lab, other)
    expired = invite(lab, user, "--ttl", "60")
    with sqlite3.connect(lab.root / "gw" / "state" / "directory.db") as db:
        db.execute(
            "UPDATE registration_codes SET expires = ? WHERE code_hash = ?",
            (time.time() - 1, hashlib.sha256(normalize_code(expired).encode()).hexdigest()),
        )
    for code in ("AAAA-BBBB-CCCC-DDDD", expired, foreign):
        with pytest.raises(RemoteError, match="registration code unknown, used or expired"):
            register(lab, user, SoftAuthenticator(), code)
    reasons = [(r["outcome"], r["reason"]) for r in records(lab, "fido2.register", user=user)]
    assert reasons == [
        ("failure", "unknown code"),
        ("failure", "code expired"),
        ("failure", "unknown code"),  # another user's code is no code for this one
    ]
    assert not records(lab, "auth.attempt", user=user)
    # The foreign code still works for its own user.
    register(lab, other, SoftAuthenticator(), foreign)


def test_failed_registration_leaves_the_code_usable(world: World, user: str) -> None:
    lab = world.lab
    code = invite(lab, user)
    with pytest.raises(AuthError, match="timed out waiting for you to touch"):
        register(lab, user, SoftAuthenticator(presence="timeout"), code)
    (gave_up,) = records(lab, "fido2.register", user=user)
    assert gave_up["outcome"] == "failure" and gave_up["reason"] == NO_ANSWER
    register(lab, user, SoftAuthenticator(), code)
    assert records(lab, "fido2.register", user=user)[-1]["outcome"] == "success"


def test_two_keys_for_one_user_and_admin_list_remove(world: World, user: str) -> None:
    lab = world.lab
    blue, spare = SoftAuthenticator(), SoftAuthenticator()
    first = register(lab, user, blue, name="blue")
    second = register(lab, user, spare, name="spare")
    listed = json.loads(lab.admin("fido2", "list", user, "--json"))
    assert [(k["id"], k["name"]) for k in listed] == [
        (first["id"], "blue"),
        (second["id"], "spare"),
    ]
    table = lab.admin("fido2", "list", user)
    assert table.splitlines()[0].split()[:3] == ["ID", "NAME", "ADDED"] and "spare" in table

    login(lab, user, blue)
    login(lab, user, spare)
    assert [a["key_name"] for a in successes(lab, user)] == ["blue", "spare"]

    # Remove the spare key by a prefix of its id, as an administrator would type it.
    out = lab.admin("fido2", "remove", user, second["id"][:12])
    assert "'spare'" in out and "1 left" in out
    (change,) = records(lab, "admin.change", op="fido2.remove", user=user)
    assert change["key_id"] == second["id"] and change["key_name"] == "spare"
    assert [k["name"] for k in json.loads(lab.admin("fido2", "list", user, "--json"))] == ["blue"]
    with pytest.raises(AuthError, match="not registered for your account"):
        login(lab, user, spare)
    login(lab, user, blue)

    # Ids are base64url: one that starts with "-" is still an id, not an option.
    bad = lab.run(
        "gw", "admin", "--config", str(lab.config), "fido2", "remove", user, "-nokey", check=False
    )
    assert bad.returncode == 1 and "no security key with id '-nokey'" in bad.stderr
    unknown = lab.run(
        "gw", "admin", "--config", str(lab.config), "fido2", "list", "ghost", check=False
    )
    assert unknown.returncode == 1 and "no user 'ghost'" in unknown.stderr

    # Removing the last key removes the factor: the user is back to TOTP only.
    lab.admin("fido2", "remove", user, first["id"])
    assert json.loads(lab.admin("fido2", "list", user, "--json")) == []
    login(lab, user, blue, totp=lab.totp(user))
    assert records(lab, "auth.attempt", user=user)[-1]["factor"] == "totp"
    assert "ok:" in lab.run("gw", "audit", "verify", "--config", str(lab.config)).stdout


def test_same_key_cannot_be_registered_twice(world: World, user: str) -> None:
    lab = world.lab
    key = SoftAuthenticator()
    register(lab, user, key)
    code = invite(lab, user)
    with pytest.raises(AuthError, match="already registered"):
        register(lab, user, key, code)  # the key itself refuses: its id is in the exclude list


# -- login ------------------------------------------------------------------------------


def test_vendor_with_totp_and_fido2_may_use_either(world: World, user: str) -> None:
    lab = world.lab
    key = SoftAuthenticator()
    register(lab, user, key)
    # gw connect --fido2 offers fido2 first ...
    assert login(lab, user, key, data=b"key\n") == b"KEY\n"
    # ... the real gw without --fido2 offers totp first: same user, same policy step.
    result = lab.connect_stdio("pc1", user, PASSWORD, "echo", "code\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "CODE\n"
    used = [
        a["factor"] for a in records(lab, "auth.attempt", user=user) if a["factor"] != "password"
    ]
    assert used == ["fido2", "totp"]


def test_unregistered_key_is_refused(world: World, user: str) -> None:
    lab = world.lab
    register(lab, user, SoftAuthenticator())
    stranger = SoftAuthenticator()
    with pytest.raises(AuthError, match="not registered for your account"):
        login(lab, user, stranger)
    (attempt,) = records(lab, "auth.attempt", user=user, factor="fido2")
    assert attempt["outcome"] == "failure" and attempt["reason"] == NO_ANSWER


def test_another_users_key_is_refused_by_the_gateway(world: World, user: str) -> None:
    """A client that ignores the allow list answers with a key registered to someone else."""
    lab = world.lab
    register(lab, user, SoftAuthenticator())
    mallory = world.new_user()
    mallorys_key = SoftAuthenticator()
    theirs = register(lab, mallory, mallorys_key)

    def swap_allow_list(prove: Prove) -> Prove:
        async def lying(method: str, payload: dict[str, Any], binding: bytes) -> dict[str, Any]:
            if method == "fido2":
                payload = {**payload, "allow": [theirs["id"]]}
            return await prove(method, payload, binding)

        return lying

    attempt = rejected(lab, user, mallorys_key, wrap=swap_allow_list)
    assert attempt["reason"] == "unknown credential (this key is not registered for the user)"
    assert attempt["key_id"] == theirs["id"]


def test_cloned_key_is_refused_and_audited(world: World, user: str) -> None:
    lab = world.lab
    key = SoftAuthenticator()
    info = register(lab, user, key)
    clone = key.clone(counter=1)  # copied early; the original has been used since
    login(lab, user, key)
    login(lab, user, key)
    last = successes(lab, user)[-1]["sign_count"]
    attempt = rejected(lab, user, clone)
    assert attempt["reason"] == CLONE
    assert attempt["key_id"] == info["id"] and attempt["aaguid"] == SOFT_AAGUID.hex()
    assert attempt["stored_sign_count"] == last
    assert attempt["received_sign_count"] < last
    # The genuine key still works; the stored counter was not moved by the clone.
    login(lab, user, key)


def test_replayed_assertion_is_refused(world: World, user: str) -> None:
    lab = world.lab
    key = SoftAuthenticator()
    register(lab, user, key)
    captured: list[dict[str, Any]] = []

    def capture(prove: Prove) -> Prove:
        async def tap(method: str, payload: dict[str, Any], binding: bytes) -> dict[str, Any]:
            answer = await prove(method, payload, binding)
            if method == "fido2":
                captured.append(answer)
            return answer

        return tap

    login(lab, user, key, wrap=capture)

    def replay(prove: Prove) -> Prove:
        async def again(method: str, payload: dict[str, Any], binding: bytes) -> dict[str, Any]:
            if method == "fido2":
                return captured[0]
            return await prove(method, payload, binding)

        return again

    with pytest.raises(RemoteError, match="auth_failed"):
        login(lab, user, key, wrap=replay)
    attempt = records(lab, "auth.attempt", user=user, factor="fido2")[-1]
    assert attempt["outcome"] == "failure" and attempt["reason"] == MISMATCH


def test_assertion_for_another_tls_connection_is_refused(world: World, user: str) -> None:
    """A relay attack: the key signs for the connection it sees, not the attacker's."""
    lab = world.lab
    key = SoftAuthenticator()
    register(lab, user, key)

    async def go() -> None:
        victims = await gateway(lab).dial()  # the victim's own, genuine connection
        try:
            victims_binding = victims.channel_binding()
            prove = prover_calls(user, key, Person())

            async def relayed(method: str, payload: dict[str, Any], _: bytes) -> dict[str, Any]:
                # The attacker's challenge, answered by the victim's gw over its channel.
                return await prove(method, payload, victims_binding)

            await session(lab, user, relayed)
        finally:
            victims.close()

    with pytest.raises(RemoteError, match="auth_failed"):
        run(go())
    attempt = records(lab, "auth.attempt", user=user, factor="fido2")[-1]
    assert attempt["outcome"] == "failure" and attempt["reason"] == MISMATCH


def test_client_side_failures_have_clear_messages(world: World, user: str) -> None:
    lab = world.lab
    with_pin = SoftAuthenticator(pin="4711")
    register(lab, user, with_pin, person=Person("4711"))
    # "preferred" and a key with a PIN: the PIN is asked for, through the prompt.
    person = Person("4711")
    login(lab, user, with_pin, person=person)
    assert person.prompts == ["Security key PIN: "]
    assert successes(lab, user)[-1]["user_verified"] is True

    with pytest.raises(AuthError, match=r"wrong PIN for the security key \(7 attempts left"):
        login(lab, user, with_pin, person=Person("0000"))
    with_pin.pin_retries = 1
    with pytest.raises(DeviceError, match=r"PIN is (now )?blocked"):
        login(lab, user, with_pin, person=Person("0000"))
    with pytest.raises(DeviceError, match="PIN is blocked"):
        login(lab, user, with_pin, person=Person("4711"))

    untouched = SoftAuthenticator()
    register(lab, user, untouched)
    untouched.presence = "timeout"  # the person never touches it
    with pytest.raises(AuthError, match="timed out waiting for you to touch"):
        login(lab, user, untouched)
    reasons = {a["reason"] for a in records(lab, "auth.attempt", user=user, outcome="failure")}
    assert reasons == {NO_ANSWER}  # the gateway saw each client give up; nothing counted


# -- user verification required ---------------------------------------------------------


@pytest.fixture(scope="module")
def uv_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A gateway whose policy needs the key's PIN at every login (no agent: auth only)."""
    lab = Lab(tmp_path_factory.mktemp("fido2-uv"))
    lab.init()
    text = lab.config.read_text().replace(
        'rp_id = "localhost"', 'rp_id = "localhost"\nuser_verification = "required"'
    )
    lab.config.write_text(text)
    try:
        lab.start_gateway()
        lab.admin("org", "add", "clinic", "--name", "Clinic")
        lab.admin("vendor", "add", "acme", "--name", "Acme")
        yield lab
    finally:
        lab.close()


def test_uv_required_but_not_performed_is_refused(uv_lab: Lab) -> None:
    lab = uv_lab
    lab.vendor_user("vera", "acme", PASSWORD)
    key = SoftAuthenticator(pin="4711")
    register(lab, "vera", key, person=Person("4711"))
    (reg,) = records(lab, "fido2.register", user="vera")
    assert reg["user_verified"] is True

    # A client that skips the PIN although the gateway asked for it.
    def skip_uv(prove: Prove) -> Prove:
        async def lazy(method: str, payload: dict[str, Any], binding: bytes) -> dict[str, Any]:
            if method == "fido2":
                payload = {**payload, "user_verification": "discouraged"}
            return await prove(method, payload, binding)

        return lazy

    person = Person("4711")
    attempt = rejected(lab, "vera", key, person=person, wrap=skip_uv)
    assert attempt["reason"] == "user verification required but not performed"
    assert person.prompts == []  # the PIN was never asked for
    # The honest client asks for the PIN, and passes authentication (then policy decides:
    # this lab has no agent, so the session is refused after the factors).
    with pytest.raises(RemoteError) as caught:
        login(lab, "vera", key, person=Person("4711"))
    assert caught.value.code != "auth_failed"
    assert records(lab, "auth.attempt", user="vera", factor="fido2")[-1]["outcome"] == "success"

    # A key with no PIN cannot satisfy this policy: it cannot even be registered.
    lab.vendor_user("nopin", "acme", PASSWORD)
    with pytest.raises(DeviceError, match="has no PIN set"):
        register(lab, "nopin", SoftAuthenticator())


def test_registration_attempts_are_rate_limited(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.init(extra_config="[limits]\nauth_per_minute = 2\n")
    try:
        lab.start_gateway()
        lab.admin("vendor", "add", "acme", "--name", "Acme")
        lab.admin(
            "user", "add", "rita", "--vendor", "acme", "--password-stdin", input=PASSWORD + "\n"
        )
        for _ in range(2):
            with pytest.raises(RemoteError, match="auth_failed"):
                register(lab, "rita", SoftAuthenticator(), "WRNG-CODE-AAAA-AAAA")
        with pytest.raises(RemoteError) as caught:
            register(lab, "rita", SoftAuthenticator(), invite(lab, "rita"))
        assert caught.value.code == "rate_limited"
        reasons = [r["reason"] for r in records(lab, "fido2.register", user="rita")]
        assert reasons == ["unknown code", "unknown code", "rate limited"]
    finally:
        lab.close()


# -- gw as a subprocess -------------------------------------------------------------------


def gw(
    lab: Lab,
    *args: str,
    input: str = "",
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "gw"), *args],
        input=input,
        capture_output=True,
        text=True,
        env={**lab.env(), **(env or {})},
        timeout=60,
        check=False,
    )


def register_args(lab: Lab, user: str, code: str) -> list[str]:
    return [
        "fido2",
        "register",
        "--gateway",
        lab.gateway,
        "--ca-file",
        str(lab.ca_file),
        "--user",
        user,
        "--code",
        code,
    ]


def connect_args(lab: Lab, user: str) -> list[str]:
    return lab.connect_args(
        "pc1", user, "echo", "access", "--stdio", "--password-stdin", "--fido2"
    )[1:]


@pytest.mark.skipif(
    bool(list(Path("/dev").glob("hidraw*"))), reason="a HID device is plugged in here"
)
def test_gw_without_a_key_plugged_in_exits_4(world: World, user: str) -> None:
    lab = world.lab
    code = invite(lab, user)
    result = gw(lab, *register_args(lab, user, code))
    assert result.returncode == 4, result.stderr
    assert result.stderr.startswith("gw: no security key found: plug in your YubiKey")
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not records(lab, "fido2.register", user=user)  # the gateway was not even asked

    register(lab, user, SoftAuthenticator(), code)  # so the gateway asks this user for a key
    result = gw(lab, *connect_args(lab, user), input=PASSWORD + "\n")
    assert result.returncode == 4, result.stderr
    assert "no security key found" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    attempt = records(lab, "auth.attempt", user=user, factor="fido2")[-1]
    assert attempt["outcome"] == "failure" and attempt["reason"] == NO_ANSWER


def test_gw_without_python_fido2_exits_4(world: World, user: str, tmp_path: Path) -> None:
    lab = world.lab
    register(lab, user, SoftAuthenticator())
    blocker = tmp_path / "site" / "fido2"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named fido2')\n")
    env = {"PYTHONPATH": str(blocker.parent)}
    for args, stdin in (
        (register_args(lab, user, "ABCD-EFGH-IJKL-MNOP"), ""),
        (connect_args(lab, user), PASSWORD + "\n"),
    ):
        result = gw(lab, *args, input=stdin, env=env)
        assert result.returncode == 4, result.stderr
        assert "pip install 'gatewayd[fido2]'" in result.stderr
        assert "Traceback" not in result.stderr
    # A gateway host without it: the config is still valid (TOTP covers the step), with a word.
    # (Without the homeoffice mode, whose smartcard PKI files this lab does not have.)
    vendor_only = lab.config.with_name("vendor-only.toml")
    text = lab.config.read_text()
    vendor_only.write_text(re.sub(r"\[modes\.homeoffice\]\n(?:(?!\[).*\n)*", "", text))
    check = subprocess.run(
        [str(BIN / "gatewayd"), "check-config", "--config", str(vendor_only)],
        capture_output=True,
        text=True,
        env={**lab.env(), **env},
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert "warning: modes access, support accept security keys" in check.stderr
    assert "pip install 'gatewayd[fido2]'" in check.stderr


def test_device_errors_exit_4_and_refusals_exit_1() -> None:
    from cli.common import Failure, execute

    async def raises(exc: Exception) -> None:
        raise exc

    for exc, code in (
        (DeviceError("no security key found"), 4),
        (AuthError("wrong PIN for the security key"), 1),
        (RemoteError("auth_failed", "authentication failed"), 1),
    ):
        with pytest.raises(Failure) as caught:
            execute(raises(exc))
        assert caught.value.exit_code == code
