"""`restore SNAPSHOT_ID --apply`: the whole runbook in one command, on real loop devices and a
moto server. The old volume's disk is loop A; the restored volume's disk is loop B, which
`volume.device` (a symlink under /dev, re-pointed by the test as EC2 would hot-plug the new
disk) leads to once the swap starts. B carries a filesystem of its own UUID: on EC2 a restored
volume is a twin of the old one, but there the old disk disappears on detach; a loop device does
not, and hostagent would rightly refuse two disks with one UUID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from hostagent.cli import main
from tests.support.cloud import make_cloud
from tests.support.hosttools import need_root, need_tool, sh, unmount_everything_under

pytestmark = pytest.mark.root


@pytest.fixture
def world(aws, imds, tmp_path, loop_device):
    need_root()
    need_tool("mkfs.ext4", "e2fsprogs")
    cloud = make_cloud(imds, tmp_path)
    old_disk, new_disk = loop_device("128M", name="old.img"), loop_device("128M", name="new.img")
    sh("mkfs.ext4", "-q", old_disk)
    sh("mkfs.ext4", "-q", new_disk)
    staging = tmp_path / "staging"
    staging.mkdir()
    sh("mount", new_disk, staging)
    (staging / "restored-marker").write_text("from the snapshot")
    sh("umount", staging)
    link = f"/dev/hostagent-test-{uuid.uuid4().hex[:8]}"
    os.symlink(old_disk, link)
    fstab = tmp_path / "fstab"
    fstab.write_text("# test fstab\n")
    config = cloud.config(volume={"device": link},
                          filesystem={"fstab": str(fstab), "mount_point": str(tmp_path / "mnt")})
    yield cloud, config, link, old_disk, new_disk
    unmount_everything_under(str(tmp_path))
    sh("chattr", "-i", str(tmp_path / "mnt"), check=False)
    os.unlink(link)


def run_json(capsys, *argv) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else {})


def volumes(ec2) -> dict:
    return {v["VolumeId"]: v for v in ec2.describe_volumes()["Volumes"]}


def test_apply_refuses_while_files_are_open_and_changes_nothing(world, capsys):
    cloud, config, link, old_disk, _ = world
    assert run_json(capsys, "--config", config, "bootstrap", "--json")[0] == 0
    mp = os.path.join(cloud.tmp, "mnt")
    code, snap = run_json(capsys, "--config", config, "snapshot", "--json", "--no-prune")
    assert code == 0
    before = volumes(cloud.ec2)
    # Another process (CouchDB, as far as hostagent can tell) with a file open on the volume.
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'w');"
                               " f.write('CouchDB writing'); f.flush(); time.sleep(60)",
                               os.path.join(mp, "data", "open.couch")])
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(os.path.join(mp, "data", "open.couch")):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        code, out = run_json(capsys, "--config", config, "restore", snap["snapshot_id"],
                             "--apply", "--json")
    finally:
        writer.kill()
        writer.wait()
    assert code == 3 and out["reason"] == "volume-in-use", out
    assert volumes(cloud.ec2).keys() == before.keys(), "refused before anything was created"
    assert sh("findmnt", "-n", "-o", "SOURCE", mp).stdout.strip() == old_disk


def test_apply_swaps_in_the_restored_volume_and_keeps_the_old(world, capsys):
    cloud, config, link, old_disk, new_disk = world
    mp = os.path.join(cloud.tmp, "mnt")
    assert run_json(capsys, "--config", config, "bootstrap", "--json")[0] == 0
    code, snap = run_json(capsys, "--config", config, "snapshot", "--json", "--no-prune")
    assert code == 0
    os.unlink(link)
    os.symlink(new_disk, link)  # EC2 hot-plugs the restored volume's disk on AttachVolume
    code, out = run_json(capsys, "--config", config, "restore", snap["snapshot_id"], "--apply",
                         "--json")
    assert code == 0, out
    status = {s["name"]: s["status"] for s in out["steps"]}
    assert status["umount"] == "done" and status["detach-old"] == "done"
    assert status["bootstrap"] == "done" and out["next_steps"] == []
    new_id = out["volume_id"]
    vols = volumes(cloud.ec2)
    assert vols[new_id]["Attachments"][0]["InstanceId"] == cloud.instance_id
    old = vols[cloud.volume_id]
    assert old["State"] == "available" and not old.get("Attachments"), "old one detached"
    tags = {t["Key"]: t["Value"] for t in old["Tags"]}
    assert tags["hostagent:replaced-by"] == new_id, "kept and marked, never deleted"
    assert sh("findmnt", "-n", "-o", "SOURCE", mp).stdout.strip() == new_disk
    assert open(os.path.join(mp, "restored-marker")).read() == "from the snapshot"
    assert run_json(capsys, "--config", config, "verify-mount", "--json")[0] == 0


def test_apply_with_a_volume_id_config_is_exit_2_before_anything(world, capsys, tmp_path):
    cloud, _, link, _, _ = world
    config = cloud.config(volume={"id": cloud.volume_id, "device": link},
                          filesystem={"fstab": str(tmp_path / "fstab"),
                                      "mount_point": str(tmp_path / "mnt")}, name="byid.toml")
    before = volumes(cloud.ec2)
    code, out = run_json(capsys, "--config", config, "restore", "snap-0123456789abcdef0",
                         "--apply", "--json")
    assert code == 2 and "tags" in out["error"]
    assert volumes(cloud.ec2).keys() == before.keys()
