"""Capacity decisions, all pure: does the ext4 need growing, to what size, may auto-grow act now."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NamedTuple

if TYPE_CHECKING:
    from datetime import datetime

GIB = 1 << 30
# The filesystem is grown when the device is more than this much larger: mkfs rounds the size
# down to whole blocks (and a hand-made ext4 may leave a little), which must never look like a
# resize; a console resize adds at least 1 GiB.
GROW_FS_MARGIN = 0.01
# EC2 allows one modification per volume per 6 h (API reference: "wait at least six hours ...
# before you can modify the same volume"); auto-grow never tries more often than that.
# (datetime is imported only where times are handled: this module is on bootstrap's boot path.)
MODIFICATION_COOLDOWN_HOURS = 6
MIN_GROW_GIB = 1  # auto-grow adds at least this much
# Bounds of what ModifyVolume can do: io2 Block Express reaches 64 TiB (gp3 16 TiB).
MAX_VOLUME_GIB = 65536
# How long `hostagent grow` waits for each phase (seconds); the agent's child timeout is their sum.
MODIFY_TIMEOUT = 900.0  # ModifyVolume -> optimizing: seconds to minutes in practice
DEVICE_TIMEOUT = 300.0  # optimizing -> the kernel shows the new size (NVMe AEN or rescan)
RESIZE_TIMEOUT = 1800.0  # online resize2fs: seconds per TiB added, bounded generously
SNAPSHOT_MARGIN = 300.0  # freeze + CreateSnapshot + IMDS and EC2 calls
CAPACITY_RECORD = "capacity.json"  # the last modification hostagent made or was refused


def fs_needs_grow(device_bytes: int | None, fs_bytes: int | None) -> bool:
    """The block device is more than GROW_FS_MARGIN larger than its ext4 (never a shrink)."""
    if not device_bytes or not fs_bytes:
        return False
    return device_bytes > fs_bytes * (1 + GROW_FS_MARGIN)


def gib(size_bytes: int) -> str:
    """'16 GiB', '1.5 GiB': sizes in operator messages."""
    value = size_bytes / GIB
    return f"{value:.0f} GiB" if abs(value - round(value)) < 0.05 else f"{value:.1f} GiB"


def size_gib(device_bytes: int) -> int:
    """The volume size in whole GiB as the host sees it (EBS sizes are whole GiB)."""
    return device_bytes // GIB


def grow_target_gib(current_gib: int, grow_by_percent: int, max_size_gib: int) -> int | None:
    """current + grow_by_percent (rounded up, at least +1 GiB), at most max_size_gib; None when
    the cap leaves no room to grow."""
    wanted = max(current_gib + MIN_GROW_GIB, -(-current_gib * (100 + grow_by_percent) // 100))
    target = min(wanted, max_size_gib)
    return target if target > current_gib else None


def free_percent(blocks: int, available: int) -> float | None:
    """statvfs f_blocks / f_bavail -> percent free, as verify-mount's free-space check counts it."""
    return 100.0 * available / blocks if blocks else None


def next_modification_at(last_start: datetime | None) -> datetime | None:
    """When EC2 accepts the next modification of a volume last modified at last_start."""
    from datetime import timedelta

    if last_start is None:
        return None
    return last_start + timedelta(hours=MODIFICATION_COOLDOWN_HOURS)


def parse_time(value) -> datetime | None:
    """An ISO 8601 time (a record's, EC2's) as an aware datetime; None when it is not one."""
    from datetime import datetime, timezone

    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str) and value:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def grow_not_before(record: Mapping | None, volume_id: str | None) -> datetime | None:
    """From the capacity record: the earliest time auto-grow may modify this volume again.

    A record of another volume (a restore swapped it) says nothing about this one."""
    if not record:
        return None
    if volume_id and record.get("volume_id") and record.get("volume_id") != volume_id:
        return None
    times = [next_modification_at(parse_time(record.get("last_modification_at"))),
             parse_time(record.get("next_possible_at"))]
    times = [t for t in times if t is not None]
    return max(times) if times else None


class AutoGrow(NamedTuple):
    """What auto-grow does this round: action is "none", "grow", "wait" or "at-cap"."""

    action: str
    reason: str
    target_gib: int | None = None
    not_before: datetime | None = None


def decide_auto_grow(*, free_pct: float | None, current_gib: int, fs_grow_pending: bool,
                     capacity, not_before: datetime | None, now: datetime) -> AutoGrow:
    """PURE: grow now (to what), wait (why, until when), at the cap, or nothing to do.

    capacity: config.CapacityConfig (auto_grow, grow_when_free_below, grow_by_percent,
    max_size_gib). not_before: grow_not_before() of the capacity record.
    """
    threshold = capacity.grow_when_free_below
    if not capacity.auto_grow or free_pct is None:
        return AutoGrow("none", "auto-grow is off" if not capacity.auto_grow else
                        "free space unknown")
    if free_pct >= threshold:
        return AutoGrow("none", f"{free_pct:.1f}% free, not below {threshold}%")
    below = f"{free_pct:.1f}% free, below {threshold}%"
    if fs_grow_pending:
        return AutoGrow("wait", f"{below}, but the device is already larger than its ext4: "
                                "growing the filesystem first")
    target = grow_target_gib(current_gib, capacity.grow_by_percent, capacity.max_size_gib)
    if target is None:
        return AutoGrow("at-cap", f"{below} and the volume is {current_gib} GiB, at "
                                  f"capacity.max_size_gib = {capacity.max_size_gib}")
    if not_before is not None and now < not_before:
        return AutoGrow("wait", f"{below}; EC2 allows one modification per volume per 6 h: "
                                f"the next from {utc_text(not_before)}", target, not_before)
    return AutoGrow("grow", f"{below}: {current_gib} -> {target} GiB "
                            f"(+{capacity.grow_by_percent}%, cap {capacity.max_size_gib} GiB)",
                    target)


def capacity_check(decision: AutoGrow) -> tuple[bool, str]:
    """verify-mount's `capacity` check (auto-grow on): it fails only at the cap."""
    if decision.action == "at-cap":
        return False, (f"{decision.reason}: auto-grow stops there; free space, or raise "
                       "capacity.max_size_gib and run `hostagent grow --size N`")
    if decision.action == "grow":
        return True, f"{decision.reason}: auto-grow will grow it"
    return True, decision.reason


def utc_text(when: datetime) -> str:
    from datetime import timezone

    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
