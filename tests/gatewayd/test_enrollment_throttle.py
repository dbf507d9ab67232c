"""Enrollment throttles failures, not valid tokens (a rollout from behind one address)."""

from __future__ import annotations

from gatewayd.enrollment import FailureThrottle


def test_valid_enrollments_are_never_counted() -> None:
    throttle = FailureThrottle()
    for i in range(500):  # a rollout of 500 PCs behind one NAT within the minute
        started = float(i) / 100
        assert throttle.begin("192.0.2.1", started, limit=30)
        throttle.succeeded("192.0.2.1", started)


def test_failures_and_attempts_in_flight_count() -> None:
    throttle = FailureThrottle()
    # 30 guesses at once: each counts from its start, so the 31st is refused even
    # before any of them is known to have failed.
    assert all(throttle.begin("192.0.2.1", 1.0 + i / 1000, limit=30) for i in range(30))
    assert not throttle.begin("192.0.2.1", 2.0, limit=30)
    assert throttle.begin("192.0.2.2", 2.0, limit=30)  # another source has its own budget
    # A valid token from the throttled source waits like the rest ...
    assert not throttle.begin("192.0.2.1", 30.0, limit=30)
    # ... until the failures are a minute old.
    assert throttle.begin("192.0.2.1", 61.1, limit=30)


def test_sources_are_bounded() -> None:
    throttle = FailureThrottle()
    throttle.MAX_SOURCES = 3
    for i in range(10):
        throttle.begin(f"198.51.100.{i}", 0.0, limit=1)
    assert len(throttle._hits) == 3
