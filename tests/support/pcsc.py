"""pcscd with the vpcd virtual reader driver, for tests that use the real PC/SC stack.

The session fixture :func:`pcscd_vpcd`:

1. checks that the pieces are installed, and *fails* (never skips) naming the package
   when one is missing: ``pcscd`` (the daemon), ``vsmartcard-vpcd`` (the reader
   driver and ``/etc/reader.conf.d/vpcd``), pyscard (``pip install
   'gatewayd[smartcard]'``, built against ``libpcsclite-dev``);
2. reuses a running pcscd if it already serves the vpcd readers; otherwise starts
   ``pcscd --foreground`` as a child process (no systemd needed; pcscd reads
   ``/etc/reader.conf.d`` at start and vpcd opens its TCP ports, 35963 and 35964 by
   default), logging to a file in the session's temporary directory;
3. waits (up to 15 s) until PC/SC lists the vpcd readers, and yields
   :class:`VirtualReaders` (reader names, their TCP ports, and helpers);
4. at the end, stops the pcscd it started (SIGTERM, then SIGKILL after 10 s).

pcscd is started without ``--apdu``, so PINs never reach its log.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

READER_CONF_DIR = Path("/etc/reader.conf.d")
DEFAULT_PORT = 0x8C7B  # 35963, vpcd's default CHANNELID
VPCD_SLOTS = 2  # vpcd exposes two readers per configured device: "<name> 00 00" and "00 01"
START_TIMEOUT = 15.0
POLL = 0.1

INSTALL_HINT = (
    "install the PC/SC test stack: apt install pcscd vsmartcard-vpcd libpcsclite-dev swig, "
    "then pip install 'gatewayd[smartcard]'"
)


@dataclass(frozen=True)
class VpcdConfig:
    friendly_name: str
    port: int
    conf_file: Path
    driver: Path


@dataclass
class VirtualReaders:
    """The vpcd readers as PC/SC lists them, with the TCP port a virtual card dials."""

    names: list[str]
    ports: dict[str, int]
    host: str = "127.0.0.1"
    started_pcscd: bool = False
    log: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def port(self, reader: str) -> int:
        return self.ports[reader]

    def card_present(self, reader: str) -> bool:
        from smartcard import scard

        hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        assert hresult == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(hresult)
        try:
            hresult, states = scard.SCardGetStatusChange(
                context, 0, [(reader, scard.SCARD_STATE_UNAWARE)]
            )
            assert hresult == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(hresult)
            return bool(states[0][1] & scard.SCARD_STATE_PRESENT)
        finally:
            scard.SCardReleaseContext(context)

    def wait_card(self, reader: str, present: bool = True, timeout: float = 10.0) -> None:
        """Wait until PC/SC sees a card in ``reader`` (or sees it gone)."""
        deadline = time.monotonic() + timeout
        while self.card_present(reader) != present:
            if time.monotonic() > deadline:
                state = "appear" if present else "go away"
                raise AssertionError(f"card in {reader!r} did not {state} within {timeout} s")
            time.sleep(POLL)


def find_vpcd_config(conf_dir: Path = READER_CONF_DIR) -> VpcdConfig | None:
    """Read the vpcd entry of pcscd's reader configuration, if any."""
    if not conf_dir.is_dir():
        return None
    for conf in sorted(conf_dir.iterdir()):
        if not conf.is_file():
            continue
        text = conf.read_text(errors="replace")
        lib = re.search(r"^\s*LIBPATH\s+(\S*libifdvpcd\S*)", text, re.M)
        if lib is None:
            continue
        name = re.search(r'^\s*FRIENDLYNAME\s+"?([^"\n]+)"?', text, re.M)
        channel = re.search(r"^\s*CHANNELID\s+(\S+)", text, re.M)
        port = int(channel.group(1), 0) if channel else DEFAULT_PORT
        return VpcdConfig(
            friendly_name=name.group(1).strip() if name else "Virtual PCD",
            port=port,
            conf_file=conf,
            driver=Path(lib.group(1)),
        )
    return None


def _list_readers() -> tuple[str, list[str]]:
    """("ok" | "no-service" | error text, reader names)."""
    from smartcard import scard

    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult == scard.SCARD_E_NO_SERVICE:
        return "no-service", []
    if hresult != scard.SCARD_S_SUCCESS:
        return scard.SCardGetErrorMessage(hresult), []
    try:
        hresult, names = scard.SCardListReaders(context, [])
        if hresult == scard.SCARD_E_NO_READERS_AVAILABLE:
            return "ok", []
        if hresult != scard.SCARD_S_SUCCESS:
            return scard.SCardGetErrorMessage(hresult), []
        return "ok", list(names)
    finally:
        scard.SCardReleaseContext(context)


def _vpcd_readers(names: list[str], cfg: VpcdConfig) -> dict[str, int]:
    """Map the vpcd reader names PC/SC lists to their TCP ports (port + slot index)."""
    ports: dict[str, int] = {}
    for name in names:
        m = re.fullmatch(re.escape(cfg.friendly_name) + r" (\d\d) (\d\d)", name)
        if m is not None:
            ports[name] = cfg.port + int(m.group(2))
    return ports


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _find_pcscd() -> str | None:
    return shutil.which("pcscd") or next(
        (p for p in ("/usr/sbin/pcscd", "/usr/local/sbin/pcscd") if os.access(p, os.X_OK)), None
    )


def _check_installed() -> tuple[str, VpcdConfig]:
    pcscd = _find_pcscd()
    if pcscd is None:
        pytest.fail(f"pcscd is not installed (Debian package 'pcscd'): {INSTALL_HINT}", False)
    cfg = find_vpcd_config()
    if cfg is None:
        pytest.fail(
            f"no vpcd reader in {READER_CONF_DIR} (Debian package 'vsmartcard-vpcd'): "
            f"{INSTALL_HINT}",
            False,
        )
    if not cfg.driver.exists():
        pytest.fail(f"{cfg.conf_file} names {cfg.driver}, which is missing: {INSTALL_HINT}", False)
    try:
        import smartcard.scard  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"pyscard cannot be imported ({exc}): {INSTALL_HINT}", False)
    return pcscd, cfg


def _wait_ready(
    cfg: VpcdConfig, proc: subprocess.Popen[bytes] | None, log: Path | None
) -> dict[str, int]:
    deadline = time.monotonic() + START_TIMEOUT
    status = "no-service"
    names: list[str] = []
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"pcscd exited with status {proc.returncode} at start:\n{_tail(log)}", False
            )
        status, names = _list_readers()
        ports = _vpcd_readers(names, cfg) if status == "ok" else {}
        if len(ports) >= 1:
            return ports
        time.sleep(POLL)
    pytest.fail(
        f"the vpcd readers did not appear within {START_TIMEOUT} s "
        f"(PC/SC: {status}, readers: {names}):\n{_tail(log)}",
        False,
    )


@pytest.fixture(scope="session")
def pcscd_vpcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualReaders]:
    """pcscd running with the vpcd readers; started here (and stopped) if need be."""
    pcscd, cfg = _check_installed()
    status, names = _list_readers()
    if status == "ok":
        ports = _vpcd_readers(names, cfg)
        if not ports:
            pytest.fail(
                f"a pcscd is already running but without the vpcd readers (it lists {names}); "
                f"pcscd reads {READER_CONF_DIR} only at start: restart it",
                False,
            )
        yield VirtualReaders(sorted(ports), ports)
        return
    if status != "no-service":
        pytest.fail(f"PC/SC is in a bad state: {status}", False)

    log = tmp_path_factory.mktemp("pcscd") / "pcscd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # fixed argv
            [pcscd, "--foreground", "--info"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ports = _wait_ready(cfg, proc, log)
        yield VirtualReaders(sorted(ports), ports, started_pcscd=True, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
