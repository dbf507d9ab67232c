"""The Windows harness (tests/support/wine.py) says why it cannot run instead of failing,
and installs what the project needs on Windows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import wine


def test_without_wine64_the_journeys_are_skipped_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wine, "wine_binary", lambda: None)
    reason = wine.windows_gw(tmp_path)
    assert reason == "wine64 is not installed (Debian: apt-get install wine64)"
    assert not any(tmp_path.iterdir())  # nothing downloaded or built


def test_a_wine_without_process_prng_needs_mingw_to_build_the_stand_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wine, "wine_binary", lambda: "/usr/lib/wine/wine64")
    monkeypatch.setattr(wine, "wine_has_process_prng", lambda _: False)
    real_which = shutil.which
    monkeypatch.setattr(
        wine.shutil, "which", lambda name: None if name == wine.MINGW else real_which(name)
    )
    reason = wine.windows_gw(tmp_path)
    assert isinstance(reason, str) and "gcc-mingw-w64-x86-64-win32" in reason


def test_windows_gets_the_project_dependencies_for_windows() -> None:
    wanted = wine.windows_requirements()
    names = [w.split(">")[0].split("=")[0].split("<")[0] for w in wanted]
    assert "uvloop" not in names  # POSIX only (its marker excludes win32)
    assert {"cryptography", "click", "pyotp", "colorama"} <= set(names)
