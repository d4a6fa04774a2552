"""Atomic file replacement: after a crash a file holds either all its old bytes or all the new."""

from __future__ import annotations

import os

from hostagent.errors import OperationError

TMP_SUFFIX = ".hostagent.tmp"


def atomic_write(target: str, data: bytes, mode: int, uid: int | None = None,
                 gid: int | None = None) -> None:
    """temp file in the same directory + fsync + rename + fsync of the directory: after a crash
    the target holds either all the old bytes or all the new ones."""
    tmp = target + TMP_SUFFIX
    directory = os.path.dirname(target) or "."
    renamed = False
    try:
        # A fixed name: a temp left by an interrupted run is ours and simply replaced.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            # chown before chmod: chown clears set-id bits, chmod then sets the exact mode.
            if uid is not None and (uid, gid) != (os.geteuid(), os.getegid()):
                os.fchown(fd, uid, gid if gid is not None else -1)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
        renamed = True
        fsync_dir(directory)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if renamed:
            raise OperationError(f"wrote {os.path.basename(target)} but could not sync its "
                                 f"directory: {exc.strerror}", where=directory) from None
        raise OperationError(f"cannot write {os.path.basename(target)}: {exc.strerror}",
                             where=target,
                             hint="the previous file is untouched; check that the directory "
                                  "is writable and not full") from None


def fsync_dir(directory: str) -> None:
    """Make a rename or unlink in `directory` survive a crash."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
