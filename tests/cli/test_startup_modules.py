"""What ``gw connect`` and ``gw agent run`` load before they dial: only what they use.

Start-up time is part of opening a session (``gw connect`` start to the first echoed
byte), and every module loaded stays in the process's memory. Each command runs here
for real, in a fresh interpreter, up to its first network step; the modules it loaded
by then are read at exit. No timing: a module that comes back fails the test by name.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from gatewayd import ca

PROBE = """
import atexit, os, sys
fd = int(os.environ.pop("PROBE_FD"))
atexit.register(lambda: os.write(fd, "\\n".join(sorted(sys.modules)).encode()))
from cli.main import main
main(sys.argv[1:], prog_name="gw")
"""

#: Never needed to open a session or to serve one: other commands, other factors, the daemon.
NOT_FOR_ANY = {
    "cli.admin",
    "cli.audit",
    "cli.directory",
    "gatewayd",
    "auth.fido2",
    "auth.smartcard",
    "auth.registry",  # factors are looked up when the gateway asks for one, not before
    "importlib.metadata",  # entry points and version lookups scan every installed package
    "fido2",
    "smartcard",
    "PyKCS11",
    "qrcode",
    "sqlite3",
    "argon2",
    "cryptography.x509",  # TLS verifies in OpenSSL; x509 objects only serve enrollment
}
NOT_FOR_CONNECT = NOT_FOR_ANY | {
    "cli.agent",
    "relay.agent",
    "relay.approval",
    "relay.registration",
    "tomllib",  # there is no client profile here: nothing to parse
}
NOT_FOR_AGENT_RUN = NOT_FOR_ANY | {
    "cli.connect",
    "cli.login",
    "cli.fido2",
    "cli.card",
    "auth",
    "tomllib",  # flags only, no agent.toml: nothing to parse
}


def _ca_file(folder: Path) -> Path:
    path = folder / "ca.pem"
    path.write_bytes(ca.cert_pem(ca.make_ca("test CA")[1]))
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loaded(tmp_path: Path, args: list[str], stdin: str = "") -> tuple[int, set[str], str]:
    """Run ``gw ARGS``; its exit code, the modules it had loaded, its standard error."""
    # Not measured for coverage either: coverage itself loads sqlite3 and tomllib.
    skip = ("GW_", "GATEWAYD_", "COVERAGE_PROCESS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"))
    read, write = os.pipe()
    env["PROBE_FD"] = str(write)
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            pass_fds=(write,),
        )
        os.close(write)
        write = -1
        with os.fdopen(read, "rb") as f:
            read = -1
            names = set(f.read().decode().split())
    finally:
        for fd in (read, write):
            if fd >= 0:
                os.close(fd)
    return done.returncode, names, done.stderr


def _offenders(loaded: set[str], banned: set[str]) -> list[str]:
    return sorted(m for m in loaded if m in banned or m.partition(".")[0] in banned)


def test_gw_connect_dials_without_other_commands_factors_or_x509(tmp_path: Path) -> None:
    ca = _ca_file(tmp_path)
    port = _closed_port()
    args = [
        "connect", "pc1", "--reason", "start-up check", "--gateway", f"127.0.0.1:{port}",
        "--ca-file", str(ca), "--user", "alice", "--target", "sink", "--mode", "access",
        "-L", "127.0.0.1:0", "--password-stdin", "--totp", "123456",
    ]  # fmt: skip
    code, loaded, err = _loaded(tmp_path, args, stdin="a password\n")
    # Exit 3, "cannot be reached": the run got as far as dialling the gateway.
    assert code == 3, err
    assert "relay.client" in loaded and "relay.noise" in loaded
    assert _offenders(loaded, NOT_FOR_CONNECT) == []


def test_gw_agent_run_starts_without_client_commands_factors_or_x509(tmp_path: Path) -> None:
    state = tmp_path / "agent"
    state.mkdir()
    args = ["agent", "run", "--state-dir", str(state), "--target", "sink=127.0.0.1:9"]
    code, loaded, err = _loaded(tmp_path, args)
    # The state folder holds no enrollment: the run stops where it would connect.
    assert code != 0 and "agent" in err, err
    assert "relay.agent" in loaded
    assert _offenders(loaded, NOT_FOR_AGENT_RUN) == []


def test_gw_help_still_loads_and_lists_every_command(tmp_path: Path) -> None:
    code, loaded, err = _loaded(tmp_path, ["--help"])
    assert code == 0, err
    assert {"cli.admin", "cli.audit", "cli.connect", "cli.fido2", "cli.agent"} <= loaded
