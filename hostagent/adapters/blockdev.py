"""Block devices from sysfs (no udev needed), EBS identity from NVMe serials, and which disk is the volume."""

from __future__ import annotations

import os
import re
import stat
from typing import Callable, Iterable, NamedTuple, Sequence

from hostagent.errors import OperationError, Reason, RefusedError, UsageError
from hostagent.log import get_logger

log = get_logger(__name__)

SECTOR_BYTES = 512  # sysfs `size` counts 512-byte sectors whatever the logical block size
SKIP_PREFIXES = ("ram", "zram")
EBS_MODEL = "Amazon Elastic Block Store"
# Nitro exposes the volume id as the NVMe serial with the hyphen dropped: vol0123456789abcdef0.
SERIAL_VOLUME_RE = re.compile(r"^vol-?([0-9a-f]{17}|[0-9a-f]{8})$")

# NVMe Identify Controller (CNS=1) is 4096 bytes; bytes 3072.. are vendor specific. EBS puts the
# device name given to AttachVolume ("sdf" or "/dev/sdf", space/NUL padded) in the first 32 —
# the same field amazon-ec2-utils' ebsnvme-id reads to build the /dev/sdf udev symlinks.
IDENTIFY_SIZE = 4096
EBS_VS_NAME_OFFSET = 3072
EBS_VS_NAME_LEN = 32
DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9/_.-]+$")

NVME_ADMIN_IDENTIFY = 0x06
NVME_ID_CNS_CTRL = 0x01
# struct nvme_admin_cmd (linux/nvme_ioctl.h): opcode, flags, rsvd1, nsid, cdw2, cdw3, metadata,
# addr, metadata_len, data_len, cdw10..cdw15, timeout_ms, result — 72 bytes, no padding.
NVME_ADMIN_CMD_FORMAT = "=BBHIIIQQII6III"
NVME_ADMIN_CMD_SIZE = 72
# _IOWR('N', 0x41, struct nvme_admin_cmd) == 0xC0484E41
NVME_IOCTL_ADMIN_CMD = (3 << 30) | (NVME_ADMIN_CMD_SIZE << 16) | (ord("N") << 8) | 0x41


class BlockDevice(NamedTuple):
    name: str
    path: str
    major_minor: str
    size_bytes: int
    serial: str
    model: str
    volume_id: str | None
    requested_name: str | None
    partitions: tuple[str, ...]
    holders: tuple[str, ...]
    read_only: bool
    removable: bool
    backing_file: str | None
    vendor: str = ""
    by_id: tuple[str, ...] = ()  # /dev/disk/by-id names, when udev made them
    wwid: str = ""  # a world-wide identifier the device reports (SCSI/NVMe), when it has one


class Partition(NamedTuple):
    name: str
    path: str
    major_minor: str
    size_bytes: int
    holders: tuple[str, ...] = ()


def number_text(dev: int) -> str:
    """A dev_t as sysfs and mountinfo spell it: "259:1"."""
    return f"{os.major(dev)}:{os.minor(dev)}"


def device_number(path: str) -> str | None:
    """major:minor of the block device node at path (symlinks followed), or None when path is
    not one: the one device-number lookup."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return number_text(st.st_rdev)


def volume_id_from_serial(serial: str) -> str | None:
    """`vol0123456789abcdef0` (Nitro NVMe serial) → `vol-0123456789abcdef0`; anything else → None."""
    m = SERIAL_VOLUME_RE.match((serial or "").strip())
    return f"vol-{m.group(1)}" if m else None


def parse_ebs_vendor_name(identify: bytes) -> str | None:
    """The device name requested in AttachVolume, from EBS NVMe Identify Controller data."""
    if not identify or len(identify) < EBS_VS_NAME_OFFSET + EBS_VS_NAME_LEN:
        return None
    raw = identify[EBS_VS_NAME_OFFSET:EBS_VS_NAME_OFFSET + EBS_VS_NAME_LEN]
    name = raw.split(b"\0", 1)[0].strip(b" \0\t")
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if text and DEVICE_NAME_RE.match(text) else None


def name_key(name: str) -> str:
    """Compare device names the way Xen renames them: /dev/sdf ≈ /dev/xvdf ≈ xvdf ≈ sdf."""
    base = name.strip()
    if base.startswith("/dev/"):
        base = base[len("/dev/"):]
    if base.startswith("xvd"):
        base = "sd" + base[3:]
    return base


def _dev_path(name: str) -> str:
    return name if name.startswith("/dev/") else f"/dev/{name}"


def read_nvme_identify_controller(path: str) -> bytes | None:
    """Identify Controller data through NVME_IOCTL_ADMIN_CMD (needs root); None on any failure."""
    # ctypes and struct only here: only an NVMe disk with the EBS model is ever identified.
    import ctypes
    import fcntl
    import struct

    buf = ctypes.create_string_buffer(IDENTIFY_SIZE)
    cmd = bytearray(struct.pack(NVME_ADMIN_CMD_FORMAT,
        NVME_ADMIN_IDENTIFY, 0, 0, 0, 0, 0, 0, ctypes.addressof(buf), 0, IDENTIFY_SIZE,
        NVME_ID_CNS_CTRL, 0, 0, 0, 0, 0, 0, 0))
    try:
        # O_RDONLY: an identify needs no write access, and we never want a writable fd by accident.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("identify %s: %s", path, exc)
        return None
    try:
        status = fcntl.ioctl(fd, NVME_IOCTL_ADMIN_CMD, cmd, True)
    except OSError as exc:
        log.debug("identify %s: %s", path, exc)
        return None
    finally:
        os.close(fd)
    if status != 0:  # a positive return is an NVMe status code: the command failed on the device
        log.debug("identify %s: NVMe status %#x", path, status)
        return None
    return buf.raw


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _flag(path: str) -> bool:
    return _read(path) == "1"


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path), key=_natural_key)
    except OSError:
        return []


def _by_id_links(dev_root: str) -> dict[str, tuple[str, ...]]:
    """Kernel name → /dev/disk/by-id links pointing at it; empty when udev is not running."""
    by_id_dir = os.path.join(dev_root, "disk", "by-id")
    links: dict[str, list[str]] = {}
    for entry in _listdir(by_id_dir):
        target = os.path.basename(os.path.realpath(os.path.join(by_id_dir, entry)))
        links.setdefault(target, []).append(os.path.join(by_id_dir, entry))
    return {k: tuple(v) for k, v in links.items()}


def _requested_name(name: str, model: str, path: str, read_identify) -> str | None:
    if name.startswith("xvd"):
        # Xen blkfront names the disk after the AttachVolume device (sdf arrives as xvdf).
        return _dev_path(name)
    if name.startswith("nvme") and model == EBS_MODEL:
        try:
            vendor_name = parse_ebs_vendor_name(read_identify(path) or b"")
        except Exception as exc:  # never fatal: the serial is the identity, this is only a hint
            log.debug("identify %s failed: %s", path, exc)
            return None
        return _dev_path(vendor_name) if vendor_name else None
    return None


def list_block_devices(
    sysfs_root: str = "/sys",
    dev_root: str = "/dev",
    read_identify: Callable[[str], bytes | None] | None = None,
) -> list[BlockDevice]:
    """Every whole disk in <sysfs>/block except ram/zram and unused loop devices."""
    read_identify = read_identify or read_nvme_identify_controller
    block_dir = os.path.join(sysfs_root, "block")
    if not os.path.isdir(block_dir):
        raise OperationError("sysfs has no block directory", where=block_dir,
                             hint="is /sys mounted? (mount -t sysfs sysfs /sys)")
    by_id = _by_id_links(dev_root)
    devices = []
    for name in _listdir(block_dir):
        if name.startswith(SKIP_PREFIXES):
            continue
        base = os.path.join(block_dir, name)
        backing = _read(os.path.join(base, "loop", "backing_file"))
        if name.startswith("loop") and not backing:
            continue  # an unattached loop device: nothing there
        major_minor = _read(os.path.join(base, "dev")) or ""
        size = _read(os.path.join(base, "size"))
        serial = _read(os.path.join(base, "device", "serial"))
        if serial is None:
            serial = _read(os.path.join(base, "serial"))  # virtio-blk keeps it on the disk itself
        serial = (serial or "").strip()
        model = _read(os.path.join(base, "device", "model")) or ""
        path = os.path.join(dev_root, name)
        devices.append(BlockDevice(
            name=name,
            path=path,
            major_minor=major_minor,
            size_bytes=int(size) * SECTOR_BYTES if size and size.isdigit() else 0,
            serial=serial,
            model=model,
            volume_id=volume_id_from_serial(serial),
            requested_name=_requested_name(name, model, path, read_identify),
            partitions=tuple(p for p in _listdir(base)
                             if os.path.isfile(os.path.join(base, p, "partition"))),
            holders=tuple(_listdir(os.path.join(base, "holders"))),
            read_only=_flag(os.path.join(base, "ro")),
            removable=_flag(os.path.join(base, "removable")),
            backing_file=backing or None,
            vendor=_read(os.path.join(base, "device", "vendor")) or "",
            by_id=by_id.get(name, ()),
            wwid=(_read(os.path.join(base, "wwid")) or _read(os.path.join(base, "device", "wwid"))
                  or ""),
        ))
    return devices


def list_partitions(device: BlockDevice, sysfs_root: str = "/sys",
                    dev_root: str = "/dev") -> list[Partition]:
    parts = []
    for pname in device.partitions:
        base = os.path.join(sysfs_root, "block", device.name, pname)
        size = _read(os.path.join(base, "size"))
        parts.append(Partition(
            name=pname,
            path=os.path.join(dev_root, pname),
            major_minor=_read(os.path.join(base, "dev")) or "",
            size_bytes=int(size) * SECTOR_BYTES if size and size.isdigit() else 0,
            holders=tuple(_listdir(os.path.join(base, "holders"))),
        ))
    return parts


def device_path_of(major_minor: str, sysfs_root: str = "/sys") -> str | None:
    """/dev path of a block device number, via /sys/dev/block (no udev needed)."""
    try:
        target = os.readlink(os.path.join(sysfs_root, "dev", "block", major_minor))
    except OSError:
        return None
    return os.path.join("/dev", os.path.basename(target))


def size_of(major_minor: str, sysfs_root: str = "/sys") -> int | None:
    """The size in bytes the kernel shows now for a block device (sysfs `size`), or None."""
    size = _read(os.path.join(sysfs_root, "dev", "block", major_minor, "size"))
    return int(size) * SECTOR_BYTES if size and size.isdigit() else None


def rescan_size(major_minor: str, sysfs_root: str = "/sys") -> list[str]:
    """Ask the bus to re-read the device's size; returns the sysfs files written.

    NVMe: `rescan_controller` of the namespace's controller (with native multipath, of each
    controller of its subsystem) re-reads namespace sizes. Nitro reports a resized EBS volume by
    an asynchronous event the kernel handles itself; this is for kernels that miss it. SCSI:
    `device/rescan`. Xen blkfront picks up a new size from xenstore by itself, and a loop device
    only after `losetup -c` by whoever grew its backing file: nothing to ask for those.
    """
    base = os.path.join(sysfs_root, "dev", "block", major_minor)
    name = os.path.basename(os.path.realpath(base))
    device = os.path.join(base, "device")
    if name.startswith("nvme"):
        targets = [os.path.join(device, "rescan_controller")]
        targets += [os.path.join(device, c, "rescan_controller") for c in _listdir(device)
                    if re.fullmatch(r"nvme\d+", c)]
    elif name.startswith("sd"):
        targets = [os.path.join(device, "rescan")]
    else:
        return []
    written = []
    for target in targets:
        if not os.path.exists(target):
            continue
        try:
            with open(target, "w", encoding="ascii") as f:
                f.write("1")
            written.append(target)
        except OSError as exc:
            log.debug("rescan %s: %s", target, exc)
    return written


def durable_identity(device: BlockDevice, proven_volume_id: str | None = None) -> str | None:
    """What makes this disk *this* disk across a crash, never its kernel name (a different disk
    can show up as loop3 or xvdf next time). The disk's own identity first: the EBS volume id
    of its NVMe serial, a loop device's backing file (inode and its generation: a deleted file's
    inode number is reused at once), a WWN or serial; only a disk with none of these (Xen) is
    identified by proven_volume_id, the attachment EC2 reports here. None when nothing at all
    identifies it (a virtio disk without serial)."""
    if device.volume_id:
        return f"ebs:{device.volume_id}"
    if device.backing_file:
        try:
            st = os.stat(device.backing_file)
        except OSError:
            return None  # deleted or unreachable: nothing durable left to compare
        generation = _inode_generation(device.backing_file)
        gen = f":gen={generation}" if generation is not None else ""
        return f"loop:{device.backing_file}:dev={st.st_dev}:ino={st.st_ino}{gen}"
    if device.wwid:
        return f"wwid:{device.wwid}"
    if device.serial:
        return f"serial:{device.model.strip()}:{device.serial}"
    if proven_volume_id:
        return f"ebs:{proven_volume_id}"
    return None


FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long): the inode's generation number


def _inode_generation(path: str) -> int | None:
    """ext4/xfs/btrfs give every new inode a fresh generation; None where the ioctl is missing."""
    import array
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        buf = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETVERSION, buf, True)
        return buf[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def loops_backed_by(devs: set[str], sys_block: str = "/sys/block") -> list[str]:
    """Loop devices whose backing file is one of these block devices (what `losetup -j` shows):
    the loop driver holds no exclusive claim, so neither holders nor O_EXCL reveal them."""
    found = []
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return found
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(os.path.join(sys_block, name, "loop", "backing_file"), encoding="utf-8",
                      errors="replace") as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue
        if backing.endswith(" (deleted)"):
            continue
        if device_number(backing) in devs:
            found.append(f"/dev/{name}")
    return found


def describe_devices(devices: Iterable[BlockDevice]) -> str:
    seen = []
    for d in devices:
        tags = [t for t in (d.volume_id, d.requested_name) if t]
        seen.append(f"{d.name}[{','.join(tags)}]" if tags else d.name)
    return ", ".join(seen) or "none"


def _refuse_other_volume(device: BlockDevice, volume_id: str) -> RefusedError:
    return RefusedError(
        f"device {device.path} is volume {device.volume_id}, not {volume_id}; refusing to use it",
        hint="device names are only hints; the NVMe serial says which volume a disk is",
        reason=Reason.WRONG_DEVICE)


def find_volume_device(
    devices: Sequence[BlockDevice],
    *,
    volume_id: str | None = None,
    requested_name: str | None = None,
) -> BlockDevice:
    """The disk that is the volume: by NVMe serial, else by requested name if it names no volume."""
    if not volume_id and not requested_name:
        raise UsageError("no volume id or device name to look for")
    if volume_id:
        by_serial = [d for d in devices if d.volume_id == volume_id]
        if len(by_serial) > 1:
            raise RefusedError(
                f"{len(by_serial)} devices claim volume {volume_id} "
                f"({', '.join(d.path for d in by_serial)}); refusing to guess")
        if by_serial:
            return by_serial[0]
    if requested_name:
        key = name_key(requested_name)
        by_name = [d for d in devices if d.requested_name and name_key(d.requested_name) == key]
        if volume_id:
            for d in by_name:
                if d.volume_id and d.volume_id != volume_id:
                    raise _refuse_other_volume(d, volume_id)
        if len(by_name) > 1:
            raise RefusedError(
                f"{len(by_name)} devices answer to {requested_name} "
                f"({', '.join(d.path for d in by_name)}); refusing to guess")
        if by_name:
            return by_name[0]
    wanted = " or ".join(x for x in (volume_id, requested_name) if x)
    raise OperationError(
        f"no block device for {wanted} yet", where=f"seen: {describe_devices(devices)}",
        hint="after AttachVolume the disk can take a few seconds to appear; hostagent waits and retries",
        reason=Reason.DEVICE_MISSING)


def _kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a device"


def resolve_explicit_device(
    path: str,
    devices: Sequence[BlockDevice],
    *,
    volume_id: str | None = None,
    sysfs_root: str = "/sys",
) -> BlockDevice:
    """Map config volume.device (any path, symlinks too) to a whole disk, by major:minor."""
    try:
        st = os.stat(path)  # follows /dev/disk/by-id/... symlinks to the node itself
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError("no such device", where=path) from None
    except OSError as exc:
        raise UsageError(f"cannot stat device: {exc.strerror}", where=path) from None
    if not stat.S_ISBLK(st.st_mode):
        raise UsageError(f"not a block device: it is {_kind_of(st.st_mode)}", where=path,
                         hint="volume.device must be a whole disk such as /dev/nvme1n1 or /dev/loop3")
    major_minor = number_text(st.st_rdev)
    for device in devices:
        if device.major_minor == major_minor:
            if volume_id and device.volume_id and device.volume_id != volume_id:
                raise _refuse_other_volume(device, volume_id)
            return device

    sys_dir = os.path.realpath(os.path.join(sysfs_root, "dev", "block", major_minor))
    kernel_name = os.path.basename(sys_dir) if os.path.isdir(sys_dir) else None
    parent = None
    if kernel_name and os.path.isfile(os.path.join(sys_dir, "partition")):
        parent = os.path.basename(os.path.dirname(sys_dir))
    else:
        # No sysfs dev/block link (or a stripped-down tree): fall back to the node's own name.
        node_name = os.path.basename(os.path.realpath(path))
        for device in devices:
            if node_name in device.partitions:
                kernel_name, parent = node_name, device.name
    if parent:
        parent_dev = next((d for d in devices if d.name == parent), None)
        parent_path = parent_dev.path if parent_dev else f"/dev/{parent}"
        raise UsageError(f"{path} is a partition ({kernel_name}) of {parent_path}; give the whole disk",
                         where=path, hint=f'set volume.device = "{parent_path}"')
    what = kernel_name or major_minor
    raise UsageError(f"block device {what} is not a disk hostagent can use "
                     f"(an unattached loop device, ram or zram)", where=path)
