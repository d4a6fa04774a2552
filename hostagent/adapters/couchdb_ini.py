"""CouchDB's etc/local.d on the mounted volume: read our ini file and the ones after it, write
ours (or drop stale lines from another) atomically, fix our file's owner and mode in place —
always through directory fds opened with O_NOFOLLOW from the mount point's own fd, so a symlink
on the way is never followed off the volume."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import NamedTuple

from hostagent.adapters.layout import DIR_FLAGS, device_of_fd, open_mount_point
from hostagent.couchdb_admin import FileMeta
from hostagent.errors import OperationError, RefusedError
from hostagent.fileio import atomic_write

FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class LocalDState(NamedTuple):
    """What is in etc/local.d, looked at without following anything."""

    kind: str  # our file: "file" | "missing" | "symlink" | "other"; "no-dir" when local.d is not a directory
    data: bytes | None  # our file's bytes (kind "file")
    later: tuple = ()  # ((name, bytes), …): the *.ini files CouchDB reads after ours, in order
    meta: FileMeta | None = None  # our file's inode, mode, owner (kind "file")


@contextlib.contextmanager
def open_local_d(mount_point: str, rel: str, expected_device: str | None = None):
    """An fd of mount_point/rel walked with O_NOFOLLOW; None when a component is missing.
    A symlink or non-directory on the way is refused (exit 3), never followed."""
    fds: list[int] = []
    with open_mount_point(mount_point) as root_fd:
        try:
            root_dev = os.fstat(root_fd).st_dev
            parent = root_fd
            for name in [c for c in rel.split("/") if c]:
                try:
                    parent = os.open(name, DIR_FLAGS, dir_fd=parent)
                except FileNotFoundError:
                    parent = None
                    break
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise RefusedError(f"{os.path.join(mount_point, rel)}: {name} is not a "
                                           "directory (a symlink?); refusing to follow it",
                                           where=mount_point,
                                           hint="move it aside by hand, then rerun") from None
                    raise
                fds.append(parent)
            if parent is not None:
                if os.fstat(parent).st_dev != root_dev or (
                        expected_device and device_of_fd(parent) != expected_device):
                    raise RefusedError(f"{os.path.join(mount_point, rel)} is not on the volume; "
                                       "refusing to write CouchDB's config elsewhere",
                                       where=mount_point)
            yield parent
        finally:
            for fd in fds:
                os.close(fd)


def _read_regular(dir_fd: int, name: str, limit: int) -> tuple[str, bytes | None, os.stat_result | None]:
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return "missing", None, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink", None, None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "other", None, st
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
        return "file", b"".join(chunks)[:limit], st
    finally:
        os.close(fd)


def inspect_local_d(mount_point: str, rel: str, name: str, *, limit: int,
                    other_limit: int) -> LocalDState:
    """Our file and the *.ini after it (CouchDB reads local.d/*.ini in name order)."""
    try:
        with open_local_d(mount_point, rel) as fd:
            if fd is None:
                return LocalDState("missing", None)
            kind, data, st = _read_regular(fd, name, limit)
            meta = FileMeta(st.st_ino, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) \
                if kind == "file" else None
            later = []
            for other in sorted(os.listdir(fd)):
                if other.endswith(".ini") and other > name:
                    other_kind, other_data, _ = _read_regular(fd, other, other_limit)
                    if other_kind == "file":
                        later.append((other, other_data))
            return LocalDState(kind, data, tuple(later), meta)
    except RefusedError:
        return LocalDState("no-dir", None)


def write_in_local_d(mount_point: str, rel: str, name: str, data: bytes, *, mode: int | None,
                     uid: int | None, gid: int | None, expected_device: str | None) -> None:
    """Atomically replace rel/name on the volume (temp + fsync + rename + directory fsync).

    The path handed to atomic_write goes through /proc/self/fd/N, the directory fd walked with
    O_NOFOLLOW: no component of the path is looked up again, so a symlink swapped in meanwhile
    is never followed. mode/uid/gid None: keep the existing file's.
    """
    where = os.path.join(mount_point, rel, name)
    with open_local_d(mount_point, rel, expected_device) as fd:
        if fd is None:
            raise OperationError(f"{os.path.join(mount_point, rel)} is missing",
                                 where=mount_point, hint="run `hostagent bootstrap` (layout)")
        if mode is None or uid is None:
            kind, _, st = _read_regular(fd, name, 0)
            if kind != "file":
                raise OperationError(f"{where} is not a regular file any more", where=where)
            mode = stat.S_IMODE(st.st_mode) if mode is None else mode
            uid, gid = (st.st_uid, st.st_gid) if uid is None else (uid, gid)
        try:
            atomic_write(f"/proc/self/fd/{fd}/{name}", data, mode, uid, gid)
        except OperationError as exc:
            raise OperationError(exc.message.replace(f"/proc/self/fd/{fd}", os.path.dirname(where)),
                                 where=where, hint=exc.hint) from None


def fix_in_local_d(mount_point: str, rel: str, name: str, fix: tuple, *, ino: int,
                   expected_device: str | None) -> None:
    """Apply (("chown", uid, gid),) / (("chmod", mode),) to rel/name in place (same inode), on
    an fd opened with O_NOFOLLOW through the walked directory fds; refused (exit 1, nothing
    changed) when the name is no longer the regular file `ino` that was looked at."""
    where = os.path.join(mount_point, rel, name)
    with open_local_d(mount_point, rel, expected_device) as dir_fd:
        if dir_fd is None:
            raise OperationError(f"{os.path.join(mount_point, rel)} is missing",
                                 where=mount_point, hint="run `hostagent bootstrap` (layout)")
        try:
            fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise OperationError(f"cannot open {where}: {exc.strerror}", where=where,
                                 hint="rerun `hostagent bootstrap`") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_ino != ino:
                raise OperationError(f"{where} changed while bootstrap looked at it; left as it "
                                     "is", where=where, hint="rerun `hostagent bootstrap`")
            # chown before chmod: chown clears set-id bits, chmod then sets the exact mode.
            for op in fix:
                if op[0] == "chown":
                    os.fchown(fd, op[1], op[2])
            for op in fix:
                if op[0] == "chmod":
                    os.fchmod(fd, op[1])
            os.fsync(fd)
        except OSError as exc:
            raise OperationError(f"cannot fix the owner or mode of {where}: {exc.strerror}",
                                 where=where) from None
        finally:
            os.close(fd)
