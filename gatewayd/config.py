"""gatewayd configuration: TOML into frozen dataclasses, validated without side effects.

:func:`parse` turns a TOML document into a :class:`Config` or raises
:class:`ConfigError` naming the key path at fault. It opens no file but the
config itself, binds nothing, loads no key: that is the daemon's job at start-up
(``gatewayd.server``). Relative paths are resolved against the config file's
folder. Secrets are always file paths, never values in the config.

See ``config.example.toml`` for every key with its default.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from relay.errors import ConfigError
from relay.message import MODES, valid_id

#: Where ``gatewayd``, ``gw admin`` and ``gw audit`` look when no ``--config`` is given
#: (the systemd unit's place), unless ``GATEWAYD_CONFIG`` names another file.
DEFAULT_PATH = Path("/etc/gatewayd/gatewayd.toml")
ENV_VAR = "GATEWAYD_CONFIG"


def default_path(given: Path | None = None) -> Path:
    """The config file to read: ``given`` (``--config``), else ``$GATEWAYD_CONFIG``, else
    :data:`DEFAULT_PATH`."""
    if given is not None:
        return given
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


@dataclass(frozen=True, slots=True)
class GatewaySection:
    listen: tuple[str, int]
    """Address and port of the gateway's TLS port (``HOST:PORT``, ``[::]:PORT``)."""
    node_id: str = "gw1"
    """Name of this node in audit records and in a cluster."""
    handshake_timeout: float = 10.0
    """Seconds a new connection has to finish its TLS and protocol handshake (a wait for
    a handshake slot counts)."""
    reuse_port: bool = False
    """Bind with SO_REUSEPORT, so that several gatewayd workers share the port. Only for
    workers that each have their own ``[store]`` and ``[audit]`` (one process holds each);
    off by default, so that a second gatewayd started by mistake cannot take connections."""
    max_handshakes: int = 64
    """TLS handshakes in progress at once; further connections wait (unread) for a slot."""
    max_handshakes_per_source: int = 8
    """Of those, at most this many from one source (IPv4 address, IPv6 /64); its further
    connections wait in their own queue, so stalled peers of one source cannot hold them all."""


@dataclass(frozen=True, slots=True)
class TLSSection:
    cert_file: Path
    """The gateway's server certificate chain (PEM)."""
    key_file: Path
    """Its private key (PEM)."""
    ca_file: Path
    """The gateway CA: issues agent certificates; clients pin it with --ca-file."""
    ca_key_file: Path
    """The CA's private key, used to sign agent certificates at enrollment."""


@dataclass(frozen=True, slots=True)
class StoreSection:
    path: Path
    """SQLite database of the directory (WAL mode)."""
    secrets_key_file: Path
    """32-byte key that encrypts factor secrets (TOTP seeds) in the database."""


@dataclass(frozen=True, slots=True)
class AuditSection:
    path: Path
    """Audit log, one JSON object per line (``docs/audit.md``)."""
    fsync: bool = True
    """fsync before a session or tunnel starts (group commit). Off only for tests."""
    key_file: Path | None = None
    """Ed25519 key that signs checkpoints; default ``audit.key`` beside ``[store] path``
    (made by ``gatewayd init`` or at the first start)."""
    checkpoint_every: int = 1000
    """A signed ``audit.checkpoint`` at least every this many records..."""
    checkpoint_seconds: float = 60.0
    """...and this many seconds after a record."""
    rotate_bytes: int = 64 * 1024 * 1024
    """A new file once the live one has reached this size..."""
    rotate_daily: bool = True
    """...and at the first record of each UTC day."""
    compress: bool = True
    """gzip rotated files."""
    retention_days: float = 730.0
    """Rotated files older than this are deleted (two years: the health norm's expectation)."""


@dataclass(frozen=True, slots=True)
class AdminSection:
    socket: Path
    """Unix socket of ``gw admin``; mode 0660."""
    allowed_uids: tuple[int, ...] = ()
    """Users besides root and the daemon's own user that may administer."""
    allowed_groups: tuple[str, ...] = ()
    """Groups whose members may administer."""


@dataclass(frozen=True, slots=True)
class LimitsSection:
    auth_per_minute: int = 30
    """Login attempts per source address per minute before ``rate_limited`` (IPv6
    sources are counted per /64)."""
    dial_timeout: float = 10.0
    """Seconds the agent has to answer a dial request with its data connection."""
    max_tunnels_per_session: int = 64
    """Concurrent tunnels one session may hold."""
    auth_per_user_per_minute: int = 20
    """Login attempts per user name per minute, from all sources together."""


@dataclass(frozen=True, slots=True)
class LockoutSection:
    threshold: int = 5
    """Consecutive failed logins before the account locks."""
    base_seconds: float = 60.0
    """First lock length; each further failure doubles it."""
    max_seconds: float = 3600.0
    """Longest lock."""
    decay_seconds: float = 86400.0
    """Each full period of this many seconds without a failure forgives one failure."""
    hard_limit: int = 100
    """Consecutive failures after which the account stays locked until
    ``gw admin user unlock`` (NIST SP 800-63B section 5.2.2: at most 100)."""


@dataclass(frozen=True, slots=True)
class EnrollmentSection:
    token_ttl: float = 86400.0
    """Seconds an agent enrollment token stays valid."""
    cert_days: int = 365
    """Validity of agent certificates."""


@dataclass(frozen=True, slots=True)
class ModeSection:
    factors: tuple[tuple[str, ...], ...]
    """Steps of authentication; each step is one factor or a choice of factors."""
    max_session: float = 12 * 3600.0
    """Longest session in seconds (NIST SP 800-63B AAL2: 12 hours)."""
    idle_timeout: float = 30 * 60.0
    """Session ends after this many seconds without tunnel traffic (AAL2: 30 minutes)."""
    end_on_card_removal: bool = True
    """When a smartcard proved the login, ``gw connect`` ends the session once the card
    leaves its reader (audited as ``session.end``, reason ``client: card removed``)."""
    card_heartbeat: float = 5.0
    """With ``end_on_card_removal``, when a smartcard proved the login: seconds between
    the client's ``card_present`` messages (sent while it sees the card in its reader)."""
    card_heartbeat_timeout: float = 15.0
    """The gateway ends such a session when no ``card_present`` arrived for this long
    (audited as ``session.end``, reason ``card heartbeat stopped``); a client that stops
    watching the card cannot keep the session."""
    require_reason: bool = True
    """``gw connect --reason`` is required (default for access and support)."""
    approval_timeout: float = 120.0
    """Seconds the person at the machine has to approve; no answer is a denial (max 600)."""
    login_lifetime: float = 12 * 3600.0
    """Longest life of a ``gw login`` credential, used or not (NIST SP 800-63B AAL2: 12 h)."""
    login_idle_timeout: float = 30 * 60.0
    """A ``gw login`` credential ends after this many seconds without use: no login with
    it and no traffic in a session it opened (AAL2: 30 minutes)."""


@dataclass(frozen=True, slots=True)
class E2ESection:
    require_hybrid: bool = False
    """Refuse sessions and tunnels to agents without an ML-KEM-768 key (enrolled before
    the hybrid handshake): every tunnel then runs X25519 + ML-KEM-768."""


@dataclass(frozen=True, slots=True)
class ClusterSection:
    """``[cluster]``: this gatewayd is one of several equal nodes joined by an MQTT broker
    (``docs/cluster.md``). Without the table the daemon is alone: SQLite, no bus."""

    node_id: str
    """This node's name on the bus and in its audit records (``[gateway] node_id`` is
    taken from here; with ``--workers N`` each worker is ``NODE_ID-1`` ... ``NODE_ID-N``)."""
    mqtt: tuple[str, int]
    """The MQTT broker, ``HOST:PORT`` (MQTT 3.1.1 or 5: Mosquitto, EMQX...)."""
    data_address: tuple[str, int]
    """Where agents held by other nodes dial their data connections for this node's
    clients (``HOST:PORT`` of this node's TLS port as agents reach it); default the
    ``data_listen`` or ``[gateway] listen`` address when that is not a wildcard."""
    data_listen: tuple[str, int] | None = None
    """A second TLS listener of this node alone, for data connections (needed with
    ``--workers``: the shared port could hand an agent's data connection to another
    worker). With ``--workers N`` worker ``i`` adds ``i - 1`` to this port and to
    ``data_address``'s."""
    mqtt_version: str = "5"
    """``"5"`` or ``"3.1.1"``."""
    mqtt_ca_file: Path | None = None
    """CA certificates (PEM) of the MQTT broker's server certificate: TLS when set."""
    mqtt_cert_file: Path | None = None
    """This node's client certificate for the broker (PEM, with ``mqtt_key_file``)."""
    mqtt_key_file: Path | None = None
    """Its private key (PEM)."""
    mqtt_username: str | None = None
    """User name on the broker."""
    mqtt_password_file: Path | None = None
    """A file whose first line is the broker password (needs ``mqtt_username``)."""
    reply_timeout: float = 2.0
    """Seconds a node waits for another node to answer over the bus (a dial request,
    a kill) before telling the client or admin that node did not answer."""

    def files(self) -> tuple[Path, ...]:
        """The files the section names (``gatewayd check-config`` looks for them)."""
        named = (self.mqtt_ca_file, self.mqtt_cert_file, self.mqtt_key_file)
        return tuple(p for p in (*named, self.mqtt_password_file) if p is not None)

    database: str | None = None
    """The directory on PostgreSQL shared by every node, a libpq URI
    (``postgresql://gatewayd@db.example.org/gatewayd?sslmode=verify-full``); its
    password from ``~/.pgpass`` or ``passfile=`` in the URI, never in this file. None:
    the SQLite ``[store] path``, which only nodes on one host can share."""


@dataclass(frozen=True, slots=True)
class MetricsSection:
    enabled: bool = False
    """Serve Prometheus metrics, ``/healthz`` and ``/readyz`` on ``listen`` (plain HTTP:
    keep it on loopback or a management network)."""
    listen: tuple[str, int] = ("127.0.0.1", 9464)
    """Address and port of the metrics listener (Prometheus' registered port for it)."""
    cert_days: float = 14.0
    """``/readyz`` fails when the server certificate expires within this many days."""


DEFAULT_FACTORS = (("password",), ("totp",))


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    gateway: GatewaySection
    tls: TLSSection
    store: StoreSection
    audit: AuditSection
    admin: AdminSection
    limits: LimitsSection = field(default_factory=LimitsSection)
    lockout: LockoutSection = field(default_factory=LockoutSection)
    enrollment: EnrollmentSection = field(default_factory=EnrollmentSection)
    e2e: E2ESection = field(default_factory=E2ESection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    cluster: ClusterSection | None = None
    """``[cluster]``; None: a node alone."""
    modes: Mapping[str, ModeSection] = field(default_factory=dict)
    auth: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per-factor settings tables (``[auth.totp]``, ``[auth.smartcard]``...)."""

    def mode(self, name: str) -> ModeSection:
        return self.modes.get(name) or ModeSection(
            DEFAULT_FACTORS, require_reason=name != "homeoffice"
        )


class ConfigHolder:
    """The config in force, one for every part of the daemon.

    The broker, the admin server and FIDO2 registration read ``current`` each time
    they need a setting, so that SIGHUP, which replaces it here, reaches them all at
    once (token lifetime, TOTP issuer, FIDO2 relying party...).
    """

    __slots__ = ("current",)

    def __init__(self, config: Config) -> None:
        self.current = config


# -- parsing ------------------------------------------------------------------------


class ConfigProblems(ConfigError):
    """Every problem :func:`parse` found in one document, in the document's order of
    tables; ``key`` is the first problem's, the message lists them all on one line."""

    def __init__(self, problems: list[ConfigError], text: str) -> None:
        first = problems[0]
        super().__init__(first.key, str(first).removeprefix(f"{first.key}: "))
        self.problems = problems
        #: The line of the document that each problem's key is on (None: not there).
        self.lines = [key_line(text, p.key) for p in problems]
        self.args = ("; ".join(str(p) for p in problems),)  # one line (a reload record)


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+?)\s*=")


def key_line(text: str, key: str) -> int | None:
    """The 1-based line that sets ``key`` (``table.sub.name``), else its table's header."""
    if not key:
        return None
    wanted = key.split("[")[0]
    table, header_line = "", None
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            table = header.group(1).replace('"', "").replace(" ", "")
            if header_line is None and wanted.startswith(table):
                header_line = number if wanted == table or wanted.startswith(f"{table}.") else None
            continue
        assign = _ASSIGN.match(line)
        if assign:
            name = assign.group(1).replace('"', "").replace("'", "")
            if (f"{table}.{name}" if table else name) == wanted:
                return number
    return header_line


def _placeholder(kind: type | tuple[type, ...]) -> Any:
    """A value of ``kind`` that stands in for a missing or wrong one while parsing goes on
    to find the other problems (the document is refused in the end)."""
    first = kind if isinstance(kind, type) else kind[0]
    return first()


class _Table:
    """Typed access to one TOML table that remembers its key path for errors.

    A problem is recorded (:meth:`problem`) and parsing goes on with the default or a
    stand-in value, so that one run reports every problem of the document.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        base: Path,
        problems: list[ConfigError] | None = None,
    ) -> None:
        self.data = data
        self.path = path
        self.base = base
        self.used: set[str] = set()
        self.problems: list[ConfigError] = [] if problems is None else problems

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def problem(self, key: str, message: str) -> None:
        self.add(ConfigError(key, message))

    def add(self, exc: ConfigError) -> None:
        """Record a problem raised elsewhere; one per key (the first says enough)."""
        if not any(p.key == exc.key for p in self.problems):
            self.problems.append(exc)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(name)
        fallback = _placeholder(kind) if default is ... else default
        if name not in self.data:
            if default is ...:
                self.problem(self.key(name), "missing")
            return fallback
        value = self.data[name]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            self.problem(self.key(name), "expected a number")
            return fallback
        if not isinstance(value, kind):
            names = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            self.problem(self.key(name), f"expected {names}, got {type(value).__name__}")
            return fallback
        return value

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        number = self.get(name, (int, float), default)
        # TOML integers have no bound; one past float's range is out of range here too.
        value = float(number) if abs(number) < 2**63 else float("inf")
        if not low <= value <= high:
            self.problem(self.key(name), f"must be between {low:g} and {high:g}")
            return float(default)
        return value

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        value: int = self.get(name, int, default)
        if not low <= value <= high:
            self.problem(self.key(name), f"must be between {low} and {high}")
            return default
        return value

    def path_(self, name: str, default: str | None = None) -> Path:
        before = len(self.problems)
        value = self.get(name, str, ... if default is None else default)
        if len(self.problems) > before:
            return Path()
        if not value:
            self.problem(self.key(name), "must not be empty")
            return Path()
        try:
            p = _expand(value, self.key(name))
        except ConfigError as exc:
            self.problems.append(exc)
            return Path()
        return p if p.is_absolute() else (self.base / p)

    def listen(self, name: str, default: str | None = None) -> tuple[str, int]:
        """``HOST:PORT`` (:func:`parse_listen`)."""
        before = len(self.problems)
        value = self.get(name, str, ... if default is None else default)
        if len(self.problems) > before:
            return ("", 0)
        try:
            return parse_listen(value, self.key(name))
        except ConfigError as exc:
            self.problems.append(exc)
            return ("", 0)

    def table(self, name: str) -> _Table:
        sub = self.get(name, dict, {})
        return _Table(sub, self.key(name), self.base, self.problems)

    def done(self) -> None:
        """Every key nobody asked for is a problem, with the nearest valid key for a typo."""
        valid = sorted(self.used)
        for name in sorted(set(self.data) - self.used):
            near = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {self.key(near[0])!r}?)" if near else ""
            self.problem(self.key(name), f"unknown key{hint}")


def parse_listen(value: str, key: str = "gateway.listen") -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` into (host, port)."""
    host, sep, port = value.rpartition(":")
    # isdigit() alone takes "²" and any number of digits, which int() then refuses.
    if not sep or not (port.isascii() and port.isdigit() and len(port) <= 5):
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    if not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    if not host:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _check_fido2(modes: Mapping[str, ModeSection], auth: Mapping[str, Any]) -> None:
    """When a mode takes a security key, ``[auth.fido2]`` must be valid (rp_id at least).

    Only the settings are checked: a gateway without python-fido2 still starts, and
    its users prove the step with the other factor (``gatewayd check-config`` warns).
    """
    used = any("fido2" in step for mode in modes.values() for step in mode.factors)
    if used or "fido2" in auth:
        from auth.fido2 import parse_settings

        parse_settings(auth.get("fido2", {}), prefix="auth.fido2")


def _factor_steps(value: Any, key: str) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, "expected a non-empty list of factor names")
    steps = []
    for i, step in enumerate(value):
        names = [step] if isinstance(step, str) else step
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{key}[{i}]", "expected a factor name or a list of names")
        steps.append(tuple(names))
    return tuple(steps)


def parse(text: str, path: Path) -> Config:
    """Validate a config document; ``path`` is where it came from (for relative paths)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path}: not valid TOML: {exc}") from exc
    root = _Table(data, "", path.parent.resolve())
    try:
        config: Config | None = _parse(root, path)
    except ConfigError as exc:  # a check that stops at its first problem
        root.add(exc)
        config = None
    if root.problems:
        raise ConfigProblems(root.problems, text)
    assert config is not None
    return config


def _parse(root: _Table, path: Path) -> Config:
    """The sections of the document; each problem is recorded in ``root.problems``."""
    g = root.table("gateway")
    gateway = GatewaySection(
        listen=g.listen("listen"),
        node_id=g.get("node_id", str, "gw1"),
        handshake_timeout=g.number("handshake_timeout", 10.0, low=1, high=300),
        max_handshakes=g.integer("max_handshakes", 64, low=1, high=100_000),
        max_handshakes_per_source=g.integer("max_handshakes_per_source", 8, low=1, high=100_000),
        reuse_port=g.get("reuse_port", bool, False),
    )
    if gateway.max_handshakes_per_source > gateway.max_handshakes:
        g.problem(
            g.key("max_handshakes_per_source"),
            f"must not exceed max_handshakes ({gateway.max_handshakes})",
        )
    g.done()

    t = root.table("tls")
    tls = TLSSection(
        t.path_("cert_file"), t.path_("key_file"), t.path_("ca_file"), t.path_("ca_key_file")
    )
    t.done()

    s = root.table("store")
    store = StoreSection(s.path_("path"), s.path_("secrets_key_file"))
    s.done()

    a = root.table("audit")
    audit = AuditSection(
        a.path_("path"),
        a.get("fsync", bool, True),
        a.path_("key_file") if "key_file" in a.data else None,
        a.integer("checkpoint_every", 1000, low=1, high=10_000_000),
        a.number("checkpoint_seconds", 60.0, low=0.01, high=86400.0),
        a.integer("rotate_bytes", 64 * 1024 * 1024, low=4096, high=2**40),
        a.get("rotate_daily", bool, True),
        a.get("compress", bool, True),
        a.number("retention_days", 730.0, low=1.0, high=36500.0),
    )
    a.done()

    ad = root.table("admin")
    uids = ad.get("allowed_uids", list, [])
    groups = ad.get("allowed_groups", list, [])
    if not all(isinstance(u, int) and not isinstance(u, bool) for u in uids):
        root.problem("admin.allowed_uids", "expected a list of numeric uids")
        uids = []
    if not all(isinstance(gr, str) for gr in groups):
        root.problem("admin.allowed_groups", "expected a list of group names")
        groups = []
    admin = AdminSection(ad.path_("socket"), tuple(uids), tuple(groups))
    ad.done()

    li = root.table("limits")
    limits = LimitsSection(
        auth_per_minute=li.integer("auth_per_minute", 30, low=1, high=100000),
        auth_per_user_per_minute=li.integer("auth_per_user_per_minute", 20, low=1, high=100000),
        dial_timeout=li.number("dial_timeout", 10.0, low=1, high=120),
        max_tunnels_per_session=li.integer("max_tunnels_per_session", 64, low=1, high=10000),
    )
    li.done()

    lo = root.table("lockout")
    lockout = LockoutSection(
        threshold=lo.integer("threshold", 5, low=1, high=1000),
        base_seconds=lo.number("base_seconds", 60.0, low=0, high=86400),
        max_seconds=lo.number("max_seconds", 3600.0, low=0, high=30 * 86400),
        decay_seconds=lo.number("decay_seconds", 86400.0, low=1, high=365 * 86400),
        hard_limit=lo.integer("hard_limit", 100, low=1, high=100),
    )
    if lockout.decay_seconds <= lockout.max_seconds:
        # Else one guess per lock period is forgiven as fast as it is counted and an
        # attacker could go on guessing for ever without reaching hard_limit.
        root.problem("lockout.decay_seconds", "must be longer than lockout.max_seconds")
    lo.done()

    en = root.table("enrollment")
    enrollment = EnrollmentSection(
        token_ttl=en.number("token_ttl", 86400.0, low=60, high=30 * 86400),
        cert_days=en.integer("cert_days", 365, low=1, high=3650),
    )
    en.done()

    ee = root.table("e2e")
    e2e = E2ESection(require_hybrid=ee.get("require_hybrid", bool, False))
    ee.done()

    me = root.table("metrics")
    metrics = MetricsSection(
        enabled=me.get("enabled", bool, False),
        listen=me.listen("listen", "127.0.0.1:9464"),
        cert_days=me.number("cert_days", 14.0, low=0, high=3650),
    )
    me.done()

    cluster = _parse_cluster(root, gateway) if "cluster" in root.data else None
    if cluster is not None:
        if "node_id" in g.data and gateway.node_id != cluster.node_id:
            raise ConfigError(
                "cluster.node_id",
                f"differs from gateway.node_id {gateway.node_id!r} (one name per node: set one)",
            )
        gateway = replace(gateway, node_id=cluster.node_id)

    from auth import registry  # late: only validation needs it

    known = set(registry.names())
    modes: dict[str, ModeSection] = {}
    mt = root.table("modes")
    for name in list(mt.data):
        if name not in MODES:
            mt.used.add(name)
            near = difflib.get_close_matches(name, MODES, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            root.problem(f"modes.{name}", f"unknown mode (known: {', '.join(MODES)}{hint})")
            continue
        m = mt.table(name)
        try:
            steps = _factor_steps(m.get("factors", list), m.key("factors"))
        except ConfigError as exc:
            root.add(exc)
            steps = DEFAULT_FACTORS
        for step in steps:
            for factor in step:
                if factor not in known:
                    near = difflib.get_close_matches(factor, sorted(known), n=1)
                    hint = f" (did you mean {near[0]!r}?)" if near else ""
                    root.problem(m.key("factors"), f"unknown factor {factor!r}{hint}")
        modes[name] = ModeSection(
            factors=steps,
            max_session=m.number("max_session", 12 * 3600.0, low=60, high=7 * 86400),
            idle_timeout=m.number("idle_timeout", 1800.0, low=10, high=86400),
            end_on_card_removal=m.get("end_on_card_removal", bool, True),
            card_heartbeat=m.number("card_heartbeat", 5.0, low=1, high=60),
            card_heartbeat_timeout=m.number("card_heartbeat_timeout", 15.0, low=2, high=600),
            require_reason=m.get("require_reason", bool, name != "homeoffice"),
            approval_timeout=m.number("approval_timeout", 120.0, low=5, high=600),
            login_lifetime=m.number("login_lifetime", 12 * 3600.0, low=60, high=7 * 86400),
            login_idle_timeout=m.number("login_idle_timeout", 1800.0, low=10, high=86400),
        )
        if modes[name].card_heartbeat_timeout < 2 * modes[name].card_heartbeat:
            root.problem(m.key("card_heartbeat_timeout"), "must be at least twice card_heartbeat")
        m.done()
    mt.done()

    au = root.table("auth")
    auth: dict[str, dict[str, Any]] = {}
    for name, table in au.data.items():
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean 'auth.{near[0]}'?)" if near else ""
            root.problem(f"auth.{name}", f"unknown factor{hint}")
            continue
        if not isinstance(table, dict):
            root.problem(f"auth.{name}", "expected a table")
            continue
        try:
            auth[name] = _resolve_paths(table, root.base, f"auth.{name}")
        except ConfigError as exc:
            root.add(exc)
    au.used.update(au.data)
    au.done()
    try:
        _check_fido2(modes, auth)
    except ConfigError as exc:
        root.add(exc)

    root.done()
    return Config(
        path=path,
        gateway=gateway,
        tls=tls,
        store=store,
        audit=audit,
        admin=admin,
        limits=limits,
        lockout=lockout,
        enrollment=enrollment,
        e2e=e2e,
        cluster=cluster,
        metrics=metrics,
        modes=modes,
        auth=auth,
    )


_WILDCARDS = ("0.0.0.0", "::", "")


def _parse_cluster(root: _Table, gateway: GatewaySection) -> ClusterSection:
    """``[cluster]``: every key checked, each error naming its key."""
    c = root.table("cluster")
    node_id = c.get("node_id", str, gateway.node_id)
    if not valid_id(node_id):
        raise ConfigError(c.key("node_id"), "letters, digits and . _ - @ only (at most 128)")
    mqtt = parse_listen(c.get("mqtt", str), c.key("mqtt"))
    data_listen = (
        parse_listen(c.get("data_listen", str), c.key("data_listen"))
        if "data_listen" in c.data
        else None
    )
    if "data_address" in c.data:
        data_address = parse_listen(c.get("data_address", str), c.key("data_address"))
        if data_address[0] in _WILDCARDS or data_address[1] == 0:
            raise ConfigError(c.key("data_address"), "must be an address agents can dial")
    else:
        own = data_listen or gateway.listen
        if own[0] in _WILDCARDS or own[1] == 0:
            raise ConfigError(
                c.key("data_address"),
                f"missing: this node listens on {own[0]}:{own[1]}; say where agents reach it",
            )
        data_address = own
    version = c.get("mqtt_version", str, "5")
    if version not in ("5", "3.1.1"):
        raise ConfigError(c.key("mqtt_version"), f'"5" or "3.1.1", not {version!r}')
    files = {
        name: c.path_(name) if name in c.data else None
        for name in ("mqtt_ca_file", "mqtt_cert_file", "mqtt_key_file", "mqtt_password_file")
    }
    if (files["mqtt_cert_file"] is None) != (files["mqtt_key_file"] is None):
        raise ConfigError(c.key("mqtt_key_file"), "mqtt_cert_file and mqtt_key_file go together")
    if files["mqtt_cert_file"] is not None and files["mqtt_ca_file"] is None:
        raise ConfigError(c.key("mqtt_ca_file"), "missing: a client certificate needs TLS")
    username = c.get("mqtt_username", str, None)
    if username == "":
        raise ConfigError(c.key("mqtt_username"), "must not be empty")
    if files["mqtt_password_file"] is not None and username is None:
        raise ConfigError(c.key("mqtt_username"), "missing: mqtt_password_file needs a user")
    section = ClusterSection(
        node_id=node_id,
        mqtt=mqtt,
        data_address=data_address,
        data_listen=data_listen,
        mqtt_version=version,
        mqtt_ca_file=files["mqtt_ca_file"],
        mqtt_cert_file=files["mqtt_cert_file"],
        mqtt_key_file=files["mqtt_key_file"],
        mqtt_username=username,
        mqtt_password_file=files["mqtt_password_file"],
        reply_timeout=c.number("reply_timeout", 2.0, low=0.1, high=60),
        database=_database(c),
    )
    c.done()
    return section


def _database(c: _Table) -> str | None:
    """``[cluster] database``: a ``postgresql://`` URI without a password in it."""
    dsn: str | None = c.get("database", str, None)
    if dsn is None:
        return None
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(c.key("database"), "expected a postgresql:// URI")
    if re.search(r"://[^/@]*:[^/@]*@|[?&]password=", dsn):
        raise ConfigError(
            c.key("database"), "no password here: use ~/.pgpass or passfile= in the URI"
        )
    return dsn


_PATH_KEYS = ("_file", "_files", "trust_anchors", "intermediates")


def _expand(value: str, key: str) -> Path:
    try:
        return Path(value).expanduser()
    except RuntimeError as exc:  # "~someone/..." where there is no such user
        raise ConfigError(key, f"cannot expand {value!r}: no such user") from exc


def _resolve_paths(table: dict[str, Any], base: Path, key: str) -> dict[str, Any]:
    """Factor tables name files by keys ending in _file(s): make those absolute."""

    def fix(value: Any, where: str) -> Any:
        if isinstance(value, str):
            p = _expand(value, where)
            return str(p if p.is_absolute() else base / p)
        if isinstance(value, list):
            return [fix(v, where) for v in value]
        return value

    return {k: fix(v, f"{key}.{k}") if k.endswith(_PATH_KEYS) else v for k, v in table.items()}


def load(path: Path) -> Config:
    """Read and validate the config file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"config {path} is not UTF-8") from exc
    return parse(text, path)


def check_factor_files(cfg: Config) -> list[str]:
    """Read the files that the settings of every factor a mode uses name (CAs, CRLs...).

    :func:`parse` opens no file but the config; this does, through each factor's
    ``check_settings`` hook, and raises :class:`ConfigError` with the key path at fault
    and the modes that need it. ``gatewayd check-config`` fails on it; the daemon logs
    it at start and on SIGHUP and keeps serving the other modes. Returns warnings:
    factor tables not filled in yet.
    """
    from auth import registry

    needed_by: dict[str, list[str]] = {}
    for name, mode in sorted(cfg.modes.items()):
        for step in mode.factors:
            for factor in step:
                needed_by.setdefault(factor, []).append(f"modes.{name}")
    warnings = []
    for factor, modes in needed_by.items():
        check = registry.get(factor).check_settings
        if check is None:
            continue
        try:
            warning = check(cfg.auth.get(factor, {}))
        except ConfigError as exc:
            text = str(exc).removeprefix(f"{exc.key}: ") if exc.key else str(exc)
            raise ConfigError(exc.key, f"{text} (needed by {', '.join(modes)})") from exc
        if warning:
            warnings.append(f"{warning} (needed by {', '.join(modes)})")
    return warnings
