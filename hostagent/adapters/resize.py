"""Grow a mounted ext4 to its device's size with resize2fs, online: never unmounted, never smaller."""

from __future__ import annotations

import os
import time
from typing import NamedTuple

from hostagent import runner
from hostagent.capacity import RESIZE_TIMEOUT, fs_needs_grow, gib
from hostagent.errors import CommandError, OperationError, Reason, RefusedError
from hostagent.plan import Unchanged

# What resize2fs prints when the kernel refuses EXT4_IOC_RESIZE_FS with EPERM: the caller lacks
# CAP_SYS_RESOURCE (ext4_resize_begin checks it), e.g. a systemd unit without it in its
# CapabilityBoundingSet, or a container.
EPERM_TEXT = "Permission denied to resize filesystem"


class MountedFs(NamedTuple):
    """The ext4 mounted at a mount point, and what its device shows now (plain data)."""

    mount_point: str
    major_minor: str
    device: str | None  # /dev path, from sysfs
    fstype: str
    read_only: bool
    device_bytes: int | None  # sysfs size now
    fs_bytes: int | None  # superblock blocks x block size
    records_errors: bool
    free_pct: float | None  # statvfs, as verify-mount's free-space check counts it

    @property
    def needs_grow(self) -> bool:
        return self.fstype == "ext4" and fs_needs_grow(self.device_bytes, self.fs_bytes)


def observe_mounted(mount_point: str) -> MountedFs | None:
    """Look at what is mounted at mount_point (mountinfo, sysfs, superblock, statvfs); None when
    nothing is. Reads only: a few small files and 1 KiB of the device."""
    from hostagent.adapters.blockdev import device_path_of, size_of
    from hostagent.adapters.mounts import mount_at, read_mountinfo
    from hostagent.adapters.superblock import mounted_error_count, read_superblock
    from hostagent.capacity import free_percent

    mp = os.path.normpath(mount_point)
    entry = mount_at(mp, read_mountinfo())
    if entry is None:
        return None
    device = device_path_of(entry.major_minor)
    sb = read_superblock(device) if device and entry.fstype == "ext4" else None
    errors = bool(sb and sb.records_errors) or bool(
        device and mounted_error_count(os.path.basename(device)))
    try:
        st = os.statvfs(mp)
        free = free_percent(st.f_blocks, st.f_bavail)
    except OSError:
        free = None
    return MountedFs(mp, entry.major_minor, device, entry.fstype, entry.read_only,
                     size_of(entry.major_minor), sb.size_bytes if sb else None, errors, free)


def grow_ext4_online(mount_point: str, major_minor: str, *, run=runner.run,
                     timeout: float = RESIZE_TIMEOUT) -> str:
    """resize2fs the ext4 mounted at mount_point from device major_minor to the device's size.

    Looked at again right before: it must still be that device, mounted read-write, ext4, with no
    recorded errors, and the device larger than the filesystem; otherwise nothing runs (a grown
    filesystem is Unchanged, the rest are errors). resize2fs without a size grows to the device's
    size, and a mounted ext4 is only ever grown online by the kernel: it cannot shrink.
    """
    fs = observe_mounted(mount_point)
    if fs is None or fs.major_minor != major_minor:
        got = "nothing" if fs is None else f"device {fs.major_minor}"
        raise OperationError(f"{mount_point} has {got} mounted, not {major_minor}; not growing "
                             "anything (resize2fs runs only on the mounted volume)",
                             where=mount_point, hint="run `hostagent bootstrap` to mount it")
    where = fs.device or major_minor
    if fs.fstype != "ext4" or fs.fs_bytes is None or fs.device is None:
        raise OperationError(f"{mount_point} holds {fs.fstype}, not a readable ext4; not growing "
                             "it", where=where)
    if fs.read_only:
        raise OperationError(f"{mount_point} is mounted read-only; resize2fs grows only a "
                             "read-write mount", where=where,
                             hint="ext4 remounts read-only after I/O errors: check dmesg")
    if fs.records_errors:
        raise RefusedError(f"the ext4 on {fs.device} records errors; refusing to grow a damaged "
                           "filesystem", where=where, reason=Reason.FS_DAMAGED,
                           hint=f"snapshot it, stop CouchDB, umount and run `e2fsck -f "
                                f"{fs.device}`; bootstrap grows it after the mount")
    if not fs.needs_grow:
        return Unchanged(f"ext4 already covers the device ({gib(fs.fs_bytes)})")
    start = time.monotonic()
    try:
        run(["resize2fs", fs.device], timeout=timeout)
    except CommandError as exc:
        if EPERM_TEXT in (exc.stderr or "") + (exc.stdout or ""):
            raise OperationError(
                f"the kernel refused to grow the ext4 on {fs.device} online: permission denied "
                "(online resize needs CAP_SYS_RESOURCE)", where=where, reason=Reason.RESIZE_DENIED,
                hint="run it as root with CAP_SYS_RESOURCE (the hostagent units grant it in "
                     "CapabilityBoundingSet; a container needs --cap-add SYS_RESOURCE)") from None
        raise
    after = observe_mounted(mount_point)
    grown = after.fs_bytes if after is not None else None
    if grown is None or grown <= fs.fs_bytes:
        raise OperationError(f"resize2fs {fs.device} finished but the ext4 still covers "
                             f"{gib(fs.fs_bytes)} of {gib(fs.device_bytes)}", where=where)
    return f"ext4 {gib(fs.fs_bytes)} -> {gib(grown)}, online in {time.monotonic() - start:.1f}s"
