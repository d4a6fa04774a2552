"""Backoff: the one retry state every agent reconciler uses, driven by a fake clock."""

from __future__ import annotations

import pytest

from hostagent.backoff import Backoff


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_due_at_once_then_doubling_up_to_the_cap():
    clock = Clock()
    b = Backoff(30, 300, clock)
    assert b.is_due() and b.remaining() == 0
    waits = []
    for _ in range(7):
        b.failed("boom")
        waits.append(b.remaining())
    assert waits == [30, 60, 120, 240, 300, 300, 300]
    assert b.failures == 7 and not b.is_due()
    clock.t += 299.9
    assert not b.is_due()
    clock.t += 0.1
    assert b.is_due()


def test_success_resets_and_schedules_the_next_regular_attempt():
    clock = Clock()
    b = Backoff(30, 300, clock)
    b.failed("boom")
    b.failed("boom")
    assert b.succeeded(next_in=1800) is True  # it was failing: worth a "recovered" line
    assert (b.failures, b.error, b.remaining()) == (0, None, 1800)
    assert b.succeeded() is False and b.is_due()
    b.failed("boom")
    assert b.remaining() == 30  # doubling starts again from the base


def test_failed_says_whether_the_error_is_new_so_it_is_logged_once():
    b = Backoff(1, 10, Clock())
    assert b.failed("no route to host") is True
    assert b.failed("no route to host") is False
    assert b.failed("throttled") is True
    assert b.error == "throttled" and b.failures == 3


def test_explicit_delay_is_capped_and_counts_from_the_attempt_start():
    clock = Clock()
    b = Backoff(2, 300, clock)
    started = clock.t
    clock.t += 1.5  # the attempt itself took 1.5 s
    b.failed("held", delay=2, since=started)
    assert b.next_at == started + 2 and b.remaining() == pytest.approx(0.5)
    b.failed("refused", delay=3600)
    assert b.remaining() == 300


def test_a_new_cause_starts_its_own_doubling():
    b = Backoff(2, 300, Clock())
    for _ in range(5):
        b.failed("held elsewhere", cause="attached-elsewhere", delay=2)
    assert b.failures == 5
    b.failed("no device yet", cause="device-missing")
    assert b.failures == 1 and b.remaining() == 2
    b.failed("no device yet", cause="device-missing")
    assert b.remaining() == 4


def test_reset_forgets_everything():
    b = Backoff(5, 50, Clock())
    b.failed("x", cause="c")
    b.reset()
    assert (b.failures, b.error, b.cause, b.is_due()) == (0, None, None, True)


@pytest.mark.parametrize("base, cap", [(0, 10), (-1, 10), (10, 5)])
def test_nonsense_limits_are_a_bug(base, cap):
    with pytest.raises(ValueError):
        Backoff(base, cap)
