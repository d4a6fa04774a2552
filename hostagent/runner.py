"""The one command runner: argument lists only, a timeout on every call, errors with argv/exit/stderr."""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Iterable, NamedTuple, Protocol, Sequence

from hostagent.errors import CommandError, OperationError

DEFAULT_TIMEOUT = 60.0
# Where the tools live on Debian/Amazon Linux even when PATH is minimal (systemd units, cron).
SBIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
# After SIGKILL, how long to wait for the child to be reaped and its pipes to close. A process in
# uninterruptible sleep (a mount on a hung device) dies only when the kernel lets it; we stop
# waiting for it rather than hang past the timeout.
KILL_GRACE = 2.0
READ_SIZE = 65536
# Dispositions a child must not inherit from Python (which ignores SIGPIPE), as subprocess does.
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class Completed(NamedTuple):
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        ok_codes: Iterable[int] = (0,),
        input: str | bytes | None = None,
    ) -> Completed: ...


def which(program: str) -> str | None:
    """Resolve a program at call time (never at import time), looking in sbin dirs too."""
    # shutil.which's rules, without importing shutil (~3 ms, which is all it was here for);
    # empty PATH entries (the current directory) are skipped: hostagent runs as root.
    if os.path.dirname(program):
        return program if _is_executable(program) else None
    path = os.environ.get("PATH")
    if path is None:
        path = os.confstr("CS_PATH") or os.defpath
    for directories in (path.split(os.pathsep), SBIN_DIRS):
        for directory in directories:
            candidate = os.path.join(directory, program)
            if directory and _is_executable(candidate):
                return candidate
    return None


def _is_executable(path: str) -> bool:
    return os.access(path, os.X_OK) and not os.path.isdir(path)


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ok_codes: Iterable[int] = (0,),
    input: str | bytes | None = None,
) -> Completed:
    """Run argv; return its output, or raise CommandError when the exit code is not in ok_codes.

    stdin is `input` or /dev/null (never our terminal). On timeout the child's whole process
    group is killed. A death by signal N is returncode -N.
    """
    argv = [str(a) for a in argv]
    program = which(argv[0])
    if program is None:
        raise OperationError(
            f"required program {argv[0]!r} not found",
            hint=f"install the package that provides {argv[0]} (Debian: e2fsprogs, util-linux)",
        )
    ok = set(ok_codes)
    data = input.encode() if isinstance(input, str) else input
    _debug("run: %s", " ".join(argv))
    start = time.monotonic()
    returncode, stdout, stderr = _spawn_and_wait([program, *argv[1:]], data, timeout)
    elapsed_ms = (time.monotonic() - start) * 1000
    stdout = stdout.decode(errors="replace")
    stderr = stderr.decode(errors="replace")
    if returncode is None:
        _debug("ran %s in %.1f ms (timed out)", " ".join(argv), elapsed_ms)
        raise CommandError(argv, None, stdout, stderr, timed_out=True)
    _debug("ran %s in %.1f ms (exit %d)", " ".join(argv), elapsed_ms, returncode)
    result = Completed(tuple(argv), returncode, stdout, stderr)
    if result.returncode not in ok:
        raise CommandError(argv, result.returncode, stdout, stderr)
    return result


def _debug(message: str, *args) -> None:
    # Through logging only once something has imported it (the CLI does, to set the level):
    # before that no handler exists that would show a debug record, and importing logging here
    # would cost every command ~8 ms even when nothing is logged.
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.getLogger(__name__).debug(message, *args)


def _spawn_and_wait(argv: list[str], data: bytes | None, timeout: float):
    """posix_spawn + poll: subprocess would cost ~3 ms of imports (locale, selectors) per run.

    Returns (returncode, stdout, stderr); returncode None means it timed out and was killed.
    """
    _stop_inheriting_fds()
    pipes: list[int] = []
    try:
        out_r, out_w = _pipe(pipes)
        err_r, err_w = _pipe(pipes)
        actions = [(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
        if data is None:
            actions.insert(0, (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
            in_w = None
        else:
            in_r, in_w = _pipe(pipes)
            actions.insert(0, (os.POSIX_SPAWN_DUP2, in_r, 0))
        try:
            # In our own process group: if hostagent is killed (kill -- -PGID, systemd, a
            # terminal's Ctrl-C), the command dies with it rather than running on unlocked.
            pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions,
                                 setsigmask=(), setsigdef=RESET_SIGNALS)
        except ValueError as exc:  # an embedded NUL byte
            raise OperationError(f"cannot run {' '.join(argv)!r}: {exc}") from None
        except OSError as exc:
            raise OperationError(f"cannot run {argv[0]}: {exc.strerror}") from None
        for fd in (out_w, err_w) if data is None else (out_w, err_w, in_r):
            _close(pipes, fd)
        if in_w is not None:
            os.set_blocking(in_w, False)
    except BaseException:
        for fd in list(pipes):
            _close(pipes, fd)
        raise
    reaped, pidfd = False, None
    try:
        deadline = time.monotonic() + timeout
        pidfd = _pidfd(pid)
        chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
        if not _pump(pipes, chunks, in_w, data, deadline):
            _kill(pid)
            _pump(pipes, chunks, None, None, time.monotonic() + KILL_GRACE)
            reaped = _reap(pid, pidfd, time.monotonic() + KILL_GRACE) is not None
            return None, b"".join(chunks[out_r]), b"".join(chunks[err_r])
        status = _reap(pid, pidfd, deadline)
        if status is None:
            _kill(pid)
            reaped = _reap(pid, pidfd, time.monotonic() + KILL_GRACE) is not None
            return None, b"".join(chunks[out_r]), b"".join(chunks[err_r])
        reaped = True
        return os.waitstatus_to_exitcode(status), b"".join(chunks[out_r]), b"".join(chunks[err_r])
    finally:
        if not reaped:  # interrupted (Ctrl-C, a signal handler raising) or not reaped in time
            _kill(pid)
            _reap(pid, pidfd, time.monotonic() + 0.1)
        if pidfd is not None:
            os.close(pidfd)
        for fd in list(pipes):
            _close(pipes, fd)


def _pump(pipes: list[int], chunks: dict[int, list[bytes]], in_w, data, deadline) -> bool:
    """Feed stdin and drain stdout/stderr until both reach EOF; False if the deadline passed first."""
    poller = select.poll()
    readers = {fd for fd in chunks if fd in pipes}
    for fd in readers:
        poller.register(fd, select.POLLIN)
    offset = 0
    view = memoryview(data) if data else None
    if in_w is not None:
        if data:
            poller.register(in_w, select.POLLOUT)
        else:
            _close(pipes, in_w)
            in_w = None
    while readers or in_w is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        for fd, _event in poller.poll(remaining * 1000 + 1):
            if fd == in_w:
                try:
                    offset += os.write(in_w, view[offset:offset + READ_SIZE])
                except BlockingIOError:
                    continue
                except BrokenPipeError:  # it exited without reading all of it, as it may
                    offset = len(data)
                if offset >= len(data):
                    poller.unregister(in_w)
                    _close(pipes, in_w)
                    in_w = None
                continue
            chunk = os.read(fd, READ_SIZE)
            if chunk:
                chunks[fd].append(chunk)
            else:
                poller.unregister(fd)
                readers.discard(fd)
                _close(pipes, fd)
    return True


def _reap(pid: int, pidfd: int | None, deadline: float) -> int | None:
    """Its wait status, or None if it has not exited by the deadline."""
    # Its pipes are closed, so it has exited or is about to: wait on its pidfd (readable once it
    # has exited), else poll with a short, growing sleep.
    pause = 0.0002
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else (a SIGCHLD handler): status unknown
            return 255 << 8
        if done:
            return status
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if pidfd is not None:
            exited = select.poll()
            exited.register(pidfd, select.POLLIN)
            exited.poll(remaining * 1000 + 1)
            continue
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.02)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # before Linux 5.3, or a seccomp filter: sleeps instead
        return None


def _descendants(pid: int) -> list[int]:
    """The process tree below pid, from /proc/PID/task/TID/children."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", encoding="ascii") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def _kill(pid: int) -> None:
    """Kill the command and whatever it started (on timeout, or when we are interrupted). The
    tree is walked rather than given its own process group: in ours, a command dies with
    hostagent (kill -- -PGID, a terminal's Ctrl-C) instead of running on without the lock."""
    for victim in [pid, *_descendants(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_inheriting_fds() -> None:
    """Mark descriptors beyond 0-2 that we inherited open across exec (Python opens its own with
    O_CLOEXEC) close-on-exec, so no command sees them: posix_spawn has no close_fds."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                os.set_inheritable(fd, False)
        except OSError:  # the listing's own descriptor, now closed
            pass


def _pipe(pipes: list[int]) -> tuple[int, int]:
    # Both ends above 0-2 (they may be closed in our process), so a dup2 onto 0/1/2 in the
    # child never meets itself and keeps its close-on-exec flag.
    ends = []
    for fd in os.pipe():
        while fd <= 2:
            pipes.append(fd)
            fd = os.dup(fd)
        pipes.append(fd)
        ends.append(fd)
    for fd in [fd for fd in pipes if fd <= 2]:
        _close(pipes, fd)
    return ends[0], ends[1]


def _close(pipes: list[int], fd: int) -> None:
    if fd in pipes:
        pipes.remove(fd)
        os.close(fd)
