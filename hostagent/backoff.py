"""Retry state for the agent's reconcilers: consecutive failures, when to try next, a cap."""

from __future__ import annotations

import time
from typing import Callable


class Backoff:
    """One reconciler's retry state. A failure waits `base`, then twice that, … up to `cap`
    (or an explicit delay); a success resets it. The clock is injected so tests can drive it.

    `cause` groups failures: when a failure's cause differs from the previous one, the doubling
    starts again from `base` (a new situation, e.g. "held elsewhere" turning into "device not
    there yet", must not inherit the long wait of the old one). `error` is the text of the last
    failure; failed() and succeeded() say whether it changed, so callers log once per change.
    """

    def __init__(self, base: float, cap: float, clock: Callable[[], float] = time.monotonic):
        if base <= 0 or cap < base:
            raise ValueError(f"backoff needs 0 < base <= cap, not base={base} cap={cap}")
        self.base = float(base)
        self.cap = float(cap)
        self.clock = clock
        self.failures = 0
        self.error: str | None = None
        self.cause: str | None = None
        self.next_at = 0.0  # clock time of the next attempt; 0: at once

    def is_due(self) -> bool:
        return self.clock() >= self.next_at

    def remaining(self) -> float:
        return max(self.next_at - self.clock(), 0.0)

    def doubling_delay(self) -> float:
        """The wait after the current run of failures: base, 2·base, 4·base, … ≤ cap."""
        if self.failures <= 0:
            return 0.0
        return min(self.base * (2 ** min(self.failures - 1, 32)), self.cap)

    def failed(self, error: str, *, cause: str | None = None, delay: float | None = None,
               since: float | None = None) -> bool:
        """Count a failure and schedule the next attempt; True when `error` is new (log it).

        delay: wait this long instead of doubling (still at most `cap`). since: the clock time
        the attempt started, so a slow attempt does not stretch the period (default: now).
        """
        if cause != self.cause:
            self.failures = 0
        self.failures += 1
        self.cause = cause
        new = error != self.error
        self.error = error
        wait = self.doubling_delay() if delay is None else min(max(delay, 0.0), self.cap)
        start = self.clock() if since is None else since
        self.next_at = start + wait
        return new

    def succeeded(self, next_in: float = 0.0) -> bool:
        """Reset; the next attempt (if any) in `next_in` seconds. True when it was failing."""
        was_failing = self.failures > 0
        self.failures, self.error, self.cause = 0, None, None
        self.next_at = self.clock() + next_in
        return was_failing

    def reset(self) -> None:
        """Forget everything, next attempt at once (a new ECS registration, a new volume)."""
        self.failures, self.error, self.cause = 0, None, None
        self.next_at = 0.0
