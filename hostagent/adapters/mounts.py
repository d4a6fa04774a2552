"""Mount table (read from /proc/self/mountinfo, no command needed) and mount/umount/chattr actions."""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, NamedTuple

from hostagent.errors import OperationError
from hostagent.runner import run as default_run

MOUNTINFO = "/proc/self/mountinfo"
MOUNT_TIMEOUT = 120.0
FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long) on 64-bit Linux
FS_IOC_SETFLAGS = 0x40086602  # _IOW('f', 2, long)
FS_IMMUTABLE_FL = 0x00000010
BARE_VIEW_NAME = "hostagent-bare"
LEGACY_VIEW_PREFIX = "/run/hostagent-bare."


class MountEntry(NamedTuple):
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


def mount_from_fstab(mount_point: str, fstab: str, run=default_run) -> None:
    """Mount exactly as the fstab line says (`mount --fstab`), so the line itself is proven."""
    run(["mount", "--fstab", fstab, mount_point], timeout=MOUNT_TIMEOUT)


def unmount(mount_point: str, run=default_run) -> None:
    run(["umount", mount_point], timeout=MOUNT_TIMEOUT)


def _get_flags(fd: int) -> int:
    import array
    import fcntl

    buf = array.array("l", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return buf[0]


def is_immutable(path: str) -> bool | None:
    """chattr +i state of a directory via FS_IOC_GETFLAGS; None when the filesystem has no flags."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return bool(_get_flags(fd) & FS_IMMUTABLE_FL)
    except OSError:
        return None  # tmpfs, overlayfs… have no inode flags
    finally:
        os.close(fd)


def set_immutable(path: str, immutable: bool) -> None:
    """chattr ±i through FS_IOC_SETFLAGS (no process started); OperationError when the
    filesystem has no inode flags or refuses."""
    import array
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OperationError(f"cannot open {path}: {exc.strerror}", where=path) from None
    try:
        flags = _get_flags(fd)
        want = flags | FS_IMMUTABLE_FL if immutable else flags & ~FS_IMMUTABLE_FL
        if want != flags:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("l", [want]), True)
    except OSError as exc:
        raise OperationError(f"cannot {'set' if immutable else 'clear'} the immutable flag: "
                             f"{exc.strerror}", where=path) from None
    finally:
        os.close(fd)


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


def view_path(state_dir: str) -> str:
    """Where bootstrap bind-mounts the filesystem under the mount point: one fixed path, so a
    view left by a killed run is found (and removed) by the next."""
    return os.path.join(state_dir, BARE_VIEW_NAME)


def leftover_views(state_dir: str, entries: Iterable[MountEntry]) -> list[str]:
    """Bind mounts of ours still mounted: at view_path, or at the /run/hostagent-bare.* paths
    of earlier versions. Deepest first, so stacked ones come off in order."""
    ours = view_path(state_dir)
    found = [e.mount_point for e in entries
             if e.mount_point == ours or e.mount_point.startswith(LEGACY_VIEW_PREFIX)]
    return sorted(found, key=lambda p: (-p.count("/"), p), reverse=False)


def remove_view(path: str, run=default_run) -> None:
    """Unmount one of our views (every mount stacked there) and remove its directory. The
    mount table says what is mounted there: os.path.ismount cannot see a bind mount of the
    filesystem the directory itself is on (same st_dev)."""
    while mount_at(path, read_mountinfo()) is not None:
        run(["umount", path], timeout=MOUNT_TIMEOUT)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def bare_directory(mount_point: str, state_dir: str, run=default_run):
    """Yield a path to the directory *underneath* what is mounted on mount_point.

    A non-recursive bind mount of the parent filesystem shows it without its submounts, so the
    bare directory can be inspected or chattr'ed while the volume stays mounted (a host whose
    volume systemd mounted from fstab before bootstrap ran).
    """
    parent = parent_mount(mount_point, read_mountinfo())
    if parent is None:
        raise OperationError(f"no filesystem found under {mount_point}", where=mount_point)
    view = view_path(state_dir)
    os.makedirs(view, mode=0o700, exist_ok=True)
    try:
        run(["mount", "--bind", parent.mount_point, view], timeout=MOUNT_TIMEOUT)
        try:
            yield os.path.join(view, os.path.relpath(os.path.normpath(mount_point), parent.mount_point))
        finally:
            run(["umount", view], timeout=MOUNT_TIMEOUT)
    finally:
        try:
            os.rmdir(view)
        except OSError:
            pass
