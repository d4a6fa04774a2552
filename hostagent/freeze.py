"""Freeze a filesystem only around one call, guarded by a separate watchdog process that always thaws it.

A frozen filesystem blocks every writer (CouchDB, journald if it logs there, anything), so the
freeze must end even when hostagent hangs in an API call or is killed with SIGKILL, when no
`finally` runs. The watchdog is started — and confirmed armed — before the freeze, in its own
session (so a signal to hostagent's process group does not reach it). It thaws:
  * at once when hostagent dies or closes the pipe without saying it thawed (EOF on stdin),
  * after `timeout` seconds whatever happens,
  * at once on SIGTERM (systemd stopping the unit kills the whole cgroup, watchdog included),
and exits without touching anything when hostagent reports that it thawed the filesystem itself.

Run as `python3 -m hostagent.freeze watchdog MOUNT_POINT SECONDS`.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from hostagent.errors import CommandError, OperationError
from hostagent.log import get_logger
from hostagent.runner import run as default_run
from hostagent.runner import which

log = get_logger(__name__)

ARMED = b"armed\n"
THAWED = b"thawed\n"
# Watchdog exit codes: how it ended tells hostagent whether the freeze covered the whole call.
EXIT_TOLD_THAWED = 0
EXIT_PARENT_GONE = 4
EXIT_TIMED_OUT = 5
EXIT_TERMINATED = 6
EXIT_USAGE = 2

ARM_TIMEOUT = 15.0  # a Python start on a loaded host; no freeze happens until the watchdog is armed
FREEZE_COMMAND_TIMEOUT = 60.0
SYNC_TIMEOUT = 600.0  # not frozen yet: flushing a lot of dirty data first keeps the freeze short
THAW_ATTEMPTS = 5


@dataclass
class FreezeOutcome:
    mount_point: str
    frozen_seconds: float = 0.0
    # True when the watchdog thawed before hostagent did: the freeze may not have covered the call.
    watchdog_fired: bool = False


def is_not_frozen_error(exc: CommandError) -> bool:
    # FITHAW on a filesystem that is not frozen fails with EINVAL: it is already thawed.
    return "Invalid argument" in (exc.stderr or "")


def thaw(mount_point: str, run=default_run) -> bool:
    """fsfreeze -u; True if it thawed, False if the filesystem was not frozen."""
    try:
        run(["fsfreeze", "-u", mount_point], timeout=FREEZE_COMMAND_TIMEOUT)
    except CommandError as exc:
        if is_not_frozen_error(exc):
            return False
        raise
    return True


class NotFrozen(OperationError):
    """fsfreeze -f refused outright: the filesystem is certainly not frozen by us."""


def freeze(mount_point: str, run=default_run) -> None:
    try:
        run(["fsfreeze", "-f", mount_point], timeout=FREEZE_COMMAND_TIMEOUT)
    except CommandError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        why = detail[-1] if detail else f"exit {exc.returncode}"
        if "Operation not supported" in why:
            raise NotFrozen(
                f"cannot freeze {mount_point}: its filesystem does not support freezing",
                where="snapshot.freeze = true",
                hint="mount the ext4 volume there, or set snapshot.freeze = false for "
                     "crash-consistent snapshots (tagged hostagent:consistency=crash)") from None
        if "Device or resource busy" in why:
            raise NotFrozen(
                f"cannot freeze {mount_point}: it is already frozen by someone else",
                hint=f"find who froze it; `fsfreeze -u {mount_point}` thaws it") from None
        raise OperationError(f"fsfreeze -f {mount_point} failed: {why}") from None


def check_can_freeze(mount_point: str) -> None:
    """Refuse before anything happens: no fsfreeze, or nothing mounted at the mount point.

    Freezing a plain directory would freeze the filesystem that holds it — the root filesystem —
    so the mount point must be a mount of its own.
    """
    from hostagent.adapters.mounts import mount_at, read_mountinfo

    if which("fsfreeze") is None:
        raise OperationError(
            "fsfreeze not found: cannot take a frozen (consistent) snapshot",
            where="snapshot.freeze = true",
            hint="install util-linux, or set snapshot.freeze = false for crash-consistent "
                 "snapshots")
    if mount_at(mount_point, read_mountinfo()) is None:
        raise OperationError(
            f"nothing is mounted at {mount_point}; refusing to freeze the filesystem that holds it",
            where="filesystem.mount_point",
            hint="run `hostagent bootstrap` (or `hostagent verify-mount`) first")


def _package_root() -> str:
    import hostagent

    return os.path.dirname(os.path.dirname(os.path.abspath(hostagent.__file__)))


def start_watchdog(mount_point: str, timeout: float, *, python: str = sys.executable):
    """Start and arm the watchdog; returns (process, write end of its stdin pipe)."""
    read_fd, write_fd = os.pipe()  # both non-inheritable: only the watchdog gets read_fd, as stdin
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    try:
        # A background process with pipes is the one thing the command runner does not do.
        proc = subprocess.Popen(
            [python, "-m", "hostagent.freeze", "watchdog", mount_point, str(timeout)],
            stdin=read_fd, stdout=subprocess.PIPE, stderr=None, env=env, close_fds=True,
            start_new_session=True,
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
        return proc.wait(timeout=FREEZE_COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.warning("freeze watchdog %s did not exit; leaving it to finish its thaw", proc.pid)
        return EXIT_TIMED_OUT


class Terminated(SystemExit):
    """SIGTERM while frozen: unwind through `finally` (thaw first), then exit 143 like a kill."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


@contextlib.contextmanager
def frozen(mount_point: str, *, timeout: float, run=default_run,
           python: str = sys.executable) -> Iterator[FreezeOutcome]:
    """sync, arm the watchdog, fsfreeze -f; yield; fsfreeze -u in `finally`, then stop the watchdog."""
    check_can_freeze(mount_point)
    outcome = FreezeOutcome(mount_point)
    run(["sync", "-f", mount_point], timeout=SYNC_TIMEOUT)
    proc, write_fd = start_watchdog(mount_point, timeout, python=python)
    thawed = False
    we_froze = False
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    started = time.monotonic()
    try:
        try:
            freeze(mount_point, run)
        except NotFrozen:
            thawed = True  # nothing of ours to thaw; someone else's freeze is theirs to end
            raise
        we_froze = True
        log.info("froze %s (watchdog pid %s thaws it after %ss at the latest)",
                 mount_point, proc.pid, timeout)
        try:
            yield outcome
        finally:
            try:
                thaw(mount_point, run)
                thawed = True
            finally:
                outcome.frozen_seconds = time.monotonic() - started
        log.info("thawed %s after %.2fs", mount_point, outcome.frozen_seconds)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        code = _stop_watchdog(proc, write_fd, thawed=thawed)
        outcome.watchdog_fired = we_froze and code != EXIT_TOLD_THAWED
        if outcome.watchdog_fired:
            log.warning("the freeze watchdog thawed %s before hostagent did (exit %s)",
                        mount_point, code)


def _say(message: str) -> None:
    # stderr may be a pipe whose reader (hostagent) is gone: never let logging stop a thaw.
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"hostagent freeze watchdog: {message}\n")
        sys.stderr.flush()


def _thaw_with_retries(mount_point: str) -> None:
    for attempt in range(1, THAW_ATTEMPTS + 1):
        try:
            if thaw(mount_point):
                _say(f"thawed {mount_point}")
            return
        except Exception as exc:  # keep trying: a frozen data volume stalls everything
            _say(f"thaw of {mount_point} failed (attempt {attempt}): {exc}")
            time.sleep(min(2.0 * attempt, 5.0))


def watchdog_main(argv: list[str]) -> int:
    if len(argv) != 2:
        _say("usage: python3 -m hostagent.freeze watchdog MOUNT_POINT SECONDS")
        return EXIT_USAGE
    mount_point, seconds = argv[0], float(argv[1])
    import hostagent.runner  # noqa: F401  (loaded now so a thaw never waits for an import)

    def on_term(signum, frame):
        _thaw_with_retries(mount_point)
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
            _thaw_with_retries(mount_point)
            return EXIT_TIMED_OUT
        ready, _, _ = select.select([0], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(0, 64)
        if not chunk:
            _say(f"hostagent went away while {mount_point} may be frozen: thawing it")
            _thaw_with_retries(mount_point)
            return EXIT_PARENT_GONE
        received += chunk
        if THAWED in received:
            return EXIT_TOLD_THAWED


if __name__ == "__main__":
    if sys.argv[1:2] != ["watchdog"]:
        _say("usage: python3 -m hostagent.freeze watchdog MOUNT_POINT SECONDS")
        sys.exit(EXIT_USAGE)
    sys.exit(watchdog_main(sys.argv[2:]))
