"""The factor registry: every factor, gatewayd's own too, comes from the entry-point group.

Plug-ins here are real distributions: a ``.dist-info`` folder with an
``entry_points.txt`` in a temporary folder put on ``sys.path``, found by
:mod:`importlib.metadata` as an installed package would be.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from auth import fido2, password, registry, smartcard, totp
from auth.base import Factor
from relay.errors import ConfigError


def _plugin(root: Path, dist: str, entries: dict[str, str], module: str, code: str) -> None:
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {ref}\n" for name, ref in entries.items())
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}")
    (root / f"{module}.py").write_text(textwrap.dedent(code))


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A folder on sys.path for plug-ins, and a registry that has loaded nothing yet."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", {})
    return tmp_path


def test_builtins_are_entry_points_of_the_group() -> None:
    group = {ep.name: ep.value for ep in entry_points(group=registry.ENTRY_POINT_GROUP)}
    for name, module in (
        ("password", password),
        ("totp", totp),
        ("fido2", fido2),
        ("smartcard", smartcard),
    ):
        assert group[name] == f"{module.__name__}:FACTOR"
        assert registry.get(name) is module.FACTOR
    assert registry.names()[:4] == ["password", "totp", "smartcard", "fido2"]


def test_unknown_factor_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown auth factor 'nope' \(known: password, "):
        registry.get("nope")


def test_broken_plugin_names_itself_and_what_failed(fresh: Path) -> None:
    _plugin(
        fresh,
        "broken-factor",
        {"broken": "broken_factor:FACTOR"},
        "broken_factor",
        "import no_such_module_here\n",
    )
    assert "broken" in registry.names()
    with pytest.raises(ConfigError) as caught:
        registry.get("broken")
    text = str(caught.value)
    assert "auth factor 'broken' (broken_factor:FACTOR from broken-factor) cannot be loaded" in text
    assert "No module named 'no_such_module_here'" in text
    # Every other factor still loads.
    assert registry.get("password") is password.FACTOR


def test_plugin_that_is_not_a_factor(fresh: Path) -> None:
    _plugin(fresh, "odd-factor", {"odd": "odd_factor:FACTOR"}, "odd_factor", "FACTOR = 42\n")
    with pytest.raises(ConfigError, match=r"'odd' .* is a int, not an auth.base.Factor"):
        registry.get("odd")


def test_plugin_cannot_take_over_a_builtin_name(fresh: Path) -> None:
    """A second package registering "password" is refused, not silently used."""
    code = """
        from auth.password import FACTOR
    """
    _plugin(fresh, "evil-password", {"password": "evil_password:FACTOR"}, "evil_password", code)
    with pytest.raises(ConfigError, match=r"'password' is registered twice: .*evil-password"):
        registry.get("password")


def test_reload_calls_every_loaded_factors_hook_and_survives_a_failing_one(
    fresh: Path,
) -> None:
    code = """
        from auth.base import Factor
        from auth.password import PasswordProver, PasswordVerifier

        SEEN = []

        def _reload(settings):
            SEEN.append(dict(settings))

        def _fail(settings):
            raise RuntimeError("cannot re-read /nowhere")

        FACTOR = Factor("good", PasswordVerifier, PasswordProver, reload=_reload)
        BAD = Factor("bad", PasswordVerifier, PasswordProver, reload=_fail)
    """
    _plugin(fresh, "hooks", {"good": "hooks_mod:FACTOR", "bad": "hooks_mod:BAD"}, "hooks_mod", code)
    good: Factor = registry.get("good")
    registry.get("bad")
    settings: Mapping[str, Mapping[str, Any]] = {"good": {"level": 2}}
    failed = registry.reload(settings)
    assert failed == ["auth factor 'bad': reload failed: RuntimeError: cannot re-read /nowhere"]
    import hooks_mod  # type: ignore[import-not-found]

    assert hooks_mod.SEEN == [{"level": 2}]
    assert good.reload is not None


def test_plugin_named_other_than_its_entry_point(fresh: Path) -> None:
    code = """
        from auth.base import Factor
        from auth.password import PasswordProver, PasswordVerifier

        FACTOR = Factor("other", PasswordVerifier, PasswordProver)
    """
    _plugin(fresh, "misnamed", {"misnamed": "misnamed_mod:FACTOR"}, "misnamed_mod", code)
    with pytest.raises(ConfigError, match="calls itself 'other'"):
        registry.get("misnamed")
