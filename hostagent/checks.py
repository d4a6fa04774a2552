"""Checks of the persistence mount, without AWS calls: verify-mount prints them, the agent reports them."""

from __future__ import annotations

import os
from dataclasses import dataclass

from hostagent.adapters import fstab as fstab_mod
from hostagent.adapters.blockdev import device_path_of
from hostagent.adapters.layout import (MOUNT_ROOT_GROUP, MOUNT_ROOT_MODE, MOUNT_ROOT_OWNER,
                                       inspect_layout, inspect_mount_root, layout_problem,
                                       mount_root_problem)
from hostagent.adapters.mounts import mount_at, read_mountinfo
from hostagent.errors import HostagentError
from hostagent.state import VOLUME_RECORD, read_record


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def expected_device(config) -> tuple[str | None, str]:
    """major:minor of the configured volume's device, and how we know it (no AWS call)."""
    from hostagent.adapters.blockdev import device_number, list_block_devices

    vol = config.volume
    if vol.device:
        number = device_number(vol.device)
        if number is None:
            return None, f"volume.device {vol.device} is not a block device"
        return number, f"volume.device {vol.device}"
    record = read_record(config.host.state_dir, VOLUME_RECORD) or {}
    volume_id = vol.id or record.get("volume_id")
    if volume_id:
        for dev in list_block_devices():
            if dev.volume_id == volume_id:
                return dev.major_minor, f"{volume_id} is {dev.path}"
        if record.get("volume_id") == volume_id and record.get("major_minor"):
            return record["major_minor"], f"{volume_id} (last bootstrap: {record.get('device')})"
        return None, f"no block device carries {volume_id}"
    return None, "volume not known yet (run `hostagent bootstrap`)"


def run_checks(config) -> list[Check]:
    fs = config.filesystem
    layout = config.layout
    checks: list[Check] = []
    mp = os.path.normpath(fs.mount_point)
    mount = mount_at(mp, read_mountinfo())
    if mount is None:
        checks.append(Check("mounted", False, f"nothing is mounted at {mp}"))
        return checks + _unmounted_checks(config, mp)
    checks.append(Check("mounted", True, f"{mount.source} on {mp}"))

    want, how = expected_device(config)
    if want is None:
        checks.append(Check("device", False, f"cannot tell which device is the volume: {how}"))
    elif want == mount.major_minor:
        checks.append(Check("device", True, f"{mount.source} is the configured volume ({how})"))
    else:
        checks.append(Check("device", False, f"{mount.source} ({mount.major_minor}) is mounted, "
                                             f"but the volume is {want} ({how})"))

    checks.append(Check("fstype", mount.fstype == fs.type,
                        f"{mount.fstype}" + ("" if mount.fstype == fs.type else f", want {fs.type}")))
    checks.append(Check("writable", not mount.read_only,
                        "mounted read-write" if not mount.read_only else
                        "mounted read-only (I/O errors make ext4 remount ro: check dmesg)"))
    checks.append(_fstab_check(config, mount))
    checks.append(_fs_errors_check(mount))
    root = inspect_mount_root(mp)
    problem = mount_root_problem(root)
    checks.append(Check(f"layout {root.relative}", problem is None, problem or
                        f"{MOUNT_ROOT_OWNER}:{MOUNT_ROOT_GROUP} {MOUNT_ROOT_MODE:04o} (private)"))
    for state in inspect_layout(mp, layout.directories):
        problem = layout_problem(state, layout.owner, layout.group, layout.mode_bits)
        checks.append(Check(f"layout {state.relative}", problem is None,
                            problem or f"{layout.owner}:{layout.group} {layout.mode_bits:04o}"))
    checks.append(_free_space_check(mp, fs.min_free_percent))
    if config.capacity.auto_grow:
        checks.append(_capacity_check(config))
    return checks


def decide_capacity(config, fs, now=None):
    """What auto-grow does about the mounted ext4 `fs` (adapters.resize.MountedFs) now: the
    decision from its free space, its size, the cap and the cool-down kept in the state dir."""
    from datetime import datetime, timezone

    from hostagent.capacity import CAPACITY_RECORD, decide_auto_grow, grow_not_before, size_gib

    not_before = None
    if fs.free_pct is not None and fs.free_pct < config.capacity.grow_when_free_below:
        # The records matter only when auto-grow would act: not read every round.
        record = read_record(config.host.state_dir, CAPACITY_RECORD)
        volume_id = config.volume.id or (read_record(config.host.state_dir, VOLUME_RECORD)
                                         or {}).get("volume_id")
        not_before = grow_not_before(record, volume_id)
    return decide_auto_grow(free_pct=fs.free_pct, current_gib=size_gib(fs.device_bytes or 0),
                            fs_grow_pending=fs.needs_grow, capacity=config.capacity,
                            not_before=not_before, now=now or datetime.now(timezone.utc))


def _capacity_check(config) -> Check:
    """With auto-grow on: fails only when the volume is at capacity.max_size_gib and free space
    is still below grow_when_free_below (auto-grow can do nothing more)."""
    from hostagent.adapters.resize import observe_mounted
    from hostagent.capacity import capacity_check

    fs = observe_mounted(config.filesystem.mount_point)
    if fs is None:
        return Check("capacity", False, "nothing mounted")
    ok, detail = capacity_check(decide_capacity(config, fs))
    return Check("capacity", ok, detail)


def _unmounted_checks(config, mp: str) -> list[Check]:
    """When nothing is mounted, the root-disk guard is what protects CouchDB's data."""
    from hostagent.adapters.mounts import is_immutable

    if not os.path.isdir(mp):
        return [Check("guard", False, f"{mp} does not exist (bootstrap creates it immutable)")]
    immutable = is_immutable(mp)
    if immutable:
        return [Check("guard", True, f"bare {mp} is immutable: nothing can write to the root disk")]
    return [Check("guard", False, f"bare {mp} is writable: Docker could create data/ on the root "
                                  "disk (run `hostagent bootstrap`)")]


def _fs_errors_check(mount) -> Check:
    """An ext4 whose superblock (or the kernel, for a mounted one) records errors is damaged
    even while it still mounts read-write."""
    from hostagent.adapters.superblock import mounted_error_count, read_superblock

    dev_path = device_path_of(mount.major_minor)
    sb = read_superblock(dev_path) if dev_path else None
    live = mounted_error_count(os.path.basename(dev_path)) if dev_path else None
    count = max(sb.error_count if sb else 0, live or 0)
    if sb is None and live is None:
        return Check("fs-errors", False, f"cannot read the superblock of {mount.source}")
    if count or (sb and sb.has_errors):
        return Check("fs-errors", False,
                     f"{mount.source} records {count} filesystem error(s)"
                     f"{' and its state says errors' if sb and sb.has_errors else ''}: snapshot "
                     f"it, stop CouchDB, umount and run `e2fsck -f {mount.source}`")
    return Check("fs-errors", True, "no errors recorded")


def _fstab_check(config, mount) -> Check:
    from hostagent.adapters.superblock import read_superblock

    fs = config.filesystem
    try:
        text = fstab_mod.read_fstab(fs.fstab)
    except HostagentError as exc:
        return Check("fstab", False, str(exc))
    entry = fstab_mod.find_entry(text, fs.mount_point)
    if entry is None:
        return Check("fstab", False, f"no line for {fs.mount_point} in {fs.fstab}: it will not "
                                     "mount at boot")
    problems = []
    if not entry.spec.startswith("UUID="):
        problems.append(f"by {entry.spec}, not by UUID=")
    if "nofail" not in entry.mntops:
        problems.append("no nofail (a missing volume would stop the boot)")
    dev_path = device_path_of(mount.major_minor)
    sb = read_superblock(dev_path) if dev_path else None
    if entry.spec.startswith("UUID=") and sb and entry.spec[5:].lower() != sb.uuid.lower():
        problems.append(f"{entry.spec} but the mounted filesystem is UUID={sb.uuid}")
    if problems:
        return Check("fstab", False, "; ".join(problems) + f" ({fs.fstab})")
    return Check("fstab", True, f"{entry.spec} nofail")


def _free_space_check(mp: str, min_free_percent: int) -> Check:
    st = os.statvfs(mp)
    if st.f_blocks == 0:
        return Check("free-space", False, "filesystem reports no blocks")
    free_pct = 100.0 * st.f_bavail / st.f_blocks
    free_gib = st.f_bavail * st.f_frsize / 2**30
    ok = free_pct >= min_free_percent
    detail = f"{free_pct:.1f}% free ({free_gib:.2f} GiB)"
    return Check("free-space", ok, detail if ok else f"{detail}, below {min_free_percent}%")
