"""No import circles among the daemon's modules, and each module imports on its own.

The graph is read from the source (the AST): every import of a ``gatewayd`` module,
at the top or inside a function, counts; imports under ``if TYPE_CHECKING:`` do not
(they never run). A circle, even one a late import inside a function hides, means
two parts that cannot be understood or tested apart.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from import_graph import find_circle, package_imports

PACKAGE = Path(__file__).resolve().parents[2] / "gatewayd"


def _imports(path: Path, modules: set[str]) -> set[str]:
    return package_imports(path, "gatewayd", modules)


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.glob("*.py"))
    modules = {f.stem for f in files}
    return {f.stem: _imports(f, modules) for f in files}


def test_the_finder_finds_a_circle() -> None:
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circles_in_gatewayd() -> None:
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_split_parts_do_not_import_the_broker() -> None:
    """The parts are wired by the broker; none reaches back into it or the admin server."""
    graph = import_graph()
    parts = ("login", "session", "tunnel", "agent", "enrollment", "access", "event", "clock")
    for part in parts:
        assert not graph[part] & {"broker", "admin", "server"}, part


@pytest.mark.parametrize(
    "module", sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__main__")
)
def test_each_module_imports_alone(module: str) -> None:
    """Imported first, in a fresh interpreter: no module relies on another being loaded."""
    done = subprocess.run(
        [sys.executable, "-c", f"import gatewayd.{module}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_private_names_are_imported_across_modules() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (
                node.level == 1 or (node.module or "").startswith("gatewayd")
            ):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_the_admin_operations_are_one_explicit_table() -> None:
    """Every operation is in the table; none registers itself by being imported."""
    from gatewayd.admin import OPERATIONS

    assert sorted(OPERATIONS) == sorted(
        [
            "org.add",
            "vendor.add",
            "user.add",
            "user.logout",
            "user.password",
            "factor.enroll",
            "user.set_cert",
            "user.unlock",
            "totp.enroll",
            "fido2.invite",
            "fido2.list",
            "fido2.remove",
            "agreement.add",
            "agreement.accept",
            "agreement.state",
            "agent.add",
            "grant.add",
            "grant.remove",
            "vendor.networks",
            "list",
            "show",
            "disable",
            "enable",
            "remove",
            "sessions.list",
            "sessions.kill",
            "status",
            "audit.acknowledge",
        ]
    )
    with pytest.raises(TypeError):
        OPERATIONS["evil"] = OPERATIONS["status"]  # type: ignore[index]
