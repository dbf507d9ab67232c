"""The operator's side against a real gatewayd: metrics and health scraped over HTTP, the
operational log as the systemd journal reads it, a rollout's enrollments, the exit-code
table of docs/exit-codes.md."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from world import PASSWORD, World

from gatewayd.demo import BIN, EchoServer, Lab, free_port, wait_for
from relay.agent import enroll
from relay.errors import GatewayError

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
#: The documented fail2ban regex (docs/operations.md), <HOST> as fail2ban spells it; it
#: matches the journal's message, the line without the priority prefix journald takes.
FAIL2BAN = r"^login failed user=\S+ source=<HOST> "


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A lab whose gatewayd serves metrics and logs to 'the journal' (JOURNAL_STREAM
    names its standard error, as systemd does for a unit)."""
    root = tmp_path_factory.mktemp("ops")
    lab = Lab(root)
    port = free_port()
    lab.init(extra_config=f'[metrics]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')
    log = root / "gatewayd.log"  # Lab.start truncates it in place: same inode
    log.touch()
    st = log.stat()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        lab.start_gateway()
    echo = EchoServer()
    lab.admin("org", "add", "clinic", "--name", "Clinic")
    lab.admin("vendor", "add", "acme", "--name", "Acme")
    lab.agreement("acme", "clinic", "access", unattended=True)
    lab.enroll_agent("pc1", "clinic")
    world = World(lab, echo)
    world.agent_proc = lab.start_agent("pc1", {"echo": echo.port})
    world.metrics_port = port  # type: ignore[attr-defined]
    try:
        yield world
    finally:
        lab.close()
        echo.close()


def get(world: World, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{world.metrics_port}{path}"  # type: ignore[attr-defined]
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(world: World) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(world, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def gateway_log(world: World) -> str:
    return (world.lab.root / "gatewayd.log").read_text(errors="replace")


# -- metrics and health ------------------------------------------------------------------


def test_metrics_after_a_login_and_a_tunnel(ops: World) -> None:
    user = ops.new_user()
    code = ops.lab.totp(user)
    result = ops.lab.connect_stdio("pc1", user, PASSWORD, "echo", "metrics\n", totp=code)
    assert result.returncode == 0, result.stderr
    assert code not in gateway_log(ops)
    wrong = ops.lab.connect_stdio("pc1", user, "not the password", "echo", "x", totp="000000")
    assert wrong.returncode == 1

    def settled() -> bool:
        found = samples(ops)
        return value(found, "gatewayd_relayed_bytes_total", direction="down") > 0 and (
            value(found, "gatewayd_sessions_live") == 0
        )

    wait_for(settled, 60, "the tunnel's bytes to be counted")
    found = samples(ops)
    assert value(found, "gatewayd_agents_online") == 1
    assert value(found, "gatewayd_sessions_opened_total", mode="access") >= 1
    assert value(found, "gatewayd_tunnels_opened_total", mode="access") >= 1
    assert value(found, "gatewayd_tunnels_live") == 0
    assert value(found, "gatewayd_relayed_bytes_total", direction="up") >= len("metrics\n")
    assert value(found, "gatewayd_auth_attempts_total", factor="password", outcome="success") >= 1
    assert value(found, "gatewayd_auth_attempts_total", factor="totp", outcome="success") >= 1
    assert value(found, "gatewayd_auth_attempts_total", factor="password", outcome="failure") >= 1
    assert value(found, "gatewayd_agent_enrollments_total", outcome="success") >= 1
    assert value(found, "gatewayd_audit_write_seconds_count") > 0
    assert value(found, "gatewayd_audit_commit_seconds_count") > 0  # durable records: fsync'ed
    assert value(found, "gatewayd_audit_failed") == 0
    assert value(found, "gatewayd_lockouts_total") == 0
    build = [k for k in found if k[0] == "gatewayd_build_info"]
    assert len(build) == 1 and dict(build[0][1])["version"]
    assert get(ops, "/healthz") == (200, "ok\n")
    assert get(ops, "/readyz") == (200, "ready\n")


def _raw(world: World, data: bytes, *, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", world.metrics_port), timeout=10) as s:  # type: ignore[attr-defined]
        s.sendall(data)
        if not read:
            return b""
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_the_listener_survives_junk_and_a_silent_client(ops: World) -> None:
    silent = socket.create_connection(("127.0.0.1", ops.metrics_port), timeout=10)  # type: ignore[attr-defined]
    try:
        # A client that sends nothing holds no one up: the scrape beside it is answered.
        assert get(ops, "/healthz") == (200, "ok\n")
        assert _raw(ops, b"\x16\x03\x01\x02\x00junk\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert _raw(ops, b"GET /metrics\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert _raw(ops, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n").startswith(
            b"HTTP/1.1 400 "
        )
        assert _raw(ops, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
        assert _raw(ops, b"GET /../etc/passwd HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
        assert _raw(ops, b"GET /metrics HTTP/1.1\r\n").startswith(b"HTTP/1.1 400 ")  # cut short
    finally:
        silent.close()
    assert samples(ops)  # still serving
    assert ops.lab.procs[0].popen.poll() is None


def test_readyz_fails_while_the_certificate_expires_within_the_configured_days(
    ops: World,
) -> None:
    config = ops.lab.config
    text = config.read_text()
    gateway = ops.lab.procs[0].popen
    try:
        config.write_text(text.replace("[metrics]\n", "[metrics]\ncert_days = 3650\n", 1))
        gateway.send_signal(signal.SIGHUP)
        wait_for(lambda: get(ops, "/readyz")[0] == 503, 60, "readyz to fail")
        _, body = get(ops, "/readyz")
        assert "server certificate expires" in body and "within 3650 days" in body
        assert get(ops, "/healthz") == (200, "ok\n")  # alive all the same
    finally:
        config.write_text(text)
        gateway.send_signal(signal.SIGHUP)
    wait_for(lambda: get(ops, "/readyz")[0] == 200, 60, "readyz to pass again")
    reloads = [r for r in ops.lab.events("gateway.reload") if r["outcome"] == "success"]
    assert len(reloads) >= 2 and reloads[-1]["needs_restart"] == []
    assert value(samples(ops), "gatewayd_reloads_total", outcome="success") >= 2


# -- a rollout: many tokens, enrollments throttled only when they fail -----------------


def _enroll(world: World, *attempts: tuple[str, str]) -> list[str]:
    """Enroll (token, name) after (token, name) in one event loop, as one address does;
    each agent id, or why it was refused."""

    async def run() -> list[str]:
        out = []
        for token, name in attempts:
            state = world.lab.root / f"rollout-{name}"
            try:
                out.append(await enroll(world.lab.gateway, world.lab.ca_file, token, state))
            except GatewayError as exc:
                out.append(f"refused: {exc}")
            await asyncio.sleep(0.01)  # the closed connection's transport goes too
        return out

    return asyncio.run(run())


def test_a_rollout_of_thirty_agents_from_one_address_then_thirty_bad_tokens(ops: World) -> None:
    out = ops.lab.admin("agent", "add", "roll", "--org", "clinic", "--count", "30", "--json")
    tokens = json.loads(out)
    assert [t["agent"] for t in tokens] == [f"roll-{i:03d}" for i in range(1, 31)]
    # 30 valid enrollments within the minute from 127.0.0.1 (the limit is 30 a minute):
    # only failures count, so the 29th, 30th... all get their certificate.
    assert _enroll(ops, *((t["token"], t["agent"]) for t in tokens)) == [t["agent"] for t in tokens]
    # A guesser: 30 bad tokens are refused as unknown, the 31st attempt is throttled,
    # and so is a valid token from that address until the failures are a minute old.
    late = json.loads(ops.lab.admin("agent", "add", "late", "--org", "clinic", "--json"))["token"]
    guesses = [(f"guess-{i}", f"guess-{i}") for i in range(31)]
    *unknown, throttled, valid = _enroll(ops, *guesses, (late, "late"))
    assert all("token unknown" in r for r in unknown[:30]), unknown
    assert "too many failed enrollments" in throttled
    assert "too many failed enrollments" in valid
    records = ops.lab.events("agent.enroll")
    assert sum(r["outcome"] == "success" for r in records) == 31  # pc1 and the rollout
    assert any(r.get("reason") == "rate limited" for r in records)
    log = gateway_log(ops)
    assert all(t["token"] not in log for t in tokens) and late not in log


def test_agent_add_names_file(ops: World, tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("# the reception's PCs\nreception-1\n\nreception-2\n  reception-3  \n")
    out = ops.lab.admin("agent", "add", "--org", "clinic", "--names-file", str(names))
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == ["reception-1", "reception-2", "reception-3"]
    assert all(len(r[1]) > 30 for r in rows)
    twice = tmp_path / "twice.txt"
    twice.write_text("ward-1\nward-2\nward-1\n")
    admin = ("gw", "admin", "--config", str(ops.lab.config), "agent", "add", "--org", "clinic")
    bad = ops.lab.run(*admin, "--names-file", str(twice), check=False)
    assert bad.returncode == 4 and "ward-1 is named twice" in bad.stderr
    listed = json.loads(ops.lab.admin("agent", "list", "--json"))
    assert not {"ward-1", "ward-2"} & {a["id"] for a in listed}  # nothing made before the check
    both = ops.lab.run(*admin, "x", "--names-file", str(names), check=False)
    assert both.returncode == 2 and "--names-file takes no AGENT" in both.stderr


# -- the journal -------------------------------------------------------------------------


def test_the_log_is_journal_lines_with_priorities_and_no_secrets(ops: World) -> None:
    user = ops.new_user()
    totp_secret = ops.lab.totp_secrets[user]
    code = ops.lab.totp(user)
    wrong = ops.lab.connect_stdio("pc1", user, "wrong horse battery", "echo", "x", totp=code)
    assert wrong.returncode == 1
    pattern = re.compile(FAIL2BAN.replace("<HOST>", r"(?P<host>[0-9a-fA-F.:]+)"))
    wait_for(lambda: f"user={user} " in gateway_log(ops), 60, "the failed login's log line")
    log = gateway_log(ops)
    lines = [line for line in log.splitlines() if line]
    assert lines and all(re.match(r"^<[0-7]>", line) for line in lines), lines[:5]
    failed = [
        (line[:3], m)
        for line in lines
        if (m := pattern.match(line[3:])) and f"user={user} " in line
    ]
    assert len(failed) == 1 and failed[0][0] == "<4>"  # a warning
    assert failed[0][1]["host"] == "127.0.0.1"
    # `journalctl -p warning` shows priorities 0-4: the failed login, not "ready" (6).
    assert any(line.startswith("<6>gatewayd ready") for line in lines)
    for secret in (PASSWORD, "wrong horse battery", code, totp_secret):
        assert secret not in log


# -- the exit-code table -----------------------------------------------------------------


def documented_cases() -> list[tuple[int, str]]:
    text = (ROOT / "docs" / "exit-codes.md").read_text()
    cases = text.split("## Cases", 1)[1]
    return [(int(c), cmd) for c, cmd in re.findall(r"^\| (\d+) \| `([^`]+)` \|$", cases, re.M)]


def test_every_exit_code_of_the_table_is_what_the_tools_return(ops: World, tmp_path: Path) -> None:
    cases = documented_cases()
    assert {code for code, _ in cases} == {0, 1, 2, 3, 4}
    lab = ops.lab
    stopped = tmp_path / "stopped.toml"
    stopped.write_text(
        re.sub(r'socket = ".*"', f'socket = "{tmp_path / "no.sock"}"', lab.config.read_text())
    )
    bad = tmp_path / "bad.toml"
    bad.write_text(lab.config.read_text().replace("[gateway]", "[gateway]\nlisten_port = 1"))
    places = {
        "config": str(lab.config),
        "stopped": str(stopped),
        "missing": str(tmp_path / "missing.toml"),
        "bad": str(bad),
        "gateway": lab.gateway,
        "ca": str(lab.ca_file),
        "closed": f"127.0.0.1:{free_port()}",
    }
    env = {k: v for k, v in lab.env().items() if k != "GATEWAYD_CONFIG"}

    def run(case: tuple[int, str]) -> str | None:
        code, command = case
        args = shlex.split(command.format(**places))
        result = subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            input="not the password\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        if result.returncode != code or "Traceback" in result.stderr:
            return f"{command}: {result.returncode}, not {code}: {result.stderr[-300:]}"
        return None

    with ThreadPoolExecutor(max_workers=2) as pool:
        wrong = [problem for problem in pool.map(run, cases) if problem]
    assert not wrong, "\n".join(wrong)


def test_gateway_config_names_the_config_when_no_option_does(ops: World) -> None:
    env = {**ops.lab.env(), "GATEWAYD_CONFIG": str(ops.lab.config)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    orgs = run("gw", "admin", "org", "list", "--json")
    assert orgs.returncode == 0, orgs.stderr
    assert "clinic" in {o["id"] for o in json.loads(orgs.stdout)}
    trail = run("gw", "audit", "--event", "gateway.start", "--json")
    assert trail.returncode == 0, trail.stderr
    assert json.loads(trail.stdout.splitlines()[0])["event"] == "gateway.start"
    check = run("gatewayd", "check-config")
    assert check.returncode == 0 and check.stdout.strip() == f"{ops.lab.config}: ok"
