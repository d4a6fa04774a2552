"""What is on a block device: blkid/wipefs output, its first and last bytes — and the blank decision."""

from __future__ import annotations

import errno
import json
import os
import stat
import uuid as uuidlib
from dataclasses import dataclass
from typing import Iterable

from hostagent import runner
from hostagent.adapters.mounts import MountEntry, parse_mountinfo, read_mountinfo, unescape_octal
from hostagent.aws.volume import FORMATTED_TAG  # a plain module: boto3 is never imported here
from hostagent.errors import CommandError, OperationError, RefusedError, UsageError

MIB = 1 << 20
EDGE_BYTES = MIB  # how much of the head and of the tail must be zeros
BLKID_NOTHING_FOUND = 2  # blkid -p: "no signature found"; every other non-zero exit is a failure
BLKID_AMBIVALENT = 8
PROBE_TIMEOUT = 60.0
# mkfs with lazy init takes about a second on a fresh EBS volume, but a throttled or huge volume
# can be far slower; a timeout here would leave a half-written filesystem, so be generous.
MKFS_TIMEOUT = 1800.0
EXT4_LABEL_MAX_BYTES = 16
SYS_DEV_BLOCK = "/sys/dev/block"
PROC_SWAPS = "/proc/swaps"
# Entries of Evidence.mounted_at that are not mount points.
SWAP_MARK = "[swap]"
IN_USE_MARK = "[busy]"  # the kernel refused an exclusive open, yet no mount of ours shows it

EXT4_SUPERBLOCK_OFFSET = 1024
EXT4_MAGIC = b"\x53\xef"  # 0xEF53 little-endian at superblock +56
EXT4_MAGIC_AT = 56
EXT4_UUID_AT = 104
EXT4_MTIME_AT = 44
EXT4_MNT_COUNT_AT = 52
EXT4_LABEL_AT = 120


@dataclass(frozen=True)
class Evidence:
    """Plain data gathered from the host: everything decide() needs, nothing it must look up."""

    device: str
    size_bytes: int
    read_error: str | None
    head_nonzero_offset: int | None  # absolute offset of the first non-zero byte in the first MiB
    tail_nonzero_offset: int | None  # absolute offset of the first non-zero byte in the last MiB
    blkid_exit: int | None  # None: blkid did not finish (timeout, missing program)
    blkid: dict[str, str]
    blkid_error: str | None
    wipefs_signatures: tuple[str, ...]  # "xfs at 0x0"
    wipefs_error: str | None
    partitions: tuple[str, ...]
    holders: tuple[str, ...]
    mounted_at: tuple[str, ...]
    is_root_disk: bool
    serial_volume_id: str | None
    expected_volume_id: str | None
    formatted_tag: str | None  # value of the volume's hostagent:formatted tag; None = not tagged
    # ext2/3/4 only: has the filesystem ever been mounted (superblock mount count/time)?
    fs_ever_mounted: bool | None = None


@dataclass(frozen=True)
class Decision:
    action: str  # "format" | "reuse" | "refuse"
    reason: str
    fs_uuid: str | None = None
    fs_label: str | None = None
    hint: str | None = None  # what the operator can do about a refusal


def parse_blkid_export(text: str) -> dict[str, str]:
    """`blkid -o export` / `blkid -p -o export` lines KEY=value → dict (values may contain '=').

    blkid backslash-escapes space, quotes, `$`, backquote, `<`, `>` and the backslash itself in
    export values ("VERSION=LVM2\\ 001"); those escapes are undone. Bytes ≥ 0x80 and control
    characters stay in blkid's own M-x / ^X notation: that encoding is ambiguous to reverse, and
    only labels can contain them.
    """
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and key:
            info[key] = _unescape_blkid(value)
    return info


def _unescape_blkid(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def parse_wipefs_json(text: str) -> tuple[str, ...]:
    """`wipefs --no-act --json --output TYPE,OFFSET` → ("xfs at 0x0", …), in wipefs's order."""
    if not text.strip():
        return ()  # some util-linux versions print nothing at all when nothing is found
    data = json.loads(text)
    found = []
    for sig in data.get("signatures", []):
        found.append(f"{sig.get('type') or '?'} at {sig.get('offset') or '?'}")
    return tuple(found)


def _signature_type(signature: str) -> str:
    return signature.split(" at ", 1)[0]


def _volume_key(volume_id: str) -> str:
    # The Nitro NVMe serial is the volume id without its hyphen: vol-0abc… ↔ vol0abc…
    return volume_id.strip().lower().replace("-", "")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiox" or word.startswith("LVM") else "a"


def _ids(info: dict[str, str], *keys: str) -> str:
    parts = [f"{key.replace('PT', '')} {info[key]}" for key in keys if info.get(key)]
    return f" ({', '.join(parts)})" if parts else ""


def describe_blkid(info: dict[str, str]) -> list[str]:
    """What blkid's TYPE/USAGE/PTTYPE say is on the device, as operator phrases."""
    found = []
    fs_type, usage = info.get("TYPE"), info.get("USAGE")
    if fs_type:
        ids = _ids(info, "UUID", "LABEL")
        if fs_type == "swap":
            found.append(f"holds swap space{ids}")
        elif usage == "filesystem":
            found.append(f"holds {_article(fs_type)} {fs_type} filesystem{ids}")
        elif usage == "crypto":
            found.append(f"holds {_article(fs_type)} {fs_type} encrypted container{ids}")
        elif usage == "raid":
            found.append(f"holds {_article(fs_type)} {fs_type} signature "
                         f"(LVM/RAID member){ids}")
        else:
            found.append(f"holds {_article(fs_type)} {fs_type} signature"
                         f"{f' (usage {usage})' if usage else ''}{ids}")
    if info.get("PTTYPE"):
        found.append(f"holds {_article(info['PTTYPE'])} {info['PTTYPE']} partition table"
                     f"{_ids(info, 'PTUUID')}")
    if not found:
        rest = {k: v for k, v in info.items() if k != "DEVNAME"}
        if rest:
            found.append("holds something blkid reports as "
                         + ", ".join(f"{k}={v}" for k, v in sorted(rest.items())))
    return found


def _is_reusable_ext4(ev: Evidence) -> bool:
    """blkid and wipefs both agree the device holds one ext4 filesystem and nothing else."""
    return (
        ev.blkid_exit == 0
        and ev.blkid_error is None
        and ev.blkid.get("TYPE") == "ext4"
        and not ev.blkid.get("PTTYPE")
        and ev.wipefs_error is None
        and all(_signature_type(s) == "ext4" for s in ev.wipefs_signatures)
    )


HINT_ROOT = ("this is the disk the system runs from; point [volume] id/tags or device at the "
             "data volume (see `hostagent devices`)")
HINT_WRONG_VOLUME = ("the device is not the volume hostagent was told to use; check [volume] "
                     "id/tags and what is attached (`hostagent devices`)")
HINT_FORMATTED = ("hostagent formatted this volume before, yet the device reads as blank: check "
                  "that the right volume is attached (`hostagent devices`); only if its data is "
                  f"really gone and you want a new filesystem, remove the volume's {FORMATTED_TAG} "
                  "tag and run bootstrap again")
HINT_READ = "check that the volume is attached and healthy (`dmesg`, `lsblk`), then run bootstrap again"
HINT_IN_USE = ("the device is partitioned, mounted or in use by LVM/RAID/device-mapper; hostagent "
               "only formats a whole, unused volume: unmount/release it or point [volume] at "
               "another volume")
# wipefs -a alone is not enough: it clears only the magic bytes, and what remains of an xfs or
# vfat header is still non-zero data in the first MiB (measured), which hostagent refuses again.
ERASE_HOWTO = ("only if you are sure it holds nothing you need, erase it yourself (hostagent never "
               "does): `wipefs -a {device}`, `blkdiscard -z -l 1MiB {device}`, "
               "`blkdiscard -z -o $(( $(blockdev --getsize64 {device}) - 1048576 )) {device}`, "
               "then run bootstrap again")
HINT_SIGNATURE = ("if this is the right volume with data on another filesystem, migrate the data "
                  "to ext4 by hand; " + ERASE_HOWTO)
HINT_UNKNOWN_DATA = ("the device holds data hostagent cannot identify (look: "
                     "`hexdump -C -s {offset} -n 512 {device}`); " + ERASE_HOWTO)
HINT_PROBE = ("run `blkid -p {device}` and `wipefs --no-act {device}` to see what is there; "
              "hostagent formats only what both prove empty")


def decide(evidence: Evidence) -> Decision:
    """Format only on positive evidence of blankness, reuse any ext4, refuse everything else. PURE."""
    ev = evidence
    dev = ev.device
    # (finding, hint): the first finding's hint is the one the operator sees.
    blockers: list[tuple[str, str]] = []  # forbid reusing as well as formatting
    doubts: list[tuple[str, str]] = []  # forbid formatting only

    if ev.is_root_disk:
        blockers.append(("is the root disk (it holds /)", HINT_ROOT))
    expected = ev.expected_volume_id
    if expected and ev.serial_volume_id and _volume_key(ev.serial_volume_id) != _volume_key(expected):
        blockers.append((f"is volume {ev.serial_volume_id} by its NVMe serial, not {expected}",
                         HINT_WRONG_VOLUME))
    if ev.read_error:
        blockers.append((f"cannot be read ({ev.read_error})", HINT_READ))
    if ev.holders:
        blockers.append((f"is held by {', '.join(ev.holders)} (LVM/RAID/device-mapper)",
                         HINT_IN_USE))
    if ev.partitions:
        blockers.append((f"has partitions {', '.join(ev.partitions)}", HINT_IN_USE))

    if _is_reusable_ext4(ev) and not blockers:
        fs_uuid = ev.blkid.get("UUID") or None
        fs_label = ev.blkid.get("LABEL") or None
        where = f"; it {_describe_use(ev.mounted_at)}" if ev.mounted_at else ""
        return Decision("reuse", f"{dev} holds an ext4 filesystem{_ids(ev.blkid, 'UUID', 'LABEL')}"
                        f"{where}; reusing it, never reformatting", fs_uuid, fs_label)

    if ev.formatted_tag is not None:
        value = f"={ev.formatted_tag}" if ev.formatted_tag else ""
        doubts.append((f"belongs to a volume tagged {FORMATTED_TAG}{value} "
                       "(hostagent formatted it before)", HINT_FORMATTED))
    if expected and not ev.serial_volume_id:
        doubts.append((f"has no NVMe serial naming a volume, so it cannot be proven to be {expected}",
                       HINT_WRONG_VOLUME))
    if ev.mounted_at:
        doubts.append((_describe_use(ev.mounted_at), HINT_IN_USE))
    if ev.size_bytes <= 0:
        doubts.append((f"reports a size of {ev.size_bytes} bytes", HINT_READ))

    signature_hint = HINT_SIGNATURE.format(device=dev)
    found_signature = False
    if ev.blkid_exit == 0 or (ev.blkid_exit == BLKID_NOTHING_FOUND and _has_values(ev.blkid)):
        for phrase in describe_blkid(ev.blkid):
            doubts.append((phrase, signature_hint))
            found_signature = True
    if ev.blkid_exit is None:
        doubts.append((f"could not be probed by blkid ({ev.blkid_error or 'no answer'})",
                       HINT_PROBE.format(device=dev)))
    elif ev.blkid_exit == BLKID_AMBIVALENT:
        doubts.append(("holds ambivalent signatures (blkid -p exit 8"
                       f"{': ' + ev.blkid_error if ev.blkid_error else ''})",
                       HINT_PROBE.format(device=dev)))
        found_signature = True
    elif ev.blkid_exit not in (0, BLKID_NOTHING_FOUND):
        doubts.append((f"could not be probed by blkid (exit {ev.blkid_exit}"
                       f"{': ' + ev.blkid_error if ev.blkid_error else ''})",
                       HINT_PROBE.format(device=dev)))
    elif ev.blkid_error:
        doubts.append((f"could not be probed by blkid ({ev.blkid_error})", HINT_PROBE.format(device=dev)))
    if ev.wipefs_signatures:
        doubts.append((f"wipefs sees {', '.join(ev.wipefs_signatures)}", signature_hint))
        found_signature = True
    if ev.wipefs_error:
        doubts.append((f"could not be listed by wipefs ({ev.wipefs_error})", HINT_PROBE.format(device=dev)))
    if not found_signature:
        # Only worth saying when no signature explains the bytes: this is data nobody can name.
        for offset in (ev.head_nonzero_offset, ev.tail_nonzero_offset):
            if offset is not None:
                doubts.append((f"has non-zero bytes at offset {offset} and no known signature",
                               HINT_UNKNOWN_DATA.format(device=dev, offset=offset)))
                break

    findings = blockers + doubts
    if findings or not is_proven_blank(ev):
        # The findings explain; is_proven_blank decides, so a gap in the wording can only refuse.
        what = "; ".join(f for f, _ in findings) or "could not be proven blank"
        hint = findings[0][1] if findings else HINT_PROBE.format(device=dev)
        return Decision("refuse", f"{dev} {what}; refusing to format it", hint=hint)
    identity = f" (volume {expected} by its NVMe serial)" if expected else ""
    return Decision("format", f"{dev}{identity} is blank: blkid and wipefs find no signature, "
                    "the first and last MiB are zeros, no partitions, holders or mounts; "
                    "formatting it as ext4")


def is_proven_blank(ev: Evidence) -> bool:
    """Every piece of positive evidence the blank rule asks for, each one present. PURE."""
    return (
        ev.read_error is None
        and ev.size_bytes > 0
        and ev.head_nonzero_offset is None
        and ev.tail_nonzero_offset is None
        and ev.blkid_exit == BLKID_NOTHING_FOUND
        and ev.blkid_error is None
        and not _has_values(ev.blkid)
        and ev.wipefs_error is None
        and not ev.wipefs_signatures
        and not ev.partitions
        and not ev.holders
        and not ev.mounted_at
        and not ev.is_root_disk
        and ev.formatted_tag is None
        and (not ev.expected_volume_id
             or (ev.serial_volume_id is not None
                 and _volume_key(ev.serial_volume_id) == _volume_key(ev.expected_volume_id)))
    )


def _describe_use(mounted_at: tuple[str, ...]) -> str:
    phrases = []
    points = [m for m in mounted_at if m not in (SWAP_MARK, IN_USE_MARK)]
    if points:
        phrases.append(f"is mounted at {', '.join(points)}")
    if SWAP_MARK in mounted_at:
        phrases.append("is active swap")
    if IN_USE_MARK in mounted_at:
        phrases.append("is in use (the kernel refuses an exclusive open: mounted in another "
                       "namespace or held by a driver)")
    return "; ".join(phrases)


def _has_values(info: dict[str, str]) -> bool:
    return any(k != "DEVNAME" for k in info)


def refusal_error(decision: Decision, device: str, volume_id: str | None = None) -> RefusedError:
    """The RefusedError (exit 3) the operator sees for a refuse decision, with what they can do."""
    hint = decision.hint or HINT_PROBE.format(device=device)
    return RefusedError(decision.reason, where=f"volume {volume_id}" if volume_id else None, hint=hint)


# --- gathering evidence from the host -------------------------------------------------------


def _mounts_from(mountinfo) -> list[MountEntry]:
    """mountinfo: None (read /proc/self/mountinfo), its text, or MountEntry objects."""
    if mountinfo is None:
        return read_mountinfo()
    if isinstance(mountinfo, str):
        return parse_mountinfo(mountinfo)
    return list(mountinfo)


def _rdev_of(path: str) -> str | None:
    """major:minor of a block device node, or None when path is not one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _mount_devices(mount: MountEntry) -> set[str]:
    # btrfs (and other multi-device filesystems) show an anonymous 0:N in mountinfo; the source
    # path is the only link to the block device there.
    found = {mount.major_minor}
    if mount.source.startswith("/dev/"):
        rdev = _rdev_of(mount.source)
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


def _underlying_disks(major_minor: str, sys_block: str, _seen: set[str] | None = None) -> set[str]:
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
        return _underlying_disks(parent, sys_block, seen) if parent else {major_minor}
    slaves_dir = os.path.join(node, "slaves")
    slaves = sorted(os.listdir(slaves_dir)) if os.path.isdir(slaves_dir) else []
    if not slaves:
        return {major_minor}
    disks: set[str] = set()
    for slave in slaves:
        dev = _read_dev(os.path.join(slaves_dir, slave))
        if dev:
            disks |= _underlying_disks(dev, sys_block, seen)
    return disks


def _first_nonzero(data: bytes) -> int | None:
    stripped = data.lstrip(b"\0")
    return None if not stripped else len(data) - len(stripped)


def _pread_exactly(fd: int, length: int, offset: int) -> bytes:
    chunks, got = [], 0
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class _Edges:
    read_error: str | None = None
    head_nonzero_offset: int | None = None
    tail_nonzero_offset: int | None = None
    busy: bool = False


def read_edges(device_path: str, size_bytes: int) -> _Edges:
    """Read the first and last MiB; say where the first non-zero byte of each is."""
    busy = False
    try:
        # O_EXCL on a block device fails with EBUSY while anything in the kernel holds it:
        # a mount in any namespace, swap, dm/md — evidence mountinfo alone cannot give.
        fd = os.open(device_path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            return _Edges(read_error=f"open: {exc.strerror}")
        busy = True
        try:
            fd = os.open(device_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc2:
            return _Edges(read_error=f"open: {exc2.strerror}", busy=True)
    try:
        actual = os.lseek(fd, 0, os.SEEK_END)
        if actual != size_bytes:
            return _Edges(read_error=f"size is {actual} bytes, expected {size_bytes}", busy=busy)
        if actual <= 0:
            return _Edges(read_error="size is 0 bytes", busy=busy)
        span = min(EDGE_BYTES, actual)
        head = _pread_exactly(fd, span, 0)
        if len(head) != span:
            return _Edges(read_error=f"short read: {len(head)} of {span} bytes at offset 0", busy=busy)
        tail_at = actual - span
        tail = _pread_exactly(fd, span, tail_at)
        if len(tail) != span:
            return _Edges(read_error=f"short read: {len(tail)} of {span} bytes at offset {tail_at}",
                          busy=busy)
    except OSError as exc:
        return _Edges(read_error=f"read: {exc.strerror}", busy=busy)
    finally:
        os.close(fd)
    head_off = _first_nonzero(head)
    tail_off = _first_nonzero(tail)
    return _Edges(None, head_off, None if tail_off is None else tail_at + tail_off, busy)


def probe_blkid(device_path: str, run=runner.run) -> tuple[int | None, dict[str, str], str | None]:
    """(exit code, parsed export, error) of `blkid -p -o export`; exit None when it did not finish."""
    try:
        done = run(["blkid", "-p", "-o", "export", device_path], timeout=PROBE_TIMEOUT,
                   ok_codes=range(256))
    except CommandError as exc:
        return None, {}, "timed out" if exc.timed_out else str(exc)
    except OperationError as exc:
        return None, {}, exc.message
    err = done.stderr.strip().splitlines()
    error = err[-1] if err and done.returncode not in (0,) else None
    if done.returncode not in (0, BLKID_NOTHING_FOUND) and not error:
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


def _read_swaps(swaps: str | None) -> list[str]:
    if swaps is None:
        try:
            with open(PROC_SWAPS, encoding="utf-8", errors="replace") as f:
                swaps = f.read()
        except OSError:
            return []
    return [unescape_octal(line.split()[0]) for line in swaps.splitlines()[1:] if line.split()]


def gather_evidence(
    device_path: str,
    *,
    size_bytes: int,
    partitions: Iterable[str] = (),
    holders: Iterable[str] = (),
    serial_volume_id: str | None = None,
    expected_volume_id: str | None = None,
    formatted_tag: str | None = None,
    run=runner.run,
    mountinfo=None,
    swaps: str | None = None,
    sys_block: str = SYS_DEV_BLOCK,
) -> Evidence:
    """Look at the device without writing a byte. Partitions and holders given by the caller are
    added to what sysfs says here (never replace it): more evidence can only make it less blank."""
    problems: list[str] = []
    parts = list(partitions)
    held_by = list(holders)
    mounted: list[str] = []
    is_root = False

    major_minor = _rdev_of(device_path)
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

    entries = _mounts_from(mountinfo)
    if own_devs:
        for mount in entries:
            if _mount_devices(mount) & own_devs and mount.mount_point not in mounted:
                mounted.append(mount.mount_point)
        for swap in _read_swaps(swaps):
            if _rdev_of(swap) in own_devs:
                mounted.append(SWAP_MARK)
        root_devs: set[str] = set()
        for mount in entries:
            if mount.mount_point == "/":
                root_devs |= _mount_devices(mount)
        root_disks: set[str] = set()
        for dev in root_devs:
            root_disks |= _underlying_disks(dev, sys_block)
        is_root = bool(_underlying_disks(major_minor, sys_block) & root_disks)

    edges = _Edges(read_error="not read")
    if major_minor:
        edges = read_edges(device_path, size_bytes)
        if edges.busy and not mounted:
            mounted.append(IN_USE_MARK)
    if edges.read_error and major_minor:
        problems.append(edges.read_error)

    blkid_exit, blkid_info, blkid_error = probe_blkid(device_path, run)
    signatures, wipefs_error = probe_wipefs(device_path, run)

    return Evidence(
        device=device_path,
        size_bytes=size_bytes,
        read_error="; ".join(problems) or None,
        head_nonzero_offset=edges.head_nonzero_offset,
        tail_nonzero_offset=edges.tail_nonzero_offset,
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
        fs_ever_mounted=ext4_ever_mounted(device_path) if blkid_info.get("TYPE") else None,
    )


# --- formatting and reading back ------------------------------------------------------------


def _recheck_evidence(device_path: str, run) -> Evidence | Decision:
    """The content half of the blank test again, right before mkfs: non-interactive mke2fs
    formats over an existing filesystem without asking (it only asks when stdin is a tty)."""
    try:
        size = _device_size(device_path)
    except OSError as exc:
        return Decision("refuse", f"{device_path} cannot be read ({exc.strerror}); refusing to format it",
                        hint=HINT_READ)
    edges = read_edges(device_path, size)
    blkid_exit, blkid_info, blkid_error = probe_blkid(device_path, run)
    signatures, wipefs_error = probe_wipefs(device_path, run)
    return Evidence(
        device=device_path, size_bytes=size, read_error=edges.read_error,
        head_nonzero_offset=edges.head_nonzero_offset, tail_nonzero_offset=edges.tail_nonzero_offset,
        blkid_exit=blkid_exit, blkid=blkid_info, blkid_error=blkid_error,
        wipefs_signatures=signatures, wipefs_error=wipefs_error, partitions=(), holders=(),
        mounted_at=(IN_USE_MARK,) if edges.busy else (),
        is_root_disk=False, serial_volume_id=None, expected_volume_id=None, formatted_tag=None,
        fs_ever_mounted=ext4_ever_mounted(device_path) if blkid_info.get("TYPE") else None,
    )


def is_own_interrupted_format(ev: Evidence, intent_uuid: str) -> bool:
    """PURE: nothing on the device but what our own mkfs (run with -U intent_uuid) left when it
    was killed: either no signature at all (killed before the superblock), or ext4 with exactly
    that UUID (killed after it). The caller has checked that the intent names this very device."""
    if ev.read_error or ev.partitions or ev.holders or ev.mounted_at or ev.is_root_disk:
        return False
    if ev.blkid_exit == BLKID_NOTHING_FOUND and not ev.wipefs_signatures and not ev.wipefs_error:
        return True
    # A complete filesystem with our UUID counts only if it was never mounted: once mounted,
    # CouchDB may have written to it, and an ext4 is reused, never remade.
    return (ev.blkid_exit == 0 and ev.blkid.get("TYPE") == "ext4"
            and ev.fs_ever_mounted is False
            and not ev.blkid.get("PTTYPE")
            and ev.blkid.get("UUID", "").lower() == intent_uuid.lower()
            and all(sig.split()[0] == "ext4" for sig in ev.wipefs_signatures))


def _device_size(device_path: str) -> int:
    fd = os.open(device_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def format_ext4(device_path: str, label: str, run=runner.run, *, uuid: str | None = None,
                resume_uuid: str | None = None) -> None:
    """mkfs.ext4 a device the caller has proven blank; refuses if it no longer reads as blank.

    uuid: the filesystem UUID to create (recorded beforehand in the format intent).
    resume_uuid: the UUID of our own earlier mkfs that was interrupted; its leftovers (and only
    those) may be formatted over.
    """
    if len(label.encode("utf-8")) > EXT4_LABEL_MAX_BYTES:
        raise UsageError(f"filesystem label {label!r} is longer than {EXT4_LABEL_MAX_BYTES} bytes",
                         where="[filesystem] label")
    if not label or label.startswith("-"):
        raise UsageError(f"filesystem label {label!r} is not usable", where="[filesystem] label")
    recheck = _recheck_evidence(device_path, run)
    if isinstance(recheck, Decision):
        raise refusal_error(recheck, device_path)
    decision = decide(recheck)
    resuming = resume_uuid is not None and decision.action != "format" and \
        is_own_interrupted_format(recheck, resume_uuid)
    if decision.action != "format" and not resuming:
        raise refusal_error(decision, device_path)
    # No -F for a blank device: mke2fs then still refuses a busy device. One -F (never two: that
    # would allow a mounted device) only over our own interrupted mkfs. input="" so it can never
    # wait on a question.
    argv = ["mkfs.ext4", "-q", "-L", label, "-m", "0",
            "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
    if uuid:
        argv += ["-U", uuid]
    if resuming:
        argv.append("-F")
    run(argv + [device_path], timeout=MKFS_TIMEOUT, input="")


def read_ext4_superblock(device_path: str) -> tuple[str, str] | None:
    """(uuid, label) straight from the ext2/3/4 superblock — no command, for fast checks.
    None when there is no ext superblock magic at offset 1024+56."""
    fd = os.open(device_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sb = _pread_exactly(fd, 1024, EXT4_SUPERBLOCK_OFFSET)
    finally:
        os.close(fd)
    if len(sb) < EXT4_LABEL_AT + 16 or sb[EXT4_MAGIC_AT:EXT4_MAGIC_AT + 2] != EXT4_MAGIC:
        return None
    fs_uuid = str(uuidlib.UUID(bytes=sb[EXT4_UUID_AT:EXT4_UUID_AT + 16]))
    label = sb[EXT4_LABEL_AT:EXT4_LABEL_AT + 16].split(b"\0", 1)[0].decode("utf-8", "replace")
    return fs_uuid, label


def ext4_ever_mounted(device_path: str) -> bool | None:
    """From the superblock: s_mnt_count (u16 at +52) and s_mtime (u32 at +44) stay 0 from mkfs
    until the first mount. None when there is no ext superblock or it cannot be read."""
    try:
        fd = os.open(device_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        sb = _pread_exactly(fd, 1024, EXT4_SUPERBLOCK_OFFSET)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(sb) < 64 or sb[EXT4_MAGIC_AT:EXT4_MAGIC_AT + 2] != EXT4_MAGIC:
        return None
    mtime = int.from_bytes(sb[EXT4_MTIME_AT:EXT4_MTIME_AT + 4], "little")
    mnt_count = int.from_bytes(sb[EXT4_MNT_COUNT_AT:EXT4_MNT_COUNT_AT + 2], "little")
    return bool(mtime or mnt_count)


def devices_with_uuid(fs_uuid: str, run=runner.run) -> list[str]:
    """Every block device whose filesystem has this UUID, probed afresh (no blkid cache): a
    volume restored from a snapshot is a twin of the original, and UUID= would pick either."""
    done = run(["blkid", "-c", "/dev/null", "-o", "device", "-t", f"UUID={fs_uuid}"],
               timeout=PROBE_TIMEOUT, ok_codes=(0, BLKID_NOTHING_FOUND))
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def filesystem_uuid(device_path: str, run=runner.run) -> str | None:
    """The filesystem UUID blkid reads from the device itself (-p: no cache), e.g. after mkfs."""
    done = run(["blkid", "-p", "-o", "export", device_path], timeout=PROBE_TIMEOUT,
               ok_codes=(0, BLKID_NOTHING_FOUND))
    if done.returncode == BLKID_NOTHING_FOUND:
        return None
    return parse_blkid_export(done.stdout).get("UUID") or None
