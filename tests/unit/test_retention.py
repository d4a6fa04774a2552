"""Retention selection with fixed clocks: keep_last, daily/weekly(ISO)/monthly buckets, protection."""

from datetime import datetime, timedelta, timezone

import pytest

from hostagent.retention import Policy, SnapshotRecord, decide_retention, snapshots_to_delete

NOW = datetime(2024, 3, 10, 12, 0, tzinfo=timezone.utc)


def snap(sid, when, state="completed"):
    if isinstance(when, str):
        when = datetime.fromisoformat(when).replace(tzinfo=timezone.utc)
    return SnapshotRecord(id=sid, start_time=when, state=state)


def deleted_ids(snaps, now=NOW, protect=(), **policy):
    policy.setdefault("keep_last", 1)
    return [s.id for s in snapshots_to_delete(snaps, now=now, protect_ids=protect, **policy)]


def hourly(n, end=NOW):
    return [snap(f"snap-{i:03d}", end - timedelta(hours=i)) for i in range(n)]


def test_keep_last_keeps_the_newest_n_and_deletes_the_rest_newest_first():
    snaps = hourly(6)
    assert deleted_ids(snaps, keep_last=3) == ["snap-003", "snap-004", "snap-005"]


def test_input_order_does_not_matter():
    snaps = hourly(6)
    assert deleted_ids(list(reversed(snaps)), keep_last=2) == deleted_ids(snaps, keep_last=2)


def test_fewer_snapshots_than_keep_last_deletes_nothing():
    assert deleted_ids(hourly(2), keep_last=7) == []
    assert deleted_ids([], keep_last=1) == []


def test_protected_snapshot_is_never_deleted_and_does_not_push_others_out():
    # The snapshot just made, if it is oldest by clock skew or anything else, still stays.
    snaps = hourly(4) + [snap("snap-new", NOW - timedelta(days=30))]
    assert deleted_ids(snaps, keep_last=2, protect=["snap-new"]) == ["snap-002", "snap-003"]


def test_pending_snapshots_are_kept_and_do_not_count_towards_keep_last():
    snaps = [snap("snap-pending", NOW, state="pending")] + hourly(4, end=NOW - timedelta(hours=1))
    # keep_last=2 means two *completed* restore points besides the pending one.
    assert deleted_ids(snaps, keep_last=2) == ["snap-002", "snap-003"]


def test_error_state_snapshots_are_not_deleted_by_retention():
    snaps = hourly(3) + [snap("snap-broken", NOW - timedelta(days=9), state="error")]
    assert deleted_ids(snaps, keep_last=1) == ["snap-001", "snap-002"]


def test_snapshot_dated_after_now_is_kept():
    snaps = hourly(3) + [snap("snap-future", NOW + timedelta(days=2))]
    assert "snap-future" not in deleted_ids(snaps, keep_last=1)


def test_daily_keeps_newest_of_each_of_the_last_n_days_with_snapshots():
    snaps = [
        snap("d10-late", "2024-03-10T11:00"), snap("d10-early", "2024-03-10T01:00"),
        snap("d09-late", "2024-03-09T23:59"), snap("d09-early", "2024-03-09T00:00"),
        # no snapshot on 03-08: a gap day does not use up a bucket (restic/borg semantics)
        snap("d07-late", "2024-03-07T18:00"), snap("d07-early", "2024-03-07T06:00"),
        snap("d06", "2024-03-06T12:00"),
    ]
    assert deleted_ids(snaps, keep_last=1, keep_daily=3) == [
        "d10-early", "d09-early", "d07-early", "d06"]


@pytest.mark.parametrize("now,times,weekly,expected_kept", [
    # ISO week 1 of 2025 starts Monday 2024-12-30: 12-30 and 01-02 share a bucket.
    (datetime(2025, 1, 3, tzinfo=timezone.utc),
     ["2025-01-02T10:00", "2024-12-30T10:00", "2024-12-29T10:00", "2024-12-23T10:00"], 2,
     {"2025-01-02T10:00", "2024-12-29T10:00"}),
    # 2021-01-03 (Sunday) is ISO 2020-W53, together with 2020-12-28.
    (datetime(2021, 1, 5, tzinfo=timezone.utc),
     ["2021-01-04T00:00", "2021-01-03T23:00", "2020-12-28T00:00", "2020-12-27T00:00"], 2,
     {"2021-01-04T00:00", "2021-01-03T23:00"}),
])
def test_weekly_buckets_are_iso_weeks_across_the_year_boundary(now, times, weekly, expected_kept):
    snaps = [snap(t, t) for t in times]
    kept = {s.id for s in snaps} - set(deleted_ids(snaps, now=now, keep_last=1, keep_weekly=weekly))
    assert kept == expected_kept


def test_monthly_buckets_across_month_and_year_boundaries():
    times = ["2024-02-01T00:00", "2024-01-31T23:59", "2024-01-01T00:00", "2023-12-31T23:59",
             "2023-12-01T00:00", "2023-11-15T00:00"]
    snaps = [snap(t, t) for t in times]
    deleted = deleted_ids(snaps, now=datetime(2024, 2, 2, tzinfo=timezone.utc), keep_last=1,
                          keep_monthly=3)
    # kept: 02-01 (last + 2024-02), 01-31 (2024-01), 12-31 (2023-12)
    assert deleted == ["2024-01-01T00:00", "2023-12-01T00:00", "2023-11-15T00:00"]


def test_buckets_use_utc_not_the_local_offset_of_the_timestamp():
    # 23:30 at UTC-05:00 is 04:30 UTC the next day: the same UTC day as the other one.
    minus5 = timezone(timedelta(hours=-5))
    snaps = [snap("utc-day11", datetime(2024, 3, 11, 6, 0, tzinfo=timezone.utc)),
             snap("local-day10", datetime(2024, 3, 10, 23, 30, tzinfo=minus5))]
    assert deleted_ids(snaps, now=datetime(2024, 3, 12, tzinfo=timezone.utc), keep_last=1,
                       keep_daily=2) == ["local-day10"]


def test_policies_combine_as_a_union_with_reasons():
    snaps = [snap(f"s{d:02d}", datetime(2024, 3, d, 12, tzinfo=timezone.utc)) for d in range(1, 11)]
    decisions = {d.snapshot.id: d for d in decide_retention(
        snaps, Policy(keep_last=2, keep_daily=3, keep_weekly=2, keep_monthly=1), now=NOW)}
    assert decisions["s10"].reasons == ("last 1", "daily 2024-03-10", "weekly 2024-W10",
                                        "monthly 2024-03")
    assert decisions["s09"].reasons == ("last 2", "daily 2024-03-09")
    assert decisions["s08"].reasons == ("daily 2024-03-08",)
    # 2024-03-03 is the Sunday ending ISO week 9.
    assert decisions["s03"].reasons == ("weekly 2024-W09",)
    assert {k for k, d in decisions.items() if not d.keep} == {
        "s01", "s02", "s04", "s05", "s06", "s07"}


def test_naive_times_are_read_as_utc():
    snaps = [SnapshotRecord("a", datetime(2024, 3, 9, 23, 0)),
             SnapshotRecord("b", datetime(2024, 3, 9, 22, 0, tzinfo=timezone.utc))]
    assert deleted_ids(snaps, keep_last=1) == ["b"]


@pytest.mark.parametrize("bad", [dict(keep_last=0), dict(keep_last=1, keep_daily=-1)])
def test_a_policy_that_would_delete_everything_is_rejected(bad):
    with pytest.raises(ValueError):
        Policy(**bad)
