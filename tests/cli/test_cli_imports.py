"""``gw``'s modules: no import circles, no private names across modules, each imports alone.

The graph is read from the source (the AST): every import of a ``cli`` module, at the
top or inside a function, counts; imports under ``if TYPE_CHECKING:`` do not. The
command groups are put together explicitly (``cli.main`` adds each group, ``cli.admin``
and ``cli.agent`` their sub-groups); none is registered by another module being imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from import_graph import find_circle, package_imports

PACKAGE = Path(__file__).resolve().parents[2] / "cli"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _imports(path: Path) -> set[str]:
    return package_imports(path, "cli", set(MODULES))


def import_graph() -> dict[str, set[str]]:
    return {m: _imports(PACKAGE / f"{m}.py") for m in MODULES}


def test_no_import_circles_in_cli() -> None:
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_nothing_imports_main_and_the_helpers_import_no_command_module() -> None:
    graph = import_graph()
    assert [m for m in MODULES if "main" in graph[m]] == []
    assert graph["common"] == set()
    assert graph["options"] == set()


def test_no_private_names_are_imported_across_modules() -> None:
    for name in MODULES:
        path = PACKAGE / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (
                node.level == 1 or (node.module or "").startswith("cli")
            ):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                base = node.value
                assert not (isinstance(base, ast.Name) and base.id in {"cli", "gw"}), (
                    f"{path.name} uses {base.id}.{node.attr}"
                )


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module: str) -> None:
    """Imported first, in a fresh interpreter: no module relies on another being loaded."""
    done = subprocess.run(
        [sys.executable, "-c", f"import cli.{module}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]


GROUPS = """
import click
from cli.admin import admin
from cli.agent import agent

def names(group):
    return sorted(group.commands)

print(names(admin))
print(names(admin.commands["user"]), names(admin.commands["agreement"]))
print(names(agent))
"""


def test_each_group_is_whole_when_imported_alone() -> None:
    """``cli.admin`` and ``cli.agent`` add their sub-commands themselves, with main not loaded."""
    done = subprocess.run(
        [sys.executable, "-c", GROUPS + "import sys; print('cli.main' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    admin, nouns, agent, main_loaded = done.stdout.splitlines()
    assert admin == str(
        sorted(
            [
                "agent",
                "agreement",
                "factor",
                "fido2",
                "grant",
                "org",
                "sessions",
                "status",
                "totp",
                "user",
                "vendor",
            ]
        )
    )
    assert "disable" in nouns and "set-cert" in nouns and "accept" in nouns
    assert agent == str(sorted(["approvals", "approve", "deny", "enroll", "fingerprint", "run"]))
    assert main_loaded == "False"


def test_main_adds_every_command_group_explicitly() -> None:
    """Listed by name in ``cli.main``; each name loads a command of that name."""
    import click

    from cli.main import main

    ctx = click.Context(main)
    names = main.list_commands(ctx)
    for name in names:
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name
    assert sorted(main.commands) == names
    assert names == [
        "admin",
        "agent",
        "agents",
        "audit",
        "connect",
        "fido2",
        "known-agents",
        "login",
        "logout",
    ]
