"""freeze: the ioctl numbers, and what each FIFREEZE refusal tells the operator."""

from __future__ import annotations

import errno

import pytest

from hostagent import freeze
from hostagent.errors import EXIT_FAILED


def iowr(kind: str, number: int, size: int) -> int:
    # linux/ioctl.h on x86/arm: dir (2 bits, read|write = 3) << 30 | size << 16 | type << 8 | nr
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | number


def test_ioctl_numbers_are_linux_fs_h():
    assert freeze.FIFREEZE == iowr("X", 119, 4) == 0xC0045877
    assert freeze.FITHAW == iowr("X", 120, 4) == 0xC0045878


@pytest.mark.parametrize("code, says, hint", [
    (errno.EOPNOTSUPP, "does not support freezing", "freeze = false"),
    (errno.ENOTTY, "does not support freezing", "freeze = false"),
    (errno.EBUSY, "already frozen by someone else", "fsfreeze -u /opt/couchdb"),
    (errno.EPERM, "CAP_SYS_ADMIN", "freeze = false"),
    (errno.EIO, "FIFREEZE failed", None),
])
def test_every_fifreeze_refusal_is_not_frozen_and_exit_1(code, says, hint):
    error = freeze.not_frozen_error(OSError(code, "x"), "/opt/couchdb")
    assert isinstance(error, freeze.NotFrozen)  # the kernel undid it: nothing of ours to thaw
    assert error.exit_code == EXIT_FAILED
    assert says in str(error) and "/opt/couchdb" in str(error)
    if hint:
        assert hint in error.hint


def test_thaw_of_a_filesystem_that_is_not_frozen_is_false_not_an_error(monkeypatch):
    def einval(fd, request):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(freeze, "_ioctl", einval)
    assert freeze.thaw(3) is False


def test_thaw_failing_otherwise_raises(monkeypatch):
    def eio(fd, request):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(freeze, "_ioctl", eio)
    with pytest.raises(OSError):
        freeze.thaw(3)
