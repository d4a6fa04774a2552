"""The one error hierarchy: each error carries the operator-facing message and its exit code."""

from __future__ import annotations

import errno
import re

EXIT_OK = 0
EXIT_FAILED = 1  # a check failed or an operation failed at run time
EXIT_USAGE = 2  # bad usage, config or input
EXIT_REFUSED = 3  # refused to protect data
EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h): an unexpected exception, a bug in hostagent


class Reason:
    """The machine-readable causes an error carries (HostagentError.reason): `"reason"` in --json
    output and the agent's ECS attribute <prefix>.reason. One list: raise sites and the agent's
    decisions (NEEDS_A_PERSON) name these, never a string of their own."""

    VOLUME_NOT_FOUND = "volume-not-found"
    AMBIGUOUS_VOLUME = "ambiguous-volume"
    OTHER_ZONE = "other-zone"
    MULTI_ATTACH = "multi-attach"
    ATTACHED_ELSEWHERE = "attached-elsewhere"
    MODIFICATION_IN_PROGRESS = "modification-in-progress"
    MODIFICATION_RATE = "modification-rate"
    WRONG_DEVICE = "wrong-device"
    FS_DAMAGED = "fs-damaged"
    MOUNT_POINT_BUSY = "mount-point-busy"
    MOUNTED_ELSEWHERE = "mounted-elsewhere"
    UUID_TWINS = "uuid-twins"
    DEVICE_IN_USE = "device-in-use"
    DEVICE_MISSING = "device-missing"
    ADMIN_SECRET_UNAVAILABLE = "admin-secret-unavailable"
    BAD_ADMIN_SECRET = "bad-admin-secret"
    VOLUME_IN_USE = "volume-in-use"
    RESIZE_DENIED = "resize-denied"
    NOT_BLANK = "not-blank"


# Refusals that protect data: no retry changes them, a person must act (the agent looks again
# every few minutes, reconcilers.REFUSED_RETRY). attached-elsewhere is not one of them: the old
# host lets go by itself.
NEEDS_A_PERSON = frozenset({
    Reason.MULTI_ATTACH, Reason.OTHER_ZONE, Reason.AMBIGUOUS_VOLUME, Reason.NOT_BLANK,
    Reason.WRONG_DEVICE, Reason.MOUNT_POINT_BUSY, Reason.MOUNTED_ELSEWHERE, Reason.UUID_TWINS,
    Reason.DEVICE_IN_USE, Reason.FS_DAMAGED,
})


class HostagentError(Exception):
    """An expected failure: printed as one line, never as a traceback."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint
        # A short machine-readable cause ("attached-elsewhere", "not-blank"…): in --json
        # output, and what the agent reports as the ECS attribute <prefix>.reason.
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.message} ({self.where})" if self.where else self.message


class OperationError(HostagentError):
    """An operation failed at run time (command, AWS call, timeout, lock)."""

    exit_code = EXIT_FAILED


class CheckFailed(OperationError):
    """A check the operator asked for did not pass."""


class UsageError(HostagentError):
    """Bad usage, bad config or bad input: nothing was changed."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """The config file is missing, unreadable, or has a bad key or value."""


class RefusedError(HostagentError):
    """Refused to go on because it could lose data; the bytes are untouched."""

    exit_code = EXIT_REFUSED


class CommandError(OperationError):
    """An external command failed; carries argv, exit code and output for the operator."""

    def __init__(self, argv, returncode, stdout="", stderr="", *, timed_out=False, hint=None):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out
        if timed_out:
            what = "timed out"
        elif returncode is not None and returncode < 0:
            what = f"killed by signal {-returncode}"
        else:
            what = f"exited {returncode}"
        detail = (stderr or stdout or "").strip().splitlines()
        tail = f": {detail[-1]}" if detail else ""
        super().__init__(f"{' '.join(self.argv)} {what}{tail}", hint=hint)


class InternalError(HostagentError):
    """An exception no code path expected: a bug in hostagent, reported in one line."""

    exit_code = EXIT_INTERNAL

    @classmethod
    def from_exception(cls, exc: BaseException) -> "InternalError":
        text = one_line(str(exc))
        what = f"unexpected {type(exc).__name__}" + (f": {text}" if text else "")
        return cls(what, hint="this is a bug in hostagent; rerun with -vv for the traceback")


# What an operator can do about the host errors that escape most often.
_OS_HINTS = {
    errno.EROFS: "the filesystem is read-only: check `findmnt` and `dmesg` (ext4 remounts "
                 "read-only after I/O errors)",
    errno.ENOSPC: "the filesystem is full: free some space (`df -h`) and run the command again",
    errno.EDQUOT: "a disk quota is exhausted: free some space and run the command again",
    errno.EPERM: "commands that change the host run as root",
    errno.EACCES: "commands that change the host run as root",
    errno.EIO: "the device reports I/O errors: check `dmesg`",
}


def host_error(exc: OSError) -> OperationError:
    """An OSError that escaped a flow is a host failure: `<strerror> (<filename>)`, exit 1."""
    what = one_line(exc.strerror or str(exc)) or type(exc).__name__
    where = None
    if exc.filename is not None:
        where = _printable(exc.filename)
        if exc.filename2 is not None:
            where += f" -> {_printable(exc.filename2)}"
    return OperationError(what, where=where, hint=_OS_HINTS.get(exc.errno))


# user:password@ in any URL an exception message carries (couchdb.url may hold one).
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


def one_line(text: str) -> str:
    """Whitespace folded to one line, URL credentials masked: safe for a last-resort message."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", " ".join(str(text).split()))


def _printable(name) -> str:
    """A file name shown as is, except that a newline or NUL in it cannot break the line."""
    text = name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else str(name)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
