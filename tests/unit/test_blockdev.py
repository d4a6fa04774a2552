"""Block-device detection over fake sysfs trees, EBS identity from serials and identify data, and matching.

The sysfs trees here are hand-written files in tmp_path (no EC2 Nitro/Xen hardware exists on a
test host); the layout mirrors what the kernel exposes (/sys/block/<disk>/{dev,size,ro,removable,
device/serial,device/model,holders/,<part>/partition,loop/backing_file}). The identify data is a
4096-byte buffer built the way EBS fills NVMe Identify Controller. Real loop devices, real sysfs
and the real CLI are exercised in tests/integration/test_devices_loop.py.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostagent.adapters.blockdev import (
    EBS_MODEL,
    BlockDevice,
    find_volume_device,
    list_block_devices,
    name_key,
    parse_ebs_vendor_name,
    resolve_explicit_device,
    volume_id_from_serial,
)
from hostagent.errors import OperationError, RefusedError, UsageError
from hostagent.runner import Completed
from tests.support.hosttools import need_root

VOL_DATA = "vol-0123456789abcdef0"
VOL_ROOT = "vol-0fedcba9876543210"
VOL_OTHER = "vol-0bbbbbbbbbbbbbbbb"


def identify_with_name(name: bytes, pad: bytes = b"\0") -> bytes:
    """A 4096-byte Identify Controller buffer: EBS vid/model, the vendor name at offset 3072."""
    buf = bytearray(4096)
    buf[0:2] = (0x1D0F).to_bytes(2, "little")
    buf[4:24] = b"vol0123456789abcdef0".ljust(20)
    buf[24:64] = EBS_MODEL.encode().ljust(40)
    buf[3072:3104] = name.ljust(32, pad)[:32]
    buf[3104:3120] = b"\xaa" * 16  # reserved bytes after the name must not leak into it
    return bytes(buf)


def make_disk(sysfs: Path, name: str, dev: str, sectors: int, *, serial: str | None = None,
              model: str | None = None, vendor: str | None = None,
              partitions: dict[str, str] | None = None, holders=(), part_holders=None,
              ro: int = 0, removable: int = 0, backing: str | None = None,
              loop_dir: bool = False) -> Path:
    base = sysfs / "block" / name
    base.mkdir(parents=True)
    (base / "dev").write_text(dev + "\n")
    (base / "size").write_text(f"{sectors}\n")
    (base / "ro").write_text(f"{ro}\n")
    (base / "removable").write_text(f"{removable}\n")
    (base / "holders").mkdir()
    for h in holders:
        (base / "holders" / h).mkdir()
    if serial is not None or model is not None or vendor is not None:
        (base / "device").mkdir()
        if serial is not None:
            (base / "device" / "serial").write_text(serial + "\n")
        if model is not None:
            (base / "device" / "model").write_text(model + "\n")
        if vendor is not None:
            (base / "device" / "vendor").write_text(vendor + "\n")
    for pname, pdev in (partitions or {}).items():
        pdir = base / pname
        pdir.mkdir()
        (pdir / "partition").write_text(pname[-1] + "\n")
        (pdir / "dev").write_text(pdev + "\n")
        (pdir / "size").write_text("2048\n")
        (pdir / "holders").mkdir()
        for h in (part_holders or {}).get(pname, ()):
            (pdir / "holders" / h).mkdir()
        # /sys/dev/block/M:m links to every block device, partitions included.
        link = sysfs / "dev" / "block" / pdev
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(pdir)
    if backing is not None or loop_dir:
        (base / "loop").mkdir()
        if backing is not None:
            (base / "loop" / "backing_file").write_text(backing + "\n")
    link = sysfs / "dev" / "block" / dev
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(base)
    # Something that is not a partition must not be taken for one.
    (base / "queue").mkdir()
    return base


@pytest.fixture
def nitro(tmp_path):
    sysfs = tmp_path / "sys"
    make_disk(sysfs, "nvme0n1", "259:0", 16777216, serial="vol0fedcba9876543210", model=EBS_MODEL,
              partitions={"nvme0n1p1": "259:1", "nvme0n1p128": "259:2"})
    # EBS pads serial and model with spaces, as the NVMe spec's fixed-width ASCII fields do.
    make_disk(sysfs, "nvme1n1", "259:3", 209715200, serial="vol0123456789abcdef0    ",
              model=EBS_MODEL + "          ")
    names = {"nvme0n1": b"/dev/xvda", "nvme1n1": b"sdf"}
    calls = []

    def read_identify(path):
        calls.append(path)
        return identify_with_name(names[os.path.basename(path)])

    devs = list_block_devices(str(sysfs), str(tmp_path / "dev"), read_identify=read_identify)
    return devs, calls, tmp_path


def by_name(devices, name) -> BlockDevice:
    return next(d for d in devices if d.name == name)


def test_nitro_root_and_data_volume_identity(nitro):
    devs, calls, tmp = nitro
    assert [d.name for d in devs] == ["nvme0n1", "nvme1n1"]
    root, data = by_name(devs, "nvme0n1"), by_name(devs, "nvme1n1")
    assert data.path == str(tmp / "dev" / "nvme1n1")
    assert data.major_minor == "259:3"
    assert data.size_bytes == 100 * 1024**3
    assert data.serial == "vol0123456789abcdef0"
    assert data.model == EBS_MODEL
    assert data.volume_id == VOL_DATA
    assert data.requested_name == "/dev/sdf"
    assert root.volume_id == VOL_ROOT
    assert root.requested_name == "/dev/xvda"
    assert root.partitions == ("nvme0n1p1", "nvme0n1p128")  # natural order, queue/ not a partition
    assert data.partitions == () and data.holders == ()
    assert sorted(os.path.basename(c) for c in calls) == ["nvme0n1", "nvme1n1"]
    assert find_volume_device(devs, volume_id=VOL_DATA, requested_name="/dev/xvdf") == data
    assert find_volume_device(devs, volume_id=VOL_ROOT) == root


def test_nitro_requested_name_from_vendor_area_matches_config_name(nitro):
    devs, _, _ = nitro
    # The volume attached as /dev/sdf answers to the config's /dev/xvdf and to sdf/xvdf too.
    for wanted in ("/dev/sdf", "/dev/xvdf", "xvdf", "sdf"):
        assert find_volume_device(devs, requested_name=wanted).name == "nvme1n1"


def test_identify_only_for_ebs_and_failures_are_not_fatal(tmp_path):
    sysfs = tmp_path / "sys"
    make_disk(sysfs, "nvme0n1", "259:0", 2048, serial="vol0123456789abcdef0", model=EBS_MODEL)
    make_disk(sysfs, "nvme2n1", "259:5", 2048, serial="AWS1234567890ABCDEF",
              model="Amazon EC2 NVMe Instance Storage")
    calls = []

    def broken(path):
        calls.append(os.path.basename(path))
        raise PermissionError(13, "Permission denied")

    devs = list_block_devices(str(sysfs), str(tmp_path / "dev"), read_identify=broken)
    assert calls == ["nvme0n1"]  # never an ioctl on a disk that is not EBS
    assert [(d.name, d.volume_id, d.requested_name) for d in devs] == [
        ("nvme0n1", VOL_DATA, None), ("nvme2n1", None, None)]

    devs = list_block_devices(str(sysfs), str(tmp_path / "dev"), read_identify=lambda p: None)
    assert by_name(devs, "nvme0n1").requested_name is None


def test_xen_names_are_the_requested_names(tmp_path):
    sysfs = tmp_path / "sys"
    make_disk(sysfs, "xvda", "202:0", 16777216, partitions={"xvda1": "202:1"})
    make_disk(sysfs, "xvdf", "202:80", 2097152)
    devs = list_block_devices(str(sysfs), str(tmp_path / "dev"), read_identify=pytest.fail)
    xvdf = by_name(devs, "xvdf")
    assert xvdf.serial == "" and xvdf.volume_id is None
    assert xvdf.requested_name == "/dev/xvdf"
    assert by_name(devs, "xvda").partitions == ("xvda1",)
    # Xen has no serial: the requested name is the only link, and it is accepted.
    for wanted in ("/dev/sdf", "/dev/xvdf", "xvdf"):
        assert find_volume_device(devs, volume_id=VOL_DATA, requested_name=wanted) == xvdf
    with pytest.raises(OperationError):
        find_volume_device(devs, volume_id=VOL_DATA, requested_name="/dev/sdg")


def test_partitions_holders_flags_and_skipped_devices(tmp_path):
    sysfs = tmp_path / "sys"
    make_disk(sysfs, "sdb", "8:16", 4194304, model="QEMU HARDDISK", vendor="ATA",
              partitions={"sdb1": "8:17", "sdb2": "8:18"}, part_holders={"sdb2": ["md0"]})
    make_disk(sysfs, "sdc", "8:32", 4194304, holders=["dm-0", "dm-1"], ro=1, removable=1)
    make_disk(sysfs, "ram0", "1:0", 8192)
    make_disk(sysfs, "zram0", "253:0", 8192)
    make_disk(sysfs, "loop0", "7:0", 0, loop_dir=True)  # attached never: no backing_file
    make_disk(sysfs, "loop7", "7:7", 0)  # no loop/ dir at all
    make_disk(sysfs, "loop1", "7:1", 131072, backing="/var/tmp/disk image.img")
    devs = list_block_devices(str(sysfs), str(tmp_path / "dev"), read_identify=pytest.fail)
    assert [d.name for d in devs] == ["loop1", "sdb", "sdc"]
    sdb, sdc, loop1 = by_name(devs, "sdb"), by_name(devs, "sdc"), by_name(devs, "loop1")
    assert sdb.partitions == ("sdb1", "sdb2")
    assert sdb.model == "QEMU HARDDISK" and sdb.vendor == "ATA"
    assert sdb.requested_name is None  # an sd* name on a non-Xen host is not a request
    assert sdc.holders == ("dm-0", "dm-1")
    assert sdc.read_only and sdc.removable and not sdb.read_only and not sdb.removable
    assert loop1.backing_file == "/var/tmp/disk image.img"
    assert loop1.size_bytes == 64 * 1024**2
    assert sdb.backing_file is None


def test_no_sysfs_is_an_operation_error(tmp_path):
    with pytest.raises(OperationError) as exc:
        list_block_devices(str(tmp_path / "nosys"), str(tmp_path / "dev"))
    assert "block" in str(exc.value)


def dev(name, *, serial="", requested=None, mm="259:9") -> BlockDevice:
    return BlockDevice(name=name, path=f"/dev/{name}", major_minor=mm, size_bytes=1 << 30,
                       serial=serial, model=EBS_MODEL if serial else "",
                       volume_id=volume_id_from_serial(serial), requested_name=requested,
                       partitions=(), holders=(), read_only=False, removable=False,
                       backing_file=None)


def test_requested_name_pointing_at_another_volume_is_refused():
    devs = [dev("nvme0n1", serial="vol0fedcba9876543210", requested="/dev/xvda"),
            dev("nvme1n1", serial="vol0bbbbbbbbbbbbbbbb", requested="/dev/sdf")]
    with pytest.raises(RefusedError) as exc:
        find_volume_device(devs, volume_id=VOL_DATA, requested_name="/dev/xvdf")
    assert str(exc.value) == (f"device /dev/nvme1n1 is volume {VOL_OTHER}, not {VOL_DATA}; "
                              f"refusing to use it")
    assert exc.value.exit_code == 3


def test_two_devices_claiming_one_volume_are_refused():
    devs = [dev("nvme1n1", serial="vol0123456789abcdef0"),
            dev("nvme2n1", serial="vol-0123456789abcdef0")]
    with pytest.raises(RefusedError) as exc:
        find_volume_device(devs, volume_id=VOL_DATA)
    assert "/dev/nvme1n1" in str(exc.value) and "/dev/nvme2n1" in str(exc.value)
    assert exc.value.exit_code == 3


def test_serial_wins_over_names():
    devs = [dev("nvme1n1", serial="vol0bbbbbbbbbbbbbbbb", requested="/dev/sdg"),
            dev("nvme2n1", serial="vol0123456789abcdef0", requested="/dev/sdh")]
    # The config's name points nowhere useful, yet the serial identifies the volume.
    assert find_volume_device(devs, volume_id=VOL_DATA, requested_name="/dev/sdg").name == "nvme2n1"


def test_requested_name_fallback_only_without_a_volume_serial():
    unnamed = dev("xvdf", requested="/dev/xvdf")
    assert find_volume_device([unnamed], volume_id=VOL_DATA, requested_name="/dev/sdf") == unnamed
    other = dev("nvme1n1", serial="vol0bbbbbbbbbbbbbbbb", requested="/dev/sdf")
    with pytest.raises(RefusedError):
        find_volume_device([other], volume_id=VOL_DATA, requested_name="/dev/sdf")
    # Without a volume id there is nothing to contradict: the name alone picks the disk.
    assert find_volume_device([other], requested_name="/dev/xvdf") == other
    twins = [dev("xvdf", requested="/dev/xvdf"), dev("sdf", requested="/dev/sdf")]
    with pytest.raises(RefusedError):
        find_volume_device(twins, volume_id=VOL_DATA, requested_name="/dev/sdf")


def test_nothing_found_is_an_operation_error_listing_what_was_seen():
    devs = [dev("nvme0n1", serial="vol0fedcba9876543210", requested="/dev/xvda"), dev("loop3")]
    with pytest.raises(OperationError) as exc:
        find_volume_device(devs, volume_id=VOL_DATA, requested_name="/dev/xvdf")
    assert not isinstance(exc.value, RefusedError)
    assert exc.value.exit_code == 1
    msg = str(exc.value)
    assert VOL_DATA in msg and "/dev/xvdf" in msg
    assert f"nvme0n1[{VOL_ROOT},/dev/xvda]" in msg and "loop3" in msg
    with pytest.raises(UsageError):
        find_volume_device(devs)


@pytest.mark.parametrize("serial, expected", [
    ("vol0123456789abcdef0", "vol-0123456789abcdef0"),
    ("vol-0123456789abcdef0", "vol-0123456789abcdef0"),
    ("  vol0123456789abcdef0  \n", "vol-0123456789abcdef0"),
    ("vol01234567", "vol-01234567"),  # the old 8-hex ids
    ("vol-89abcdef", "vol-89abcdef"),
    ("vol0123456", None),  # 7 hex
    ("vol0123456789abcdef", None),  # 16 hex
    ("vol0123456789abcdef01", None),  # 18 hex
    ("vol0123456789ABCDEF0", None),  # EBS ids are lower case
    ("vol", None),
    ("", None),
    ("AWS22A1B3C4D5E6F7A8B", None),  # instance store
    ("overlayblk", None),
    ("S3EVNX0M123456", None),
])
def test_volume_id_from_serial(serial, expected):
    assert volume_id_from_serial(serial) == expected


@pytest.mark.parametrize("name, pad, expected", [
    (b"sdf", b"\0", "sdf"),
    (b"/dev/xvdf", b" ", "/dev/xvdf"),
    (b"sdf   \0\0\0", b"\0", "sdf"),
    (b"/dev/sdf", b" ", "/dev/sdf"),
    (b"", b"\0", None),
    (b"", b" ", None),
    (b"\xff\xfe\x01", b"\0", None),
    (b"sd f", b" ", None),
])
def test_parse_ebs_vendor_name(name, pad, expected):
    assert parse_ebs_vendor_name(identify_with_name(name, pad)) == expected


def test_parse_ebs_vendor_name_needs_the_whole_structure():
    assert parse_ebs_vendor_name(b"") is None
    assert parse_ebs_vendor_name(identify_with_name(b"sdf")[:3080]) is None
    # The name is exactly 32 bytes: what follows (reserved) is not part of it.
    assert parse_ebs_vendor_name(identify_with_name(b"x" * 32)) == "x" * 32


def test_name_key():
    assert name_key("/dev/xvdf") == name_key("/dev/sdf") == name_key("xvdf") == name_key("sdf")
    assert name_key("/dev/sdf") != name_key("/dev/sdg")
    assert name_key("/dev/nvme1n1") == "nvme1n1"


@pytest.fixture
def nodes(nitro):
    """Real device nodes (os.mknod, root only) that point at the fake sysfs disks' major:minor."""
    need_root()
    devs, _, tmp = nitro
    d = tmp / "nodes"
    d.mkdir()
    os.mknod(d / "nvme1n1", 0o600 | stat.S_IFBLK, os.makedev(259, 3))
    os.mknod(d / "nvme0n1p1", 0o600 | stat.S_IFBLK, os.makedev(259, 1))
    os.mknod(d / "loop5", 0o600 | stat.S_IFBLK, os.makedev(7, 5))
    os.mknod(d / "tty9", 0o600 | stat.S_IFCHR, os.makedev(4, 9))
    (d / "by-id").mkdir()
    (d / "by-id" / "nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0").symlink_to(
        d / "nvme1n1")
    (d / "file.img").write_bytes(b"\0" * 4096)
    return devs, d, str(tmp / "sys")


def test_resolve_explicit_device_by_major_minor_and_symlink(nodes):
    devs, d, sysfs = nodes
    assert resolve_explicit_device(str(d / "nvme1n1"), devs, sysfs_root=sysfs).name == "nvme1n1"
    link = d / "by-id" / "nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0"
    assert resolve_explicit_device(str(link), devs, volume_id=VOL_DATA,
                                   sysfs_root=sysfs).name == "nvme1n1"


def test_resolve_explicit_device_refuses_another_volume(nodes):
    devs, d, sysfs = nodes
    with pytest.raises(RefusedError) as exc:
        resolve_explicit_device(str(d / "nvme1n1"), devs, volume_id=VOL_OTHER, sysfs_root=sysfs)
    assert f"is volume {VOL_DATA}, not {VOL_OTHER}" in str(exc.value)


@pytest.mark.parametrize("node, words", [
    ("file.img", "not a block device: it is a regular file"),
    (".", "not a block device: it is a directory"),
    ("tty9", "not a block device: it is a character device"),
    ("missing", "no such device"),
    ("file.img/sub", "no such device"),
    ("nvme0n1p1", "is a partition (nvme0n1p1) of"),
    ("loop5", "not a disk hostagent can use"),
])
def test_resolve_explicit_device_usage_errors(nodes, node, words):
    devs, d, sysfs = nodes
    path = str(d / node)
    with pytest.raises(UsageError) as exc:
        resolve_explicit_device(path, devs, sysfs_root=sysfs)
    assert words in str(exc.value)
    assert str(exc.value).endswith(f"({path})")
    assert exc.value.exit_code == 2


def test_resolve_partition_without_sysfs_link_uses_the_node_name(nodes):
    devs, d, _ = nodes
    with pytest.raises(UsageError) as exc:
        resolve_explicit_device(str(d / "nvme0n1p1"), devs, sysfs_root=str(d / "no-sysfs"))
    assert "give the whole disk" in str(exc.value)
    assert exc.value.hint.endswith('nvme0n1"')


@dataclass
class FakeCtx:
    """Stands in for cli.Context: `config` is a property that may raise, like the real one."""

    cfg: object = None
    error: Exception | None = None
    json: bool = True
    verbose: int = 0

    @property
    def config(self):
        if self.error:
            raise self.error
        return self.cfg


def fake_blkid(argv, **kw):
    """A hand-written blkid (no real disks behind a fake sysfs): only nvme1n1 holds ext4."""
    if argv[-1].endswith("nvme1n1"):
        return Completed(tuple(argv), 0, "DEVNAME=x\nUUID=1111-2222\nTYPE=ext4\nLABEL=couchdb\n", "")
    return Completed(tuple(argv), 2, "", "")


def test_devices_flow_marks_the_configured_volume_by_serial(nitro):
    from hostagent.config import parse_config
    from hostagent.errors import ConfigError
    from hostagent.flows.devices import collect, render

    _, _, tmp = nitro
    mountinfo = tmp / "mountinfo"
    mountinfo.write_text(
        "29 1 259:1 / / rw,relatime shared:1 - xfs /dev/nvme0n1p1 rw\n"
        "40 29 259:3 / /opt/couchdb rw,noatime shared:2 - ext4 /dev/nvme1n1 rw\n")
    cfg = parse_config({"volume": {"id": VOL_DATA, "device_name": "/dev/xvdf"}})
    items, configured = collect(FakeCtx(cfg=cfg), sysfs_root=str(tmp / "sys"),
                                dev_root=str(tmp / "dev"), mountinfo=str(mountinfo),
                                run=fake_blkid)
    data = next(i for i in items if i["name"] == "nvme1n1")
    # The sysfs fixture has no identify reader here: the real ioctl fails on a fake path → None.
    assert data["configured"] and data["volume_id"] == VOL_DATA
    assert data["fstype"] == "ext4" and data["uuid"] == "1111-2222"
    assert data["mount_points"] == ["/opt/couchdb"]
    root = next(i for i in items if i["name"] == "nvme0n1")
    assert not root["configured"]
    assert [p["mount_points"] for p in root["partitions"]] == [["/"], []]
    assert configured["device"].endswith("nvme1n1") and "NVMe serial" in configured["note"]
    text = render(items, configured)
    assert "nvme1n1 *" in text and "`-nvme0n1p128" in text and "100G" in text
    json.dumps({"ok": True, "devices": items})

    items, configured = collect(FakeCtx(error=ConfigError("config file not found", where="/x")),
                                sysfs_root=str(tmp / "sys"), dev_root=str(tmp / "dev"),
                                mountinfo=str(mountinfo), run=fake_blkid)
    assert not any(i["configured"] for i in items)
    assert configured["device"] is None and "config file not found (/x)" in configured["note"]


def test_admin_command_layout_matches_linux_nvme_ioctl_h():
    """Offsets measured with gcc on linux/nvme_ioctl.h: sizeof 72, addr 24, data_len 36, cdw10 40."""
    import struct

    from hostagent.adapters.blockdev import (NVME_ADMIN_CMD_FORMAT, NVME_ADMIN_CMD_SIZE,
                                             NVME_IOCTL_ADMIN_CMD)

    packed = struct.pack(NVME_ADMIN_CMD_FORMAT, 6, 0, 0, 0, 0, 0, 0, 0x1122334455667788, 0, 4096,
                         1, 0, 0, 0, 0, 0, 0, 0)
    assert len(packed) == 72 == NVME_ADMIN_CMD_SIZE
    assert packed[0] == 0x06
    assert packed[24:32] == (0x1122334455667788).to_bytes(8, "little")
    assert packed[36:40] == (4096).to_bytes(4, "little")
    assert packed[40:44] == (1).to_bytes(4, "little")  # CNS=1: Identify Controller
    assert NVME_IOCTL_ADMIN_CMD == 0xC0484E41


def fake_disk(sysfs: Path, name: str, dev: str, sectors: int, device_files=(), subdirs=()) -> Path:
    """/sys/devices/…/block/<name> with its `device` directory, and /sys/dev/block/<dev> -> it."""
    base = sysfs / "devices" / "pci" / "block" / name
    (base / "device").mkdir(parents=True)
    (base / "size").write_text(f"{sectors}\n")
    for f in device_files:
        (base / "device" / f).write_text("")
    for d in subdirs:
        (base / "device" / d).mkdir()
        (base / "device" / d / "rescan_controller").write_text("")
    (sysfs / "dev" / "block").mkdir(parents=True, exist_ok=True)
    (sysfs / "dev" / "block" / dev).symlink_to(base)
    return base


def test_size_of_reads_the_size_the_kernel_shows_now(tmp_path):
    from hostagent.adapters.blockdev import device_path_of, size_of

    fake_disk(tmp_path, "nvme1n1", "259:1", 2 * 16 * 1024 * 1024)
    assert size_of("259:1", sysfs_root=str(tmp_path)) == 16 << 30
    assert size_of("259:9", sysfs_root=str(tmp_path)) is None
    assert device_path_of("259:1", sysfs_root=str(tmp_path)) == "/dev/nvme1n1"


@pytest.mark.parametrize("name, files, subdirs, written", [
    ("nvme1n1", ["rescan_controller"], [], ["rescan_controller"]),  # the namespace's controller
    ("nvme1n1", [], ["nvme1", "nvme4"], ["nvme1/rescan_controller", "nvme4/rescan_controller"]),
    ("sdf", ["rescan"], [], ["rescan"]),  # SCSI
    ("xvdf", ["rescan"], [], []),  # Xen blkfront sees the new size by itself
    ("loop3", [], [], []),  # a loop device: only `losetup -c` by whoever grew its file
])
def test_rescan_size_asks_only_the_buses_that_need_asking(tmp_path, name, files, subdirs,
                                                          written):
    from hostagent.adapters.blockdev import rescan_size

    base = fake_disk(tmp_path, name, "259:1", 100, files, subdirs)
    done = rescan_size("259:1", sysfs_root=str(tmp_path))
    assert [os.path.relpath(p, tmp_path / "dev" / "block" / "259:1" / "device") for p in done] \
        == written
    for rel in written:
        assert (base / "device" / rel).read_text() == "1"
