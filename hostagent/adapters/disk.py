"""Evidence about a disk, gathered without writing a byte: blkid, wipefs, its bytes, its users.

The one place that runs blkid and wipefs and reads a device's content; hostagent.blank decides
on what this gathers.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple
from typing import Iterable

from hostagent import runner
from hostagent.adapters.blockdev import device_number, loops_backed_by
from hostagent.adapters.mounts import MountEntry, parse_mountinfo, read_mountinfo, unescape_octal
from hostagent.blank import IN_USE_MARK, SWAP_MARK, Evidence, parse_blkid_export, parse_wipefs_json
from hostagent.errors import CommandError, OperationError

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
# The blank proof reads the first and last EDGE_BYTES and SAMPLE_BYTES every SAMPLE_STRIDE in
# between; beyond MAX_SAMPLES samples the stride widens, so a 1 TiB volume reads 1 GiB at most.
EDGE_BYTES = 8 * MIB
SAMPLE_BYTES = 64 * KIB
SAMPLE_STRIDE = 64 * MIB
MAX_SAMPLES = 16384
READ_CHUNK = 1 * MIB
READ_WORKERS = 4  # measured on a 16 GiB loop device: 45 ms with one reader, 16 ms with four
ZEROS = bytes(READ_CHUNK)
PROBE_TIMEOUT = 60.0
SYS_DEV_BLOCK = "/sys/dev/block"
PROC = "/proc"
PROC_SWAPS = "/proc/swaps"


class Content(NamedTuple):
    read_error: str | None = None
    head_nonzero_offset: int | None = None
    tail_nonzero_offset: int | None = None
    sample_nonzero_offset: int | None = None
    busy: bool = False
    bytes_read: int = 0
    summary: str = ""


def sample_offsets(size_bytes: int) -> list[int]:
    """PURE: where the stride samples start, between the head and the tail regions."""
    if size_bytes <= 2 * EDGE_BYTES:
        return []
    stride = SAMPLE_STRIDE
    if size_bytes // stride > MAX_SAMPLES:
        stride = -(-size_bytes // MAX_SAMPLES)
        stride = -(-stride // SAMPLE_BYTES) * SAMPLE_BYTES  # keep samples aligned
    first = -(-EDGE_BYTES // stride) * stride
    return list(range(first, size_bytes - EDGE_BYTES - SAMPLE_BYTES + 1, stride))


def describe_reads(size_bytes: int) -> str:
    """PURE: what read_content reads of a device this size, in words."""
    samples = sample_offsets(size_bytes)
    edge = min(EDGE_BYTES, size_bytes // 2) if size_bytes > 2 * EDGE_BYTES else size_bytes
    total = (2 * edge if size_bytes > 2 * EDGE_BYTES else size_bytes) + len(samples) * SAMPLE_BYTES
    if not samples:
        return f"{_mib(total)} read: the whole device"
    stride = samples[1] - samples[0] if len(samples) > 1 else SAMPLE_STRIDE
    return (f"{_mib(total)} read: first and last {_mib(EDGE_BYTES)}, {len(samples)} samples of "
            f"{SAMPLE_BYTES // KIB} KiB every {_mib(stride)}")


def _mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB" if n % MIB == 0 else f"{n / MIB:.1f} MiB"


def _first_nonzero(data: bytes) -> int | None:
    if data == ZEROS[:len(data)]:  # memcmp speed; only a non-zero region is scanned
        return None
    return len(data) - len(data.lstrip(b"\0"))


def open_exclusive(device_path: str) -> tuple[int, bool]:
    """A read-only fd and whether the kernel refused an exclusive open. O_EXCL on a block device
    fails with EBUSY while anything in the kernel holds it: a mount in any namespace, swap,
    dm/md — evidence mountinfo alone cannot give."""
    try:
        return os.open(device_path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC), False
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    return os.open(device_path, os.O_RDONLY | os.O_CLOEXEC), True


def read_plan(size_bytes: int, edge_bytes: int = EDGE_BYTES, samples: bool = True):
    """PURE: (region, offset, length) reads of at most READ_CHUNK: head, tail, then samples."""
    edge = min(edge_bytes, size_bytes)
    reads = [("head", o, min(READ_CHUNK, edge - o)) for o in range(0, edge, READ_CHUNK)]
    tail_at = size_bytes - edge
    reads += [("tail", tail_at + o, min(READ_CHUNK, edge - o)) for o in range(0, edge, READ_CHUNK)]
    if samples:
        reads += [("sample", o, SAMPLE_BYTES) for o in sample_offsets(size_bytes)]
    return reads


def _open_direct(device_path: str, size_bytes: int) -> int | None:
    """O_DIRECT: no page cache to fill (a 1 TiB volume's samples are 1 GiB) and, measured on a
    loop device, a third faster; None where it cannot be used (a regular file on tmpfs, a
    size not a multiple of 4 KiB) and buffered reads are used instead."""
    if size_bytes % 4096:
        return None
    try:
        return os.open(device_path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return None


def _read_all(fd: int, direct: bool, reads, found: dict, stop, errors: list) -> int:
    """One reader's share of the plan; records the first non-zero byte of each region it sees
    and stops everyone at the first (data anywhere is enough to refuse)."""
    import mmap

    buf = mmap.mmap(-1, READ_CHUNK)  # page aligned, as O_DIRECT needs
    view = memoryview(buf)
    done = 0
    try:
        for region, offset, length in reads:
            if stop.is_set():
                break
            got = os.preadv(fd, [view[:length]], offset) if direct else None
            data = buf[:length] if direct else os.pread(fd, length, offset)
            if (got if direct else len(data)) != length:
                raise EOFError(f"short read: {got if direct else len(data)} of {length} bytes "
                               f"at offset {offset}")
            done += length
            at = _first_nonzero(data)
            if at is not None:
                found[region] = min(found.get(region, offset + at), offset + at)
                stop.set()
    except EOFError as exc:
        errors.append(str(exc))
        stop.set()
    except OSError as exc:
        errors.append(f"read: {exc.strerror}")
        stop.set()
    finally:
        view.release()
        buf.close()
    return done


def read_content(device_path: str, size_bytes: int, *, edge_bytes: int = EDGE_BYTES,
                 samples: bool = True, workers: int = READ_WORKERS) -> Content:
    """Read the head, the tail and the stride samples (the blank proof's reads, say where a
    non-zero byte is. Several readers at once: a volume answers one read at a time slower than
    several (EBS latency, the loop driver's queue), and preadv releases the GIL."""
    import threading

    try:
        fd, busy = open_exclusive(device_path)
    except OSError as exc:
        return Content(read_error=f"open: {exc.strerror}")
    direct_fd = None
    try:
        actual = os.lseek(fd, 0, os.SEEK_END)
        if actual != size_bytes:
            return Content(read_error=f"size is {actual} bytes, expected {size_bytes}", busy=busy)
        if actual <= 0:
            return Content(read_error="size is 0 bytes", busy=busy)
        direct_fd = _open_direct(device_path, actual)
        reads = read_plan(actual, edge_bytes, samples)
        found: dict[str, int] = {}
        errors: list[str] = []
        stop = threading.Event()
        shares = [reads[i::workers] for i in range(min(workers, len(reads)))]
        totals = [0] * len(shares)

        def work(i: int) -> None:
            totals[i] = _read_all(direct_fd if direct_fd is not None else fd,
                                  direct_fd is not None, shares[i], found, stop, errors)

        threads = [threading.Thread(target=work, args=(i,), daemon=True)
                   for i in range(1, len(shares))]
        for t in threads:
            t.start()
        work(0)
        for t in threads:
            t.join()
    except OSError as exc:
        return Content(read_error=f"read: {exc.strerror}", busy=busy)
    finally:
        os.close(fd)
        if direct_fd is not None:
            os.close(direct_fd)
    if errors:
        return Content(read_error=errors[0], busy=busy)
    summary = describe_reads(actual) if samples and edge_bytes == EDGE_BYTES else \
        f"first and last {_mib(min(edge_bytes, actual))}"
    return Content(None, found.get("head"), found.get("tail"), found.get("sample"), busy,
                   sum(totals), summary)


def blkid(argv_tail: list[str], run=runner.run, ok_codes=range(256)):
    """The one blkid call site (argument list after `blkid`)."""
    return run(["blkid", *argv_tail], timeout=PROBE_TIMEOUT, ok_codes=ok_codes)


def probe_blkid(device_path: str, run=runner.run) -> tuple[int | None, dict[str, str], str | None]:
    """(exit code, parsed export, error) of `blkid -p -o export` (low level: no cache, every
    prober); exit None when it did not finish."""
    try:
        done = blkid(["-p", "-o", "export", device_path], run)
    except CommandError as exc:
        return None, {}, "timed out" if exc.timed_out else str(exc)
    except OperationError as exc:
        return None, {}, exc.message
    err = done.stderr.strip().splitlines()
    error = err[-1] if err and done.returncode != 0 else None
    if done.returncode not in (0, 2) and not error:
        error = f"exit {done.returncode}"
    return done.returncode, parse_blkid_export(done.stdout), error


def probe_wipefs(device_path: str, run=runner.run) -> tuple[tuple[str, ...], str | None]:
    """(signatures, error) from `wipefs --no-act` listing — it never writes."""
    argv = ["wipefs", "--no-act", "--json", "--output", "TYPE,OFFSET", device_path]
    try:
        done = run(argv, timeout=PROBE_TIMEOUT)
    except CommandError as exc:
        return (), "timed out" if exc.timed_out else str(exc)
    except OperationError as exc:
        return (), exc.message
    try:
        return parse_wipefs_json(done.stdout), None
    except (ValueError, AttributeError, TypeError) as exc:
        return (), f"unreadable output: {exc}"


def _mounts_from(mountinfo) -> list[MountEntry]:
    """mountinfo: None (read /proc/self/mountinfo), its text, or MountEntry objects."""
    if mountinfo is None:
        return read_mountinfo()
    if isinstance(mountinfo, str):
        return parse_mountinfo(mountinfo)
    return list(mountinfo)


def _mount_devices(mount: MountEntry) -> set[str]:
    # btrfs (and other multi-device filesystems) show an anonymous 0:N in mountinfo; the source
    # path is the only link to the block device there.
    found = {mount.major_minor}
    if mount.source.startswith("/dev/"):
        rdev = device_number(mount.source)
        if rdev:
            found.add(rdev)
    return found


def _sysfs_node(major_minor: str, sys_block: str) -> str | None:
    path = os.path.join(sys_block, major_minor)
    return os.path.realpath(path) if os.path.exists(path) else None


def _read_dev(node: str) -> str | None:
    try:
        with open(os.path.join(node, "dev"), encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _sysfs_partitions(node: str) -> list[tuple[str, str]]:
    """(name, major:minor) of the partitions the kernel knows on the disk at this sysfs node."""
    found = []
    for name in sorted(os.listdir(node)):
        child = os.path.join(node, name)
        if os.path.isfile(os.path.join(child, "partition")):
            found.append((name, _read_dev(child) or ""))
    return found


def underlying_disks(major_minor: str, sys_block: str = SYS_DEV_BLOCK,
                     _seen: set[str] | None = None) -> set[str]:
    """Whole disks beneath a device: a partition's disk, a dm/md device's slaves, recursively."""
    seen = _seen if _seen is not None else set()
    if major_minor in seen:
        return set()
    seen.add(major_minor)
    node = _sysfs_node(major_minor, sys_block)
    if node is None:
        return {major_minor}
    if os.path.isfile(os.path.join(node, "partition")):
        parent = _read_dev(os.path.dirname(node))
        return underlying_disks(parent, sys_block, seen) if parent else {major_minor}
    slaves_dir = os.path.join(node, "slaves")
    slaves = sorted(os.listdir(slaves_dir)) if os.path.isdir(slaves_dir) else []
    if not slaves:
        return {major_minor}
    disks: set[str] = set()
    for slave in slaves:
        dev = _read_dev(os.path.join(slaves_dir, slave))
        if dev:
            disks |= underlying_disks(dev, sys_block, seen)
    return disks


def _read_swaps(swaps: str | None) -> list[str]:
    if swaps is None:
        try:
            with open(PROC_SWAPS, encoding="utf-8", errors="replace") as f:
                swaps = f.read()
        except OSError:
            return []
    return [unescape_octal(line.split()[0]) for line in swaps.splitlines()[1:] if line.split()]


def mounts_in_other_namespaces(devs: set[str], proc: str = PROC) -> list[str]:
    """'<mount point> in the mount namespace of pid N' for every mount of these devices that
    only another mount namespace (a container, a systemd PrivateMounts unit) can see."""
    try:
        own = os.readlink(os.path.join(proc, "self", "ns", "mnt"))
    except OSError:
        own = None
    seen = {own}
    found = []
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return found
    for pid in sorted(pids, key=int):
        try:
            ns = os.readlink(os.path.join(proc, pid, "ns", "mnt"))
        except OSError:
            continue  # gone, or a kernel thread
        if ns in seen:
            continue
        seen.add(ns)
        try:
            entries = read_mountinfo(os.path.join(proc, pid, "mountinfo"))
        except OSError:
            continue
        for mount in entries:
            if _mount_devices(mount) & devs:
                found.append(f"{mount.mount_point} in the mount namespace of pid {pid}")
    return found


def gather_evidence(
    device_path: str,
    *,
    size_bytes: int,
    partitions: Iterable[str] = (),
    holders: Iterable[str] = (),
    serial_volume_id: str | None = None,
    expected_volume_id: str | None = None,
    formatted_tag: str | None = None,
    snapshot_id: str | None = None,
    run=runner.run,
    mountinfo=None,
    swaps: str | None = None,
    sys_block: str = SYS_DEV_BLOCK,
    proc: str = PROC,
) -> Evidence:
    """Look at the device without writing a byte. Partitions and holders given by the caller are
    added to what sysfs says here (never replace it): more evidence can only make it less blank.

    blkid and wipefs run first: when they agree on an ext4 (to be reused, never formatted), the
    content read and the scan of other mount namespaces — needed only to prove blank — are
    skipped."""
    from hostagent.blank import _is_reusable_ext4_info

    problems: list[str] = []
    parts = list(partitions)
    held_by = list(holders)
    mounted: list[str] = []
    users: list[str] = []
    is_root = False

    major_minor = device_number(device_path)
    if major_minor is None:
        problems.append("not a block device" if os.path.exists(device_path) else "no such device")
    node = _sysfs_node(major_minor, sys_block) if major_minor else None
    own_devs: set[str] = set()
    if major_minor and node is None:
        problems.append(f"no sysfs entry for {major_minor}")
    elif node is not None:
        own_devs.add(major_minor)
        try:
            for name, dev in _sysfs_partitions(node):
                if name not in parts:
                    parts.append(name)
                if dev:
                    own_devs.add(dev)
            holders_dir = os.path.join(node, "holders")
            for name in sorted(os.listdir(holders_dir)) if os.path.isdir(holders_dir) else []:
                if name not in held_by:
                    held_by.append(name)
        except OSError as exc:
            problems.append(f"sysfs: {exc.strerror}")

    from hostagent.adapters.superblock import read_superblock

    # With no ext superblock the device is a candidate for formatting, which needs its content
    # read: read it while blkid and wipefs run (a reused ext4 never needs it).
    sb = read_superblock(device_path) if major_minor else None
    early: dict[str, Content] = {}
    reader = None
    if major_minor and sb is None:
        import threading

        reader = threading.Thread(
            target=lambda: early.update(content=read_content(device_path, size_bytes)),
            daemon=True)
        reader.start()
    blkid_exit, blkid_info, blkid_error = probe_blkid(device_path, run)
    signatures, wipefs_error = probe_wipefs(device_path, run)
    if reader is not None:
        reader.join()
    reusable = _is_reusable_ext4_info(blkid_exit, blkid_info, blkid_error, signatures,
                                      wipefs_error)

    entries = _mounts_from(mountinfo)
    if own_devs:
        for mount in entries:
            if _mount_devices(mount) & own_devs and mount.mount_point not in mounted:
                mounted.append(mount.mount_point)
        for swap in _read_swaps(swaps):
            if device_number(swap) in own_devs:
                mounted.append(SWAP_MARK)
        root_devs: set[str] = set()
        for mount in entries:
            if mount.mount_point == "/":
                root_devs |= _mount_devices(mount)
        root_disks: set[str] = set()
        for dev in root_devs:
            root_disks |= underlying_disks(dev, sys_block)
        is_root = bool(underlying_disks(major_minor, sys_block) & root_disks)
        users += [f"backs {loop} (a loop device reads and writes through it)"
                  for loop in loops_backed_by(own_devs)]
        if not reusable:
            users += [f"is mounted at {where}"
                      for where in mounts_in_other_namespaces(own_devs, proc)]

    content = Content(read_error="not read")
    if major_minor and not reusable:
        content = early.get("content") or read_content(device_path, size_bytes)
        if content.busy and not mounted and not users:
            mounted.append(IN_USE_MARK)
        if content.read_error:
            problems.append(content.read_error)
    elif major_minor:
        content = Content()

    if not blkid_info.get("TYPE"):
        sb = None
    return Evidence(
        device=device_path,
        size_bytes=size_bytes,
        read_error="; ".join(problems) or None,
        head_nonzero_offset=content.head_nonzero_offset,
        tail_nonzero_offset=content.tail_nonzero_offset,
        blkid_exit=blkid_exit,
        blkid=blkid_info,
        blkid_error=blkid_error,
        wipefs_signatures=signatures,
        wipefs_error=wipefs_error,
        partitions=tuple(parts),
        holders=tuple(held_by),
        mounted_at=tuple(mounted),
        is_root_disk=is_root,
        serial_volume_id=serial_volume_id,
        expected_volume_id=expected_volume_id,
        formatted_tag=formatted_tag,
        fs_ever_mounted=sb.ever_mounted if sb else None,
        sample_nonzero_offset=content.sample_nonzero_offset,
        users=tuple(users),
        snapshot_id=snapshot_id or None,
        read_summary=content.summary,
    )


def filesystem_info(device_path: str, run=runner.run) -> dict[str, str]:
    """TYPE/UUID/LABEL/PTTYPE blkid reads from the device itself; {} when nothing is found."""
    done = blkid(["-p", "-o", "export", device_path], run, ok_codes=(0, 2))
    return parse_blkid_export(done.stdout) if done.returncode == 0 else {}

