"""The host lock: never truncates, never follows a symlink, refuses a file that is not ours."""

import os
import subprocess
import sys
import textwrap

import pytest

from hostagent.errors import EXIT_USAGE, OperationError, UsageError
from hostagent.lock import host_lock


def snapshot_of(path):
    st = os.lstat(path)
    return st.st_ino, path.read_bytes()


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("content", [b"root:x:0:0:root:/root:/bin/bash\n", b"x" * 4096,
                                     b"1234\nsecond line\n", b"-1\n"])
def test_a_file_that_is_not_ours_is_refused_byte_identical(tmp_path, content, dry_run):
    path = tmp_path / "passwd"
    path.write_bytes(content)
    before = snapshot_of(path)
    with pytest.raises(UsageError) as exc:
        with host_lock(str(path), dry_run=dry_run):
            pytest.fail("entered the lock on a foreign file")
    assert exc.value.exit_code == EXIT_USAGE
    assert f"lock file {path} is not hostagent's" in str(exc.value)
    assert "host.lock_file" in str(exc.value)
    assert snapshot_of(path) == before


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_symlink_is_refused_and_its_target_untouched(tmp_path, dry_run):
    target = tmp_path / "target"
    target.write_bytes(b"")  # even an empty file, which would otherwise be acceptable
    link = tmp_path / "lock"
    link.symlink_to(target)
    with pytest.raises(UsageError, match="symbolic link"):
        with host_lock(str(link), dry_run=dry_run):
            pass
    assert target.read_bytes() == b"" and link.is_symlink()


def test_a_directory_or_fifo_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (tmp_path, fifo):
        with pytest.raises(UsageError, match="not a regular file"):
            with host_lock(str(path), wait=0):
                pass


def test_a_new_lock_file_gets_our_pid_as_a_fixed_width_field(tmp_path):
    path = tmp_path / "run" / "lock"
    with host_lock(str(path)):
        assert path.read_bytes() == f"{os.getpid():>10}\n".encode()


def test_our_own_pid_file_is_reused_in_place_never_truncated(tmp_path):
    path = tmp_path / "lock"
    path.write_bytes(b"12345\n")  # what earlier versions wrote
    inode = path.stat().st_ino
    with host_lock(str(path)):
        assert path.stat().st_ino == inode
        assert path.read_bytes() == f"{os.getpid():>10}\n".encode()
    # A longer, valid file keeps its tail: only the pid field is written, nothing is cut.
    path.write_bytes(b"7\n" + b" " * 20)
    with host_lock(str(path)):
        data = path.read_bytes()
    assert data == f"{os.getpid():>10}\n".encode() + b" " * 11 and path.stat().st_ino == inode
    with host_lock(str(path)):  # and that file is still ours
        pass


def test_dry_run_never_creates_or_writes_the_lock_file(tmp_path):
    missing = tmp_path / "no" / "lock"
    with host_lock(str(missing), dry_run=True):
        pass
    assert not missing.parent.exists()
    ours = tmp_path / "lock"
    ours.write_bytes(b"      4242\n")
    before = snapshot_of(ours)
    with host_lock(str(ours), dry_run=True):
        pass
    assert snapshot_of(ours) == before


HOLDER = textwrap.dedent("""
    import sys, time
    from hostagent.lock import host_lock
    with host_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.readline()
""")


def test_two_holders_serialise(tmp_path):
    path = tmp_path / "lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OperationError, match=rf"holds the lock \(pid {holder.pid}\)"):
            with host_lock(str(path), wait=0.3):
                pass
        # A dry run waits for the writer too: it must not look at a half-made change.
        with pytest.raises(OperationError, match="holds the lock"):
            with host_lock(str(path), wait=0.2, dry_run=True):
                pass
    finally:
        holder.communicate("\n", timeout=10)
    assert holder.returncode == 0
    with host_lock(str(path), wait=1):
        assert path.read_bytes() == f"{os.getpid():>10}\n".encode()


def test_dry_runs_share_the_lock_with_each_other(tmp_path):
    path = tmp_path / "lock"
    path.write_bytes(b"")
    with host_lock(str(path), dry_run=True):
        with host_lock(str(path), dry_run=True, wait=0):
            pass
        with pytest.raises(OperationError, match="holds the lock"):
            with host_lock(str(path), wait=0):
                pass
    assert path.read_bytes() == b""
