"""A plug-in factor through real gatewayd, ``gw admin`` and ``gw connect`` processes.

The plug-in is tests/support/plugin_factor/: a module and a ``.dist-info`` folder
whose ``entry_points.txt`` registers ``pin`` in the ``gatewayd.auth_factors`` group,
found on ``PYTHONPATH`` as an installed package would be. Mode access asks for
``["password", "pin"]``. A second, broken plug-in (its module does not import) is on
the path too: the daemon keeps serving, ``check-config`` names it and what failed.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gatewayd.demo import EchoServer, Lab, wait_for

pytestmark = pytest.mark.integration

PLUGIN = Path(__file__).resolve().parents[1] / "support" / "plugin_factor"
PASSWORD = "plugin integration pass phrase"
PIN = "482913"


@dataclass
class PluginLab(Lab):
    """A lab whose processes find the plug-ins (``extra_path``) on PYTHONPATH."""

    extra_path: str = ""

    def env(self) -> dict[str, str]:
        env = super().env()
        path = [self.extra_path, env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        return env


@pytest.fixture(scope="module")
def plab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PluginLab, EchoServer]]:
    root = tmp_path_factory.mktemp("plugin")
    broken = root / "broken-plugin"
    info = broken / "gw_broken_factor-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gw-broken-factor\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[gatewayd.auth_factors]\nbrokenpin = gw_broken_factor:FACTOR\n"
    )
    (broken / "gw_broken_factor.py").write_text("import no_such_module_for_this_factor\n")
    lab = PluginLab(root / "lab", extra_path=os.pathsep.join([str(PLUGIN), str(broken)]))
    echo = EchoServer()
    try:
        lab.init()
        text = lab.config.read_text()
        access = '[modes.access]\nfactors = ["password", ["totp", "fido2"]]'
        assert access in text
        text = text.replace(access, '[modes.access]\nfactors = ["password", "pin"]')
        text += '\n[auth.pin]\nreloads_file = "pin-reloads.jsonl"\nlevel = 1\n'
        lab.config.write_text(text)
        lab.start_gateway()
        lab.admin("org", "add", "clinic", "--name", "Clinic")
        lab.admin("vendor", "add", "acme", "--name", "Acme")
        lab.agreement("acme", "clinic", "access", unattended=True)
        lab.enroll_agent("pc1", "clinic")
        lab.start_agent("pc1", {"echo": echo.port})
        lab.admin(
            "user", "add", "alice", "--vendor", "acme", "--password-stdin", input=PASSWORD + "\n"
        )
        yield lab, echo
    finally:
        lab.close()
        echo.close()


def _connect(lab: Lab, user: str, pin: str, data: str) -> tuple[int, str, str]:
    args = lab.connect_args(
        "pc1", user, "echo", "access", "--stdio", "--password-stdin", "--factor-value", f"pin={pin}"
    )
    result = lab.run(*args, input=f"{PASSWORD}\n{data}", check=False)
    return result.returncode, result.stdout, result.stderr


def test_enroll_through_gw_admin_and_log_in_with_the_plugin(
    plab: tuple[PluginLab, EchoServer],
) -> None:
    lab, _ = plab
    out = lab.admin("factor", "enroll", "alice", "pin", "--param", f"pin={PIN}")
    assert "alice" in out
    changes = [r for r in lab.events("admin.change") if r["op"] == "factor.enroll"]
    assert changes[-1]["user"] == "alice" and changes[-1]["factor"] == "pin"
    assert changes[-1]["params"] == ["pin"]
    assert PIN not in lab.audit_path.read_text()  # the value is never on the record

    code, stdout, stderr = _connect(lab, "alice", PIN, "through the plug-in\n")
    assert code == 0, stderr
    assert "THROUGH THE PLUG-IN" in stdout
    pins = [r for r in lab.events("auth.attempt") if r["factor"] == "pin"]
    assert pins[-1]["outcome"] == "success" and pins[-1]["user"] == "alice"


def test_wrong_plugin_value_fails_and_is_audited(plab: tuple[PluginLab, EchoServer]) -> None:
    lab, _ = plab
    lab.admin("factor", "enroll", "alice", "pin", "--param", f"pin={PIN}")
    before = len(lab.events("auth.attempt"))
    code, stdout, stderr = _connect(lab, "alice", "000000", "must not pass\n")
    assert code != 0
    assert "MUST NOT PASS" not in stdout
    assert "authentication failed" in stderr
    attempts = lab.events("auth.attempt")[before:]
    assert [(r["factor"], r["outcome"]) for r in attempts] == [
        ("password", "success"),
        ("pin", "failure"),
    ]
    assert attempts[-1]["reason"] == "wrong pin"


def test_enrollment_refuses_bad_parameters(plab: tuple[PluginLab, EchoServer]) -> None:
    lab, _ = plab
    bad = lab.run(
        "gw", "admin", "--config", str(lab.config), "factor", "enroll", "alice", "pin",
        "--param", "pin=12", check=False,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "pin: 4 to 12 digits" in bad.stderr
    unknown = lab.run(
        "gw", "admin", "--config", str(lab.config), "factor", "enroll", "alice", "nosuch",
        check=False,
    )  # fmt: skip
    assert unknown.returncode != 0
    assert "unknown auth factor 'nosuch'" in unknown.stderr
    args = lab.connect_args("pc1", "alice", "echo", "access", "--stdio")
    password = lab.run(*args, "--factor-value", "password=on-the-command-line", check=False)
    assert password.returncode == 2
    assert "the password is not taken here" in password.stderr
    generated = json.loads(lab.admin("factor", "enroll", "alice", "pin", "--json"))
    assert len(generated["pin"]) == 6  # shown once to the administrator


def test_sighup_reaches_the_plugin_and_a_broken_plugin_leaves_the_daemon_up(
    plab: tuple[PluginLab, EchoServer],
) -> None:
    lab, _ = plab
    reloads = lab.config.parent / "pin-reloads.jsonl"
    text = lab.config.read_text().replace("level = 1\n", "level = 2\n")
    # homeoffice now needs the broken plug-in: the daemon says so and serves on.
    home = '[modes.homeoffice]\nfactors = ["smartcard", "password"]'
    assert home in text
    lab.config.write_text(text.replace(home, '[modes.homeoffice]\nfactors = ["brokenpin"]'))
    gatewayd = next(p for p in lab.procs if p.name == "gatewayd")
    gatewayd.popen.send_signal(signal.SIGHUP)

    def reloaded() -> bool:
        return reloads.exists() and '"level": 2' in reloads.read_text()

    wait_for(reloaded, 60, "the plug-in's reload hook")
    settings = json.loads(reloads.read_text().splitlines()[-1])
    assert settings == {"level": 2, "reloads_file": str(reloads)}
    missing = "No module named 'no_such_module_for_this_factor'"
    wait_for(lambda: missing in gatewayd.output(), 60, "the broken plug-in's warning")
    assert gatewayd.popen.poll() is None

    lab.admin("factor", "enroll", "alice", "pin", "--param", f"pin={PIN}")
    code, stdout, stderr = _connect(lab, "alice", PIN, "after the reload\n")
    assert code == 0, stderr
    assert "AFTER THE RELOAD" in stdout

    check = lab.run("gatewayd", "check-config", "--config", str(lab.config), check=False)
    assert check.returncode == 4  # a config problem (docs/exit-codes.md)
    assert "auth factor 'brokenpin' (gw_broken_factor:FACTOR from gw-broken-factor)" in (
        check.stderr
    )
    assert "cannot be loaded" in check.stderr
    assert missing in check.stderr
