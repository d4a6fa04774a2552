"""Mount table (read from /proc/self/mountinfo, no command needed) and mount/umount/chattr actions."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable

from hostagent.errors import OperationError
from hostagent.runner import run as default_run

MOUNTINFO = "/proc/self/mountinfo"
MOUNT_TIMEOUT = 120.0
FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long) on 64-bit Linux
FS_IMMUTABLE_FL = 0x00000010


@dataclass(frozen=True)
class MountEntry:
    major_minor: str  # "259:1" — the identity of the mounted block device
    root: str
    mount_point: str
    fstype: str
    source: str
    options: tuple[str, ...]  # per-mount options (rw/ro, nodev…)
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options or "ro" in self.super_options


def unescape_octal(field: str) -> str:
    """mountinfo and /proc/swaps escape space, tab, newline and backslash as \\040 \\011 \\012 \\134."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse proc(5) mountinfo text; optional fields end at the lone '-' separator."""
    entries = []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) < 10 or "-" not in parts[6:]:
            continue
        sep = parts.index("-", 6)
        entries.append(MountEntry(
            major_minor=parts[2],
            root=unescape_octal(parts[3]),
            mount_point=unescape_octal(parts[4]),
            fstype=parts[sep + 1],
            source=unescape_octal(parts[sep + 2]),
            options=tuple(parts[5].split(",")),
            super_options=tuple(parts[sep + 3].split(",")) if len(parts) > sep + 3 else (),
        ))
    return entries


def read_mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_mountinfo(f.read())


def mount_at(mount_point: str, entries: Iterable[MountEntry]) -> MountEntry | None:
    """The mount that is visible at mount_point (the last one stacked there), if any."""
    want = os.path.normpath(mount_point)
    found = None
    for entry in entries:
        if entry.mount_point == want:
            found = entry
    return found


def mounts_of_device(major_minor: str, entries: Iterable[MountEntry]) -> list[MountEntry]:
    return [e for e in entries if e.major_minor == major_minor]


def device_major_minor(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def mount_from_fstab(mount_point: str, fstab: str, run=default_run) -> None:
    """Mount exactly as the fstab line says (`mount --fstab`), so the line itself is proven."""
    run(["mount", "--fstab", fstab, mount_point], timeout=MOUNT_TIMEOUT)


def unmount(mount_point: str, run=default_run) -> None:
    run(["umount", mount_point], timeout=MOUNT_TIMEOUT)


def is_immutable(path: str) -> bool | None:
    """chattr +i state of a directory via FS_IOC_GETFLAGS; None when the filesystem has no flags."""
    import array
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        buf = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    except OSError:
        return None  # tmpfs, overlayfs… have no inode flags
    finally:
        os.close(fd)
    return bool(buf[0] & FS_IMMUTABLE_FL)


def set_immutable(path: str, immutable: bool, run=default_run) -> None:
    run(["chattr", "+i" if immutable else "-i", path], timeout=10)


def parent_mount(path: str, entries: Iterable[MountEntry]) -> MountEntry | None:
    """The mount holding `path` itself (not a mount *on* path): the longest prefix strictly above."""
    path = os.path.normpath(path)
    best = None
    for entry in entries:
        mp = entry.mount_point
        if mp == path:
            continue
        if path.startswith(mp.rstrip("/") + "/") and (best is None or len(mp) >= len(best.mount_point)):
            best = entry
    return best


@contextlib.contextmanager
def bare_directory(mount_point: str, run=default_run, scratch_dir: str = "/run"):
    """Yield a path to the directory *underneath* what is mounted on mount_point.

    A non-recursive bind mount of the parent filesystem shows it without its submounts, so the
    bare directory can be inspected or chattr'ed while the volume stays mounted (a host whose
    volume systemd mounted from fstab before bootstrap ran).
    """
    parent = parent_mount(mount_point, read_mountinfo())
    if parent is None:
        raise OperationError(f"no filesystem found under {mount_point}", where=mount_point)
    view = tempfile.mkdtemp(prefix="hostagent-bare.", dir=scratch_dir)
    try:
        run(["mount", "--bind", parent.mount_point, view], timeout=MOUNT_TIMEOUT)
        try:
            yield os.path.join(view, os.path.relpath(os.path.normpath(mount_point), parent.mount_point))
        finally:
            run(["umount", view], timeout=MOUNT_TIMEOUT)
    finally:
        os.rmdir(view)
