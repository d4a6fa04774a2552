"""The blank decision as a table: Evidence → Decision, with blkid/wipefs output captured from the
real tools (util-linux 2.38.1 on Debian 12) pasted in as literal strings."""

from __future__ import annotations

import os
import subprocess

import pytest

from hostagent import blank
from hostagent.adapters import disk, superblock
from hostagent.adapters.mkfs import mkfs_argv
from hostagent.blank import Decision, Evidence, decide, is_proven_blank
from hostagent.errors import CommandError, EXIT_REFUSED, OperationError, RefusedError, UsageError
from hostagent.runner import Completed
from tests.support.hosttools import need_tool

GIB = 1 << 30
DEV = "/dev/nvme1n1"

BLANK = Evidence(
    device=DEV, size_bytes=100 * GIB, read_error=None,
    head_nonzero_offset=None, tail_nonzero_offset=None,
    blkid_exit=2, blkid={}, blkid_error=None,
    wipefs_signatures=(), wipefs_error=None,
    partitions=(), holders=(), mounted_at=(), is_root_disk=False,
    serial_volume_id="vol0123456789abcdef0", expected_volume_id="vol-0123456789abcdef0",
    formatted_tag=None,
)


def with_(**changes) -> Evidence:
    return BLANK._replace(**changes)


# --- real tool output, captured on loop devices -------------------------------------------

BLKID_NOTHING = ""  # blkid -p -o export on a fresh sparse loop device: exit 2, no output at all

BLKID_XFS = """\
DEVNAME=/dev/loop0
UUID=0f515bce-2fba-401d-af78-7c7c13245e8c
BLOCK_SIZE=512
TYPE=xfs
USAGE=filesystem
"""
WIPEFS_XFS = """\
{
   "signatures": [
      {
         "type": "xfs",
         "offset": "0x0"
      }
   ]
}
"""
BLKID_SWAP = """\
DEVNAME=/dev/loop0
UUID=69384be3-c084-48fd-a9ea-232b3e88acbc
VERSION=1
TYPE=swap
USAGE=other
"""
BLKID_GPT = """\
DEVNAME=/dev/loop0
PTUUID=c35b2970-ad5f-4446-80f7-06ae778f34a4
PTTYPE=gpt
"""
WIPEFS_GPT = """\
{
   "signatures": [
      {
         "type": "gpt",
         "offset": "0x200"
      },{
         "type": "gpt",
         "offset": "0x3fffe00"
      },{
         "type": "PMBR",
         "offset": "0x1fe"
      }
   ]
}
"""
BLKID_DOS = """\
DEVNAME=/dev/loop0
PTUUID=e97b6c15
PTTYPE=dos
"""
BLKID_LUKS = """\
DEVNAME=/dev/loop0
VERSION=2
UUID=a0a7e9d9-f1f1-41af-a0b6-f3d13a50ce68
TYPE=crypto_LUKS
USAGE=crypto
"""
BLKID_LVM = """\
DEVNAME=/dev/loop0
UUID=hrpuTU-SR4w-CEIs-SadH-mISs-h6hD-HlDyhs
VERSION=LVM2\\ 001
TYPE=LVM2_member
USAGE=raid
"""
BLKID_BTRFS = """\
DEVNAME=/dev/loop0
UUID=c40e1b04-5bd3-45b8-aabe-c3369d15a9fc
UUID_SUB=33eb9a4d-b930-447a-890f-1bb90e3a3818
BLOCK_SIZE=4096
TYPE=btrfs
USAGE=filesystem
"""
BLKID_VFAT = """\
DEVNAME=/dev/loop0
SEC_TYPE=msdos
UUID=789B-6841
VERSION=FAT16
BLOCK_SIZE=512
TYPE=vfat
USAGE=filesystem
"""
BLKID_EXT3 = """\
DEVNAME=/dev/loop0
UUID=187ea345-27cf-42fe-a336-e8afd4e01cfd
SEC_TYPE=ext2
VERSION=1.0
BLOCK_SIZE=1024
TYPE=ext3
USAGE=filesystem
"""
BLKID_EXT4_LABEL = """\
DEVNAME=/dev/loop0
LABEL=couchdb
UUID=b032c618-40a3-4813-9511-197b47c79f70
VERSION=1.0
BLOCK_SIZE=1024
TYPE=ext4
USAGE=filesystem
"""
BLKID_EXT4_SPACED_LABEL = """\
DEVNAME=/dev/loop0
LABEL=my\\ data
UUID=3f65737e-e3eb-406c-ba78-f316dffb7019
VERSION=1.0
BLOCK_SIZE=1024
TYPE=ext4
USAGE=filesystem
"""
BLKID_EXT4_NO_LABEL = """\
DEVNAME=/dev/loop0
UUID=3f65737e-e3eb-406c-ba78-f316dffb7019
VERSION=1.0
BLOCK_SIZE=1024
TYPE=ext4
USAGE=filesystem
"""
WIPEFS_EXT4 = """\
{
   "signatures": [
      {
         "type": "ext4",
         "offset": "0x438"
      }
   ]
}
"""
WIPEFS_BLANK = """\
{
   "signatures": [

   ]
}
"""
# xfs at 0 plus an ext4 superblock copied to 1024: stdout empty, exit 8.
BLKID_AMBIVALENT_STDERR = ("blkid: /dev/loop0: ambivalent result (probably more filesystems on the "
                           "device, use wipefs(8) to see more details)\n")
BLKID_USAGE_STDERR = "blkid: unsupported output format bogus\n"  # exit 4


def test_blank_evidence_decides_format():
    decision = decide(BLANK)
    assert decision.action == "format"
    assert is_proven_blank(BLANK)
    assert "vol-0123456789abcdef0" in decision.reason


def test_blank_loop_device_without_volume_id_decides_format():
    assert decide(with_(serial_volume_id=None, expected_volume_id=None)).action == "format"


def test_serial_in_volume_id_spelling_still_matches():
    assert decide(with_(serial_volume_id="vol-0123456789ABCDEF0")).action == "format"


# Each row flips exactly one rule of the blank test; each alone must turn format into refuse.
ONE_RULE_EACH = [
    ("unreadable", dict(read_error="short read: 4096 of 1048576 bytes at offset 0"), "cannot be read"),
    ("size mismatch", dict(read_error="size is 1024 bytes, expected 107374182400"), "expected"),
    ("zero size", dict(size_bytes=0), "0 bytes"),
    ("data in head", dict(head_nonzero_offset=4096), "non-zero bytes at offset 4096"),
    ("data in tail", dict(tail_nonzero_offset=100 * GIB - 17), f"non-zero bytes at offset {100 * GIB - 17}"),
    ("blkid found xfs", dict(blkid_exit=0, blkid=blank.parse_blkid_export(BLKID_XFS)), "xfs filesystem"),
    ("blkid usage error", dict(blkid_exit=4, blkid_error=BLKID_USAGE_STDERR.strip()), "exit 4"),
    ("blkid ambivalent", dict(blkid_exit=8, blkid_error=BLKID_AMBIVALENT_STDERR.strip()), "ambivalent"),
    ("blkid timed out", dict(blkid_exit=None, blkid_error="timed out"), "timed out"),
    ("blkid missing", dict(blkid_exit=None, blkid_error="required program 'blkid' not found"), "not found"),
    ("blkid exit 2 with stderr", dict(blkid_error="blkid: /dev/x: I/O error"), "I/O error"),
    ("blkid exit 2 yet output", dict(blkid={"TYPE": "xfs"}), "xfs"),
    ("blkid exit 0 yet nothing", dict(blkid_exit=0, blkid={"DEVNAME": DEV}), "could not be proven blank"),
    ("wipefs signature", dict(wipefs_signatures=("zfs_member at 0x3f000",)), "zfs_member at 0x3f000"),
    ("wipefs failed", dict(wipefs_error="wipefs --no-act timed out"), "wipefs"),
    ("partition", dict(partitions=("nvme1n1p1",)), "partitions nvme1n1p1"),
    ("holder", dict(holders=("dm-0",)), "held by dm-0"),
    ("mounted", dict(mounted_at=("/mnt/data",)), "mounted at /mnt/data"),
    ("swap", dict(mounted_at=(blank.SWAP_MARK,)), "swap"),
    ("busy", dict(mounted_at=(blank.IN_USE_MARK,)), "exclusive open"),
    ("root disk", dict(is_root_disk=True), "root disk"),
    ("serial names another volume", dict(serial_volume_id="vol0fffffffffffffffff"), "vol0fffffffffffffffff"),
    ("serial unknown", dict(serial_volume_id=None), "cannot be proven to be vol-0123456789abcdef0"),
    ("formatted tag", dict(formatted_tag="2024-05-01T10:00:00Z"), "hostagent:formatted=2024-05-01"),
    ("formatted tag empty", dict(formatted_tag=""), "hostagent:formatted"),
]


@pytest.mark.parametrize("changes, expected", [(c, e) for _, c, e in ONE_RULE_EACH],
                         ids=[name for name, _, _ in ONE_RULE_EACH])
def test_each_rule_alone_refuses(changes, expected):
    evidence = with_(**changes)
    decision = decide(evidence)
    assert decision.action == "refuse"
    assert not is_proven_blank(evidence)
    assert expected in decision.reason
    assert decision.reason.startswith(f"{DEV} ") and decision.reason.endswith("; refusing to format it")
    assert "\n" not in decision.reason
    assert decision.hint


# Real blkid + wipefs output → decision; head offset as the real device had it.
CAPTURED = [
    ("xfs", BLKID_XFS, WIPEFS_XFS, 0, "refuse", "holds an xfs filesystem (UUID 0f515bce"),
    ("swap", BLKID_SWAP, "", 1024, "refuse", "holds swap space (UUID 69384be3"),
    ("gpt", BLKID_GPT, WIPEFS_GPT, 0x1be, "refuse", "holds a gpt partition table (UUID c35b2970"),
    ("dos", BLKID_DOS, "", 0x1b8, "refuse", "holds a dos partition table"),
    ("luks", BLKID_LUKS, "", 0, "refuse", "holds a crypto_LUKS encrypted container"),
    ("lvm", BLKID_LVM, "", 0x200, "refuse", "holds an LVM2_member signature (LVM/RAID member)"),
    ("btrfs", BLKID_BTRFS, "", 0x10000, "refuse", "holds a btrfs filesystem"),
    ("vfat", BLKID_VFAT, "", 0, "refuse", "holds a vfat filesystem (UUID 789B-6841)"),
    ("ext3", BLKID_EXT3, "", 0x400, "refuse", "holds an ext3 filesystem"),
    ("ext4", BLKID_EXT4_LABEL, WIPEFS_EXT4, 0x400, "reuse", "holds an ext4 filesystem"),
    ("ext4 no label", BLKID_EXT4_NO_LABEL, WIPEFS_EXT4, 0x400, "reuse", "holds an ext4 filesystem"),
]


@pytest.mark.parametrize("blkid_out, wipefs_out, head, action, expected",
                         [c[1:] for c in CAPTURED], ids=[c[0] for c in CAPTURED])
def test_captured_tool_output(blkid_out, wipefs_out, head, action, expected):
    evidence = with_(blkid_exit=0, blkid=blank.parse_blkid_export(blkid_out),
                     wipefs_signatures=blank.parse_wipefs_json(wipefs_out), head_nonzero_offset=head)
    decision = decide(evidence)
    assert decision.action == action
    assert expected in decision.reason
    # Known data is named by its signature, not by the bytes it happens to start with.
    assert "non-zero bytes" not in decision.reason


def test_captured_nothing_found_is_blank():
    evidence = with_(blkid_exit=2, blkid=blank.parse_blkid_export(BLKID_NOTHING),
                     wipefs_signatures=blank.parse_wipefs_json(WIPEFS_BLANK))
    assert decide(evidence).action == "format"


def test_wipefs_offsets_are_named_in_the_refusal():
    evidence = with_(blkid_exit=0, blkid=blank.parse_blkid_export(BLKID_GPT),
                     wipefs_signatures=blank.parse_wipefs_json(WIPEFS_GPT))
    reason = decide(evidence).reason
    assert "gpt at 0x200, gpt at 0x3fffe00, PMBR at 0x1fe" in reason


def test_ext4_reuse_carries_uuid_and_label():
    ev = with_(blkid_exit=0, blkid=blank.parse_blkid_export(BLKID_EXT4_LABEL),
               wipefs_signatures=blank.parse_wipefs_json(WIPEFS_EXT4), head_nonzero_offset=0x400)
    assert decide(ev) == Decision(
        "reuse",
        f"{DEV} holds an ext4 filesystem (UUID b032c618-40a3-4813-9511-197b47c79f70, LABEL couchdb);"
        " reusing it, never reformatting",
        "b032c618-40a3-4813-9511-197b47c79f70", "couchdb")


def test_ext4_without_label_is_reused_with_no_label():
    ev = with_(blkid_exit=0, blkid=blank.parse_blkid_export(BLKID_EXT4_NO_LABEL))
    decision = decide(ev)
    assert (decision.action, decision.fs_uuid, decision.fs_label) == (
        "reuse", "3f65737e-e3eb-406c-ba78-f316dffb7019", None)


def test_ext4_label_with_space_is_unescaped():
    decision = decide(with_(blkid_exit=0, blkid=blank.parse_blkid_export(BLKID_EXT4_SPACED_LABEL)))
    assert decision.fs_label == "my data"


EXT4 = dict(blkid_exit=0, blkid=blank.parse_blkid_export(BLKID_EXT4_LABEL),
            wipefs_signatures=("ext4 at 0x438",), head_nonzero_offset=0x400)


@pytest.mark.parametrize("changes", [
    dict(mounted_at=("/opt/couchdb",)),  # second bootstrap: already mounted where it belongs
    dict(formatted_tag="2024-05-01T10:00:00Z"),  # hostagent formatted it: exactly the reuse case
    dict(serial_volume_id=None),  # no serial (Xen) cannot make reusing unsafe
], ids=["mounted", "formatted-tag", "no-serial"])
def test_ext4_is_reused_where_a_blank_device_would_be_refused(changes):
    decision = decide(with_(**EXT4, **changes))
    assert decision.action == "reuse"
    assert decision.fs_uuid == "b032c618-40a3-4813-9511-197b47c79f70"


def test_mounted_ext4_reuse_says_where():
    assert "mounted at /opt/couchdb" in decide(with_(**EXT4, mounted_at=("/opt/couchdb",))).reason


@pytest.mark.parametrize("changes, expected", [
    (dict(is_root_disk=True), "root disk"),
    (dict(serial_volume_id="vol0fffffffffffffffff"), "vol0fffffffffffffffff"),
    (dict(partitions=("nvme1n1p1",)), "partitions"),
    (dict(holders=("dm-0",)), "dm-0"),
    (dict(read_error="read: Input/output error"), "Input/output error"),
    (dict(wipefs_signatures=("ext4 at 0x438", "gpt at 0x200")), "gpt at 0x200"),
    (dict(wipefs_error="wipefs timed out"), "wipefs"),
    (dict(blkid={**blank.parse_blkid_export(BLKID_EXT4_LABEL), "PTTYPE": "gpt"}), "gpt partition table"),
], ids=["root", "wrong-volume", "partitions", "holders", "unreadable", "extra-signature",
        "wipefs-failed", "pttype"])
def test_ext4_is_not_reused_when_it_is_not_clearly_ours_to_use(changes, expected):
    decision = decide(with_(**{**EXT4, **changes}))
    assert decision.action == "refuse"
    assert expected in decision.reason


def test_several_findings_are_all_named_on_one_line():
    decision = decide(with_(blkid_exit=0, blkid=blank.parse_blkid_export(BLKID_XFS),
                            mounted_at=("/srv",), partitions=("nvme1n1p1",)))
    assert decision.reason == (
        f"{DEV} has partitions nvme1n1p1; is mounted at /srv; holds an xfs filesystem "
        "(UUID 0f515bce-2fba-401d-af78-7c7c13245e8c); refusing to format it")


def test_refusal_error_is_exit_3_with_volume_and_hint():
    decision = decide(with_(blkid_exit=0, blkid=blank.parse_blkid_export(BLKID_XFS)))
    err = blank.refusal_error(decision, DEV, "vol-0123456789abcdef0")
    assert isinstance(err, RefusedError) and err.exit_code == EXIT_REFUSED
    assert str(err) == (f"{DEV} holds an xfs filesystem (UUID 0f515bce-2fba-401d-af78-7c7c13245e8c);"
                        " refusing to format it (volume vol-0123456789abcdef0)")
    assert "migrate" in err.hint and f"wipefs -a {DEV}" in err.hint and "never" in err.hint


@pytest.mark.parametrize("changes, hint_part", [
    (dict(is_root_disk=True), "disk the system runs from"),
    (dict(formatted_tag="x"), "remove the volume's hostagent:formatted tag"),
    (dict(head_nonzero_offset=4096), "hexdump -C -s 4096"),
    (dict(serial_volume_id="vol0fffffffffffffffff"), "hostagent devices"),
])
def test_hint_fits_the_first_finding(changes, hint_part):
    assert hint_part in blank.refusal_error(decide(with_(**changes)), DEV).hint


# --- parsers -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("", {}),
    ("\n\n", {}),
    ("TYPE=ext4\n", {"TYPE": "ext4"}),
    ("LABEL=a=b=c\n", {"LABEL": "a=b=c"}),  # only the first '=' separates
    ("LABEL=\n", {"LABEL": ""}),
    ("VERSION=LVM2\\ 001\n", {"VERSION": "LVM2 001"}),
    ("LABEL=back\\\\slash\\$x\\\"q\n", {"LABEL": 'back\\slash$x"q'}),
    ("garbage line\n=novalue\nTYPE=xfs\r\n", {"TYPE": "xfs"}),
    ("LABEL=donM-CM-)es\n", {"LABEL": "donM-CM-)es"}),  # blkid's M- notation is left as printed
    (BLKID_XFS, {"DEVNAME": "/dev/loop0", "UUID": "0f515bce-2fba-401d-af78-7c7c13245e8c",
                 "BLOCK_SIZE": "512", "TYPE": "xfs", "USAGE": "filesystem"}),
])
def test_parse_blkid_export(text, expected):
    assert blank.parse_blkid_export(text) == expected


def test_parse_wipefs_json():
    assert blank.parse_wipefs_json("") == ()
    assert blank.parse_wipefs_json(WIPEFS_BLANK) == ()
    assert blank.parse_wipefs_json(WIPEFS_GPT) == ("gpt at 0x200", "gpt at 0x3fffe00", "PMBR at 0x1fe")
    with pytest.raises(ValueError):
        blank.parse_wipefs_json("xfs 0x0")


# --- command wrappers with a stand-in runner ----------------------------------------------
# A blkid that hangs, or is missing, cannot be produced on demand with the real tool: these use a
# hand-written fake runner that returns or raises what runner.run would.

def fake_run(returncode=0, stdout="", stderr="", raises=None):
    calls = []

    def run(argv, *, timeout=60.0, ok_codes=(0,), input=None):
        calls.append(list(argv))
        if raises is not None:
            raise raises
        if returncode not in set(ok_codes):
            raise CommandError(argv, returncode, stdout, stderr)
        return Completed(tuple(argv), returncode, stdout, stderr)

    run.calls = calls
    return run


def test_probe_blkid_outcomes():
    assert disk.probe_blkid(DEV, fake_run(2)) == (2, {}, None)
    code, info, err = disk.probe_blkid(DEV, fake_run(0, BLKID_XFS))
    assert (code, info["TYPE"], err) == (0, "xfs", None)
    assert disk.probe_blkid(DEV, fake_run(8, "", BLKID_AMBIVALENT_STDERR)) == (
        8, {}, BLKID_AMBIVALENT_STDERR.strip())
    assert disk.probe_blkid(DEV, fake_run(4, "", ""))[2] == "exit 4"
    timeout = CommandError(["blkid"], None, timed_out=True)
    assert disk.probe_blkid(DEV, fake_run(raises=timeout)) == (None, {}, "timed out")
    missing = OperationError("required program 'blkid' not found")
    assert disk.probe_blkid(DEV, fake_run(raises=missing))[0] is None


def test_probe_blkid_argv_is_low_level_export():
    run = fake_run(2)
    disk.probe_blkid(DEV, run)
    assert run.calls == [["blkid", "-p", "-o", "export", DEV]]


def test_probe_wipefs_never_acts_and_reports_failures():
    run = fake_run(0, WIPEFS_XFS)
    assert disk.probe_wipefs(DEV, run) == (("xfs at 0x0",), None)
    assert "--no-act" in run.calls[0] and "-a" not in run.calls[0]
    failing = fake_run(1, "", "wipefs: error: /dev/x: probing initialization failed")
    sigs, err = disk.probe_wipefs(DEV, failing)
    assert sigs == () and "probing initialization failed" in err
    assert disk.probe_wipefs(DEV, fake_run(0, "not json"))[1].startswith("unreadable output")


def test_mkfs_argv_passes_our_uuid_and_forces_only_a_resume():
    argv = mkfs_argv(DEV, "couchdb", "3f65737e-e3eb-406c-ba78-f316dffb7019")
    assert argv == ["mkfs.ext4", "-q", "-L", "couchdb", "-m", "0", "-U",
                    "3f65737e-e3eb-406c-ba78-f316dffb7019", "-E",
                    "lazy_itable_init=1,lazy_journal_init=1,nodiscard", DEV]
    forced = mkfs_argv(DEV, "couchdb", "3f65737e-e3eb-406c-ba78-f316dffb7019", force=True)
    assert forced.count("-F") == 1 and forced[-1] == DEV


def test_filesystem_info_with_runner():
    info = disk.filesystem_info(DEV, fake_run(0, BLKID_EXT4_LABEL))
    assert info["UUID"] == "b032c618-40a3-4813-9511-197b47c79f70"
    assert disk.filesystem_info(DEV, fake_run(2)) == {}


# --- sysfs and mountinfo walking on a hand-made sysfs tree ----------------------------------
# (the real sysfs of this machine has no dm/md; the loop-device tests cover the real one)

def make_sysfs(tmp_path):
    """sda (8:0) with sda1 (8:1), sda2 (8:2); sdb (8:16); dm-0 (253:0) on sda2."""
    devices = tmp_path / "devices"
    block = tmp_path / "dev" / "block"
    block.mkdir(parents=True)

    def node(path, dev, partition=False):
        path.mkdir(parents=True)
        (path / "dev").write_text(dev + "\n")
        if partition:
            (path / "partition").write_text("1\n")
        (block / dev).symlink_to(path)
        return path

    sda = node(devices / "sda", "8:0")
    node(sda / "sda1", "8:1", partition=True)
    sda2 = node(sda / "sda2", "8:2", partition=True)
    node(devices / "sdb", "8:16")
    dm = node(devices / "dm-0", "253:0")
    (dm / "slaves").mkdir()
    (dm / "slaves" / "sda2").symlink_to(sda2)
    return str(block)


def test_underlying_disks_resolves_partitions_and_device_mapper(tmp_path):
    sys_block = make_sysfs(tmp_path)
    assert disk.underlying_disks("8:1", sys_block) == {"8:0"}
    assert disk.underlying_disks("253:0", sys_block) == {"8:0"}
    assert disk.underlying_disks("8:16", sys_block) == {"8:16"}
    assert disk.underlying_disks("9:9", sys_block) == {"9:9"}  # unknown: itself, never empty


def test_parse_mountinfo_reads_device_mount_point_and_source():
    text = ("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
            "43 27 0:39 / /tmp/my\\040mnt rw,relatime - btrfs /dev/loop0 rw,subvol=/\n"
            "short line\n")
    mounts = disk._mounts_from(text)
    assert [(m.major_minor, m.mount_point, m.source) for m in mounts] == [
        ("254:0", "/", "/dev/vda"), ("0:39", "/tmp/my mnt", "/dev/loop0")]


def test_gather_evidence_on_a_regular_file_is_not_blank(tmp_path):
    image = tmp_path / "file.img"
    image.write_bytes(b"\0" * (2 << 20))
    ev = disk.gather_evidence(str(image), size_bytes=2 << 20, run=fake_run(2),
                               mountinfo="", swaps="")
    assert ev.read_error == "not a block device"
    assert decide(ev).action == "refuse"


# --- the superblock reader on a real image made by mkfs.ext4 --------------------------------

def mkfs_image(tmp_path, *args) -> str:
    need_tool("mkfs.ext4", "e2fsprogs")
    image = tmp_path / "ext4.img"
    subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", *args, str(image)], check=True, capture_output=True,
                   env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    return str(image)


def blkid_value(image: str, tag: str) -> str:
    need_tool("blkid", "util-linux")
    out = subprocess.run(["blkid", "-p", "-o", "value", "-s", tag, image], capture_output=True,
                         text=True, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    return out.stdout.strip()


@pytest.mark.parametrize("label", ["couchdb", "sixteen-chars-16", "données"])
def test_read_ext4_superblock_matches_blkid(tmp_path, label):
    image = mkfs_image(tmp_path, "-L", label)
    sb = superblock.read_superblock(image)
    assert sb.label == label
    assert sb.uuid == blkid_value(image, "UUID")
    assert (sb.ever_mounted, sb.records_errors) == (False, False)
    assert sb.size_bytes == 8 << 20


def test_read_ext4_superblock_without_label(tmp_path):
    image = mkfs_image(tmp_path, "-U", "3f65737e-e3eb-406c-ba78-f316dffb7019")
    sb = superblock.read_superblock(image)
    assert (sb.uuid, sb.label) == ("3f65737e-e3eb-406c-ba78-f316dffb7019", "")


def test_read_ext4_superblock_on_non_ext_data(tmp_path):
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(b"\0" * 4096)
    assert superblock.read_superblock(str(zeros)) is None
    short = tmp_path / "short.img"
    short.write_bytes(b"\0" * 1100)
    assert superblock.read_superblock(str(short)) is None


# --- what the blank proof reads -----------------------------------------------------------

TIB = 1 << 40


@pytest.mark.parametrize("size, samples, max_read", [
    (16 * GIB, 254, 32 * (1 << 20)),  # 16 MiB of edges + 254 × 64 KiB
    (TIB, 16382, (1 << 30) + 16 * (1 << 20)),  # the 1 TiB bound: 1 GiB of samples
    (64 * TIB, 16383, (1 << 30) + 16 * (1 << 20)),  # wider stride, never more samples
    (10 * (1 << 20), 0, 10 * (1 << 20)),  # small: the whole device
])
def test_sample_plan_is_bounded(size, samples, max_read):
    offsets = disk.sample_offsets(size)
    assert abs(len(offsets) - samples) <= 2
    assert all(o % disk.SAMPLE_BYTES == 0 for o in offsets)
    assert all(disk.EDGE_BYTES <= o <= size - disk.EDGE_BYTES - disk.SAMPLE_BYTES for o in offsets)
    edges = min(size, 2 * disk.EDGE_BYTES)
    assert edges + len(offsets) * disk.SAMPLE_BYTES <= max_read
    assert "read" in disk.describe_reads(size)


def test_every_64_mib_boundary_is_sampled_up_to_1_tib():
    offsets = set(disk.sample_offsets(16 * GIB))
    assert {n * 64 * (1 << 20) for n in range(1, 255)} <= offsets


def sparse_image(tmp_path, size, chunks=()):
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(size)
        for offset, data in chunks:
            f.seek(offset)
            f.write(data)
    return str(image)


@pytest.mark.parametrize("where, field", [
    (4 * (1 << 20), "head_nonzero_offset"),  # inside the first 8 MiB, past the old 1 MiB
    (1 * GIB - 5 * (1 << 20), "tail_nonzero_offset"),
    (192 * (1 << 20), "sample_nonzero_offset"),  # only the stride sample can see it
])
def test_read_content_finds_data_where_the_old_proof_was_blind(tmp_path, where, field):
    image = sparse_image(tmp_path, GIB, [(where, b"\x01" * 512)])
    content = disk.read_content(image, GIB)
    assert content.read_error is None
    assert getattr(content, field) == where


def test_read_content_of_zeros_reads_the_planned_bytes(tmp_path):
    image = sparse_image(tmp_path, GIB)
    content = disk.read_content(image, GIB)
    assert (content.head_nonzero_offset, content.tail_nonzero_offset,
            content.sample_nonzero_offset) == (None, None, None)
    assert content.bytes_read == 16 * (1 << 20) + len(disk.sample_offsets(GIB)) * disk.SAMPLE_BYTES
    assert content.summary == disk.describe_reads(GIB)


def test_read_content_size_mismatch_is_a_read_error(tmp_path):
    image = sparse_image(tmp_path, 64 << 20)
    assert "expected" in disk.read_content(image, 65 << 20).read_error


@pytest.mark.parametrize("changes, words", [
    (dict(sample_nonzero_offset=192 << 20), "non-zero bytes at offset 201326592"),
    (dict(users=("backs /dev/loop7 (a loop device reads and writes through it)",)), "/dev/loop7"),
    (dict(users=("is mounted at /srv in the mount namespace of pid 4242",)), "pid 4242"),
    (dict(snapshot_id="snap-0123456789abcdef0"), "snap-0123456789abcdef0"),
])
def test_new_evidence_refuses(changes, words):
    ev = with_(**changes)
    assert not is_proven_blank(ev)
    decision = decide(ev)
    assert decision.action == "refuse" and words in decision.reason


def test_a_loop_on_top_forbids_reusing_an_ext4_too():
    ev = with_(**EXT4, users=("backs /dev/loop7 (a loop device reads and writes through it)",))
    assert decide(ev).action == "refuse"


def test_own_interrupted_format_is_only_our_uuid_or_nothing_at_all():
    uuid = "b032c618-40a3-4813-9511-197b47c79f70"  # BLKID_EXT4_LABEL's
    partial = with_(tail_nonzero_offset=(100 << 30) - (1 << 20))  # our mark, nothing else
    assert blank.is_own_interrupted_format(partial, uuid, uuid) == "partial"
    assert blank.is_own_interrupted_format(partial, uuid, uuid.upper()) == "partial"
    # Without our mark (or with another run's), non-zero bytes could be anybody's data.
    assert blank.is_own_interrupted_format(partial, uuid, None) is None
    assert blank.is_own_interrupted_format(partial, uuid, "00000000-0000-0000-0000-000000000000") is None
    assert blank.is_own_interrupted_format(with_(**EXT4), uuid, None) == "complete"
    assert blank.is_own_interrupted_format(with_(**EXT4), "00000000-0000-0000-0000-000000000000", None) is None
    xfs = with_(blkid_exit=0, blkid=blank.parse_blkid_export(BLKID_XFS),
                wipefs_signatures=("xfs at 0x0",))
    assert blank.is_own_interrupted_format(xfs, uuid, uuid) is None
    assert blank.is_own_interrupted_format(with_(mounted_at=("/x",)), uuid, uuid) is None
    assert blank.is_own_interrupted_format(with_(users=("backs /dev/loop7",)), uuid, uuid) is None


def test_mark_round_trip_and_strict_parse():
    from hostagent.adapters.mkfs import MARK_SIZE, mark_bytes, parse_mark

    uuid = "b032c618-40a3-4813-9511-197b47c79f70"
    block = mark_bytes(uuid)
    assert len(block) == MARK_SIZE and parse_mark(block) == uuid
    assert parse_mark(bytes(MARK_SIZE)) is None
    assert parse_mark(block[:-1] + b"x") is None  # anything after the mark: not ours
    assert parse_mark(os.urandom(MARK_SIZE)) is None


def test_mark_survives_a_real_mkfs(tmp_path):
    """mke2fs zeroes the device's last sectors: the mark must sit where it never writes."""
    from hostagent.adapters.mkfs import read_mark, write_mark

    image = str(tmp_path / "m.img")
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    uuid = "3f65737e-e3eb-406c-ba78-f316dffb7019"
    write_mark(image, 256 << 20, uuid)
    need_tool("mkfs.ext4", "e2fsprogs")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", uuid, "-m", "0", "-E",
                    "lazy_itable_init=1,lazy_journal_init=1,nodiscard", image], check=True,
                   capture_output=True, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    assert read_mark(image, 256 << 20) == uuid


def test_superblock_records_errors_set_by_debugfs(tmp_path):
    need_tool("debugfs", "e2fsprogs")
    image = mkfs_image(tmp_path, "-L", "couchdb")
    subprocess.run(["debugfs", "-w", "-R", "ssv state 2", image], check=True, capture_output=True,
                   env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    sb = superblock.read_superblock(image)
    assert sb.has_errors and sb.records_errors
    subprocess.run(["debugfs", "-w", "-R", "ssv state 1", image], check=True, capture_output=True,
                   env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    subprocess.run(["debugfs", "-w", "-R", "ssv error_count 3", image], check=True,
                   capture_output=True, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    sb = superblock.read_superblock(image)
    assert (sb.has_errors, sb.error_count, sb.records_errors) == (False, 3, True)
