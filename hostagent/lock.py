"""One flock serialises every command that changes the host or the volume."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time

from hostagent.errors import OperationError

LOCK_WAIT_SECONDS = 120.0
POLL_SECONDS = 0.1


@contextlib.contextmanager
def host_lock(path: str, *, wait: float = LOCK_WAIT_SECONDS):
    """Hold an exclusive flock on path; wait up to `wait` seconds, then fail naming the holder."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise OperationError(f"cannot open the lock file: {exc.strerror}", where=path,
                             hint="commands that change the host run as root") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    raise OperationError(
                        f"another hostagent command holds the lock{holder} for more than "
                        f"{wait:.0f}s", where=path,
                        hint="wait for it to finish, or check `ps` for a stuck hostagent",
                    ) from None
                time.sleep(POLL_SECONDS)
        # The pid is informational only: the kernel drops a flock when its holder dies,
        # so a crashed run never leaves a stale lock behind.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
