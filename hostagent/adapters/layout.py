"""CouchDB's directories on the mounted volume, and its private top directory: inspect, say what
is wrong, create/fix without touching contents — always relative to the mount point's own fd,
never following a symlink."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import NamedTuple

from hostagent.errors import OperationError, RefusedError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The volume's top directory (the mount point while mounted) is what keeps CouchDB's files
# private: the official image chmods data/ and etc/ to 0755 (files 0644) at every start, but the
# task bind-mounts only data/ and etc/local.d, so no container ever sees (or chmods) the top.
# root:root 0700: Docker (root) does the bind mounts and CouchDB inside the container reaches its
# files through them, never through this directory, so nobody else needs even to traverse it.
MOUNT_ROOT = "/"  # its name in checks and plans: `layout /`
MOUNT_ROOT_OWNER = 0
MOUNT_ROOT_GROUP = 0
MOUNT_ROOT_MODE = 0o700
# ext4's root directory is always inode 2 (EXT4_ROOT_INO); filesystem.type is ext4 only. With the
# device, it proves an fd is the mounted filesystem's top, not a directory inside it (a bind
# mount of a subdirectory, a mount point reached through a symlink into the volume).
ROOT_INODE = 2


class DirState(NamedTuple):
    relative: str
    path: str
    kind: str  # "dir" | "missing" | "symlink" | "other"
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None  # permission bits only


def _components(rel: str) -> list[str]:
    return [c for c in os.path.normpath(rel).split("/") if c and c != "."]


def _kind(mode: int) -> str:
    return "symlink" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def device_of_fd(fd: int) -> str:
    from hostagent.adapters.blockdev import number_text

    return number_text(os.fstat(fd).st_dev)


@contextlib.contextmanager
def open_mount_point(mount_point: str):
    try:
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OperationError(f"cannot open the mount point: {exc.strerror}",
                             where=mount_point) from None
    try:
        yield fd
    finally:
        os.close(fd)


def _inspect_one(root_fd: int, mount_point: str, rel: str) -> DirState:
    path = os.path.join(mount_point, os.path.normpath(rel))
    parts = _components(rel)
    fds: list[int] = []
    try:
        parent = root_fd
        for i, name in enumerate(parts):
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return DirState(rel, path, "missing")
            kind = _kind(st.st_mode)
            if i == len(parts) - 1:
                return DirState(rel, path, kind, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
            if kind != "dir":
                # A symlink in the middle would take etc/local.d off the volume.
                return DirState(rel, os.path.join(mount_point, *parts[:i + 1]), kind)
            parent = os.open(name, DIR_FLAGS, dir_fd=parent)
            fds.append(parent)
        return DirState(rel, path, "dir")  # pragma: no cover - rel is never empty (config)
    finally:
        for fd in fds:
            os.close(fd)


def is_filesystem_top(fd: int) -> bool:
    return os.fstat(fd).st_ino == ROOT_INODE


def inspect_mount_root(mount_point: str) -> DirState:
    """The mounted filesystem's top directory; kind "not-top" when the mount point shows a
    directory inside the filesystem instead."""
    with open_mount_point(mount_point) as root_fd:
        st = os.fstat(root_fd)
        kind = "dir" if is_filesystem_top(root_fd) else "not-top"
    return DirState(MOUNT_ROOT, os.path.normpath(mount_point), kind, st.st_uid, st.st_gid,
                    stat.S_IMODE(st.st_mode))


def mount_root_problem(state: DirState) -> str | None:
    """PURE: what is wrong with the volume's top directory (root:root 0700), or None."""
    if state.kind == "not-top":
        return "not the top directory of the mounted ext4 filesystem"
    return layout_problem(state, MOUNT_ROOT_OWNER, MOUNT_ROOT_GROUP, MOUNT_ROOT_MODE)


def inspect_layout(mount_point: str, directories) -> list[DirState]:
    with open_mount_point(mount_point) as root_fd:
        return [_inspect_one(root_fd, mount_point, rel) for rel in directories]


def layout_problem(state: DirState, owner: int, group: int, mode: int) -> str | None:
    """PURE: what is wrong with one directory, or None when it is as configured."""
    if state.kind == "missing":
        return "missing"
    if state.kind != "dir":
        return f"is a {state.kind}, not a directory"
    wrong = []
    if (state.uid, state.gid) != (owner, group):
        wrong.append(f"owner {state.uid}:{state.gid}, want {owner}:{group}")
    if state.mode != mode:
        wrong.append(f"mode {state.mode:04o}, want {mode:04o}")
    return "; ".join(wrong) or None


def _refuse_non_directory(path: str, what: str) -> RefusedError:
    return RefusedError(f"{path} {what}, not a directory; refusing to follow or change it "
                        "(it could lead off the volume)", where=path,
                        hint="move it aside by hand (it may point at the root disk), then rerun")


def apply_layout(mount_point: str, directories, owner: int, group: int, mode: int, *,
                 expected_device: str | None = None) -> list[str]:
    """Make the volume's top directory root:root 0700 (MOUNT_ROOT_MODE), create missing
    directories and fix owner/mode of the directories themselves (never recursive). Every step
    is relative to an fd opened with O_NOFOLLOW, so a symlink anywhere on the way is refused
    (exit 3), never followed. expected_device: major:minor the mount point must be on (the
    volume), or nothing is changed. Returns what was changed."""
    changed: list[str] = []
    with open_mount_point(mount_point) as root_fd:
        if expected_device and device_of_fd(root_fd) != expected_device:
            raise RefusedError(f"{mount_point} is not on the volume ({expected_device}); refusing "
                               "to lay out CouchDB's directories on another filesystem",
                               where=mount_point)
        if not is_filesystem_top(root_fd):
            raise RefusedError(f"{mount_point} is not the top directory of the mounted ext4 "
                               "filesystem; refusing to change its mode or lay out under it",
                               where=mount_point,
                               hint="mount the volume's filesystem itself there, not a "
                                    f"subdirectory of it (`findmnt {mount_point}`)")
        try:
            _apply_mount_root(root_fd, changed)
        except OSError as exc:
            raise OperationError(f"cannot make the volume's top directory private: "
                                 f"{exc.strerror}", where=mount_point,
                                 hint="check that the volume is mounted read-write "
                                      "(`hostagent verify-mount`)") from None
        for rel in directories:
            try:
                _apply_one(root_fd, mount_point, rel, owner, group, mode, changed)
            except OSError as exc:
                raise OperationError(f"cannot lay out {rel}: {exc.strerror}",
                                     where=os.path.join(mount_point, rel),
                                     hint="check that the volume is mounted read-write and not "
                                          "full (`hostagent verify-mount`)") from None
    return changed


def _apply_mount_root(root_fd: int, changed: list[str]) -> None:
    st = os.fstat(root_fd)
    if (st.st_uid, st.st_gid) != (MOUNT_ROOT_OWNER, MOUNT_ROOT_GROUP):
        os.fchown(root_fd, MOUNT_ROOT_OWNER, MOUNT_ROOT_GROUP)
        changed.append(f"chown {MOUNT_ROOT} {MOUNT_ROOT_OWNER}:{MOUNT_ROOT_GROUP}")
    if stat.S_IMODE(st.st_mode) != MOUNT_ROOT_MODE:
        os.fchmod(root_fd, MOUNT_ROOT_MODE)
        changed.append(f"chmod {MOUNT_ROOT} {MOUNT_ROOT_MODE:04o}")


def _apply_one(root_fd: int, mount_point: str, rel: str, owner: int, group: int, mode: int,
               changed: list[str]) -> None:
    parts = _components(rel)
    fds: list[int] = []
    try:
        parent = root_fd
        for i, name in enumerate(parts):
            here = os.path.join(mount_point, *parts[:i + 1])
            created = False
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                os.mkdir(name, 0o700, dir_fd=parent)
                fd = os.open(name, DIR_FLAGS, dir_fd=parent)
                created = True
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                    raise _refuse_non_directory(here, f"is a {_kind(st.st_mode)}") from None
                raise
            fds.append(fd)
            parent = fd
            last = i == len(parts) - 1
            if created:
                changed.append(f"created {os.path.join(*parts[:i + 1])}")
            if not last and not created:
                continue
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (owner, group):
                os.fchown(fd, owner, group)
                if not created:
                    changed.append(f"chown {rel} {owner}:{group}")
            if stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
                if not created:
                    changed.append(f"chmod {rel} {mode:04o}")
    finally:
        for fd in fds:
            os.close(fd)
