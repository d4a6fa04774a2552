"""The one command runner: argument lists only, a timeout on every call, errors with argv/exit/stderr."""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from hostagent.errors import CommandError, OperationError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
# Where the tools live on Debian/Amazon Linux even when PATH is minimal (systemd units, cron).
SBIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


@dataclass(frozen=True)
class Completed:
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
    found = shutil.which(program)
    if found:
        return found
    return shutil.which(program, path=":".join(SBIN_DIRS))


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ok_codes: Iterable[int] = (0,),
    input: str | bytes | None = None,
) -> Completed:
    """Run argv; return its output, or raise CommandError when the exit code is not in ok_codes."""
    import sh  # lazy: ~60 ms, and only commands that change the host need it

    argv = [str(a) for a in argv]
    program = which(argv[0])
    if program is None:
        raise OperationError(
            f"required program {argv[0]!r} not found",
            hint=f"install the package that provides {argv[0]} (Debian: e2fsprogs, util-linux)",
        )
    ok = set(ok_codes)
    log.debug("run: %s", " ".join(argv))
    proc = sh.Command(program)(
        *argv[1:],
        _bg=True,
        _bg_exc=False,
        _ok_code=list(range(256)),
        _in=input,
        _return_cmd=True,
        _tty_out=False,
        _decode_errors="replace",
    )
    # Our own timer instead of sh's `_timeout`: that one's watcher thread adds ~100 ms to
    # every command, which would dominate a bootstrap that runs a dozen of them.
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    try:
        proc.wait()
    except sh.SignalException:
        if not timed_out.is_set():
            raise CommandError(argv, proc.exit_code, _text(proc.stdout), _text(proc.stderr)) from None
    finally:
        timer.cancel()
    stdout, stderr = _text(proc.stdout), _text(proc.stderr)
    if timed_out.is_set():
        raise CommandError(argv, None, stdout, stderr, timed_out=True)
    result = Completed(tuple(argv), proc.exit_code, stdout, stderr)
    if result.returncode not in ok:
        raise CommandError(argv, result.returncode, stdout, stderr)
    return result


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
