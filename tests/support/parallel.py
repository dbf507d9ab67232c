"""Tests in parallel (pytest-xdist): which tests must share a worker, and a scheduler that
keeps each such group on one worker.

``make test`` runs ``pytest -n N --dist loadgroup``. A test goes to any free worker
unless it shares something with other tests; then the whole group runs, one test after
the other, on one worker. :func:`group_of` gives the group by rule, so that a new test
module is placed correctly without marking anything (docs/testing.md):

- ``pcsc``: pcscd and its vpcd readers are one per machine (fixed TCP ports 35963 and
  35964, one card in each reader at a time): every test that uses the ``pcscd_vpcd``
  fixture or is marked ``smartcard``;
- ``wine``: the Windows build of CPython and its Wine prefix under ``.cache/win`` (built
  once, one wineserver): every test marked ``windows``;
- the test's module, when the test uses a module-scoped (or class- or package-scoped)
  fixture, such as an integration world (a gatewayd, an agent, a directory): the world
  is built once, not once per worker.

An explicit ``@pytest.mark.xdist_group("name")`` wins over these rules (for another
resource that is one per machine).

Why a scheduler of our own: xdist's ``loadgroup`` passes the group from the worker to
the controller by appending ``@group`` to the test's node id, which pytest 9 no longer
lets a plugin change (pytest-xdist issue 1386: the marks are silently ignored and the
tests spread as if unmarked). Here the workers write the groups they collected to a file
the controller named (:data:`GROUPS_ENV`), and :class:`GroupScheduling` (xdist's
load-scope scheduler keyed by those groups) reads it once every worker has collected;
node ids are left alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

#: Where the controller asks the workers to write the groups (an environment variable,
#: which the workers inherit).
GROUPS_ENV = "GATEWAYD_TEST_GROUPS"

#: Fixture scopes whose value the tests of one module share.
SHARED_SCOPES = frozenset({"module", "package", "class"})


def group_of(item: pytest.Item) -> str | None:
    """The group the rules above give ``item``, or None (any worker)."""
    fixtures = getattr(item, "fixturenames", ())
    if "pcscd_vpcd" in fixtures or item.get_closest_marker("smartcard") is not None:
        return "pcsc"
    if item.get_closest_marker("windows") is not None:
        return "wine"
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:
        for defs in info.name2fixturedefs.values():
            if any(d.scope in SHARED_SCOPES for d in defs):
                return item.nodeid.split("::", 1)[0]
    return None


def mark_groups(items: list[pytest.Item]) -> None:
    """Give every item the rules place an ``xdist_group`` mark (unless it has its own)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            group = group_of(item)
            if group is not None:
                item.add_marker(pytest.mark.xdist_group(group))


def marked_group(item: pytest.Item) -> str | None:
    """The item's group as xdist names it (several marks: their names sorted and joined)."""
    names = sorted(
        {
            str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for mark in item.iter_markers("xdist_group")
        }
    )
    return "_".join(names) or None


def write_groups(items: list[pytest.Item]) -> None:
    """In an xdist worker: write {node id: group} where the controller asked for it."""
    target = os.environ.get(GROUPS_ENV)
    if not target:
        return
    groups = {item.nodeid: g for item in items if (g := marked_group(item)) is not None}
    path = Path(target)
    scratch = path.with_name(f"{path.name}.{os.getpid()}")
    scratch.write_text(json.dumps(groups))
    scratch.replace(path)  # every worker collects the same tests: the last one stays


def make_scheduler(config: pytest.Config, log: Any) -> Any:
    """The controller's scheduler for ``--dist loadgroup``."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        """xdist's load-scope scheduling with our groups as the scopes: a group goes to one
        worker as a whole; a test outside any group is a scope of its own."""

        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                path = Path(os.environ[GROUPS_ENV])
                if not path.exists():
                    raise RuntimeError(f"no worker wrote the test groups to {path}")
                self.groups = json.loads(path.read_text())
            return self.groups.get(nodeid, nodeid)

    return GroupScheduling(config, log)
