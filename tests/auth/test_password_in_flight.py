"""At most MAX_HASHES_IN_FLIGHT password hashes run at once; the others wait their turn.

Each Argon2id check holds 19 MiB for its whole run: a burst of parallel logins must
queue, not add 19 MiB each to the daemon's memory.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from auth import password

THREADS = 6
#: Bounded waits: the test fails with a message rather than hang if something is wrong.
DEADLINE = 20.0


class Crowd:
    """A fake hasher that counts the checks inside it at once.

    A check that got in waits until a second one is inside too (the bound is broken:
    no need to wait further) or until every thread has arrived, so that, without the
    bound, a second check is always inside before the first one leaves.
    """

    def __init__(self, stored: str) -> None:
        self.stored = stored
        self.cond = threading.Condition()
        self.arrived = self.inside = self.peak = self.done = 0

    def arrive(self, stored: str) -> Any:
        with self.cond:
            self.arrived += 1
            self.cond.notify_all()
        return real_extract(stored)

    def verify(self, stored: str, given: str) -> bool:
        with self.cond:
            self.inside += 1
            self.peak = max(self.peak, self.inside)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.inside > 1 or self.arrived == THREADS, DEADLINE)
            self.inside -= 1
            self.done += 1
            self.cond.notify_all()
        return False

    def check(self) -> None:
        assert password.check_password(self.stored, "a guess") is False


real_extract = password.extract_parameters


@pytest.fixture(scope="module")
def stored() -> str:
    return password.hash_password("correct horse battery staple")


def test_parallel_checks_wait_for_each_other(stored: str, monkeypatch: pytest.MonkeyPatch) -> None:
    crowd = Crowd(stored)
    monkeypatch.setattr(password, "extract_parameters", crowd.arrive)
    monkeypatch.setattr(password, "_HASHER", crowd)
    threads = [threading.Thread(target=crowd.check) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert crowd.done == THREADS, "every check ran, one after the other"
    assert crowd.peak == password.MAX_HASHES_IN_FLIGHT == 1


def test_a_failing_hash_frees_its_place(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def hash(self, _password: str) -> str:
            raise MemoryError("no memory for the hash")

    monkeypatch.setattr(password, "_HASHER", Broken())
    with pytest.raises(MemoryError):
        password.hash_password("x")
    monkeypatch.undo()
    assert password.check_password(password.hash_password("y"), "y")
