"""`gatewayd check-config` reports every problem at once: key, line, what is expected,
and the nearest valid key for a typo; the default config path and GATEWAYD_CONFIG."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd import config
from gatewayd.config import ConfigProblems, key_line, parse

BIN = Path(sys.executable).parent

BROKEN = """\
[gateway]
listen = "127.0.0.1"
node_idd = "gw1"

[tls]
cert_file = 3
key_file = "tls/server.key"
ca_file = "tls/ca.pem"
ca_key_file = "tls/ca.key"

[store]
pth = "state/directory.db"
secrets_key_file = "state/secrets.key"

[audit]
path = "log/audit.jsonl"

[admin]
socket = "/run/gatewayd/admin.sock"

[limits]
auth_per_minute = 0

[lockout]
threshhold = 3

[modes.acess]
factors = ["password"]

[modes.access]
factors = ["password", "totpp"]

[metrics]
listen = "localhost"
"""

EXPECTED = [
    (2, "gateway.listen", "expected HOST:PORT, got '127.0.0.1'"),
    (3, "gateway.node_idd", "unknown key (did you mean 'gateway.node_id'?)"),
    (6, "tls.cert_file", "expected str, got int"),
    (11, "store.path", "missing"),
    (12, "store.pth", "unknown key (did you mean 'store.path'?)"),
    (22, "limits.auth_per_minute", "must be between 1 and 100000"),
    (25, "lockout.threshhold", "unknown key (did you mean 'lockout.threshold'?)"),
    (34, "metrics.listen", "expected HOST:PORT, got 'localhost'"),
    (
        27,
        "modes.acess",
        "unknown mode (known: access, support, homeoffice; did you mean 'access'?)",
    ),
    (31, "modes.access.factors", "unknown factor 'totpp' (did you mean 'totp'?)"),
]


def test_every_problem_at_once_with_its_line_and_the_nearest_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigProblems) as info:
        parse(BROKEN, tmp_path / "gatewayd.toml")
    found = [
        (line, p.key, str(p).removeprefix(f"{p.key}: "))
        for p, line in zip(info.value.problems, info.value.lines, strict=True)
    ]
    assert sorted(found) == sorted(EXPECTED)
    # The first problem is the exception's own key, as a single error used to be.
    assert info.value.key == "gateway.listen"


def test_one_problem_reads_as_it_always_did(tmp_path: Path) -> None:
    text = BROKEN.split("[limits]")[0]
    for old, new in (
        ('"127.0.0.1"', '"127.0.0.1:1"'),
        ("node_idd", "node_id"),
        ("cert_file = 3", 'cert_file = "c"'),
        ("pth =", "path ="),
    ):
        text = text.replace(old, new)
    with pytest.raises(ConfigProblems) as info:
        parse(text + "[lockout]\nthreshhold = 3\n", tmp_path / "gatewayd.toml")
    assert len(info.value.problems) == 1
    assert str(info.value) == "lockout.threshhold: unknown key (did you mean 'lockout.threshold'?)"


@pytest.mark.parametrize(
    ("key", "line"),
    [
        ("gateway.listen", 2),
        ("tls.ca_key_file", 9),
        ("modes.access.factors", 31),
        ("modes.acess", 27),
        ("admin.allowed_uids", 18),  # not set: its table's header
        ("nowhere.at_all", None),
        ("", None),
    ],
)
def test_key_line(key: str, line: int | None) -> None:
    assert key_line(BROKEN, key) == line


def test_a_valid_config_has_metrics_off_and_the_documented_default(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "config.example.toml").read_text()
    cfg = parse(text, tmp_path / "gatewayd.toml")
    assert cfg.metrics == config.MetricsSection(False, ("127.0.0.1", 9464), 14.0)


def test_the_config_path_default_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAYD_CONFIG", raising=False)
    assert config.default_path() == Path("/etc/gatewayd/gatewayd.toml")
    monkeypatch.setenv("GATEWAYD_CONFIG", "/srv/gw.toml")
    assert config.default_path() == Path("/srv/gw.toml")
    assert config.default_path(Path("given.toml")) == Path("given.toml")


def test_check_config_lists_every_problem_and_exits_4(tmp_path: Path) -> None:
    path = tmp_path / "gatewayd.toml"
    path.write_text(BROKEN)
    result = subprocess.run(
        [str(BIN / "gatewayd"), "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 4
    lines = result.stderr.strip().splitlines()
    assert f"{path}:3: gateway.node_idd: unknown key (did you mean 'gateway.node_id'?)" in lines
    assert f"{path}:12: store.pth: unknown key (did you mean 'store.path'?)" in lines
    assert lines[-1] == f"Error: config error: {len(EXPECTED)} problems in {path}"
    assert "Traceback" not in result.stderr
