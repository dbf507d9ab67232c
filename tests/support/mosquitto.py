"""A real Mosquitto MQTT broker on a free loopback port, in a folder of its own.

:class:`Mosquitto` starts the Debian package's ``mosquitto`` with a config written
into the folder (anonymous access on 127.0.0.1 only, nothing kept on disk), and can
be stopped and started again on the same port (the cluster tests' broker outage).
The ``mosquitto`` fixture gives one per test module.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.demo import free_port

BINARY = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Mosquitto:
    """``tls``: (CA, certificate, key) PEM files for a TLS listener; ``users``: name ->
    password (then anonymous clients are refused)."""

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        *,
        tls: tuple[Path, Path, Path] | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "mosquitto.conf"
        self.log = root / "mosquitto.log"
        extra = ""
        if tls is not None:
            ca, cert, key = tls
            extra += f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        if users:
            passwords = root / "passwords"
            passwords.write_text("")
            for name, secret in users.items():
                tool = shutil.which("mosquitto_passwd") or "mosquitto_passwd"
                subprocess.run(
                    [tool, "-b", str(passwords), name, secret],
                    check=True,
                    capture_output=True,
                )
            extra += f"password_file {passwords}\n"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + extra
            + f"allow_anonymous {'false' if users else 'true'}\n"
            "persistence false\n"
            # Started as root (CI), mosquitto would switch to a user "mosquitto": stay.
            f"user {getpass.getuser()}\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [BINARY, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("mosquitto did not listen in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    if not Path(BINARY).exists():
        pytest.skip("mosquitto is not installed (Debian package mosquitto; make test installs it)")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
