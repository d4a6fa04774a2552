"""Plan, then apply: a flow lists its steps (what and why) once; --dry-run prints them and stops."""

from __future__ import annotations

from typing import Callable, Iterable

from hostagent.log import get_logger
from hostagent.report import render_table

log = get_logger(__name__)

PLANNED, DONE, SKIPPED, FAILED = "planned", "done", "skipped", "failed"


class Step:
    """One step of a plan: what it does, why, and how (run, or op bound to an executor).

    A plain class (not a dataclass: the dataclasses module costs ~5 ms to import, and this is
    on the reboot path)."""

    __slots__ = ("name", "action", "reason", "run", "status", "detail", "op")

    def __init__(self, name: str, action: str, reason: str,
                 run: Callable[[], str | None] | None = None, status: str = PLANNED,
                 detail: str = "", op: tuple[str, dict] | None = None):
        self.name = name
        self.action = action  # what it does, e.g. "mkfs.ext4 -L couchdb /dev/nvme1n1"
        self.reason = reason  # why, e.g. "device proven blank"
        self.run = run  # None (and no op): already in the desired state
        self.status = status
        self.detail = detail
        # The change as plain data, for flows whose planner is pure (bootstrap): ("mkfs", {...}).
        # The flow binds it to an executor (sets run) before applying.
        self.op = op

    def __repr__(self) -> str:
        return f"Step({self.name!r}, {self.status}, op={self.op!r})"

    @property
    def needed(self) -> bool:
        return self.run is not None or self.op is not None

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "action": self.action,
                "reason": self.reason, "detail": self.detail}


class Unchanged(str):
    """Returned by a step's run when, looking closer, nothing needed doing: status skipped."""


def skipped(name: str, action: str, reason: str) -> Step:
    return Step(name, action, reason, run=None, status=SKIPPED)


def apply_steps(steps: Iterable[Step], *, dry_run: bool, on_step=None) -> list[Step]:
    """Run each needed step in order; a failing step is marked and its error propagates."""
    done: list[Step] = []
    for step in steps:
        done.append(step)
        if not step.needed:
            step.status = SKIPPED
        elif dry_run:
            step.status = PLANNED
        else:
            try:
                result = step.run()
            except BaseException:
                step.status = FAILED
                if on_step:
                    on_step(step)
                raise
            step.detail = result or ""
            step.status = SKIPPED if isinstance(result, Unchanged) else DONE
        log.info("%s: %s (%s: %s)", step.name, step.status, step.action, step.reason)
        if on_step:
            on_step(step)
    return done


def render_steps(steps: Iterable[Step]) -> str:
    rows = [(s.status, s.name, s.action, s.detail or s.reason) for s in steps]
    return render_table(rows, ("STATUS", "STEP", "ACTION", "WHY"))
