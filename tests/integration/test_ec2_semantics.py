"""hostagent against EC2 as it is (issue 9), not as moto is: every call goes through the EC2
fidelity layer (tests/support/ec2_fidelity.py), which refuses, delays and hides what EC2 refuses,
delays and hides. Each test runs `python -m hostagent` as systemd/cron do, and asserts only what an
operator or EC2 can see: the exit code, the one-line error, EC2's state (boto3), the device's bytes.

Bootstrap tests use a real loop device named in `volume.device` (a loop has no NVMe serial), the
IMDSv2 test server for this instance's identity, and their own [host] lock_file and state_dir.
"""

from __future__ import annotations

import json
import os
import re
import time

import boto3
import pytest

from tests.integration.test_bootstrap import hostagent
from tests.integration.test_bootstrap_aws import TAGS, aws_config
from tests.support.hosttools import need_root, sh, sha256_of_device

REGION, HERE = "us-east-1", "us-east-1a"


@pytest.fixture
def ec2(fidelity):
    return boto3.client("ec2", region_name=REGION)


@pytest.fixture
def me(ec2, imds):
    """This instance, in us-east-1a, as the IMDSv2 test server tells hostagent."""
    iid = launch(ec2, HERE)
    imds(instance_id=iid, region=REGION, availability_zone=HERE)
    return iid


@pytest.fixture
def boot(me, loop_device, host_paths):
    """(device, run): a blank loop device and `hostagent bootstrap` with the tag search on it."""
    need_root()
    dev = loop_device("128M")
    config = aws_config(host_paths, dev)
    return dev, lambda *extra: hostagent(config, "bootstrap", *extra)


def launch(ec2, az=HERE) -> str:
    return ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                             Placement={"AvailabilityZone": az})["Instances"][0]["InstanceId"]


def tagged_volume(ec2, az=HERE, **kw) -> str:
    spec = [{"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in TAGS.items()]}]
    return ec2.create_volume(AvailabilityZone=az, Size=kw.pop("Size", 1), TagSpecifications=spec,
                             **kw)["VolumeId"]


def attachments(ec2, vid) -> list[tuple[str, str]]:
    vol = ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]
    return sorted((a["InstanceId"], a["State"]) for a in vol["Attachments"])


def error_line(result) -> str:
    """The one `hostagent: error: …` line on stderr (exactly one, as the contract says)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("hostagent: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def assert_untouched(dev, before, mount_point):
    assert sha256_of_device(dev) == before, "the device was written"
    assert sh("blkid", "-p", dev, check=False).returncode == 2  # still nothing on it
    assert not os.path.ismount(mount_point)


@pytest.mark.root
@pytest.mark.parametrize("state", ["attached", "detaching"])
def test_volume_still_held_by_the_replaced_instance_is_refused_untouched(ec2, me, boot, fidelity,
                                                                          host_paths, state):
    """Issue 9 item 1 (a replaced host meets the old attachment) at boot: the old instance was
    terminated, EC2 still lists its attachment (attached, then detaching). Bootstrap refuses,
    exit 3 naming the old instance; nothing attached here, nothing formatted, nothing mounted."""
    dev, bootstrap = boot
    old = launch(ec2)
    vid = tagged_volume(ec2)
    ec2.terminate_instances(InstanceIds=[old])
    fidelity.hold(vid, old)
    if state == "detaching":
        fidelity.release_after(vid, 0, detaching=600)
    before = sha256_of_device(dev)
    result = bootstrap()
    assert result.returncode == 3, result.stderr
    assert old in error_line(result)
    assert attachments(ec2, vid) == [(old, state)]
    assert fidelity.count("AttachVolume", 200) == 0
    assert_untouched(dev, before, host_paths["mount_point"])


@pytest.mark.root
def test_tag_matches_here_and_in_another_zone_uses_the_one_here(ec2, me, boot, fidelity,
                                                                 host_paths):
    """Issue 9 item 2 (one volume per AZ): the same tags on a volume in this AZ and one in
    us-east-1b; bootstrap takes the one here, exit 0, and leaves the other alone."""
    dev, bootstrap = boot
    elsewhere = tagged_volume(ec2, az="us-east-1b")
    here = tagged_volume(ec2)
    result = bootstrap("--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["volume_id"] == here
    assert attachments(ec2, here) == [(me, "attached")]
    assert attachments(ec2, elsewhere) == []
    assert sh("findmnt", "-n", "-o", "SOURCE", host_paths["mount_point"]).stdout.strip() == dev


@pytest.mark.root
def test_two_tag_matches_in_this_zone_are_refused_listing_both(ec2, me, boot, fidelity, host_paths):
    """Issue 9 item 2 (one volume per AZ): two matches in this AZ (and one elsewhere) is a refusal,
    exit 3, the error listing both here; nothing attached or formatted."""
    dev, bootstrap = boot
    first, second = tagged_volume(ec2), tagged_volume(ec2)
    tagged_volume(ec2, az="us-east-1b")
    before = sha256_of_device(dev)
    result = bootstrap()
    assert result.returncode == 3, result.stderr
    line = error_line(result)
    assert first in line and second in line
    assert fidelity.count("AttachVolume") == 0
    assert attachments(ec2, first) == attachments(ec2, second) == []
    assert_untouched(dev, before, host_paths["mount_point"])


@pytest.mark.root
@pytest.mark.parametrize("zones", [["us-east-1b"], ["us-east-1b", "us-east-1c"]],
                         ids=["one-elsewhere", "two-elsewhere"])
def test_tag_matches_only_in_other_zones_are_refused_naming_them(ec2, me, boot, fidelity,
                                                                  host_paths, zones):
    """Issue 9 item 2 (one volume per AZ): the tags match only volumes in other AZs: exit 3 (a
    refusal, not a run-time failure), the error naming their AZs; no AttachVolume is tried."""
    dev, bootstrap = boot
    for az in zones:
        tagged_volume(ec2, az=az)
    before = sha256_of_device(dev)
    result = bootstrap()
    assert result.returncode == 3, result.stderr
    line = error_line(result)
    assert all(az in line for az in zones), line
    assert fidelity.count("AttachVolume") == 0
    assert_untouched(dev, before, host_paths["mount_point"])


@pytest.mark.root
def test_multi_attach_volume_is_refused_before_any_attach(ec2, me, boot, fidelity, host_paths):
    """Issue 9 item 3 (Multi-Attach): ext4 is not cluster-safe, so a MultiAttachEnabled io2 volume
    is refused outright: exit 3 naming the volume and Multi-Attach, with a hint line, before any
    AttachVolume; nothing attached, nothing formatted."""
    dev, bootstrap = boot
    vid = tagged_volume(ec2, Size=4, VolumeType="io2", Iops=100, MultiAttachEnabled=True)
    before = sha256_of_device(dev)
    result = bootstrap()
    assert result.returncode == 3, result.stderr
    line = error_line(result)
    assert vid in line and re.search(r"multi-?attach", line, re.I), line
    assert any(s.startswith("hint:") for s in result.stderr.splitlines()), result.stderr
    assert fidelity.count("AttachVolume") == 0
    assert attachments(ec2, vid) == []
    assert_untouched(dev, before, host_paths["mount_point"])


@pytest.mark.root
def test_throttled_describe_volumes_at_boot_still_bootstraps(ec2, me, boot, fidelity, host_paths):
    """Issue 9, "tests play EC2 as it is" (throttling): the first three DescribeVolumes answer 503
    RequestLimitExceeded; bootstrap retries them and succeeds, exit 0, mounted."""
    dev, bootstrap = boot
    vid = tagged_volume(ec2)
    fidelity.throttle("DescribeVolumes", 3)
    result = bootstrap()
    assert result.returncode == 0, result.stderr
    assert fidelity.count("DescribeVolumes", 503) == 3
    assert attachments(ec2, vid) == [(me, "attached")]
    assert sh("findmnt", "-n", "-o", "SOURCE", host_paths["mount_point"]).stdout.strip() == dev


@pytest.mark.root
def test_bootstrap_waits_while_the_attachment_is_attaching(ec2, me, boot, fidelity, host_paths):
    """Issue 9, "tests play EC2 as it is" (attaching): the attachment stays `attaching` for 3 s
    after AttachVolume; bootstrap waits for `attached`, then formats and mounts, exit 0."""
    dev, bootstrap = boot
    vid = tagged_volume(ec2)
    fidelity.attaching_for(3.0)
    start = time.monotonic()
    result = bootstrap()
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start >= 3.0
    assert fidelity.count("AttachVolume") == 1
    assert attachments(ec2, vid) == [(me, "attached")]
    assert sh("findmnt", "-n", "-o", "SOURCE", host_paths["mount_point"]).stdout.strip() == dev


def snapshot_config(tmp_path, me_ec2_volume) -> str:
    path = tmp_path / "hostagent.toml"
    path.write_text(f"""[volume]
id = "{me_ec2_volume}"

[filesystem]
mount_point = "{tmp_path / 'mnt'}"

[snapshot]
keep_last = 1
freeze = false

[host]
lock_file = "{tmp_path / 'lock'}"
state_dir = "{tmp_path / 'state'}"
""")
    return str(path)


def our_snapshots(ec2, vid) -> dict[str, str]:
    found = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": "tag:hostagent:volume-id", "Values": [vid]}])["Snapshots"]
    return {s["SnapshotId"]: s["State"] for s in found}


def test_snapshot_wait_rides_out_not_found_right_after_create_and_prunes(ec2, me, fidelity,
                                                                          tmp_path):
    """Issue 9 item 6 (eventual consistency): right after CreateSnapshot, DescribeSnapshots on the
    new id answers InvalidSnapshot.NotFound for ~2 s, then the snapshot is `pending` for 3 s.
    `snapshot --wait` waits it out, exit 0 (today: exit 2 "not found"), and pruning runs
    (keep_last = 1 deletes the older one)."""
    vid = tagged_volume(ec2)
    ec2.attach_volume(VolumeId=vid, InstanceId=me, Device="/dev/xvdf")
    config = snapshot_config(tmp_path, vid)
    first = hostagent(config, "snapshot", "--json")
    assert first.returncode == 0, first.stderr
    older = json.loads(first.stdout)["snapshot_id"]
    time.sleep(1.05)  # moto keeps StartTime to the second: keep the order unambiguous
    fidelity.not_found_for(2.0)
    fidelity.snapshots_pending_for(3.0)
    result = hostagent(config, "snapshot", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    new = out["snapshot_id"]
    assert {s["name"]: s["status"] for s in out["steps"]} == {
        "snapshot": "done", "wait": "done", "prune": "done"}
    assert fidelity.count("DescribeSnapshots", 400) >= 1, "the NotFound window was never met"
    assert our_snapshots(ec2, vid) == {new: "completed"}  # the older one pruned
    assert older in out["deleted"]


def test_restore_rides_out_not_found_right_after_create_volume(ec2, me, fidelity, tmp_path):
    """Issue 9 item 6 (eventual consistency, "wherever that happens": restore): right after
    CreateVolume, DescribeVolumes on the new id answers InvalidVolume.NotFound for ~2 s. restore
    waits it out, exit 0, and the new volume is the one tagged restored-from the snapshot."""
    vid = tagged_volume(ec2)
    snap = ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    path = tmp_path / "hostagent.toml"
    path.write_text(f"""[volume]
tags = {{ Name = "{TAGS['Name']}" }}

[filesystem]
mount_point = "{tmp_path / 'mnt'}"

[host]
lock_file = "{tmp_path / 'lock'}"
state_dir = "{tmp_path / 'state'}"
""")
    fidelity.not_found_for(2.0)
    result = hostagent(str(path), "restore", snap, "--json")
    assert result.returncode == 0, result.stderr
    new = json.loads(result.stdout)["volume_id"]
    assert new and new != vid
    assert fidelity.count("DescribeVolumes", 400) >= 1, "the NotFound window was never met"
    volume = ec2.describe_volumes(VolumeIds=[new])["Volumes"][0]
    tags = {t["Key"]: t["Value"] for t in volume.get("Tags", [])}
    assert tags.get("hostagent:restored-from") == snap and volume["AvailabilityZone"] == HERE
