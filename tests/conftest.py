"""Shared test set-up: tests/support on the import path; the groups of tests that share a
worker when the tests run in parallel."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

SUPPORT = Path(__file__).parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))


# -- in parallel (pytest-xdist; tests/support/parallel.py, docs/testing.md) -------------

import parallel  # noqa: E402 - tests/support, on sys.path from above


def pytest_configure(config: pytest.Config) -> None:
    # The controller of an xdist run names the file its workers write the groups to.
    distributed = config.getoption("dist", "no") == "loadgroup" and config.getoption("tx", None)
    if distributed and not hasattr(config, "workerinput"):
        folder = Path(tempfile.mkdtemp(prefix="gatewayd-test-groups-"))
        os.environ[parallel.GROUPS_ENV] = str(folder / "groups.json")
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    parallel.mark_groups(items)


@pytest.hookimpl(tryfirst=True)  # before the worker tells the controller it has collected
def pytest_collection_finish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):
        parallel.write_groups(session.items)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    return parallel.make_scheduler(config, log) if config.getoption("dist") == "loadgroup" else None
