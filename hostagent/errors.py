"""The one error hierarchy: each error carries the operator-facing message and its exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a check failed or an operation failed at run time
EXIT_USAGE = 2  # bad usage, config or input
EXIT_REFUSED = 3  # refused to protect data


class HostagentError(Exception):
    """An expected failure: printed as one line, never as a traceback."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

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
