"""The end-to-end cipher on real processes: AESGCM between new ends, ChaChaPoly otherwise.

A real ``gatewayd`` (the lying one of ``tests/support/lying_gateway.py``, honest until
asked), real ``gw agent run`` and ``gw connect``. An end with ``GW_E2E_CIPHERS=ChaChaPoly``
says exactly what an end from before the AESGCM cipher says on the wire (nothing about
ciphers), so it stands for an old agent or an old client. Then the gateway lies: it
flips the cipher the client named on its way to the agent, strips the agent's list,
or replays a client's first handshake message naming the other cipher.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_e2e_binding import PASSWORD, LyingLab, Site

from gatewayd.demo import EchoServer, Lab, Proc, wait_for

pytestmark = pytest.mark.integration

OLD = {"GW_E2E_CIPHERS": "ChaChaPoly"}
#: The last version before the AESGCM cipher: its agent and client, run from this
#: repository's history, are the old ends of the version-skew tests.
OLD_VERSION = "34575cc65eb8c29f9d9f5d89d290cc7f140d287b"
REPO = Path(__file__).resolve().parents[2]
#: ``gw`` and ``gatewayd`` from the old version's packages (first on the path).
OLD_GW = "import sys; sys.path.insert(0, {path!r}); from cli.main import main; sys.exit(main())"
OLD_GATEWAYD = (
    "import sys; sys.path.insert(0, {path!r}); from gatewayd.main import main; sys.exit(main())"
)


def _old_version(into: Path) -> Path:
    """The old version's packages, unpacked from git history (skip without history)."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", OLD_VERSION, "relay", "cli", "auth", "gatewayd"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"version {OLD_VERSION} is not in this checkout's history: {exc}")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later
            tar.extractall(into, filter="data")
        else:  # pragma: no cover - our own repository's archive
            tar.extractall(into)
    return into


class SuiteLab(LyingLab):
    """A lying lab whose next processes get ``extra_env`` too."""

    extra_env: dict[str, str] = {}

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra_env}


class SuiteSite(Site):
    lab: SuiteLab

    def stdio(self, user: str, data: str = "hi", agent: str = "pc1") -> Any:
        return self.lab.connect_stdio(
            agent, user, PASSWORD, "echo", data, "-v", "--known-agents", str(self.known(user))
        )

    def old_client(self, user: str, agent: str = "pc1") -> Any:
        self.lab.extra_env = OLD
        try:
            return self.stdio(user, agent=agent, data="old client\n")
        finally:
            self.lab.extra_env = {}

    def start(self, user: str) -> dict[str, Any]:
        (record,) = [r for r in self.lab.events("tunnel.start") if r["user"] == user]
        return record


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SuiteSite]:
    lab = SuiteLab(tmp_path_factory.mktemp("suite"))
    lab.init(extra_config="[limits]\nauth_per_minute = 5000\n")
    lab.start_gateway()
    echo = EchoServer()
    lab.admin("org", "add", "clinic", "--name", "Clinic")
    lab.admin("vendor", "add", "acme", "--name", "Acme")
    lab.agreement("acme", "clinic", "access", unattended=True)
    lab.enroll_agent("pc1", "clinic")
    lab.enroll_agent("pc-old", "clinic")
    agent = lab.start_agent("pc1", {"echo": echo.port})
    lab.extra_env = OLD
    try:
        lab.start_agent("pc-old", {"echo": echo.port})
    finally:
        lab.extra_env = {}
    try:
        yield SuiteSite(lab, echo, agent)
    finally:
        lab.close()
        echo.close()


def _old_agent_output(site: SuiteSite) -> str:
    return next(p for p in site.lab.procs if p.name == "agent-pc-old").output()


@pytest.fixture(scope="module")
def old_gw(site: SuiteSite) -> list[str]:
    """The command line of the old version's ``gw``."""
    path = _old_version(site.lab.root / "old-version")
    return ["python", "-c", OLD_GW.format(path=str(path))]


# -- the old version itself, from history -----------------------------------------------------


def test_the_old_versions_agent_and_a_new_client_run_chachapoly(
    site: SuiteSite, old_gw: list[str]
) -> None:
    site.lie()
    lab = site.lab
    lab.enroll_agent("pc-v0", "clinic")
    state = lab.root / "agent-pc-v0"
    proc = lab.start(
        "agent-pc-v0",
        *old_gw,
        "agent",
        "run",
        "--state-dir",
        str(state),
        f"--target=echo=127.0.0.1:{site.echo.port}",
    )
    wait_for(lambda: "connected" in proc.output(), 60, "the old agent to connect")
    user = site.user("acme")
    result = site.stdio(user, data="to the old version\n", agent="pc-v0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "TO THE OLD VERSION\n"
    assert "ChaCha20-Poly1305" in result.stderr
    assert site.start(user)["cipher"] == "ChaChaPoly"
    assert "tunnel open" in proc.output() and "cipher=" not in proc.output()


def test_the_old_versions_client_and_a_new_agent_run_chachapoly(
    site: SuiteSite, old_gw: list[str]
) -> None:
    site.lie()
    lab = site.lab
    user = site.user("acme")
    args = lab.connect_args(
        "pc1", user, "echo", "access", "--stdio", "--password-stdin", "--totp", lab.totp(user),
        "-v", "--known-agents", str(site.known(user)),
    )  # fmt: skip
    result = lab.run(*old_gw, *args[1:], input=f"{PASSWORD}\nfrom the old version\n", check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "FROM THE OLD VERSION\n"
    assert site.start(user)["cipher"] == "ChaChaPoly"
    wait_for(lambda: "cipher=ChaChaPoly" in site.agent.output(), 60, "the agent's tunnel line")


# -- the combinations -------------------------------------------------------------------------


def test_a_new_client_and_a_new_agent_run_aesgcm_in_the_hybrid_handshake(site: SuiteSite) -> None:
    site.lie()
    user = site.user("acme")
    result = site.stdio(user, data="patient record\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "PATIENT RECORD\n"
    assert "end-to-end encrypted (X25519 + ML-KEM-768, AES-256-GCM)" in result.stderr
    start = site.start(user)
    assert start["cipher"] == "AESGCM" and start["e2e"] == "hybrid"
    assert "cipher=AESGCM" in site.agent.output()


def test_a_new_client_and_an_old_agent_run_chachapoly(site: SuiteSite) -> None:
    site.lie()
    user = site.user("acme")
    result = site.stdio(user, data="to the old agent\n", agent="pc-old")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "TO THE OLD AGENT\n"
    assert "ChaCha20-Poly1305" in result.stderr
    assert site.start(user)["cipher"] == "ChaChaPoly"
    assert "cipher=ChaChaPoly" in _old_agent_output(site)


def test_an_old_client_and_a_new_agent_run_chachapoly(site: SuiteSite) -> None:
    site.lie()
    user = site.user("acme")
    result = site.old_client(user)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "OLD CLIENT\n"
    assert "ChaCha20-Poly1305" in result.stderr
    assert site.start(user)["cipher"] == "ChaChaPoly"


# -- a lying gateway ----------------------------------------------------------------------------


def test_a_gateway_that_flips_the_cipher_gets_no_tunnel(site: SuiteSite) -> None:
    site.lie("cipher-flip")
    user = site.user("acme")
    result = site.stdio(user, data="secret\n")
    assert result.returncode != 0
    assert result.stdout == ""
    (flip,) = [a for a in site.attacks() if a["attack"] == "cipher-flip"]
    assert (flip["named"], flip["told"]) == ("AESGCM", "ChaChaPoly")
    wait_for(lambda: "decryption failed" in site.agent.output(), 60, "the agent's refusal")
    # The record says what the client named: the only cipher the agent would answer.
    assert site.start(user)["cipher"] == "AESGCM"


def test_a_gateway_that_strips_the_agents_ciphers_gets_chachapoly(site: SuiteSite) -> None:
    site.lie("cipher-strip")
    user = site.user("acme")
    result = site.stdio(user, data="still private\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "STILL PRIVATE\n"
    assert "ChaCha20-Poly1305" in result.stderr
    assert site.start(user)["cipher"] == "ChaChaPoly"
    assert [a["attack"] for a in site.attacks()] == ["cipher-strip"]


def test_a_first_message_replayed_under_the_other_cipher_is_refused(site: SuiteSite) -> None:
    site.lie("cipher-replay")
    user = site.user("acme")
    result = site.stdio(user, data="relayed\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "RELAYED\n"
    wait_for(
        lambda: any(a["attack"] == "cipher-replay" for a in site.attacks()),
        60,
        "the attacker's replay",
    )
    (replay,) = [a for a in site.attacks() if a["attack"] == "cipher-replay"]
    assert replay["cipher"] == "ChaChaPoly"
    assert replay["outcome"].startswith("refused"), replay
    assert "replayed first handshake message" in site.agent.output()


class OldSiteLab(Lab):
    """Everything of the old version (gatewayd, gw admin, gw agent) but ``gw connect``."""

    old: Path
    #: ``gw`` subcommands run by the old version (``agent`` too unless an agent was
    #: upgraded before its gateway).
    old_commands: tuple[str, ...] = ("admin", "agent")

    def _old(self, args: tuple[str, ...]) -> tuple[str, ...]:
        if args[0] == "gatewayd":
            return ("python", "-c", OLD_GATEWAYD.format(path=str(self.old)), *args[1:])
        if args[0] == "gw" and args[1] in self.old_commands:
            return ("python", "-c", OLD_GW.format(path=str(self.old)), *args[1:])
        return args

    def run(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return super().run(*self._old(args), **kwargs)

    def start(self, name: str, *args: str, **kwargs: Any) -> Proc:
        return super().start(name, *self._old(args), **kwargs)


def _through_old_gateway(
    tmp_path: Path, old_commands: tuple[str, ...], data: str
) -> tuple[subprocess.CompletedProcess[str], str]:
    """A tunnel from today's ``gw connect`` through the old version's gatewayd to an agent
    run by ``old_commands``' version: the client's result and the agent's output."""
    lab = OldSiteLab(tmp_path / "os")  # short: agents keep a Unix socket in it
    lab.old = _old_version(tmp_path / "old-version")
    lab.old_commands = old_commands
    echo = EchoServer()
    try:
        lab.init(extra_config="[limits]\nauth_per_minute = 5000\n")
        lab.start_gateway()
        lab.admin("org", "add", "clinic", "--name", "Clinic")
        lab.admin("vendor", "add", "acme", "--name", "Acme")
        lab.agreement("acme", "clinic", "access", unattended=True)
        lab.enroll_agent("pc1", "clinic")
        agent = lab.start_agent("pc1", {"echo": echo.port})
        lab.vendor_user("carol-acme", "acme", PASSWORD)
        result = lab.connect_stdio("pc1", "carol-acme", PASSWORD, "echo", data, "-v")
        return result, agent.output()
    finally:
        lab.close()
        echo.close()


def test_a_new_client_with_the_old_versions_gateway_and_agent_runs_chachapoly(
    tmp_path: Path,
) -> None:
    # The client says its ciphers at login; the old gateway refuses the member, and the
    # client logs in once more without it (nothing was asked yet: no code is spent).
    result, agent = _through_old_gateway(tmp_path, ("admin", "agent"), "new client\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "NEW CLIENT\n"
    assert "ChaCha20-Poly1305" in result.stderr
    assert "tunnel open" in agent


def test_an_agent_upgraded_before_its_gateway_comes_online_and_runs_chachapoly(
    tmp_path: Path,
) -> None:
    # The new agent says its ciphers in its hello; the old gateway refuses the member.
    # The agent says its hello once more without it instead of being refused for ever.
    result, agent = _through_old_gateway(tmp_path, ("admin",), "new agent\n")
    assert result.returncode == 0, result.stderr + agent
    assert result.stdout == "NEW AGENT\n"
    assert "ChaCha20-Poly1305" in result.stderr
    assert "the gateway does not take the agent's ciphers" in agent
