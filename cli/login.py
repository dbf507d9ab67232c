"""``gw login`` and ``gw logout``: one strong login, then connections that ask nothing.

``gw login`` proves the mode's factors once and makes a new Ed25519 key that never
leaves this machine: its private half goes into a 0600 file under
``~/.config/gw/logins/`` (a 0700 folder), the gateway keeps only the public half and
the credential's id. ``gw connect`` and ``gw agents`` then prove possession of the key
(a signature over the gateway's nonce and this TLS channel) instead of asking for a
password and a code, until the credential ends: the mode's ``login_lifetime`` (12 h),
``login_idle_timeout`` without use (30 min), ``gw logout``, or
``gw admin user logout USER``. Nothing but the key proves the credential: its id
(the ``.json`` file) alone is worth nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from relay.errors import GatewayError, RemoteError

from .common import EXIT_LOCAL, EXIT_UNREACHABLE, config_home, execute, fail, info, prompt
from .profile import MODES, Resolved, client_target, profile_options

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True)
class StoredLogin:
    """A login credential this client holds for one gateway, user and mode."""

    mode: str
    credential: str
    expires: float
    idle_timeout: float
    key: Ed25519PrivateKey


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.@-]", "_", text)


class Logins:
    """The ``logins`` folder: ``<gateway>_<user>_<mode>.json`` (id, limits) and ``.key``."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or config_home() / "logins"

    def _file(self, gateway: str, user: str, mode: str, suffix: str) -> Path:
        return self.folder / f"{_safe(gateway)}_{_safe(user)}_{mode}{suffix}"

    def load(self, gateway: str, user: str, mode: str, now: float) -> StoredLogin | None:
        """The credential for these, or None (none, or ended by time: then forgotten)."""
        from relay import credential as cred

        record_file = self._file(gateway, user, mode, ".json")
        try:
            record = json.loads(record_file.read_text())
            key = cred.load_private(self._file(gateway, user, mode, ".key").read_bytes())
            stored = StoredLogin(
                mode=mode,
                credential=str(record["credential"]),
                expires=float(record["expires"]),
                idle_timeout=float(record["idle_timeout"]),
                key=key,
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            fail(f"the login in {record_file} is unreadable ({exc}); run gw logout", EXIT_LOCAL)
        if stored.expires <= now:
            self.remove(gateway, user, mode)
            return None
        return stored

    def modes(self, gateway: str, user: str) -> list[str]:
        """The modes this client holds a login for at ``gateway`` as ``user``."""
        return [m for m in MODES if self._file(gateway, user, m, ".key").exists()]

    def save(self, gateway: str, user: str, mode: str, key: Ed25519PrivateKey, issued: Any) -> Path:
        from relay import credential as cred
        from relay.platform import write_private

        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.remove(gateway, user, mode)
        key_file = self._file(gateway, user, mode, ".key")
        # 0600; on Windows a protected ACL granting this user alone.
        write_private(key_file, cred.private_bytes(key))
        record = {
            "gateway": gateway,
            "user": user,
            "mode": mode,
            "credential": issued.credential,
            "expires": issued.expires,
            "idle_timeout": issued.idle_timeout,
        }
        record_file = self._file(gateway, user, mode, ".json")
        fd = os.open(record_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record, indent=1) + "\n")
        return key_file

    def remove(self, gateway: str, user: str, mode: str) -> None:
        """Forget a credential here; without its key it can never be used again."""
        for suffix in (".key", ".json"):
            with contextlib.suppress(FileNotFoundError):
                self._file(gateway, user, mode, suffix).unlink()


def choose_mode(r: Resolved, given: str | None, logins: Logins, gateway: str, user: str) -> str:
    """``--mode``, else ``GW_MODE``, else the profile's, else the one mode logged in, else
    access."""
    mode = r.value("mode", given, required=False)
    if mode:
        if mode not in MODES:
            raise click.BadParameter(f"must be one of {', '.join(MODES)}", param_hint="--mode")
        return mode
    held = logins.modes(gateway, user)
    return held[0] if len(held) == 1 else "access"


def prove_with(provers: dict[str, Any], options: Any) -> Any:
    """The ``prove`` callback: builds each factor's prover on first use."""

    async def prove(method: str, payload: dict[str, Any], binding: bytes) -> dict[str, Any]:
        if method not in provers:
            # Looked up when the gateway asks: a login by stored credential never scans
            # the installed packages for factors (importlib.metadata).
            from auth import registry

            try:
                provers[method] = registry.get(method).prover(options)
            except GatewayError as exc:
                fail(str(exc), EXIT_LOCAL)
        result: dict[str, Any] = await provers[method].respond(payload, binding)
        return result

    return prove


def credential_prover(stored: StoredLogin | None, prove: Any) -> Any:
    """Wrap a ``prove`` callback: the gateway's ``credential`` request is answered with
    the stored key's signature, every other factor as before."""
    from relay import credential as cred

    async def answer(method: str, payload: dict[str, Any], binding: bytes) -> dict[str, Any]:
        if method == cred.METHOD:
            if stored is None:
                fail("the gateway asked for a login credential this client does not hold")
            try:
                return cred.prove(stored.key, stored.credential, payload, binding)
            except ValueError as exc:
                fail(str(exc))
        result: dict[str, Any] = await prove(method, payload, binding)
        return result

    return answer


def ended(exc: BaseException) -> bool:
    """Whether the gateway said the login credential has ended."""
    return isinstance(exc, RemoteError) and exc.code == "login_ended"


def _until(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


@click.command("login")
@profile_options
@click.option(
    "--mode",
    default=None,
    type=click.Choice(list(MODES)),
    help="Log in for this mode [env GW_MODE; profile; default access].",
)
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
@click.option("--totp", "totp_code", metavar="CODE", help="Authenticator code (else asked).")
@click.option("--fido2", "use_fido2", is_flag=True, help="Use your security key, not a code.")
@click.option("--fido2-device", metavar="NAME", default=None, help="Which security key.")
@click.option("--smartcard", "use_smartcard", is_flag=True, help="Use your PKI smartcard.")
@click.option("--reader", metavar="NAME", default=None, help="The smartcard reader.")
@click.option(
    "--pkcs11-module",
    metavar="PATH",
    envvar="GW_PKCS11_MODULE",
    default=None,
    help="The smartcard's PKCS#11 module [env GW_PKCS11_MODULE].",
)
def login_cmd(
    gateway: str | None,
    ca_file: Path | None,
    user: str | None,
    mode: str | None,
    password_stdin: bool,
    totp_code: str | None,
    use_fido2: bool,
    fido2_device: str | None,
    use_smartcard: bool,
    reader: str | None,
    pkcs11_module: str | None,
) -> None:
    """Prove your factors once; gw connect and gw agents then ask nothing until it ends."""
    from auth.base import ProverOptions
    from relay import credential as cred
    from relay import noise
    from relay.client import login

    from .common import gateway_client, read_stdin_line
    from .fido2 import choose_key

    r, gateway, ca, user = client_target(gateway, ca_file, user)
    gw = gateway_client(gateway, ca)
    where = f"{gw.host}:{gw.port}"
    logins = Logins()
    mode = r.value("mode", mode, required=False) or "access"
    password = read_stdin_line() if password_stdin else os.environ.get("GW_PASSWORD")
    values: dict[str, Any] = {"password": password, "totp": totp_code, "notify": info}
    values.update(smartcard_reader=reader, fido2_device_name=fido2_device)
    values.update(fido2_choose=choose_key, pkcs11_module=pkcs11_module, cert_label=None)
    use_fido2 = use_fido2 or fido2_device is not None
    first = ("smartcard",) if use_smartcard or reader else ()
    provers: dict[str, Any] = {}
    prove = prove_with(provers, ProverOptions(user=user, prompt=prompt, values=values))
    key = cred.new_key()

    async def go() -> Any:
        try:
            return await login(
                gw,
                user=user,
                mode=mode,
                static_private=noise.generate_keypair()[0],
                prove=prove,
                login_key=cred.public_text(key),
                factors=first + (("fido2", "totp") if use_fido2 else ("totp", "fido2")),
            )
        finally:
            for p in provers.values():
                await p.aclose()

    issued = execute(go())
    try:
        logins.save(where, user, mode, key, issued)
    except OSError as exc:
        fail(f"cannot keep the login in {logins.folder}: {exc.strerror or exc}", EXIT_LOCAL)
    info(
        f"gw: logged in as {user} at {where} for {mode} until {_until(issued.expires)} "
        f"(ends after {issued.idle_timeout / 60:.0f} min unused; gw logout ends it now)"
    )


@click.command("logout")
@profile_options
@click.option(
    "--mode",
    default=None,
    type=click.Choice(list(MODES)),
    help="Only this mode's login (default: every mode's).",
)
def logout_cmd(
    gateway: str | None, ca_file: Path | None, user: str | None, mode: str | None
) -> None:
    """End your gw login: the gateway ends the credential and the key here is deleted."""
    from relay import noise
    from relay.client import describe, logout

    from .common import gateway_client

    _r, gateway, ca, user = client_target(gateway, ca_file, user)
    gw = gateway_client(gateway, ca)
    where = f"{gw.host}:{gw.port}"
    logins = Logins()
    modes = [mode] if mode else logins.modes(where, user)
    held = [s for m in modes if (s := logins.load(where, user, m, time.time())) is not None]
    if not held:
        for m in modes:
            logins.remove(where, user, m)
        info(f"gw: not logged in as {user} at {where}")
        return
    unreachable = ""
    for stored in held:

        async def tell(stored: StoredLogin = stored) -> None:
            await logout(
                gw,
                user=user,
                mode=stored.mode,
                static_private=noise.generate_keypair()[0],
                prove=credential_prover(stored, None),
                credential=stored.credential,
            )

        try:
            execute(tell())
        except click.ClickException as exc:
            if exc.exit_code == EXIT_UNREACHABLE:
                unreachable = exc.message
        except (GatewayError, OSError) as exc:  # pragma: no cover - execute maps these
            unreachable = describe(exc)
        # The key goes in any case: without it the credential can never be used again.
        logins.remove(where, user, stored.mode)
    if unreachable:
        fail(
            f"logged out here (the key is deleted), but the gateway was not told: {unreachable}",
            EXIT_UNREACHABLE,
        )
    info(f"gw: logged out as {user} at {where}")
