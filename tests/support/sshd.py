"""A real OpenSSH server on loopback for the integration tests (Debian's openssh-server)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.demo import free_port, wait_for

SSHD = Path("/usr/sbin/sshd")


class Sshd:
    """sshd with its own host key and one authorized client key, in ``root``."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.host_key = root / "host_ed25519"
        self.client_key = root / "client_ed25519"
        for key in (self.host_key, self.client_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
        (root / "authorized_keys").write_bytes((root / "client_ed25519.pub").read_bytes())
        (root / "authorized_keys").chmod(0o600)
        self.port = free_port()
        config = root / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "MaxStartups 100\nLogLevel ERROR\n"
        )
        if os.geteuid() == 0:
            # sshd running as root insists on its privilege separation directory.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.log = root / "sshd.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config), "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        wait_for(self._listening, 20, "sshd to listen")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {self.log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module", name="sshd")
def sshd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """One sshd for a test module; skipped where OpenSSH is not installed."""
    if not SSHD.exists() or shutil.which("ssh") is None:
        pytest.skip("OpenSSH server and client are installed by `make system-deps`")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.close()
