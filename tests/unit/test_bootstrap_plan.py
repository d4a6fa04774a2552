"""bootstrap's plan as a table: observation in, steps or refusal out — no host, no root."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hostagent.adapters.blockdev import BlockDevice
from hostagent.adapters.layout import DirState
from hostagent.adapters.mounts import MountEntry
from hostagent.adapters.superblock import Superblock
from hostagent.aws.volume import Attachment, Identity, VolumeInfo
from hostagent.blank import Evidence
from hostagent.config import parse_config
from hostagent.errors import EXIT_FAILED, EXIT_REFUSED, EXIT_USAGE, HostagentError
from hostagent.flows.bootstrap import (
    HostObservation,
    VolumeSide,
    identity_volume_id,
    plan_bootstrap,
    random_uuid,
    requested_name,
)

VOL = "vol-0123456789abcdef0"
ME = Identity("i-0aaaaaaaaaaaaaaaa", "us-east-1", "us-east-1a")
MP = "/opt/couchdb"
UUID = "0b5c7a34-8f4e-4c0e-9a55-4b1d3c2e1f00"
LOOP_ID = "loop:/var/disk.img:dev=2049:ino=12"
GIB = 1 << 30


def disk(name="loop3", serial="", volume_id=None, read_only=False):
    return BlockDevice(name=name, path=f"/dev/{name}", major_minor="7:3", size_bytes=16 * GIB,
                       serial=serial, model="", volume_id=volume_id, requested_name=None,
                       partitions=(), holders=(), read_only=read_only, removable=False,
                       backing_file="/var/disk.img")


BLANK = Evidence(
    device="/dev/loop3", size_bytes=16 * GIB, read_error=None, head_nonzero_offset=None,
    tail_nonzero_offset=None, blkid_exit=2, blkid={}, blkid_error=None, wipefs_signatures=(),
    wipefs_error=None, partitions=(), holders=(), mounted_at=(), is_root_disk=False,
    serial_volume_id=None, expected_volume_id=None, formatted_tag=None)
EXT4 = BLANK._replace(blkid_exit=0, wipefs_signatures=("ext4 at 0x438",),
                           blkid={"TYPE": "ext4", "UUID": UUID, "USAGE": "filesystem"},
                           fs_ever_mounted=True)
XFS = BLANK._replace(blkid_exit=0, wipefs_signatures=("xfs at 0x0",),
                          blkid={"TYPE": "xfs", "UUID": "x", "USAGE": "filesystem"})
RANDOM = BLANK._replace(head_nonzero_offset=0)
SB = Superblock(uuid=UUID, label="couchdb", ever_mounted=True, has_errors=False, error_count=0,
                size_bytes=16 * GIB)
LAID_OUT = tuple(DirState(d, f"{MP}/{d}", "dir", 5984, 5984, 0o755)
                 for d in ("data", "etc", "etc/local.d"))
PRIVATE_ROOT = DirState("/", MP, "dir", 0, 0, 0o700)  # the volume's top directory
MOUNTED = MountEntry("7:3", "/", MP, "ext4", "/dev/loop3", ("rw",), ("rw",))
FSTAB_LINE = (f"UUID={UUID}\t{MP}\text4\tdefaults,noatime,nodev,nosuid,noexec,nofail,"
              "x-systemd.device-timeout=30s,comment=hostagent\t0\t2\n")


def config(**volume):
    return parse_config({"volume": volume or {"device": "/dev/loop3"}})


def observation(**changes) -> HostObservation:
    """A blank disk, nothing mounted, mount point missing, empty fstab."""
    base = HostObservation(
        device=disk(), mount_point=MP, proven_volume_id=None, identity=LOOP_ID, superblock=None,
        evidence=BLANK, known_uuid=None, loop_users=(), intent=None, own_mkfs_clean=None,
        mark_uuid=None, mounted=None, device_mounts=(), mount_point_kind="missing", mount_point_blocked=None,
        bare_immutable=None, bare_leftovers=(), guard_recorded=False, fstab_text="",
        fstab_blocked=None, fstab_free_bytes=1 << 30, twins=(), views=(), layout=None)
    return base._replace(**changes)


def plan(obs=None, cfg=None, side=None):
    return plan_bootstrap(obs or observation(), cfg or config(), side or VolumeSide())


def ops(steps) -> dict:
    return {s.name: (s.op[0] if s.op else None) for s in steps}


def refusal(obs=None, cfg=None, side=None) -> HostagentError:
    with pytest.raises(HostagentError) as info:
        plan(obs, cfg, side)
    return info.value


def test_blank_disk_plans_every_step_in_order():
    steps = plan()
    assert [s.name for s in steps] == ["format", "fstab", "mount-point", "guard", "mount", "layout"]
    assert ops(steps) == {"format": "mkfs", "fstab": "write-fstab", "mount-point": "mkdir",
                          "guard": "guard", "mount": "mount", "layout": "layout"}
    fmt = steps[0].op[1]
    assert fmt["resume"] is False
    # The UUID chosen for mkfs -U is the one the fstab line names: known before anything runs.
    assert f"UUID={fmt['uuid']}" in steps[1].op[1]["text"]


def test_reboot_path_mounts_only():
    obs = observation(evidence=None, known_uuid=UUID, superblock=SB, fstab_text=FSTAB_LINE,
                      mount_point_kind="dir", bare_immutable=True)
    steps = plan(obs)
    assert ops(steps) == {"format": None, "fstab": None, "guard": None, "mount": "mount",
                          "layout": "layout"}


def test_already_mounted_and_laid_out_is_all_skipped():
    obs = observation(evidence=None, known_uuid=UUID, superblock=SB, fstab_text=FSTAB_LINE,
                      mount_point_kind="dir", mounted=MOUNTED, layout=LAID_OUT,
                      mount_root=PRIVATE_ROOT, guard_recorded=True)
    assert set(ops(plan(obs)).values()) == {None}


def laid_out_obs(**changes):
    return observation(evidence=None, known_uuid=UUID, superblock=SB, fstab_text=FSTAB_LINE,
                       mount_point_kind="dir", mounted=MOUNTED, layout=LAID_OUT,
                       mount_root=PRIVATE_ROOT, guard_recorded=True)._replace(**changes)


@pytest.mark.parametrize("root, reason", [
    (PRIVATE_ROOT._replace(mode=0o755), "/: mode 0755, want 0700"),  # ext4's mkfs default
    (PRIVATE_ROOT._replace(uid=5984, gid=5984), "/: owner 5984:5984, want 0:0"),
    (PRIVATE_ROOT._replace(kind="not-top"),
     "/: not the top directory of the mounted ext4 filesystem"),
])
def test_an_open_volume_top_is_made_private_by_the_layout_step(root, reason):
    step = {s.name: s for s in plan(laid_out_obs(mount_root=root))}["layout"]
    assert step.op == ("layout", {}) and step.reason == reason
    assert step.action.startswith("/ private (root:root 0700); data, etc, etc/local.d owned "
                                  "5984:5984 mode 0755")


def test_the_layout_takes_what_the_official_image_sets_and_an_explicit_mode_exactly():
    # A host where CouchDB has started: the entrypoint left 0755 and nothing is to be done.
    assert ops(plan(laid_out_obs()))["layout"] is None
    strict = parse_config({"volume": {"device": "/dev/loop3"}, "layout": {"mode": "0750"}})
    step = {s.name: s for s in plan(laid_out_obs(), strict)}["layout"]
    assert step.op == ("layout", {})
    assert step.reason == "data: mode 0755, want 0750; etc: mode 0755, want 0750; " \
                          "etc/local.d: mode 0755, want 0750"


def test_mounted_before_bootstrap_gets_the_guard_underneath_once():
    obs = observation(evidence=EXT4, superblock=SB, fstab_text=FSTAB_LINE,
                      mount_point_kind="dir", mounted=MOUNTED, layout=LAID_OUT,
                      mount_root=PRIVATE_ROOT)
    assert ops(plan(obs))["guard"] == "guard-under"
    assert ops(plan(obs._replace(guard_recorded=True)))["guard"] is None


def test_hand_made_ext4_is_reused():
    steps = plan(observation(evidence=EXT4, superblock=SB))
    assert ops(steps)["format"] is None and "reused" in steps[0].reason
    assert f"UUID={UUID}" in steps[1].op[1]["text"]


@pytest.mark.parametrize("obs, code, words", [
    (observation(evidence=XFS), EXIT_REFUSED, "xfs"),
    (observation(evidence=RANDOM), EXIT_REFUSED, "non-zero bytes at offset 0"),
    (observation(mounted=MOUNTED._replace(major_minor="8:1", source="/dev/sda1")),
     EXIT_REFUSED, "/dev/sda1 mounted"),
    (observation(device_mounts=(MOUNTED._replace(mount_point="/mnt"),)),
     EXIT_REFUSED, "already mounted at /mnt"),
    (observation(mount_point_kind="other"), EXIT_USAGE, "not a directory"),
    (observation(mount_point_blocked="/opt is on a read-only filesystem"), EXIT_FAILED,
     "read-only"),
    (observation(evidence=EXT4, superblock=SB, twins=("/dev/loop9",)), EXIT_REFUSED,
     "same filesystem UUID"),
    (observation(loop_users=("backs /dev/loop7 (a loop device reads and writes through it)",),
                 evidence=None, known_uuid=UUID, superblock=SB), EXIT_REFUSED, "/dev/loop7"),
    (observation(device=disk(read_only=True)), EXIT_FAILED, "read-only"),
    (observation(fstab_blocked="/etc is on a read-only filesystem"), EXIT_FAILED, "fstab"),
    (observation(fstab_free_bytes=100), EXIT_FAILED, "bytes free"),
])
def test_refusals_come_before_any_step(obs, code, words):
    err = refusal(obs)
    assert err.exit_code == code and words in str(err), str(err)


def test_xen_disk_not_proven_to_be_the_volume_is_refused_for_reuse_too():
    side = VolumeSide(volume_id=VOL, instance_id=ME.instance_id)
    err = refusal(observation(evidence=EXT4, superblock=SB, device=disk("xvdf")),
                  config(tags={"Name": "x"}), side)
    assert err.exit_code == EXIT_REFUSED and "cannot prove" in str(err)


def test_superblock_with_errors_is_preened_before_the_first_mount():
    sb = SB._replace(has_errors=True, error_count=2)
    steps = plan(observation(evidence=EXT4, superblock=sb))
    assert [s.name for s in steps][:2] == ["fsck", "format"] and steps[0].op[0] == "fsck"
    mounted = observation(evidence=EXT4, superblock=sb, mounted=MOUNTED, layout=LAID_OUT,
                          mount_root=PRIVATE_ROOT, mount_point_kind="dir", fstab_text=FSTAB_LINE, guard_recorded=True)
    assert "fsck" not in ops(plan(mounted)), "never fsck a mounted filesystem"


def test_leftover_views_are_removed_first():
    steps = plan(observation(views=("/var/lib/hostagent/hostagent-bare",)))
    assert steps[0].name == "cleanup" and steps[0].op == (
        "remove-view", {"path": "/var/lib/hostagent/hostagent-bare"})


# --- the format intent: only the same disk, only our own leftovers -----------------------

INTENT = {"identity": LOOP_ID, "volume_id": None, "uuid": UUID, "started": "t",
          "size_bytes": 16 * GIB}
PARTIAL = BLANK._replace(tail_nonzero_offset=16 * GIB - (1 << 20))  # our mark, no superblock yet


def test_interrupted_mkfs_on_the_same_disk_is_finished_with_the_same_uuid():
    steps = plan(observation(evidence=PARTIAL, intent=INTENT, mark_uuid=UUID))
    assert steps[0].op == ("mkfs", {"uuid": UUID, "resume": True})


def test_interrupted_mkfs_without_our_mark_is_refused():
    """Same disk by identity (a loop file's inode can be reused), no mark: the bytes could be
    anybody's."""
    err = refusal(observation(evidence=PARTIAL, intent=INTENT, mark_uuid=None))
    assert err.exit_code == EXIT_REFUSED


def test_intent_for_a_disk_of_another_size_authorises_nothing():
    err = refusal(observation(evidence=PARTIAL, intent={**INTENT, "size_bytes": 8 * GIB},
                              mark_uuid=UUID))
    assert err.exit_code == EXIT_REFUSED


def test_intent_for_another_disk_authorises_nothing():
    other = {**INTENT, "identity": "loop:/var/other.img:dev=2049:ino=99"}
    err = refusal(observation(evidence=PARTIAL, intent=other))
    assert err.exit_code == EXIT_REFUSED and "another disk" in err.hint


def test_intent_without_durable_identity_authorises_nothing():
    err = refusal(observation(evidence=PARTIAL, intent={**INTENT, "identity": None},
                              identity=None))
    assert err.exit_code == EXIT_REFUSED


def test_intent_for_another_volume_authorises_nothing():
    err = refusal(observation(evidence=PARTIAL, intent={**INTENT, "volume_id": VOL}))
    assert err.exit_code == EXIT_REFUSED


def test_intent_never_authorises_formatting_a_foreign_signature():
    err = refusal(observation(evidence=XFS, intent=INTENT))
    assert err.exit_code == EXIT_REFUSED and "xfs" in str(err)


def test_finished_mkfs_with_our_uuid_is_reused_never_remade():
    fresh = EXT4._replace(fs_ever_mounted=False)
    steps = plan(observation(evidence=fresh, superblock=SB, intent=INTENT, own_mkfs_clean=True))
    assert steps[0].op == ("forget-intent", {}) and "finished before a crash" in steps[0].reason
    assert f"UUID={UUID}" in steps[1].op[1]["text"]


def test_incomplete_mkfs_with_our_uuid_is_finished_with_the_same_uuid():
    fresh = EXT4._replace(fs_ever_mounted=False)
    steps = plan(observation(evidence=fresh, superblock=SB, intent=INTENT, own_mkfs_clean=False))
    assert steps[0].op == ("mkfs", {"uuid": UUID, "resume": True})


def test_blank_disk_with_our_intent_formats_with_the_recorded_uuid():
    steps = plan(observation(intent=INTENT))
    assert steps[0].op == ("mkfs", {"uuid": UUID, "resume": False})


# --- which disk is the volume (pure) -------------------------------------------------------


def side_with(attached_as="/dev/sdf", instance=ME.instance_id):
    volume = VolumeInfo(VOL, "us-east-1a", "in-use", 10, (Attachment(instance, attached_as,
                                                                      "attached"),))
    return VolumeSide(volume_id=VOL, instance_id=ME.instance_id, volume=volume)


def xdisk(name, serial="", volume_id=None):
    return SimpleNamespace(name=name, path=f"/dev/{name}", serial=serial, volume_id=volume_id)


TAGGED = config(tags={"Name": "x"})


def test_nitro_serial_proves_the_volume():
    assert identity_volume_id(TAGGED, side_with(), xdisk("nvme1n1", "vol0123456789abcdef0", VOL)) == VOL


def test_a_serial_of_another_kind_proves_nothing():
    assert identity_volume_id(TAGGED, side_with(), xdisk("nvme1n1", "QEMU1234")) is None


def test_xen_disk_is_the_volume_only_under_the_name_ec2_reports_here():
    assert identity_volume_id(TAGGED, side_with("/dev/sdf"), xdisk("xvdf")) == VOL
    assert identity_volume_id(TAGGED, side_with("/dev/xvdf"), xdisk("xvdf")) == VOL
    assert identity_volume_id(TAGGED, side_with("/dev/sdg"), xdisk("xvdf")) is None
    assert identity_volume_id(TAGGED, side_with(instance="i-0bbbbbbbbbbbbbbbb"), xdisk("xvdf")) is None


def test_operator_named_device_counts_as_identity():
    cfg = config(tags={"Name": "x"}, device="/dev/loop3")
    assert identity_volume_id(cfg, side_with("/dev/sdg"), xdisk("loop3")) == VOL


def test_requested_name_follows_the_attachment_not_the_config():
    assert requested_name(TAGGED, side_with("/dev/sdg")) == "/dev/sdg"
    available = VolumeSide(volume_id=VOL, instance_id=ME.instance_id,
                           volume=VolumeInfo(VOL, "us-east-1a", "available", 10, ()))
    assert requested_name(TAGGED, available) == "/dev/xvdf"


def test_random_uuid_is_a_version_4_uuid():
    import uuid

    made = {random_uuid() for _ in range(200)}
    assert len(made) == 200
    for text in made:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
