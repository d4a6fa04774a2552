"""Capacity, the pure decisions: grow the ext4? to what size? the cap, the 6 h cool-down (fixed
clocks); the grow-fs step of bootstrap's plan; the two agent reconcilers with stand-in runners."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from hostagent.adapters.resize import MountedFs
from hostagent.capacity import (GIB, capacity_check, decide_auto_grow, fs_needs_grow, gib,
                                grow_not_before, grow_target_gib, next_modification_at)
from hostagent.config import CapacityConfig, parse_config
from hostagent.reconcilers import (AUTO_GROW_RETRY, AutoGrow, ClaimResult, FilesystemGrow,
                                   grow_timeout)
from tests.unit.test_bootstrap_plan import (LAID_OUT, PRIVATE_ROOT, MOUNTED, SB, UUID, FSTAB_LINE,
                                            observation, plan)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
ON = CapacityConfig(auto_grow=True)  # below 15% free, +50%, cap 1024 GiB


@pytest.mark.parametrize("device, fs, grow", [
    (16 * GIB, 16 * GIB, False),
    (16 * GIB, 16 * GIB - 4096, False),  # mkfs rounds down to whole blocks: not a resize
    (int(16 * GIB * 1.01), 16 * GIB, False),  # exactly 1% larger: not more than 1%
    (int(16 * GIB * 1.01) + 4096, 16 * GIB, True),
    (32 * GIB, 16 * GIB, True),  # a console resize
    (8 * GIB, 16 * GIB, False),  # never a shrink
    (None, 16 * GIB, False), (16 * GIB, None, False), (0, 0, False),
])
def test_fs_needs_grow(device, fs, grow):
    assert fs_needs_grow(device, fs) is grow


@pytest.mark.parametrize("current, percent, cap, target", [
    (8, 50, 1024, 12),
    (3, 50, 1024, 5),  # 4.5 rounds up
    (1, 50, 1024, 2),
    (2, 10, 1024, 3),  # 10% of 2 GiB is less than the minimum +1 GiB
    (100, 10, 1024, 110),
    (1000, 50, 1024, 1024),  # stops at the cap
    (1023, 50, 1024, 1024),
    (1024, 50, 1024, None),  # at the cap: no room
    (2000, 50, 1024, None),  # above it (grown by hand): auto-grow does nothing
])
def test_grow_target(current, percent, cap, target):
    assert grow_target_gib(current, percent, cap) == target


def decide(free, current=8, pending=False, capacity=ON, not_before=None, now=NOW):
    return decide_auto_grow(free_pct=free, current_gib=current, fs_grow_pending=pending,
                            capacity=capacity, not_before=not_before, now=now)


def test_auto_grow_decisions():
    assert decide(10.0, capacity=CapacityConfig()).action == "none"  # off by default
    assert decide(None).action == "none"
    assert decide(15.0).action == "none"  # not below the threshold
    d = decide(14.9)
    assert (d.action, d.target_gib) == ("grow", 12) and "8 -> 12 GiB" in d.reason
    assert decide(14.9, pending=True).action == "wait"  # the ext4 catches up first
    cap = decide(5.0, current=1024)
    assert cap.action == "at-cap" and "capacity.max_size_gib = 1024" in cap.reason


def test_cool_down_with_a_fixed_clock():
    last = NOW - timedelta(hours=1)
    not_before = next_modification_at(last)
    assert not_before == NOW + timedelta(hours=5)
    wait = decide(10.0, not_before=not_before)
    assert (wait.action, wait.target_gib, wait.not_before) == ("wait", 12, not_before)
    assert "the next from 2026-03-01 17:00 UTC" in wait.reason
    assert decide(10.0, not_before=not_before, now=NOW + timedelta(hours=5)).action == "grow"
    # The cap is said even during the cool-down: waiting would not help.
    assert decide(10.0, current=1024, not_before=not_before).action == "at-cap"


def test_cool_down_comes_from_the_record_of_this_volume():
    record = {"volume_id": "vol-1", "last_modification_at": "2026-03-01T11:00:00+00:00"}
    assert grow_not_before(record, "vol-1") == NOW + timedelta(hours=5)
    assert grow_not_before(record, "vol-2") is None  # a restore swapped the volume
    assert grow_not_before(record, None) == NOW + timedelta(hours=5)
    refused = {**record, "next_possible_at": "2026-03-02T00:00:00Z"}  # EC2 said later
    assert grow_not_before(refused, "vol-1") == datetime(2026, 3, 2, tzinfo=timezone.utc)
    assert grow_not_before({"last_modification_at": "garbage"}, "vol-1") is None
    assert grow_not_before(None, "vol-1") is None


def test_capacity_check_fails_only_at_the_cap():
    ok, detail = capacity_check(decide(5.0, current=1024))
    assert not ok and "capacity.max_size_gib = 1024" in detail and "hostagent grow" in detail
    assert capacity_check(decide(5.0))[0] is True
    assert capacity_check(decide(50.0))[0] is True
    assert capacity_check(decide(5.0, not_before=NOW + timedelta(hours=1)))[0] is True


def test_gib_text():
    assert (gib(16 * GIB), gib(int(1.5 * GIB)), gib(16 * GIB - 4096)) == \
        ("16 GiB", "1.5 GiB", "16 GiB")


@pytest.mark.parametrize("capacity, needle", [
    ({"grow_when_free_below": 0}, "between 1 and 99"),
    ({"grow_when_free_below": 100}, "between 1 and 99"),
    ({"grow_by_percent": 0}, "grow_by_percent must be between 1 and 1000"),
    ({"max_size_gib": 0}, "max_size_gib must be between 1 and 65536"),
    ({"max_size_gib": 70000}, "max_size_gib must be between 1 and 65536"),
    ({"auto_grow": "yes"}, "capacity.auto_grow must be true or false"),
    ({"max_size_gib": "1T"}, "capacity.max_size_gib must be an integer"),
    ({"grow_by": 50}, "unknown key capacity.grow_by"),
    ({"auto_grow": True, "grow_when_free_below": 5}, "below filesystem.min_free_percent (10%)"),
])
def test_capacity_config_is_checked_at_load(capacity, needle):
    from hostagent.errors import EXIT_USAGE, ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config({"volume": {"tags": {"Name": "x"}}, "capacity": capacity})
    assert needle in str(err.value) and err.value.exit_code == EXIT_USAGE


def test_capacity_defaults_and_auto_grow_needs_an_ebs_volume():
    from hostagent.errors import ConfigError

    c = parse_config({"volume": {"device": "/dev/loop7"}})
    assert c.capacity == CapacityConfig(False, 15, 50, 1024, True)
    with pytest.raises(ConfigError, match="auto_grow needs an EBS volume"):
        parse_config({"volume": {"device": "/dev/loop7"}, "capacity": {"auto_grow": True}})
    assert parse_config({"volume": {"id": "vol-0123456789abcdef0"},
                         "capacity": {"auto_grow": True}}).capacity.auto_grow


# -- bootstrap's grow-fs step (pure: observation in, steps out) ---------------------------------


def mounted_obs(device_gib=32, fs_gib=16, **changes):
    dev = observation().device._replace(size_bytes=device_gib * GIB)
    base = dict(device=dev, evidence=None, known_uuid=UUID,
                superblock=SB._replace(size_bytes=fs_gib * GIB), fstab_text=FSTAB_LINE,
                mount_point_kind="dir", mounted=MOUNTED, layout=LAID_OUT, mount_root=PRIVATE_ROOT,
                guard_recorded=True)
    return observation(**{**base, **changes})


def test_grow_fs_is_planned_last_when_the_device_outgrew_the_ext4():
    steps = plan(mounted_obs())
    assert [s.name for s in steps][-2:] == ["layout", "grow-fs"]
    grow = steps[-1]
    assert grow.op == ("grow-fs", {"major_minor": "7:3"})
    assert grow.action == "resize2fs /dev/loop3 (16 GiB -> 32 GiB, online)"
    assert "100% larger" in grow.reason


def test_grow_fs_after_the_mount_at_boot():
    obs = mounted_obs(mounted=None, layout=None, mount_point_kind="dir", bare_immutable=True)
    names = [s.name for s in plan(obs)]
    assert names.index("mount") < names.index("grow-fs")


def test_no_grow_fs_when_the_ext4_covers_the_device_or_is_new():
    assert "grow-fs" not in [s.name for s in plan(mounted_obs(device_gib=16))]
    assert "grow-fs" not in [s.name for s in plan()]  # a blank disk: mkfs covers all of it


@pytest.mark.parametrize("changes, why", [
    ({"mounted": MOUNTED._replace(options=("ro",))}, "read-only"),
    ({"superblock": SB._replace(size_bytes=16 * GIB, error_count=3)}, "records errors"),
])
def test_grow_fs_is_skipped_with_the_reason_when_it_cannot_run(changes, why):
    grow = plan(mounted_obs(**changes))[-1]
    assert grow.name == "grow-fs" and grow.op is None and why in grow.reason


# -- the agent's reconcilers (stand-in runners, fake clock) -------------------------------------


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def fs(device_gib=2, fs_gib=1, free=10.0):
    return MountedFs("/opt/couchdb", "7:3", "/dev/loop3", "ext4", False, device_gib * GIB,
                     fs_gib * GIB, False, free)


def finish(reconciler):
    """Wait for the background attempt, then collect it."""
    import time

    deadline = time.monotonic() + 5
    while reconciler.job.running and time.monotonic() < deadline:
        time.sleep(0.01)
    return reconciler.collect()


def test_filesystem_grow_runs_when_the_device_grew_and_backs_off_on_failure():
    clock, calls, outcomes = Clock(), [], [RuntimeError, "ext4 1 GiB -> 2 GiB"]

    def grow(major_minor):
        from hostagent.errors import OperationError

        calls.append(major_minor)
        outcome = outcomes.pop(0)
        if outcome is RuntimeError:
            raise OperationError("the kernel refused", hint="CAP_SYS_RESOURCE")
        return outcome

    r = FilesystemGrow(grow, interval=30, clock=clock, wake=lambda: None)
    r.observe(fs(device_gib=1))
    assert not r.start_if_due()  # nothing to grow
    r.observe(fs())
    assert not r.start_if_due(blocked=True)  # a `hostagent grow` child is at it
    assert r.start_if_due()
    assert finish(r) == "failed" and calls == ["7:3"] and r.text() == "fs-failed"
    assert not r.start_if_due()  # backed off: one interval
    clock.t += 30
    assert r.start_if_due()
    assert finish(r) == "grown" and calls == ["7:3", "7:3"]
    r.observe(fs(device_gib=2, fs_gib=2))
    assert r.wanted is None and not r.start_if_due() and r.text() is None


def test_auto_grow_runs_the_child_only_when_decided_and_backs_off_after_a_failure():
    clock, sizes = Clock(), []
    results = [ClaimResult(1, "modification-rate", "EC2 allows one…"), ClaimResult(0, "none")]

    def grow(size):
        sizes.append(size)
        return results.pop(0)

    decisions = {}

    def decide_for(f):
        return decide(f.free_pct, current=f.device_bytes // GIB, pending=f.needs_grow,
                      not_before=decisions.get("not_before"))

    r = AutoGrow(decide_for, grow, clock=clock, wake=lambda: None)
    r.observe(fs(device_gib=8, fs_gib=8, free=50.0))
    assert not r.start_if_due()
    r.observe(fs(device_gib=8, fs_gib=8, free=10.0))
    assert not r.start_if_due(blocked=True)
    assert r.start_if_due() and finish(r) == "failed" and sizes == [12]
    assert not r.start_if_due()  # backed off
    clock.t += AUTO_GROW_RETRY
    assert r.start_if_due() and finish(r) == "grown" and sizes == [12, 12]
    decisions["not_before"] = NOW + timedelta(hours=6)  # the child's record
    r.observe(fs(device_gib=12, fs_gib=12, free=10.0))
    assert r.decision.action == "wait" and not r.start_if_due()
    r.observe(fs(device_gib=1024, fs_gib=1024, free=10.0))
    assert r.decision.action == "at-cap" and r.text() == "at-cap"


def test_the_grow_child_may_take_every_phase_and_the_lock_wait():
    assert 3000 < grow_timeout() < 4 * 3600


def test_rate_exceeded_error_says_when_and_records_it(tmp_path):
    from hostagent.aws.modify import Modification
    from hostagent.flows.grow import rate_exceeded_error

    config = parse_config({"volume": {"id": "vol-0123456789abcdef0"},
                           "host": {"state_dir": str(tmp_path)}})
    last = Modification("vol-0123456789abcdef0", "completed", 8, 12, 100,
                        NOW - timedelta(hours=2))
    err = rate_exceeded_error(config, "vol-0123456789abcdef0", last, now=NOW)
    assert err.reason == "modification-rate" and err.exit_code == 1
    assert "the last started 2026-03-01 10:00 UTC, so the next is possible from " \
           "2026-03-01 16:00 UTC" in str(err)
    record = json.loads((tmp_path / "capacity.json").read_text())
    assert record["next_possible_at"] == "2026-03-01T16:00:00+00:00"
    unknown = rate_exceeded_error(config, "vol-0123456789abcdef0", None, now=NOW)
    assert "EC2 lists no recent one; try again after 2026-03-01 18:00 UTC" in str(unknown)


def test_grow_goes_to_argparse_and_takes_an_integer_size():
    from hostagent.cli import build_parser, fast_parse

    assert fast_parse(["grow", "--size", "12"]) is None
    args = build_parser(only="grow").parse_args(["grow", "--size", "12", "--dry-run"])
    assert (args.size, args.dry_run, args.no_snapshot) == (12, True, False)
