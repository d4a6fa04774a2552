"""Which snapshots retention keeps and which it deletes: a pure function of plain data and a clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, Sequence

COMPLETED = "completed"


@dataclass(frozen=True)
class SnapshotRecord:
    """What retention and the listing need to know about one snapshot."""

    id: str
    start_time: datetime  # when the point in time was taken (tz-aware, UTC)
    state: str = COMPLETED  # pending | completed | error | recoverable | recovering
    progress: str = ""
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Decision:
    snapshot: SnapshotRecord
    keep: bool
    reasons: tuple[str, ...]  # why it is kept ("last 1", "daily 2024-05-01", "pending"…)


@dataclass(frozen=True)
class Policy:
    keep_last: int
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def __post_init__(self):
        if self.keep_last < 1:
            # Deleting every snapshot is never what a retention policy means.
            raise ValueError("keep_last must be at least 1")
        if min(self.keep_daily, self.keep_weekly, self.keep_monthly) < 0:
            raise ValueError("keep_daily/keep_weekly/keep_monthly must not be negative")


def _utc(moment: datetime) -> datetime:
    # AWS times are UTC; a naive time can only have come from a test or a bad parse: read it as UTC.
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _day(t: datetime) -> str:
    return t.strftime("%Y-%m-%d")


def _iso_week(t: datetime) -> str:
    year, week, _ = t.isocalendar()
    return f"{year}-W{week:02d}"


def _month(t: datetime) -> str:
    return t.strftime("%Y-%m")


BUCKETS: tuple[tuple[str, Callable[[datetime], str]], ...] = (
    ("daily", _day), ("weekly", _iso_week), ("monthly", _month),
)


def _newest_first(snapshots: Iterable[SnapshotRecord]) -> list[SnapshotRecord]:
    # The id breaks ties so two runs over the same data always decide the same way.
    return sorted(snapshots, key=lambda s: (_utc(s.start_time), s.id), reverse=True)


def decide_retention(
    snapshots: Sequence[SnapshotRecord], policy: Policy, *, now: datetime,
    protect_ids: Iterable[str] = (),
) -> list[Decision]:
    """Keep/delete for each snapshot, newest first, with the reasons a kept one is kept.

    The caller passes only snapshots that carry hostagent's marker for this volume. Like restic's
    and borg's `forget`: the newest `keep_last` are kept, and for daily/weekly(ISO)/monthly the
    newest snapshot of each of the last N buckets that hold a snapshot. Only completed snapshots
    count towards the policy and only they may be deleted: a pending one is not a restore point
    yet (it may still fail), so it neither replaces an older completed one nor goes away. Protected
    ids (the snapshot just made) and snapshots dated after `now` (clock skew) are always kept.
    """
    now = _utc(now)
    protected = set(protect_ids)
    ordered = _newest_first(snapshots)
    reasons: dict[str, list[str]] = {s.id: [] for s in ordered}

    for snap in ordered:
        if snap.id in protected:
            reasons[snap.id].append("protected")
        if snap.state != COMPLETED:
            reasons[snap.id].append(snap.state or "unknown state")
        if _utc(snap.start_time) > now:
            reasons[snap.id].append("dated in the future")

    completed = [s for s in ordered if s.state == COMPLETED]
    for index, snap in enumerate(completed[: policy.keep_last]):
        reasons[snap.id].append(f"last {index + 1}")

    for (name, bucket_of), count in zip(BUCKETS, (policy.keep_daily, policy.keep_weekly,
                                                   policy.keep_monthly)):
        seen: set[str] = set()
        for snap in completed:
            if len(seen) >= count:
                break
            bucket = bucket_of(_utc(snap.start_time))
            if bucket not in seen:
                seen.add(bucket)
                reasons[snap.id].append(f"{name} {bucket}")

    return [Decision(s, keep=bool(reasons[s.id]), reasons=tuple(reasons[s.id])) for s in ordered]


def snapshots_to_delete(
    snapshots: Sequence[SnapshotRecord], *, keep_last: int, keep_daily: int = 0,
    keep_weekly: int = 0, keep_monthly: int = 0, now: datetime, protect_ids: Iterable[str] = (),
) -> list[SnapshotRecord]:
    """The snapshots retention deletes, newest first (see decide_retention)."""
    policy = Policy(keep_last, keep_daily, keep_weekly, keep_monthly)
    return [d.snapshot for d in decide_retention(snapshots, policy, now=now,
                                                 protect_ids=protect_ids) if not d.keep]
