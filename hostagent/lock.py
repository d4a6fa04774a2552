"""One flock serialises every command that changes the host or the volume."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import time

from hostagent.errors import OperationError, UsageError

LOCK_WAIT_SECONDS = 120.0
POLL_SECONDS = 0.1
# What a lock file of ours holds: nothing yet, or one pid line. Anything else belongs to someone
# else (host.lock_file = "/etc/passwd" by mistake) and must never be written to.
MAX_LOCK_BYTES = 32
PID_LINE = re.compile(rb"\A *[0-9]{1,10}\s*\Z")
PID_WIDTH = 10  # pid_max is at most 2**22: ten digits always fit, so the field never grows


@contextlib.contextmanager
def host_lock(path: str, *, wait: float = LOCK_WAIT_SECONDS, dry_run: bool = False):
    """Hold an exclusive flock on path; wait up to `wait` seconds, then fail naming the holder.

    The file is opened without truncation and never follows a symlink; a file that is not a
    lock file of ours is refused untouched. Our pid is written in place as a fixed-width field,
    so no run ever has to truncate it. With dry_run, nothing is created or written: an existing
    file is checked and held with a shared lock (so a dry run sees no half-made change), a
    missing one is left missing.
    """
    fd = _open_lock_file(path, dry_run=dry_run)
    if fd is None:  # dry run, and no lock file yet: nobody holds it, and we make none
        yield
        return
    try:
        _acquire(fd, path, fcntl.LOCK_SH if dry_run else fcntl.LOCK_EX, wait)
        if not dry_run:
            # Informational only: the kernel drops a flock when its holder dies, so a crashed run
            # never leaves a stale lock behind.
            _write_pid(fd, path)
        yield
    finally:
        os.close(fd)


def _open_lock_file(path: str, *, dry_run: bool) -> int | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OperationError(f"cannot open the lock file: {exc.strerror}", where=path) from None
    if st is not None:
        # Before open(): opening a FIFO or a device can itself have effects (block, rewind a tape).
        _refuse_unless_regular(path, st)
    elif dry_run:
        return None
    flags = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    flags |= os.O_RDONLY if dry_run else os.O_RDWR | os.O_CREAT  # never O_TRUNC
    try:
        if not dry_run:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a symlink between lstat and open
            raise _not_ours(path, "it is a symbolic link") from None
        if exc.errno == errno.ENOENT and dry_run:
            return None
        raise OperationError(f"cannot open the lock file: {exc.strerror}", where=path,
                             hint="commands that change the host run as root") from None
    try:
        _refuse_unless_regular(path, os.fstat(fd))
        _refuse_unless_pid_file(path, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _not_ours(path: str, why: str) -> UsageError:
    return UsageError(f"lock file {path} is not hostagent's: {why}; it was left untouched",
                      where="host.lock_file",
                      hint='set [host] lock_file to a path of its own, e.g. '
                           '"/run/lock/hostagent.lock"')


def _refuse_unless_regular(path: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise _not_ours(path, "it is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise _not_ours(path, "it is not a regular file")


def _refuse_unless_pid_file(path: str, fd: int) -> None:
    try:
        head = os.pread(fd, MAX_LOCK_BYTES + 1, 0)
    except OSError as exc:
        raise OperationError(f"cannot read the lock file: {exc.strerror}", where=path) from None
    if len(head) > MAX_LOCK_BYTES:
        raise _not_ours(path, f"it holds more than {MAX_LOCK_BYTES} bytes")
    if head and not PID_LINE.match(head):
        raise _not_ours(path, "it holds something other than a pid")


def _acquire(fd: int, path: str, operation: int, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise OperationError(f"cannot lock the lock file: {exc.strerror}",
                                     where=path) from None
        if time.monotonic() >= deadline:
            raise OperationError(
                f"another hostagent command holds the lock{_read_holder(fd)} for more than "
                f"{wait:.0f}s", where=path,
                hint="wait for it to finish, or check `ps` for a stuck hostagent",
            )
        time.sleep(POLL_SECONDS)


def _write_pid(fd: int, path: str) -> None:
    try:
        os.pwrite(fd, f"{os.getpid():>{PID_WIDTH}}\n".encode(), 0)
    except OSError as exc:
        raise OperationError(f"cannot write the lock file: {exc.strerror}", where=path) from None


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, MAX_LOCK_BYTES, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
