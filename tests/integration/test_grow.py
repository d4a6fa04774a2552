"""`hostagent grow` and bootstrap's grow-fs step, with real parts: moto's ModifyVolume behind the EC2
fidelity proxy (which refuses a shrink and a second modification within 6 h, as EC2 does), the
IMDSv2 test server, a real loop device carrying a real ext4, real fsfreeze, resize2fs and mount.

The test plays EC2's other side: when the proxy says the volume grew (the modification reached
`optimizing`), it grows the loop device as EBS grows the NVMe namespace: a larger sparse backing
file, then `losetup -c` (hostagent never touches a loop device's size itself).

Online resize needs CAP_SYS_RESOURCE. Where the machine lacks it (this sandbox's bounding set
does, and so do the machines CI runs on), the tests of a successful resize skip; the refused
resize is shown everywhere by running hostagent without that capability (setpriv), as a unit lacking it would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import pytest

from hostagent.adapters.superblock import read_superblock
from tests.integration.test_bootstrap import REPO, steps_by_name
from tests.support.hosttools import (CAP_SYS_RESOURCE, WITHOUT_SYS_RESOURCE, grow_loop,
                                     has_capability, need_online_resize, need_root, need_tool, sh)

pytestmark = pytest.mark.root
GIB = 1 << 30
AZ = "us-east-1a"
NAME = "grand-central-persistence"


def run_hostagent(config: str, *args: str, drop_resize: bool = False, timeout: float = 180):
    env = {**os.environ, "HOSTAGENT_CONFIG": config}
    env.setdefault("PYTHONPATH", REPO)
    prefix = list(WITHOUT_SYS_RESOURCE) if drop_resize else []
    return subprocess.run([*prefix, sys.executable, "-m", "hostagent", *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def write_config(paths, dev: str, *, tags: bool = True, **sections) -> str:
    lines = ["[volume]"]
    if tags:
        lines.append(f'tags = {{ Name = "{NAME}" }}')
    lines += [f'device = "{dev}"', "attach_timeout = 20", "", "[filesystem]",
              f'mount_point = "{paths["mount_point"]}"', f'fstab = "{paths["fstab"]}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in sections.pop("filesystem", {}).items()]
    for name, values in sections.items():
        lines += ["", f"[{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    lines += ["", "[host]", f'lock_file = "{paths["lock_file"]}"',
              f'state_dir = "{paths["state_dir"]}"']
    path = os.path.join(paths["root"], "hostagent.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def mount_id(mount_point: str) -> str:
    """The kernel's id of the mount at mount_point: unchanged only if it was never unmounted."""
    with open("/proc/self/mountinfo") as f:
        ids = [line.split()[0] for line in f if line.split()[4] == mount_point]
    assert ids, f"nothing mounted at {mount_point}"
    return ids[-1]


def fs_bytes(dev: str) -> int:
    return read_superblock(dev).size_bytes


def write_data(mount_point: str) -> tuple[str, bytes]:
    path = os.path.join(mount_point, "data", "shard.couch")
    data = os.urandom(3 << 20)
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    return path, data


def ec2_volume(ec2, vid) -> dict:
    return ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]


def snapshots_of(ec2, vid) -> list[dict]:
    return ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": "volume-id", "Values": [vid]}])["Snapshots"]


def tags_of(item) -> dict:
    return {t["Key"]: t["Value"] for t in item.get("Tags", [])}


@pytest.fixture
def host(fidelity, imds, loop_device, host_paths):
    """This instance, its 1 GiB persistence volume (attached in moto) and the loop device that
    plays its disk, bootstrapped (ext4, mounted, laid out, recorded); EC2's side grows the loop."""
    import boto3

    need_root()
    need_tool("resize2fs", "e2fsprogs")
    need_tool("setpriv", "util-linux")
    ec2 = boto3.client("ec2", region_name="us-east-1")
    me = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                           Placement={"AvailabilityZone": AZ})["Instances"][0]["InstanceId"]
    imds(instance_id=me, region="us-east-1", availability_zone=AZ)
    vid = ec2.create_volume(AvailabilityZone=AZ, Size=1, TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": "Name", "Value": NAME}]}])["VolumeId"]
    ec2.attach_volume(VolumeId=vid, InstanceId=me, Device="/dev/xvdf")
    dev = loop_device("1G")
    grown = []
    lag = {"seconds": 0.0}

    def ec2_grows_the_disk(volume_id, size_gib):
        assert volume_id == vid

        def grow():
            grow_loop(dev, size_gib * GIB)
            grown.append(size_gib)

        if lag["seconds"]:  # the kernel sees the new size a moment after EC2 says optimizing
            threading.Timer(lag["seconds"], grow).start()
        else:
            grow()

    fidelity.on_volume_grown(ec2_grows_the_disk)
    config = write_config(host_paths, dev)
    first = run_hostagent(config, "bootstrap", "--json")
    assert first.returncode == 0, first.stderr
    return {"ec2": ec2, "vid": vid, "dev": dev, "config": config, "paths": host_paths,
            "mp": host_paths["mount_point"], "fidelity": fidelity, "grown": grown, "me": me,
            "lag": lag}


def test_grow_snapshots_modifies_waits_and_grows_ext4_online_with_data_intact(host):
    need_online_resize()
    mp, dev = host["mp"], host["dev"]
    path, data = write_data(mp)
    before_mount, before_fs = mount_id(mp), fs_bytes(dev)
    host["fidelity"].modifying_for(1.0, 2.0)
    host["lag"]["seconds"] = 1.5
    result = run_hostagent(host["config"], "grow", "--size", "2", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [(s["name"], s["status"]) for s in out["steps"]] == [
        ("snapshot", "done"), ("modify", "done"), ("wait-modification", "done"),
        ("wait-device", "done"), ("grow-fs", "done")]
    assert out["from_gib"] == 1 and out["to_gib"] == 2 and host["grown"] == [2]
    assert ec2_volume(host["ec2"], host["vid"])["Size"] == 2
    [snap] = snapshots_of(host["ec2"], host["vid"])
    assert snap["SnapshotId"] == out["snapshot_id"]
    assert tags_of(snap)["hostagent:before-grow"] == "1 to 2 GiB"
    assert tags_of(snap)["hostagent:managed"] == "true"
    assert before_fs < 1.01 * GIB and fs_bytes(dev) > 1.98 * GIB
    assert mount_id(mp) == before_mount, "the filesystem was unmounted"
    with open(path, "rb") as f:
        assert f.read() == data
    st = os.statvfs(mp)
    assert st.f_blocks * st.f_frsize > 1.9 * GIB
    record = json.load(open(os.path.join(host["paths"]["state_dir"], "capacity.json")))
    assert record["volume_id"] == host["vid"] and record["to_gib"] == 2
    assert run_hostagent(host["config"], "verify-mount").returncode == 0
    again = run_hostagent(host["config"], "bootstrap", "--json")
    assert "grow-fs" not in steps_by_name(again)


def test_refused_resize_is_a_clear_error_the_volume_stays_usable_and_a_rerun_finishes(host):
    mp, dev = host["mp"], host["dev"]
    path, data = write_data(mp)
    before_mount, before_fs = mount_id(mp), fs_bytes(dev)
    host["fidelity"].modifying_for(1.0, 2.0)
    host["lag"]["seconds"] = 1.5
    result = run_hostagent(host["config"], "grow", "--size", "2", "--json", drop_resize=True)
    assert result.returncode == 1, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("hostagent: error: the kernel refused to grow the ext4 on ")
    assert "CAP_SYS_RESOURCE" in first
    out = json.loads(result.stdout)
    assert out["ok"] is False and out["reason"] == "resize-denied"
    assert [(s["name"], s["status"]) for s in out["steps"]] == [
        ("snapshot", "done"), ("modify", "done"), ("wait-modification", "done"),
        ("wait-device", "done"), ("grow-fs", "failed")]
    assert out["snapshot_id"].startswith("snap-")
    assert ec2_volume(host["ec2"], host["vid"])["Size"] == 2
    assert int(open(f"/sys/block/{os.path.basename(dev)}/size").read()) * 512 == 2 * GIB
    assert fs_bytes(dev) == before_fs and mount_id(mp) == before_mount
    with open(path, "rb") as f:
        assert f.read() == data
    # Finishing it: the same command plans no second snapshot nor modification, only the grow.
    plan = run_hostagent(host["config"], "grow", "--size", "2", "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    assert [(s["name"], s["status"]) for s in json.loads(plan.stdout)["steps"]] == [
        ("snapshot", "skipped"), ("modify", "skipped"), ("wait-modification", "skipped"),
        ("wait-device", "planned"), ("grow-fs", "planned")]
    boot = run_hostagent(host["config"], "bootstrap", "--dry-run", "--json")
    assert steps_by_name(boot)["grow-fs"] == "planned"
    if has_capability(CAP_SYS_RESOURCE):
        rerun = run_hostagent(host["config"], "grow", "--size", "2", "--json")
        assert rerun.returncode == 0, rerun.stderr
        assert fs_bytes(dev) > 1.98 * GIB and mount_id(mp) == before_mount
        assert len(snapshots_of(host["ec2"], host["vid"])) == 1
    assert host["fidelity"].count("ModifyVolume") == 1


def test_dry_run_changes_nothing(host):
    mp, dev = host["mp"], host["dev"]
    before = (mount_id(mp), fs_bytes(dev), sorted(os.listdir(host["paths"]["state_dir"])))
    result = run_hostagent(host["config"], "grow", "--size", "2", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["dry_run"] is True
    assert {s["status"] for s in out["steps"]} == {"planned"}
    fid = host["fidelity"]
    assert fid.count("ModifyVolume") == 0 and fid.count("CreateSnapshot") == 0
    assert ec2_volume(host["ec2"], host["vid"])["Size"] == 1 and host["grown"] == []
    assert (mount_id(mp), fs_bytes(dev), sorted(os.listdir(host["paths"]["state_dir"]))) == before
    table = run_hostagent(host["config"], "grow", "--size", "2", "--dry-run")
    assert "planned  grow-fs" in table.stdout and "dry run: 5 step(s)" in table.stdout


@pytest.mark.parametrize("size", ["1", "0"])
def test_a_size_not_larger_is_exit_2_and_nothing_happens(host, size):
    result = run_hostagent(host["config"], "grow", "--size", size, "--json")
    assert result.returncode == 2, result.stderr
    assert "hostagent: error: --size" in result.stderr
    assert json.loads(result.stdout)["ok"] is False
    fid = host["fidelity"]
    assert fid.count("ModifyVolume") == 0 and fid.count("CreateSnapshot") == 0


def test_a_second_modification_within_6_h_says_when_the_next_is_possible(host):
    expected = 0 if has_capability(CAP_SYS_RESOURCE) else 1
    first = run_hostagent(host["config"], "grow", "--size", "2", "--no-snapshot", "--json")
    assert first.returncode == expected, first.stderr
    assert host["fidelity"].count("CreateSnapshot") == 0  # --no-snapshot
    [mod] = host["ec2"].describe_volumes_modifications(
        VolumeIds=[host["vid"]])["VolumesModifications"]
    next_at = (mod["StartTime"] + timedelta(hours=6)).astimezone(timezone.utc)
    second = run_hostagent(host["config"], "grow", "--size", "3", "--json")
    assert second.returncode == 1, second.stderr
    line = second.stderr.splitlines()[0]
    assert "VolumeModificationRateExceeded" in line and "6 h" in line
    assert f"the next is possible from {next_at:%Y-%m-%d %H:%M} UTC" in line
    out = json.loads(second.stdout)
    assert out["reason"] == "modification-rate"
    assert ec2_volume(host["ec2"], host["vid"])["Size"] == 2
    record = json.load(open(os.path.join(host["paths"]["state_dir"], "capacity.json")))
    assert datetime.fromisoformat(record["next_possible_at"]) == next_at.replace(microsecond=0) \
        or abs(datetime.fromisoformat(record["next_possible_at"]) - next_at) < timedelta(seconds=1)


def test_rate_exceeded_with_no_listed_modification_is_still_a_clear_error(host):
    """A before-send hook answers ModifyVolume as EC2 does under a rule moto cannot show (EC2
    lists no modification of the volume): the error counts 6 h from now."""
    from hostagent.aws.clients import AWS
    from hostagent.errors import OperationError
    from hostagent.flows.grow import run
    from tests.support.aws_faults import ec2_error, inject
    from tests.support.cloud import args, context

    aws = AWS()
    calls = inject(aws.ec2, "ec2.ModifyVolume", [ec2_error(400, "VolumeModificationRateExceeded")])
    with pytest.raises(OperationError) as err:
        run(context(host["config"]), args(size=2, no_snapshot=True), aws=aws)
    assert calls == ["injected"] and err.value.reason == "modification-rate"
    assert "EC2 lists no recent one; try again after " in str(err.value)
    assert ec2_volume(host["ec2"], host["vid"])["Size"] == 1


def test_bootstrap_grows_the_filesystem_when_the_device_outgrew_it(loop_device, host_paths):
    """A console resize while the host runs: no AWS at all (volume.device only)."""
    need_root()
    need_tool("setpriv", "util-linux")
    dev = loop_device("1G")
    config = write_config(host_paths, dev, tags=False)
    assert run_hostagent(config, "bootstrap").returncode == 0
    mp = host_paths["mount_point"]
    path, data = write_data(mp)
    before_mount, before_fs = mount_id(mp), fs_bytes(dev)
    grow_loop(dev, 2 * GIB)  # the console resize, as the kernel then shows it
    plan = run_hostagent(config, "bootstrap", "--dry-run", "--json")
    step = next(s for s in json.loads(plan.stdout)["steps"] if s["name"] == "grow-fs")
    assert step["status"] == "planned" and "(1 GiB -> 2 GiB, online)" in step["action"]
    assert "100% larger" in step["reason"]
    assert fs_bytes(dev) == before_fs
    refused = run_hostagent(config, "bootstrap", "--json", drop_resize=True)
    assert refused.returncode == 1 and "CAP_SYS_RESOURCE" in refused.stderr
    assert json.loads(refused.stdout)["reason"] == "resize-denied"
    assert mount_id(mp) == before_mount and fs_bytes(dev) == before_fs
    with open(path, "rb") as f:
        assert f.read() == data
    need_online_resize()
    done = run_hostagent(config, "bootstrap", "--json")
    assert done.returncode == 0, done.stderr
    assert steps_by_name(done)["grow-fs"] == "done"
    assert fs_bytes(dev) > 1.98 * GIB and mount_id(mp) == before_mount
    with open(path, "rb") as f:
        assert f.read() == data
    # At boot: the volume was resized while the host was down: mounted, then grown.
    sh("umount", mp)
    grow_loop(dev, 3 * GIB)
    boot = run_hostagent(config, "bootstrap", "--json")
    assert boot.returncode == 0, boot.stderr
    assert steps_by_name(boot)["mount"] == "done" and steps_by_name(boot)["grow-fs"] == "done"
    assert fs_bytes(dev) > 2.97 * GIB
    with open(path, "rb") as f:
        assert f.read() == data
