"""bootstrap with the AWS side: volume found by tag in a real moto server (over HTTP), attached to
the instance the IMDSv2 test server names, formatted on a real loop device, tagged, mounted.

A loop device has no NVMe serial, so `volume.device` names it (the operator's statement of
identity); the Nitro serial path is exercised in the VM test and in the device unit tests.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.integration.test_bootstrap import hostagent, steps_by_name
from tests.support.hosttools import need_root, sh, sha256_of_device

pytestmark = pytest.mark.root
TAGS = {"Name": "grand-central-persistence"}


def aws_config(paths, device: str) -> str:
    path = os.path.join(paths["root"], "hostagent.toml")
    with open(path, "w") as f:
        f.write(f"""[volume]
tags = {{ Name = "grand-central-persistence" }}
device = "{device}"
device_name = "/dev/xvdf"
attach_timeout = 20

[filesystem]
mount_point = "{paths['mount_point']}"
fstab = "{paths['fstab']}"

[host]
lock_file = "{paths['lock_file']}"
state_dir = "{paths['state_dir']}"
""")
    return path


@pytest.fixture
def cloud(aws, imds):
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1")
    run = lambda: ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,  # noqa: E731
                                    Placement={"AvailabilityZone": "us-east-1a"})["Instances"][0]["InstanceId"]
    me = run()
    imds(instance_id=me, region="us-east-1", availability_zone="us-east-1a")
    spec = [{"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in TAGS.items()]}]
    vol = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1, TagSpecifications=spec)["VolumeId"]
    return ec2, me, vol, run


def volume(ec2, vol):
    return ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]


def test_bootstrap_finds_attaches_formats_tags_and_mounts_by_tag(cloud, loop_device, host_paths):
    need_root()
    ec2, me, vol, _ = cloud
    dev = loop_device("128M")
    config = aws_config(host_paths, dev)
    first = hostagent(config, "bootstrap", "--json")
    assert first.returncode == 0, first.stderr
    status = steps_by_name(first)
    assert status["attach"] == "done" and status["format"] == "done" and status["tag-volume"] == "done"
    assert json.loads(first.stdout)["volume_id"] == vol
    v = volume(ec2, vol)
    assert [(a["InstanceId"], a["Device"]) for a in v["Attachments"]] == [(me, "/dev/xvdf")]
    tags = {t["Key"]: t["Value"] for t in v["Tags"]}
    assert tags["hostagent:formatted"].endswith("Z")
    assert sh("findmnt", "-n", "-o", "SOURCE", host_paths["mount_point"]).stdout.strip() == dev

    second = hostagent(config, "bootstrap", "--json")
    assert second.returncode == 0, second.stderr
    assert set(steps_by_name(second).values()) == {"skipped"}
    verify = hostagent(config, "verify-mount", "--json")
    assert verify.returncode == 0, verify.stdout


def test_volume_attached_to_another_instance_is_refused_untouched(cloud, loop_device, host_paths):
    need_root()
    ec2, me, vol, run = cloud
    other = run()
    ec2.attach_volume(VolumeId=vol, InstanceId=other, Device="/dev/xvdf")
    dev = loop_device("128M")
    before = sha256_of_device(dev)
    result = hostagent(aws_config(host_paths, dev), "bootstrap")
    assert result.returncode == 3, result.stderr
    assert other in result.stderr.splitlines()[0]
    assert [a["InstanceId"] for a in volume(ec2, vol)["Attachments"]] == [other]
    assert sha256_of_device(dev) == before


def test_formatted_volume_whose_device_looks_blank_is_refused(cloud, loop_device, host_paths):
    """Tagged hostagent:formatted, yet the device is all zeros: the wrong disk, or lost data."""
    need_root()
    ec2, me, vol, _ = cloud
    ec2.create_tags(Resources=[vol], Tags=[{"Key": "hostagent:formatted", "Value": "2026-01-01T00:00:00Z"}])
    dev = loop_device("128M")
    before = sha256_of_device(dev)
    result = hostagent(aws_config(host_paths, dev), "bootstrap")
    assert result.returncode == 3, result.stderr
    assert "hostagent:formatted" in result.stderr
    assert sha256_of_device(dev) == before
    assert not os.path.ismount(host_paths["mount_point"])


def test_dry_run_makes_no_aws_change(cloud, loop_device, host_paths):
    need_root()
    ec2, me, vol, _ = cloud
    dev = loop_device("128M")
    result = hostagent(aws_config(host_paths, dev), "bootstrap", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    status = steps_by_name(result)
    assert status["attach"] == "planned" and status["device"] == "planned"
    assert volume(ec2, vol)["Attachments"] == []
    assert sh("blkid", "-p", dev, check=False).returncode == 2  # still nothing on it


def test_first_bootstrap_of_a_restored_volume_marks_it_in_service(cloud, loop_device, host_paths):
    need_root()
    ec2, me, vol, _ = cloud
    ec2.create_tags(Resources=[vol], Tags=[{"Key": "hostagent:restored-from", "Value": "snap-0123456789abcdef0"},
                                           {"Key": "hostagent:formatted", "Value": "2026-01-01T00:00:00Z"}])
    dev = loop_device("128M")
    sh("mkfs.ext4", "-q", dev)  # the snapshot's filesystem
    config = aws_config(host_paths, dev)
    first = hostagent(config, "bootstrap", "--json")
    assert first.returncode == 0, first.stderr
    assert steps_by_name(first)["tag-in-service"] == "done"
    tags = {t["Key"]: t["Value"] for t in volume(ec2, vol)["Tags"]}
    assert tags["hostagent:in-service"].endswith("Z")
    second = hostagent(config, "bootstrap", "--json")
    assert "tag-in-service" not in steps_by_name(second)
