"""The only code that writes a filesystem: mkfs.ext4 on a proven-blank disk, and e2fsck."""

from __future__ import annotations

import os

from hostagent import runner
from hostagent.adapters.disk import read_content
from hostagent.blank import HINT_READ, HINT_UNKNOWN_DATA
from hostagent.errors import CommandError, OperationError, Reason, RefusedError

# mkfs with lazy init takes about a second on a fresh EBS volume, but a throttled or huge volume
# can be far slower; a timeout here would leave a half-written filesystem, so be generous.
MKFS_TIMEOUT = 1800.0
FSCK_TIMEOUT = 3600.0
RECHECK_BYTES = 1 << 20
# Our mark on a disk proven blank, written right before mkfs: the positive trace that tells our
# own interrupted mkfs (no superblock yet) from anybody's data. 1 MiB before the end: mke2fs
# zeroes the last sectors and writes the journal in the middle, but never touches this block
# (measured on 1, 2, 16 and 64 GiB devices); in the finished filesystem it is a free block.
MARK_FROM_END = 1 << 20
MARK_SIZE = 4096
MARK_MAGIC = b"HOSTAGENT-MKFS\n"
# e2fsck exit bits (e2fsck(8)): 1 errors corrected, 2 corrected + reboot, 4 left uncorrected.
FSCK_CORRECTED = (0, 1, 2)
FSCK_UNCORRECTED = 4


def mark_bytes(uuid: str) -> bytes:
    """PURE: the 4 KiB mark for the mkfs that will make filesystem UUID uuid."""
    return (MARK_MAGIC + f"uuid={uuid.lower()}\n".encode()).ljust(MARK_SIZE, b"\0")


def parse_mark(block: bytes) -> str | None:
    """PURE: the UUID a mark names, or None when block is not exactly one of our marks."""
    if not block.startswith(MARK_MAGIC):
        return None
    head, _, rest = block[len(MARK_MAGIC):].partition(b"\n")
    if not head.startswith(b"uuid=") or rest.strip(b"\0") or len(block) != MARK_SIZE:
        return None
    return head[len(b"uuid="):].decode("ascii", "replace")


def read_mark(device_path: str, size_bytes: int) -> str | None:
    """The UUID of our mark on the device, if it carries one (reads 4 KiB, writes nothing)."""
    if size_bytes < 2 * MARK_FROM_END:
        return None
    try:
        fd = os.open(device_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return parse_mark(os.pread(fd, MARK_SIZE, size_bytes - MARK_FROM_END))
    except OSError:
        return None
    finally:
        os.close(fd)


def write_mark(device_path: str, size_bytes: int, uuid: str) -> None:
    fd = os.open(device_path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, mark_bytes(uuid), size_bytes - MARK_FROM_END)
        os.fsync(fd)
    finally:
        os.close(fd)


def mkfs_argv(device_path: str, label: str, uuid: str, *, force: bool = False) -> list[str]:
    """PURE: -m 0 (CouchDB runs as uid 5984, reserved blocks are only waste); lazy init and no
    discard keep a fresh EBS volume's format to about a second. One -F only over our own
    interrupted mkfs (never two: that would format a mounted device)."""
    argv = ["mkfs.ext4", "-q", "-L", label, "-m", "0", "-U", uuid,
            "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
    if force:
        argv.append("-F")
    return argv + [device_path]


def format_ext4(device_path: str, label: str, uuid: str, *, size_bytes: int,
                resume: bool = False, run=runner.run) -> None:
    """mkfs.ext4 a disk the plan proved blank (or our own interrupted mkfs, resume=True).

    The first and last MiB are read once more right before (where every signature lives), with
    an exclusive open: the plan's evidence is milliseconds old, taken under our lock, and
    non-interactive mke2fs formats over an existing filesystem without asking."""
    if not resume:
        content = read_content(device_path, size_bytes, edge_bytes=RECHECK_BYTES, samples=False)
        if content.read_error:
            raise RefusedError(f"{device_path} cannot be read ({content.read_error}); refusing "
                               "to format it", where=device_path, hint=HINT_READ)
        if content.busy:
            raise RefusedError(f"{device_path} became busy (the kernel refuses an exclusive open); "
                               "refusing to format it", where=device_path,
                               hint="something mounted or claimed the disk since it was checked")
        nonzero = next((o for o in (content.head_nonzero_offset, content.tail_nonzero_offset,
                                    content.sample_nonzero_offset) if o is not None), None)
        if nonzero is not None:
            raise RefusedError(f"{device_path} has non-zero bytes at offset {nonzero} since it was "
                               "checked; refusing to format it", where=device_path,
                               hint=HINT_UNKNOWN_DATA.format(device=device_path, offset=nonzero))
    if size_bytes >= 2 * MARK_FROM_END:
        try:
            write_mark(device_path, size_bytes, uuid)
        except OSError as exc:
            raise OperationError(f"cannot write to {device_path}: {exc.strerror}",
                                 where=device_path) from None
    run(mkfs_argv(device_path, label, uuid, force=resume), timeout=MKFS_TIMEOUT, input="")


def fsck_preen(device_path: str, run=runner.run) -> str:
    """`e2fsck -f -p` on an unmounted ext4 whose superblock records errors (-f: with only an error
    count recorded and the state clean, plain -p says "clean" and keeps the count). Exit 3 when preen
    cannot fix it: that needs a person answering e2fsck's questions."""
    done = run(["e2fsck", "-f", "-p", device_path], timeout=FSCK_TIMEOUT, ok_codes=range(256), input="")
    if done.returncode in FSCK_CORRECTED:
        return "clean" if done.returncode == 0 else "errors corrected by e2fsck -p"
    last = (done.stdout.strip() or done.stderr.strip()).splitlines()[-1:] or [""]
    if done.returncode & FSCK_UNCORRECTED:
        raise RefusedError(
            f"{device_path} has filesystem errors e2fsck -p cannot fix safely ({last[0].strip()}); "
            "refusing to mount it", where=device_path,
            hint=f"snapshot the volume first, then run `e2fsck -f {device_path}` by hand and "
                 "answer its questions; then run bootstrap again", reason=Reason.FS_DAMAGED)
    raise CommandError(["e2fsck", "-f", "-p", device_path], done.returncode, done.stdout, done.stderr)


def is_clean(device_path: str, run=runner.run) -> bool:
    """`e2fsck -n -f`: a read-only full check (opens the device read-only, never writes)."""
    try:
        done = run(["e2fsck", "-n", "-f", device_path], timeout=FSCK_TIMEOUT, ok_codes=range(256),
                   input="")
    except OperationError:
        return False
    return done.returncode == 0
