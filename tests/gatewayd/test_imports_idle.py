"""What a started gatewayd with the default config has imported: nothing it does not use.

Each library a daemon imports stays in its memory for good (modules, classes, code:
python-fido2 7 MiB, prometheus-client 4 MiB). Those that only some configs or some
requests need are imported by the code that uses them. The process checked here is a
real ``gatewayd --config`` (its own ``__main__``), stopped with SIGTERM once ready; at
exit it writes the names in ``sys.modules`` and how often it settled its memory
(:func:`gatewayd.malloc.settle`: once, before it said it was ready).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

#: Libraries a default gatewayd (no [metrics], no [cluster], no security key used yet)
#: must not have imported once it is ready.
NOT_AT_IDLE = (
    "fido2",  # python-fido2: the first FIDO2 login or registration imports it
    "prometheus_client",  # only with [metrics] enabled
    "smartcard",  # pyscard: never in the daemon (cards are read by gw)
    "pkcs11",  # python-pkcs11: gw's
    "aiomqtt",  # [cluster]
    "psycopg",  # [cluster] database
    "cli",  # the gw command line
    "wsgiref",  # prometheus-client's HTTP server, unused even with [metrics]
    "urllib.request",  # the OCSP client: the first smartcard check that asks a responder
    "http.client",
)

#: Runs the real daemon entry point; at exit, writes every imported module's name.
RUNNER = textwrap.dedent(
    """
    import atexit, runpy, sys

    from gatewayd import malloc

    out = sys.argv[1]
    settled = []
    settle = malloc.settle
    malloc.settle = lambda: settled.append(1) or settle()

    def dump():
        with open(out, "w") as f:
            f.write("\\n".join([f"settled={len(settled)}", *sorted(sys.modules)]))

    atexit.register(dump)
    sys.argv = ["gatewayd", "--config", sys.argv[2]]
    runpy.run_module("gatewayd", run_name="__main__")
    """
)


def _init(tmp: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gatewayd",
            "init",
            "--dir",
            str(tmp / "gw"),
            "--listen",
            "127.0.0.1:0",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return tmp / "gw" / "gatewayd.toml"


def started_modules(
    config: Path, tmp: Path, when_ready: Callable[[subprocess.Popen[bytes]], None] | None = None
) -> set[str]:
    """The modules of a gatewayd started with ``config``, once it is ready (and after
    ``when_ready`` did what it does to the running daemon)."""
    dump, log = tmp / "modules.txt", tmp / "gatewayd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(dump), str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60  # a hang guard, not a measure
        while b"gatewayd ready" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "gatewayd not ready:\n" + log.read_text()
            time.sleep(0.05)
        if when_ready is not None:
            when_ready(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return set(dump.read_text().split())


def _loaded(modules: set[str], package: str) -> bool:
    return any(m == package or m.startswith(package + ".") for m in modules)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the daemon's platform")
def test_a_default_gatewayd_imports_no_library_it_does_not_use(tmp_path: Path) -> None:
    config = _init(tmp_path)
    text = config.read_text()
    assert '"fido2"' in text and '"smartcard"' in text  # the modes name both factors
    modules = started_modules(config, tmp_path)
    assert "gatewayd.server" in modules and "auth.fido2" in modules  # it did start
    assert "settled=1" in modules  # start-up's garbage and freed heap went before ready
    loaded = [lib for lib in NOT_AT_IDLE if _loaded(modules, lib)]
    assert not loaded, f"a default gatewayd imported {loaded}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the daemon's platform")
def test_metrics_enabled_imports_prometheus_and_serves(tmp_path: Path) -> None:
    config = _init(tmp_path)
    with config.open("a") as f:
        f.write('\n[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n')
    modules = started_modules(config, tmp_path)
    assert "prometheus_client" in modules
    assert "metrics listening" in (tmp_path / "gatewayd.log").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the daemon's platform")
def test_a_reload_that_turns_metrics_on_asks_for_a_restart(tmp_path: Path) -> None:
    """SIGHUP with [metrics] newly enabled: the reload succeeds, says the listener needs a
    restart, and the daemon (which never loaded prometheus-client) serves on."""
    config = _init(tmp_path)
    audit = tmp_path / "gw" / "audit" / "audit.jsonl"

    def enable_metrics_and_reload(proc: subprocess.Popen[bytes]) -> None:
        with config.open("a") as f:
            f.write('\n[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60  # a hang guard, not a measure
        while '"gateway.reload"' not in audit.read_text():
            assert proc.poll() is None
            assert time.monotonic() < deadline, "no gateway.reload record"
            time.sleep(0.05)

    modules = started_modules(config, tmp_path, enable_metrics_and_reload)
    (reload,) = [
        json.loads(line) for line in audit.read_text().splitlines() if '"gateway.reload"' in line
    ]
    assert reload["outcome"] == "success"
    assert "metrics.enabled" in reload["needs_restart"]
    assert not _loaded(modules, "prometheus_client")


def _fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its standard output."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_metrics_import_prometheus_client_when_made() -> None:
    out = _fresh(
        """
        import sys
        from gatewayd import metrics
        from gatewayd import event as ev
        print("prometheus_client" in sys.modules)
        m = metrics.Metrics()
        m(ev.AuthLocked(user="alice", failures=5, seconds=60.0))
        print(b"gatewayd_lockouts_total 1.0" in m.exposition())
        """
    )
    assert out.split() == ["False", "True"]


def test_fido2_settings_parse_without_python_fido2_and_logins_load_it() -> None:
    out = _fresh(
        """
        import sys
        from auth import fido2
        from relay.errors import ConfigError
        s = fido2.parse_settings({"rp_id": "gw.example.org"})
        print(s.origin, "fido2" in sys.modules)
        try:  # another origin is checked by the library's rule (loaded for it)
            fido2.parse_settings({"rp_id": "example.org", "origin": "https://evil.example.com"})
        except ConfigError as exc:
            print("refused", "fido2" in sys.modules)
        fido2.parse_settings({"rp_id": "example.org", "origin": "https://gw.example.org"})
        verifier = fido2.FACTOR.verifier()
        print(type(verifier).__name__, "fido2.webauthn" in sys.modules)
        """
    )
    assert out.split() == [
        "https://gw.example.org",
        "False",
        "refused",
        "True",
        "Fido2Verifier",
        "True",
    ]
