"""The systemd units' exposure, as `systemd-analyze security` scores it (0 best, 10 worst),
stays at or below the score docs/operations.md states for each."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
ANALYZE = shutil.which("systemd-analyze")


def stated_scores() -> dict[str, float]:
    text = (ROOT / "docs" / "operations.md").read_text()
    return {
        unit: float(score)
        for unit, score in re.findall(r"^\| `([\w-]+\.service)` \| (\d+\.\d) \|", text, re.M)
    }


def test_every_unit_has_a_stated_score() -> None:
    units = {p.name for p in (ROOT / "systemd").glob("*.service")}
    assert units == set(stated_scores()) == {"gatewayd.service", "gw-agent.service"}


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze (Debian's systemd package) missing")
@pytest.mark.parametrize("unit", ["gatewayd.service", "gw-agent.service"])
def test_exposure_is_at_most_the_stated_score(unit: str) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(ROOT / "systemd" / unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr[-2000:]
    assert float(found[1]) <= stated_scores()[unit], result.stdout
