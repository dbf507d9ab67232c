"""SoftHSM2 tokens holding test person certificates, for ``gw connect --pkcs11-module``.

SoftHSM2 (Debian ``softhsm2``) is a real PKCS#11 module that keeps its tokens in a
directory named by the file ``SOFTHSM2_CONF`` points at; every :class:`SoftHSM` has a
directory and config of its own, so a test's ``gw`` process sees exactly the tokens the
test made (pass :attr:`SoftHSM.env` to it). Objects are written with OpenSC's
``pkcs11-tool`` through the same module, as an administrator would.

What SoftHSM2 cannot show: it never locks a PIN (a wrong PIN only sets the
"count low" flag), and it has no reader a card leaves. Deleting a token
(:meth:`SoftHSM.remove`) is its removal: the module then fails on that slot.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pki
from cryptography.hazmat.primitives import serialization

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SO_PIN = "12345678"


def available() -> bool:
    return Path(MODULE).exists() and shutil.which("pkcs11-tool") is not None


class SoftHSM:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        tokens = directory / "tokens"
        tokens.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        self.env = {"SOFTHSM2_CONF": str(self.conf)}

    def _run(self, *args: str) -> str:
        result = subprocess.run(
            list(args), env=self.env | _path(), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise AssertionError(f"{args[0]} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def token(self, label: str, pin: str) -> None:
        """A new, empty token with user PIN ``pin``."""
        self._run(
            "softhsm2-util", "--init-token", "--free", "--label", label,
            "--pin", pin, "--so-pin", SO_PIN,
        )  # fmt: skip

    def put(
        self,
        token: str,
        pin: str,
        issued: pki.Issued,
        *,
        label: str,
        key_id: str,
        allowed: str | None = None,
        with_key: bool = True,
        cert: bool = True,
    ) -> None:
        """Write ``issued``'s certificate (``cert``) and private key (``with_key``) under
        ``key_id`` (hex) and ``label``; ``allowed`` limits the key's mechanisms
        (``RSA-PKCS-PSS``)."""
        if cert:
            path = self.dir / f"{token}-{key_id}.crt"
            path.write_bytes(issued.der)
            self._write(token, pin, path, "cert", label, key_id)
        if with_key:
            key = self.dir / f"{token}-{key_id}.key"
            key.write_bytes(
                issued.key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            extra = ["--allowed-mechanisms", allowed] if allowed else []
            self._write(token, pin, key, "privkey", label, key_id, *extra)
            key.unlink()

    def _write(
        self, token: str, pin: str, path: Path, kind: str, label: str, key_id: str, *extra: str
    ) -> None:
        self._run(
            "pkcs11-tool", "--module", MODULE, "--token-label", token, "--login", "--pin", pin,
            "--write-object", str(path), "--type", kind, "--id", key_id, "--label", label,
            *extra,
        )  # fmt: skip

    def remove(self, token: str) -> None:
        """Delete the token (as if the card left its reader)."""
        self._run("softhsm2-util", "--delete-token", "--token", token)


def _path() -> dict[str, str]:
    import os

    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
