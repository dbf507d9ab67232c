"""No POSIX-only module at import time in the client's and the agent's modules.

A fresh interpreter on this machine is made to look like Windows to an importer:
``pwd``, ``grp``, ``fcntl``, ``termios``, ``uvloop`` cannot be imported and the
socket module has no ``AF_UNIX`` and no ``SO_PEERCRED``. Every module of relay/,
auth/ and cli/ must still import, and ``gw agent --help`` must still run (gw's
admin and audit commands import gatewayd modules when they run; those are the
gateway operator's, on Linux).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

POISON = textwrap.dedent(
    """
    import importlib, pkgutil, socket, sys
    for name in ("pwd", "grp", "fcntl", "termios", "uvloop"):
        sys.modules[name] = None  # import raises ImportError
    saved = {a: getattr(socket, a) for a in ("AF_UNIX", "SO_PEERCRED") if hasattr(socket, a)}
    for attr in saved:
        delattr(socket, attr)
    imported = []
    for package in ("relay", "auth", "cli"):
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__, package + "."):
            importlib.import_module(info.name)
            imported.append(info.name)
    print(" ".join(imported))
    """
)


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_client_and_agent_modules_import_without_posix_modules() -> None:
    result = _python(POISON)
    assert result.returncode == 0, result.stderr
    imported = set(result.stdout.split())
    for name in ("relay.agent", "relay.client", "relay.approval", "relay.tls", "cli.main"):
        assert name in imported
    assert {"auth.password", "auth.totp", "auth.fido2", "auth.smartcard"} <= imported


def test_gw_runs_without_posix_modules_on_the_plain_asyncio_loop() -> None:
    code = POISON + textwrap.dedent(
        """
        import asyncio
        from relay.aio import run

        for attr, value in saved.items():  # this loop's own wake-up pipe is a socketpair
            setattr(socket, attr, value)

        async def loop_kind():
            return type(asyncio.get_running_loop()).__module__

        print("LOOP", run(loop_kind()))
        from cli.main import main
        sys.argv = ["gw", "agent", "--help"]
        main()
        """
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "LOOP asyncio." in result.stdout
    assert "approvals" in result.stdout and "run" in result.stdout
