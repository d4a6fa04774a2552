"""Freeze a filesystem only around one call, guarded by a separate watchdog process that always thaws it.

A frozen filesystem blocks every writer (CouchDB, journald if it logs there, anything), so the
freeze must end even when hostagent hangs in an API call or is killed with SIGKILL, when no
`finally` runs. The watchdog is started — and confirmed armed — before the freeze, in its own
session (so a signal to hostagent's process group does not reach it). It thaws:
  * at once when hostagent dies or closes the pipe without saying it thawed (EOF on stdin),
  * after `timeout` seconds whatever happens,
  * at once on SIGTERM (systemd stopping the unit kills the whole cgroup, watchdog included),
and exits without touching anything when hostagent reports that it thawed the filesystem itself.

Freeze and thaw are the FIFREEZE/FITHAW ioctls on a directory fd opened before the freeze (what
`fsfreeze -f/-u` do, without starting a process while writers are blocked), so the fsfreeze
program is not needed. Nothing else happens between FIFREEZE and FITHAW but the caller's body.

Run as `python3 -m hostagent.freeze watchdog MOUNT_POINT SECONDS`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from hostagent.errors import OperationError
from hostagent.log import get_logger

log = get_logger(__name__)

ARMED = b"armed\n"
THAWED = b"thawed\n"
# Watchdog exit codes: how it ended tells hostagent whether the freeze covered the whole call.
EXIT_TOLD_THAWED = 0
EXIT_PARENT_GONE = 4
EXIT_TIMED_OUT = 5
EXIT_TERMINATED = 6
EXIT_USAGE = 2
EXIT_CANNOT_OPEN = 7

# linux/fs.h: FIFREEZE = _IOWR('X', 119, int), FITHAW = _IOWR('X', 120, int).
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
ARM_TIMEOUT = 15.0  # a Python start on a loaded host; no freeze happens until the watchdog is armed
WATCHDOG_EXIT_TIMEOUT = 60.0
SYNC_TIMEOUT = 600.0  # not frozen yet: flushing a lot of dirty data first keeps the freeze short
THAW_ATTEMPTS = 5


@dataclass
class FreezeOutcome:
    mount_point: str
    frozen_seconds: float = 0.0
    # True when the watchdog thawed before hostagent did: the freeze may not have covered the call.
    watchdog_fired: bool = False


class NotFrozen(OperationError):
    """FIFREEZE refused: the filesystem is certainly not frozen by us (the kernel undoes a failed
    freeze), so there is nothing of ours to thaw."""


def _ioctl(fd: int, request: int) -> None:
    fcntl.ioctl(fd, request, 0)


def open_mount(mount_point: str) -> int:
    """An fd on the mount point's directory, refused unless a filesystem of its own is mounted there.

    Freezing a plain directory would freeze the filesystem that holds it — the root filesystem.
    The fd is checked against the mount table after it is opened, so an unmount in between can
    never turn the freeze onto the parent filesystem.
    """
    from hostagent.adapters.mounts import mount_at, read_mountinfo

    try:
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OperationError(f"cannot open {mount_point} to freeze it: {exc.strerror}",
                             where="filesystem.mount_point") from None
    try:
        entry = mount_at(mount_point, read_mountinfo())
        st = os.fstat(fd)
        if entry is None or entry.major_minor != f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}":
            raise OperationError(
                f"nothing is mounted at {mount_point}; refusing to freeze the filesystem that "
                "holds it", where="filesystem.mount_point",
                hint="run `hostagent bootstrap` (or `hostagent verify-mount`) first")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_can_freeze(mount_point: str) -> None:
    """Refuse before anything happens: nothing mounted at the mount point (no fsfreeze program
    is needed: the freeze is an ioctl). Whether that filesystem supports freezing only FIFREEZE
    itself can tell: it refuses at once, before a snapshot is taken."""
    os.close(open_mount(mount_point))


def not_frozen_error(exc: OSError, mount_point: str) -> NotFrozen:
    code = exc.errno
    if code in (errno.EOPNOTSUPP, errno.ENOTTY):
        return NotFrozen(
            f"cannot freeze {mount_point}: its filesystem does not support freezing "
            f"(FIFREEZE: {os.strerror(code)})",
            where="snapshot.freeze = true",
            hint="mount the ext4 volume there, or set snapshot.freeze = false for "
                 "crash-consistent snapshots (tagged hostagent:consistency=crash)")
    if code == errno.EBUSY:
        return NotFrozen(
            f"cannot freeze {mount_point}: it is already frozen by someone else",
            hint=f"find who froze it; `fsfreeze -u {mount_point}` (util-linux) thaws it")
    if code == errno.EPERM:
        return NotFrozen(
            f"not allowed to freeze {mount_point} (FIFREEZE needs CAP_SYS_ADMIN)",
            where="snapshot.freeze = true",
            hint="run hostagent snapshot as root (the shipped unit keeps CAP_SYS_ADMIN), or set "
                 "snapshot.freeze = false for crash-consistent snapshots")
    return NotFrozen(f"cannot freeze {mount_point}: FIFREEZE failed: {os.strerror(code)}",
                     where="snapshot.freeze = true")


def freeze(fd: int, mount_point: str) -> None:
    try:
        _ioctl(fd, FIFREEZE)
    except OSError as exc:
        raise not_frozen_error(exc, mount_point) from None


def thaw(fd: int) -> bool:
    """FITHAW; True if it thawed, False if the filesystem was not frozen (EINVAL)."""
    try:
        _ioctl(fd, FITHAW)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True


def _package_root() -> str:
    import hostagent

    return os.path.dirname(os.path.dirname(os.path.abspath(hostagent.__file__)))


def start_watchdog(mount_point: str, timeout: float, *, fd: int | None = None,
                   python: str = sys.executable):
    """Start and arm the watchdog; returns (process, write end of its stdin pipe).

    With `fd` (the directory fd hostagent freezes through) the watchdog inherits that very fd,
    so it thaws exactly the filesystem hostagent froze, whatever is mounted at the path later.
    """
    read_fd, write_fd = os.pipe()  # both non-inheritable: only the watchdog gets read_fd, as stdin
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    argv = [python, "-m", "hostagent.freeze", "watchdog", mount_point, str(timeout)]
    if fd is not None:
        argv.append(str(fd))
    try:
        # A background process with pipes is the one thing the command runner does not do.
        proc = subprocess.Popen(
            argv, stdin=read_fd, stdout=subprocess.PIPE, stderr=None, env=env, close_fds=True,
            pass_fds=() if fd is None else (fd,), start_new_session=True,
        )
    except OSError as exc:
        os.close(write_fd)
        raise OperationError(f"cannot start the freeze watchdog: {exc}") from None
    finally:
        os.close(read_fd)
    ready, _, _ = select.select([proc.stdout], [], [], ARM_TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    if line != ARMED:
        os.close(write_fd)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        raise OperationError(
            f"the freeze watchdog did not start (exit {proc.returncode}); not freezing "
            f"{mount_point}")
    proc.stdout.close()
    return proc, write_fd


def _stop_watchdog(proc, write_fd: int, *, thawed: bool) -> int:
    """Tell the watchdog whether we thawed, close the pipe, and return how it ended."""
    try:
        if thawed:
            os.write(write_fd, THAWED)
    except OSError:
        pass  # it already exited (timed out): its exit code says so
    finally:
        os.close(write_fd)
    try:
        return proc.wait(timeout=WATCHDOG_EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.warning("freeze watchdog %s did not exit; leaving it to finish its thaw", proc.pid)
        return EXIT_TIMED_OUT


class Terminated(SystemExit):
    """SIGTERM while frozen: unwind through `finally` (thaw first), then exit 143 like a kill."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


def sync_filesystem(mount_point: str, run=None) -> float:
    """`sync -f`: flushed now, while writers still run, the freeze has little left to write.
    Returns the seconds it took."""
    if run is None:
        from hostagent.runner import run
    started = time.monotonic()
    run(["sync", "-f", mount_point], timeout=SYNC_TIMEOUT)
    return time.monotonic() - started


@contextlib.contextmanager
def frozen(mount_point: str, *, timeout: float, sync: bool = True, run=None,
           python: str = sys.executable) -> Iterator[FreezeOutcome]:
    """Open the mount point, sync it (unless the caller just did), arm the watchdog, FIFREEZE;
    yield; FITHAW in `finally`, then stop the watchdog.

    Everything that can wait — the sync, the watchdog's start, logging — happens before FIFREEZE
    or after FITHAW. In between runs only the body, with the garbage collector paused (a full
    collection over boto3's objects would be a pause of its own while every writer waits).
    """
    fd = open_mount(mount_point)
    try:
        outcome = FreezeOutcome(mount_point)
        if sync:
            sync_filesystem(mount_point, run)
        proc, write_fd = start_watchdog(mount_point, timeout, fd=fd, python=python)
        with _frozen_under(proc, write_fd, fd, outcome, timeout) as outcome:
            yield outcome
    finally:
        os.close(fd)


@contextlib.contextmanager
def _frozen_under(proc, write_fd: int, fd: int, outcome: FreezeOutcome,
                  timeout: float) -> Iterator[FreezeOutcome]:
    mount_point = outcome.mount_point
    thawed = False  # what the watchdog is told: True = nothing (left) for it to thaw
    freezing = False  # FIFREEZE was called and did not refuse: ours to thaw
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    collecting = gc.isenabled()
    log.info("freezing %s for one call (watchdog pid %s thaws it after %ss at the latest)",
             mount_point, proc.pid, timeout)
    try:
        if proc.poll() is not None:
            thawed = True  # nothing frozen
            raise OperationError(f"the freeze watchdog exited (code {proc.returncode}) before "
                                 f"the freeze; not freezing {mount_point}")
        gc.disable()
        started = time.monotonic()
        freezing = True
        try:
            freeze(fd, mount_point)
        except NotFrozen:
            freezing, thawed = False, True  # nothing of ours; someone else's freeze is theirs
            raise
        yield outcome
    finally:
        try:
            if freezing:
                try:
                    thaw(fd)  # False when the watchdog thawed first: its exit code says so
                    thawed = True
                except OSError as exc:  # the watchdog, told nothing, keeps trying
                    raise OperationError(f"cannot thaw {mount_point}: {exc.strerror}; the "
                                         "freeze watchdog is trying too") from None
                finally:
                    outcome.frozen_seconds = time.monotonic() - started
        finally:
            if collecting:
                gc.enable()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            code = _stop_watchdog(proc, write_fd, thawed=thawed)
            outcome.watchdog_fired = freezing and code != EXIT_TOLD_THAWED
            if outcome.watchdog_fired:
                log.warning("the freeze watchdog thawed %s before hostagent did (exit %s)",
                            mount_point, code)
    log.info("thawed %s after %.3fs", mount_point, outcome.frozen_seconds)


def _say(message: str) -> None:
    # stderr may be a pipe whose reader (hostagent) is gone: never let logging stop a thaw.
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"hostagent freeze watchdog: {message}\n")
        sys.stderr.flush()


def _thaw_with_retries(fd: int, mount_point: str) -> None:
    for attempt in range(1, THAW_ATTEMPTS + 1):
        try:
            if thaw(fd):
                _say(f"thawed {mount_point}")
            return
        except Exception as exc:  # keep trying: a frozen data volume stalls everything
            _say(f"thaw of {mount_point} failed (attempt {attempt}): {exc}")
            time.sleep(min(2.0 * attempt, 5.0))


USAGE = "usage: python3 -m hostagent.freeze watchdog MOUNT_POINT SECONDS [FD]"


def watchdog_main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        _say(USAGE)
        return EXIT_USAGE
    mount_point, seconds = argv[0], float(argv[1])
    # The fd to thaw through is ready before "armed": a thaw never waits for an open or import.
    try:
        fd = int(argv[2]) if len(argv) == 3 else open_mount(mount_point)
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OperationError(f"fd {fd} is not a directory")
    except (OperationError, OSError, ValueError) as exc:
        _say(f"cannot watch {mount_point}: {exc}")
        return EXIT_CANNOT_OPEN

    def on_term(signum, frame):
        _thaw_with_retries(fd, mount_point)
        os._exit(EXIT_TERMINATED)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    deadline = time.monotonic() + seconds
    os.write(sys.stdout.fileno(), ARMED)
    received = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _say(f"{mount_point} still frozen after {seconds:g}s: thawing it")
            _thaw_with_retries(fd, mount_point)
            return EXIT_TIMED_OUT
        ready, _, _ = select.select([0], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(0, 64)
        if not chunk:
            _say(f"hostagent went away while {mount_point} may be frozen: thawing it")
            _thaw_with_retries(fd, mount_point)
            return EXIT_PARENT_GONE
        received += chunk
        if THAWED in received:
            return EXIT_TOLD_THAWED


if __name__ == "__main__":
    if sys.argv[1:2] != ["watchdog"]:
        _say(USAGE)
        sys.exit(EXIT_USAGE)
    sys.exit(watchdog_main(sys.argv[2:]))
