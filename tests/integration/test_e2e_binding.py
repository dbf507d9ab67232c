"""End to end at first contact: a gateway that lies about keys gets no tunnel.

The gateway here is ``tests/support/lying_gateway.py``: the real daemon with a broker
that swaps end-to-end keys as a malicious operator would. Each test tells it which
lie to tell, runs real ``gw connect`` and ``gw agent`` processes against it, and reads
back what the attacker achieved.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.demo import EchoServer, Lab, Proc, round_trip, wait_for

pytestmark = pytest.mark.integration

PASSWORD = "binding tests pass phrase"
LYING_GATEWAY = Path(__file__).parents[1] / "support" / "lying_gateway.py"
_n = itertools.count(1)


class LyingLab(Lab):
    """A lab whose gateway is the lying one (same config, same state, same checks)."""

    @property
    def lie_file(self) -> Path:
        return self.root / "lies"

    @property
    def lie_log(self) -> Path:
        return self.root / "lies.jsonl"

    def env(self) -> dict[str, str]:
        env = super().env()
        env["GW_LIE_FILE"] = str(self.lie_file)
        env["GW_LIE_LOG"] = str(self.lie_log)
        return env

    def start_gateway(self) -> Proc:
        proc = self.start("gatewayd", "python", str(LYING_GATEWAY), "--config", str(self.config))
        sock = self.root / "gw" / "admin.sock"

        def ready() -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"lying gateway exited: {proc.output()[-2000:]}")
            return sock.exists() and self.audit_path.exists()

        wait_for(ready, 60, "the lying gateway to start")
        return proc


class Site:
    def __init__(self, lab: LyingLab, echo: EchoServer, agent: Proc) -> None:
        self.lab = lab
        self.echo = echo
        self.agent = agent

    @property
    def state_dir(self) -> Path:
        return self.lab.root / "agent-pc1"

    def lie(self, *lies: str) -> None:
        """Tell these lies from now on; forget what the attacker wrote down so far."""
        self.lab.lie_file.write_text(",".join(lies))
        self.lab.lie_log.unlink(missing_ok=True)

    def attacks(self) -> list[dict[str, Any]]:
        if not self.lab.lie_log.exists():
            return []
        return [json.loads(line) for line in self.lab.lie_log.read_text().splitlines()]

    def user(self, vendor: str) -> str:
        user = f"b{next(_n)}-{vendor}"
        self.lab.vendor_user(user, vendor, PASSWORD)
        return user

    def known(self, user: str) -> Path:
        return self.lab.root / f"known-{user}.json"

    def stdio(self, user: str, *extra: str, data: str = "hi") -> subprocess.CompletedProcess[str]:
        return self.lab.connect_stdio(
            "pc1", user, PASSWORD, "echo", data, "--known-agents", str(self.known(user)), *extra
        )

    def agent_codes(self) -> list[str]:
        """The codes the person at the machine was shown, in order."""
        path = self.lab.root / "codes"
        return path.read_text().split() if path.exists() else []

    def fingerprint(self) -> str:
        return self.lab.run("gw", "agent", "fingerprint", "--state-dir", str(self.state_dir)).stdout


def _fingerprint(key: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(key).digest()).decode().rstrip("=")


def _client_code(stderr: str) -> str:
    found = re.search(r"it must match: (\d{4}-\d{4}-\d{4})", stderr)
    assert found, stderr
    return found.group(1)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    lab = LyingLab(tmp_path_factory.mktemp("binding"))
    lab.init(extra_config="[limits]\nauth_per_minute = 5000\n")
    lab.start_gateway()
    echo = EchoServer()
    lab.admin("org", "add", "clinic", "--name", "Clinic")
    lab.admin("vendor", "add", "acme", "--name", "Acme")
    lab.admin("vendor", "add", "attended", "--name", "Attended only AS")
    lab.agreement("acme", "clinic", "access", unattended=True)
    lab.agreement("attended", "clinic", "access", unattended=False)
    lab.enroll_agent("pc1", "clinic")
    # The person at the machine approves everything, and writes down the code shown.
    codes = lab.root / "codes"
    approve = f'test "$GW_EVENT" != approve || echo "$GW_SAS" >> {codes}'
    agent = lab.start_agent("pc1", {"echo": echo.port}, "--approval-command", approve)
    try:
        yield Site(lab, echo, agent)
    finally:
        lab.close()
        echo.close()


# -- the client: the key it uses is the key its code was computed from -----------------


def test_agent_key_swapped_after_the_code_is_refused_before_a_byte(site: Site) -> None:
    site.lie("agent-key")
    user = site.user("attended")
    connections = site.echo.connections
    result = site.stdio(user, data="the secret plans\n")
    # The lie is invisible to the people comparing codes: both saw the genuine key's code.
    assert _client_code(result.stderr) == site.agent_codes()[-1]
    assert result.returncode == 3, result.stderr
    assert "not the key" in result.stderr and result.stdout == ""
    attacks = site.attacks()
    assert [a for a in attacks if a["outcome"] == "sent"], "the gateway did not lie"
    assert not [a for a in attacks if a["outcome"] in ("tunnel requested", "read", "accepted")]
    assert site.echo.connections == connections
    assert not site.known(user).exists()  # the attacker's key was not pinned


def test_a_consistent_lie_changes_the_code_and_the_agent_refuses(site: Site) -> None:
    site.lie("pending-key")
    user = site.user("attended")
    result = site.stdio(user, data="the secret plans\n")
    # Shown its own key, the client's code differs from the machine's: a person
    # comparing them refuses. Here the approval command approved without looking, and
    # still the attacker cannot reach the target: the agent refuses its client key.
    assert _client_code(result.stderr) != site.agent_codes()[-1]
    assert result.returncode != 0 and "THE SECRET PLANS" not in result.stdout
    attacks = site.attacks()
    assert not [a for a in attacks if a["outcome"] in ("read", "accepted")], attacks
    assert [a for a in attacks if a["outcome"].startswith("refused")], attacks


def test_client_key_swapped_in_the_approval_request_changes_the_code_at_the_machine(
    site: Site,
) -> None:
    site.lie("approve-key")
    user = site.user("attended")
    refused = site.agent.output().count("REFUSED a tunnel")
    result = site.stdio(user, data="the secret plans\n")
    # The machine's code comes from the key it was told, so it differs from the client's.
    assert _client_code(result.stderr) != site.agent_codes()[-1]
    # Approved without comparing, the session is bound to the attacker's key: the
    # genuine client's tunnel is refused, and nothing reaches the target.
    assert result.returncode != 0 and result.stdout == "", result.stderr
    assert site.agent.output().count("REFUSED a tunnel") == refused + 1


# -- the agent: only the client key of the approved or announced session ----------------


@pytest.mark.parametrize("vendor", ["attended", "acme"])
def test_agent_refuses_a_client_key_swapped_by_the_gateway(site: Site, vendor: str) -> None:
    site.lie("client-key")
    user = site.user(vendor)
    proc, port = site.lab.connect_local(
        "pc1", user, PASSWORD, "echo", "--known-agents", str(site.known(user))
    )
    try:
        wait_for(lambda: len(site.attacks()) >= 2, 60, "the attacker's two tries")
        by_attack = {a["attack"]: a["outcome"] for a in site.attacks()}
        assert by_attack["client-key"].startswith("refused"), by_attack
        assert by_attack["unknown-session"].startswith("refused"), by_attack
        # The genuine client of the same session is served as before.
        assert round_trip(port, b"still mine\n") == b"STILL MINE\n"
    finally:
        proc.stop()
    log = site.agent.output()
    assert "REFUSED a tunnel" in log and "unknown session" in log


# -- unattended first contact: the fingerprint, checked out of band ---------------------


def test_agent_fingerprint_is_sha256_of_the_key(site: Site) -> None:
    # One fingerprint for both keys: the X25519 key, then the ML-KEM-768 key.
    info = json.loads((site.state_dir / "agent.json").read_text())
    raw = b"".join(
        base64.urlsafe_b64decode(info[k] + "=" * (-len(info[k]) % 4))
        for k in ("noise_key", "pq_key")
    )
    assert len(raw) == 32 + 1184
    assert site.fingerprint().strip() == _fingerprint(raw)
    missing = site.lab.run(
        "gw", "agent", "fingerprint", "--state-dir", str(site.lab.root / "nope"), check=False
    )
    assert missing.returncode == 4 and len(missing.stderr.strip().splitlines()) == 1


def test_agent_key_checks_the_fingerprint(site: Site) -> None:
    site.lie()
    good = site.fingerprint().strip()
    user = site.user("acme")
    ok = site.stdio(user, "--agent-key", good)
    assert ok.returncode == 0 and ok.stdout == "HI", ok.stderr
    assert "pc1" in site.known(user).read_text()
    # A fingerprint that is not the agent's: refused before any tunnel.
    other = _fingerprint(hashlib.sha256(b"another key").digest())
    user = site.user("acme")
    connections = site.echo.connections
    bad = site.stdio(user, "--agent-key", other)
    assert bad.returncode == 3 and "does not match" in bad.stderr and bad.stdout == ""
    assert site.echo.connections == connections and not site.known(user).exists()
    # The gateway hands out its own key to a client that knows the fingerprint: refused.
    site.lie("agent-key")
    user = site.user("acme")
    lied = site.stdio(user, "--agent-key", good)
    assert lied.returncode == 3 and "does not match" in lied.stderr, lied.stderr
    assert not [a for a in site.attacks() if a["outcome"] == "tunnel requested"]
    malformed = site.stdio(site.user("acme"), "--agent-key", "MD5:abc")
    assert malformed.returncode == 2 and "SHA256:" in malformed.stderr


def test_strict_agent_key_and_known_agents(site: Site) -> None:
    site.lie()
    fp = site.fingerprint().strip()
    user = site.user("acme")
    known = site.known(user)
    strict = site.stdio(user, "--strict-agent-key")
    assert strict.returncode == 3 and "unknown agent" in strict.stderr, strict.stderr
    assert not known.exists()

    def ka(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return site.lab.run("gw", "known-agents", *args, "--known-agents", str(known), check=check)

    gateway = ["--gateway", site.lab.gateway]
    ka("add", "pc1", fp, *gateway)
    listed = ka("list").stdout
    assert f"{site.lab.gateway} pc1 {fp}" in listed
    rows = json.loads(ka("list", "--json").stdout)
    assert rows == [{"gateway": site.lab.gateway, "agent": "pc1", "fingerprint": fp}]
    user2 = site.user("acme")
    ok = site.lab.connect_stdio(
        "pc1", user2, PASSWORD, "echo", "hi", "--known-agents", str(known), "--strict-agent-key"
    )
    assert ok.returncode == 0 and ok.stdout == "HI", ok.stderr
    # A second add of another key for the same agent is refused; forget, then add.
    assert ka("add", "pc1", _fingerprint(b"x" * 32), *gateway, check=False).returncode == 1
    ka("forget", "pc1", *gateway)
    assert ka("list").stdout.strip() == ""
    gone = ka("forget", "pc1", *gateway, check=False)  # as ssh-keygen -R: not an error
    assert gone.returncode == 0 and "not found" in gone.stderr
    again = site.lab.connect_stdio(
        "pc1",
        site.user("acme"),
        PASSWORD,
        "echo",
        "hi",
        "--known-agents",
        str(known),
        "--strict-agent-key",
    )
    assert again.returncode == 3 and "unknown agent" in again.stderr
    bad = ka("add", "pc1", "not-a-fingerprint", *gateway, check=False)
    assert bad.returncode == 2 and "expected SHA256:" in bad.stderr.splitlines()[-1]


def test_pinned_key_refuses_a_gateway_that_swaps_it_later(site: Site) -> None:
    site.lie()
    user = site.user("acme")
    first = site.stdio(user)
    assert first.returncode == 0 and "pinned" in first.stderr
    site.lie("agent-key")
    user2 = site.user("acme")
    site.known(user).replace(site.known(user2))
    lied = site.stdio(user2)
    assert lied.returncode == 3 and "CHANGED" in lied.stderr, lied.stderr
    assert not [a for a in site.attacks() if a["outcome"] == "tunnel requested"]
