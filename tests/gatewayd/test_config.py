"""gatewayd configuration (gatewayd/config.py): parse() validates and names the key path."""

from __future__ import annotations

from pathlib import Path

import gateway_config
import pytest

from gatewayd import config
from gatewayd.config import DEFAULT_FACTORS, Config, parse
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

#: Two of its paths absolute, to show those stay as they are.
MINIMAL = gateway_config.MINIMAL.replace(
    'ca_file = "tls/ca.pem"', 'ca_file = "/etc/gatewayd/ca.pem"'
).replace('socket = "admin.sock"', 'socket = "/run/gatewayd/admin.sock"')


@pytest.fixture
def where(tmp_path: Path) -> Path:
    """Where the config file would be; parse() only uses its folder."""
    return tmp_path / "etc" / "gatewayd.toml"


def parse_with(where: Path, extra: str = "", *, replace: dict[str, str] | None = None) -> Config:
    text = MINIMAL
    for old, new in (replace or {}).items():
        assert old in text
        text = text.replace(old, new)
    return parse(text + extra, where)


def error(where: Path, extra: str = "", **kw: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_with(where, extra, **kw)
    return info.value


# -- a valid document -----------------------------------------------------------------------------


def test_minimal_document(where: Path) -> None:
    cfg = parse_with(where)
    base = where.parent.resolve()
    assert cfg.path == where
    assert cfg.gateway == config.GatewaySection(("127.0.0.1", 8443))
    assert cfg.gateway.node_id == "gw1"
    assert cfg.gateway.handshake_timeout == 10.0
    assert cfg.gateway.reuse_port is False  # only where several workers share the port
    assert cfg.tls == config.TLSSection(
        base / "tls/server.pem",
        base / "tls/server.key",
        Path("/etc/gatewayd/ca.pem"),  # absolute paths stay as they are
        base / "tls/ca.key",
    )
    assert cfg.store == config.StoreSection(base / "state/directory.db", base / "state/secrets.key")
    assert cfg.audit == config.AuditSection(base / "log/audit.jsonl", fsync=True)
    assert cfg.admin == config.AdminSection(Path("/run/gatewayd/admin.sock"))
    assert cfg.limits == config.LimitsSection()
    assert cfg.lockout == config.LockoutSection()
    assert cfg.enrollment == config.EnrollmentSection()
    assert cfg.modes == {}
    assert cfg.auth == {}
    assert cfg.mode("access") == config.ModeSection(DEFAULT_FACTORS)


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(
    where: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = parse(MINIMAL, Path("../etc/gatewayd.toml"))
    assert cfg.store.path == (tmp_path / "etc" / "state" / "directory.db").resolve()
    assert cfg.store.path.is_absolute()


def test_home_directory_is_expanded(where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/gw")
    cfg = parse_with(where, replace={'"state/secrets.key"': '"~/secrets.key"'})
    assert cfg.store.secrets_key_file == Path("/home/gw/secrets.key")


def test_every_section(where: Path) -> None:
    cfg = parse_with(
        where,
        """
[limits]
auth_per_minute = 5
dial_timeout = 2.5
max_tunnels_per_session = 3

[lockout]
threshold = 3
base_seconds = 30
max_seconds = 600

[enrollment]
token_ttl = 3600
cert_days = 30
""",
        replace={
            'listen = "127.0.0.1:8443"': 'listen = "[::]:443"\nnode_id = "gw7"\n'
            "handshake_timeout = 20\nreuse_port = true\n"
            "max_handshakes = 32\nmax_handshakes_per_source = 4",
            '[admin]\nsocket = "/run/gatewayd/admin.sock"': '[admin]\nsocket = "admin.sock"\n'
            'allowed_uids = [1000, 1001]\nallowed_groups = ["wheel"]',
            '[audit]\npath = "log/audit.jsonl"': '[audit]\npath = "log/audit.jsonl"\nfsync = false',
        },
    )
    assert cfg.gateway == config.GatewaySection(
        listen=("::", 443),
        node_id="gw7",
        handshake_timeout=20.0,
        reuse_port=True,
        max_handshakes=32,
        max_handshakes_per_source=4,
    )
    assert cfg.admin == config.AdminSection(
        where.parent.resolve() / "admin.sock", (1000, 1001), ("wheel",)
    )
    assert cfg.audit.fsync is False
    assert cfg.limits == config.LimitsSection(5, 2.5, 3)
    assert cfg.lockout == config.LockoutSection(3, 30.0, 600.0)
    assert cfg.enrollment == config.EnrollmentSection(3600.0, 30)


def test_modes_with_alternatives(where: Path) -> None:
    cfg = parse_with(
        where,
        """
[modes.access]
factors = ["password", ["totp", "fido2"]]
max_session = 3600
idle_timeout = 600

[modes.homeoffice]
factors = ["smartcard", "password"]

[auth.fido2]
rp_id = "gateway.example.org"
""",
    )
    access = cfg.mode("access")
    assert access.factors == (("password",), ("totp", "fido2"))
    assert (access.max_session, access.idle_timeout) == (3600.0, 600.0)
    assert cfg.mode("homeoffice").factors == (("smartcard",), ("password",))
    assert cfg.mode("support").factors == DEFAULT_FACTORS


def test_auth_tables_resolve_file_keys_only(where: Path) -> None:
    cfg = parse_with(
        where,
        """
[auth.totp]
issuer = "Example"

[auth.smartcard]
trust_anchors = ["pki/root.pem", "/etc/pki/other.pem"]
intermediates = ["pki/person-ca.pem"]
crl_files = ["pki/root.crl"]
required_policy = "2.16.578.1.26.1.3.1"
""",
    )
    base = where.parent.resolve()
    assert cfg.auth["totp"] == {"issuer": "Example"}
    assert cfg.auth["smartcard"] == {
        "trust_anchors": [str(base / "pki/root.pem"), "/etc/pki/other.pem"],
        "intermediates": [str(base / "pki/person-ca.pem")],
        "crl_files": [str(base / "pki/root.crl")],
        "required_policy": "2.16.578.1.26.1.3.1",
    }


def test_example_config_is_valid() -> None:
    example = ROOT / "config.example.toml"
    cfg = config.load(example)
    assert cfg.gateway.listen == ("0.0.0.0", 8443)
    assert set(cfg.modes) == {"access", "support", "homeoffice"}


# -- errors name the key path -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ('listen = "127.0.0.1:8443"', "gateway.listen"),
        ('cert_file = "tls/server.pem"', "tls.cert_file"),
        ('ca_key_file = "tls/ca.key"', "tls.ca_key_file"),
        ('secrets_key_file = "state/secrets.key"', "store.secrets_key_file"),
        ('path = "log/audit.jsonl"', "audit.path"),
        ('socket = "/run/gatewayd/admin.sock"', "admin.socket"),
    ],
)
def test_missing_key(where: Path, section: str, key: str) -> None:
    exc = error(where, replace={section: ""})
    assert exc.key == key
    assert str(exc) == f"{key}: missing"


def test_missing_table(where: Path) -> None:
    exc = error(where, replace={'[gateway]\nlisten = "127.0.0.1:8443"': ""})
    assert exc.key == "gateway.listen"


@pytest.mark.parametrize(
    "listen",
    ["8443", "127.0.0.1", "127.0.0.1:", ":8443", "[]:8443", "host:65536", "host:http", "host:-1"],
)
def test_bad_listen(where: Path, listen: str) -> None:
    exc = error(where, replace={'"127.0.0.1:8443"': f'"{listen}"'})
    assert exc.key == "gateway.listen"
    assert "expected HOST:PORT" in str(exc)


@pytest.mark.parametrize(
    ("listen", "parsed"),
    [
        ("0.0.0.0:443", ("0.0.0.0", 443)),
        ("[::1]:8443", ("::1", 8443)),
        ("gw.example.org:0", ("gw.example.org", 0)),
    ],
)
def test_listen(listen: str, parsed: tuple[str, int]) -> None:
    assert config.parse_listen(listen) == parsed


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[limits]\nauth_per_second = 3", "limits.auth_per_second"),
        ("[lockout]\nthreshhold = 3", "lockout.threshhold"),
        ("[modes.access]\nfactors = ['password']\nmax_sessions = 60", "modes.access.max_sessions"),
        ("[other]\nx = 1", "other"),
    ],
)
def test_unknown_key(where: Path, extra: str, key: str) -> None:
    exc = error(where, extra)
    assert exc.key == key
    assert "unknown key" in str(exc)


def test_unknown_top_level_key(where: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse("colour = 'blue'\n" + MINIMAL, where)
    assert (info.value.key, str(info.value)) == ("colour", "colour: unknown key")


def test_unknown_key_in_a_required_table(where: Path) -> None:
    exc = error(where, replace={"[store]": "[store]\npassword = 'x'"})
    assert exc.key == "store.password"


def error_with(where: Path, table: str, line: str) -> ConfigError:
    """The error for ``line`` added to ``[table]`` (which MINIMAL may or may not have)."""
    header = f"[{table}]"
    if header in MINIMAL:
        return error(where, replace={header: f"{header}\n{line}"})
    return error(where, f"{header}\n{line}\n")


def test_wrong_type_of_listen(where: Path) -> None:
    exc = error(where, replace={'listen = "127.0.0.1:8443"': "listen = 8443"})
    assert (exc.key, str(exc)) == ("gateway.listen", "gateway.listen: expected str, got int")


@pytest.mark.parametrize(
    ("table", "line", "key", "message"),
    [
        ("gateway", "node_id = 1", "gateway.node_id", "expected str, got int"),
        ("gateway", 'reuse_port = "yes"', "gateway.reuse_port", "expected bool, got str"),
        ("gateway", "handshake_timeout = true", "gateway.handshake_timeout", "expected a number"),
        ("gateway", 'handshake_timeout = "10"', "gateway.handshake_timeout", "expected int or"),
        ("audit", "fsync = 1", "audit.fsync", "expected bool, got int"),
        ("admin", 'allowed_uids = ["root"]', "admin.allowed_uids", "numeric uids"),
        ("admin", "allowed_uids = [true]", "admin.allowed_uids", "numeric uids"),
        ("admin", "allowed_uids = 0", "admin.allowed_uids", "expected list, got int"),
        ("admin", "allowed_groups = [0]", "admin.allowed_groups", "group names"),
        ("limits", "auth_per_minute = 1.5", "limits.auth_per_minute", "expected int, got float"),
        ("limits", "auth_per_minute = true", "limits.auth_per_minute", "expected a number"),
        ("limits", "dial_timeout = [1]", "limits.dial_timeout", "expected int or float"),
        ("enrollment", "cert_days = 3.65e2", "enrollment.cert_days", "expected int, got float"),
        (
            "modes.access",
            "factors = ['password']\nend_on_card_removal = 1",
            "modes.access.end_on_card_removal",
            "expected bool",
        ),
    ],
)
def test_wrong_types(where: Path, table: str, line: str, key: str, message: str) -> None:
    exc = error_with(where, table, line)
    assert exc.key == key
    assert message in str(exc)


def test_table_of_wrong_type(where: Path) -> None:
    without_tls = MINIMAL[: MINIMAL.index("[tls]")] + MINIMAL[MINIMAL.index("[store]") :]
    with pytest.raises(ConfigError) as info:
        parse('tls = "tls.toml"\n' + without_tls, where)
    assert info.value.key == "tls"
    assert "expected dict, got str" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse("modes = []\n" + MINIMAL, where)
    assert info.value.key == "modes"


def test_empty_path(where: Path) -> None:
    exc = error(where, replace={'path = "state/directory.db"': 'path = ""'})
    assert (exc.key, str(exc)) == ("store.path", "store.path: must not be empty")


def test_unknown_home_directory_is_a_config_error(where: Path) -> None:
    exc = error(where, replace={'"state/secrets.key"': '"~no-such-user-gw/secrets.key"'})
    assert exc.key == "store.secrets_key_file"


def test_unknown_home_directory_in_a_factor_table(where: Path) -> None:
    exc = error(where, "[auth.smartcard]\ntrust_anchors = ['~no-such-user-gw/root.pem']\n")
    assert exc.key == "auth.smartcard.trust_anchors"


@pytest.mark.parametrize(
    ("extra", "key", "bounds"),
    [
        ("[gateway]\nhandshake_timeout = 0", "gateway.handshake_timeout", "between 1 and 300"),
        ("[gateway]\nhandshake_timeout = 301", "gateway.handshake_timeout", "between 1 and 300"),
        ("[gateway]\nhandshake_timeout = nan", "gateway.handshake_timeout", "between"),
        ("[gateway]\nhandshake_timeout = inf", "gateway.handshake_timeout", "between"),
        ("[limits]\nauth_per_minute = 0", "limits.auth_per_minute", "between 1 and 100000"),
        ("[limits]\ndial_timeout = 121", "limits.dial_timeout", "between 1 and 120"),
        ("[limits]\nmax_tunnels_per_session = 10001", "limits.max_tunnels_per_session", "10000"),
        ("[lockout]\nthreshold = 0", "lockout.threshold", "between 1 and 1000"),
        ("[lockout]\nbase_seconds = -1", "lockout.base_seconds", "between 0 and 86400"),
        ("[enrollment]\ntoken_ttl = 59", "enrollment.token_ttl", "between 60"),
        ("[enrollment]\ncert_days = 3651", "enrollment.cert_days", "between 1 and 3650"),
        (
            "[modes.access]\nfactors = ['password']\nmax_session = 59",
            "modes.access.max_session",
            "between 60",
        ),
        (
            "[modes.support]\nfactors = ['password']\nidle_timeout = 9",
            "modes.support.idle_timeout",
            "between 10",
        ),
    ],
)
def test_out_of_range(where: Path, extra: str, key: str, bounds: str) -> None:
    table, line = extra.split("\n", 1)
    exc = error_with(where, table.strip("[]"), line)
    assert exc.key == key
    assert bounds in str(exc)


def test_range_limits_are_inclusive(where: Path) -> None:
    cfg = parse_with(where, "[limits]\nauth_per_minute = 1\ndial_timeout = 120\n")
    assert (cfg.limits.auth_per_minute, cfg.limits.dial_timeout) == (1, 120.0)


def test_unknown_mode(where: Path) -> None:
    exc = error(where, "[modes.admin]\nfactors = ['password']\n")
    assert exc.key == "modes.admin"
    assert "unknown mode" in str(exc)


def test_unknown_factor(where: Path) -> None:
    exc = error(where, "[modes.access]\nfactors = ['password', 'sms']\n")
    assert exc.key == "modes.access.factors"
    assert "'sms'" in str(exc)


def test_unknown_factor_among_alternatives(where: Path) -> None:
    exc = error(where, "[modes.access]\nfactors = ['password', ['totp', 'sms']]\n")
    assert exc.key == "modes.access.factors"
    assert "'sms'" in str(exc)


@pytest.mark.parametrize(
    ("factors", "key"),
    [
        ("[]", "modes.access.factors"),
        ("'password'", "modes.access.factors"),
        ("['password', []]", "modes.access.factors[1]"),
        ("['password', 5]", "modes.access.factors[1]"),
        ("[['totp', 5]]", "modes.access.factors[0]"),
        ("[['totp', ['fido2']]]", "modes.access.factors[0]"),
    ],
)
def test_malformed_factor_steps(where: Path, factors: str, key: str) -> None:
    exc = error(where, f"[modes.access]\nfactors = {factors}\n")
    assert exc.key == key


def test_mode_without_factors(where: Path) -> None:
    exc = error(where, "[modes.access]\nmax_session = 3600\n")
    assert (exc.key, str(exc)) == ("modes.access.factors", "modes.access.factors: missing")


def test_unknown_factor_table(where: Path) -> None:
    exc = error(where, "[auth.sms]\nsender = 'x'\n")
    assert exc.key == "auth.sms"


def test_factor_settings_must_be_a_table(where: Path) -> None:
    exc = error(where, "[auth]\ntotp = 'yes'\n")
    assert exc.key == "auth.totp"


def test_invalid_toml(where: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        parse("[gateway\nlisten = 1", where)
    assert info.value.key == ""


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        config.load(tmp_path / "missing.toml")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(latin1)
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL)
    assert config.load(good).store.path == tmp_path.resolve() / "state/directory.db"
