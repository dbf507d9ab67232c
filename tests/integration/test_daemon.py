"""gatewayd as an operator runs it: TLS policy, systemd notify, reload, key logging."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from world import PASSWORD, World

from gatewayd.demo import BIN, Lab, wait_for

pytestmark = pytest.mark.integration


def test_tls_below_1_3_is_refused(world: World) -> None:
    ctx = ssl.create_default_context(cafile=str(world.lab.ca_file))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", world.lab.port), timeout=5) as raw,
        pytest.raises(ssl.SSLError),
    ):
        ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    ctx13 = ssl.create_default_context(cafile=str(world.lab.ca_file))
    with (
        socket.create_connection(("127.0.0.1", world.lab.port), timeout=5) as raw,
        ctx13.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.3"


def test_sslkeylogfile_is_honoured_by_gw_connect(world: World, tmp_path: Path) -> None:
    keylog = tmp_path / "keys.log"
    user = world.new_user()
    lab = world.lab
    args = lab.connect_args(
        "pc1", user, "echo", "access", "--stdio", "--password-stdin", "--totp", lab.totp(user)
    )
    env = {**lab.env(), "SSLKEYLOGFILE": str(keylog)}
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        input=f"{PASSWORD}\nkeys",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = keylog.read_text().splitlines()
    # One TLS 1.3 connection for the session and one for the tunnel.
    assert sum(line.startswith("CLIENT_TRAFFIC_SECRET_0") for line in lines) >= 2


def test_systemd_notify_reload_and_stop(tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(20)
    lab = Lab(tmp_path / "lab")
    lab.init()
    env = {**lab.env(), "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "2000000"}
    log = (tmp_path / "gatewayd.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "gatewayd"), "--config", str(lab.config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**env, "WATCHDOG_PID": ""},
    )
    try:
        messages: list[str] = []

        def received(text: str) -> bool:
            while not any(text in m for m in messages):
                messages.append(listener.recv(4096).decode())
            return True

        assert received("READY=1")
        assert received("WATCHDOG=1")
        # SIGHUP with a broken config keeps the running one and says so.
        good = lab.config.read_text()
        lab.config.write_text(good + "\n[gateway.oops]\n")
        proc.send_signal(signal.SIGHUP)
        assert received("RELOADING=1")
        wait_for(lambda: bool(lab.events("gateway.reload")), 60, "reload record")
        assert lab.events("gateway.reload")[-1]["outcome"] == "failure"
        lab.config.write_text(good)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(lab.events("gateway.reload")) == 2, 60, "second reload record")
        assert lab.events("gateway.reload")[-1]["outcome"] == "success"
        proc.send_signal(signal.SIGTERM)
        assert received("STOPPING=1")
        assert proc.wait(20) == 0
        assert lab.events("gateway.stop")
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        listener.close()
        os.unlink(notify)


def test_gatewayd_refuses_a_bad_config_with_the_key(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.init(extra_config="[lockout]\nthreshold = 0\n")
    result = lab.run("gatewayd", "--config", str(lab.config), check=False)
    assert result.returncode == 4  # a config problem (docs/exit-codes.md)
    assert "lockout.threshold" in result.stderr and "Traceback" not in result.stderr
