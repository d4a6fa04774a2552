"""A small EC2 world on the moto server for the snapshot/restore/secrets tests: an instance, its
IMDSv2 stand-in, a tagged persistence volume attached to it, and a config file that points at them."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

REGION = "us-east-1"
AZ = "us-east-1a"
VOLUME_TAGS = {"Name": "couch-data", "app": "grand-central", "team": "db"}


@dataclass
class Cloud:
    ec2: object
    instance_id: str
    volume_id: str
    imds: object
    tmp: str
    volume_tags: dict = field(default_factory=lambda: dict(VOLUME_TAGS))

    def config(self, *, snapshot=None, volume=None, filesystem=None, secrets=None,
               name="hostagent.toml") -> str:
        sections = {
            "volume": {"tags": {"Name": self.volume_tags["Name"]}, **(volume or {})},
            "filesystem": {"mount_point": os.path.join(self.tmp, "mnt"), **(filesystem or {})},
            "host": {"lock_file": os.path.join(self.tmp, "lock"),
                     "state_dir": os.path.join(self.tmp, "state")},
            "snapshot": {"keep_last": 3, "freeze": False, **(snapshot or {})},
        }
        if secrets:
            sections["secrets"] = secrets
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(toml_dumps(sections))
        return path

    def snapshots(self, region: str = REGION, **filters) -> list[dict]:
        import boto3

        ec2 = self.ec2 if region == REGION else boto3.client("ec2", region_name=region)
        out = []
        for page in ec2.get_paginator("describe_snapshots").paginate(OwnerIds=["self"]):
            out.extend(page["Snapshots"])
        return out

    def snapshot_tags(self, snapshot_id: str, region: str = REGION) -> dict:
        snap = next(s for s in self.snapshots(region) if s["SnapshotId"] == snapshot_id)
        return {t["Key"]: t["Value"] for t in snap.get("Tags", [])}


def toml_dumps(doc: dict) -> str:
    """Enough TOML for hostagent's config: sections of strings, numbers, booleans, lists of
    strings and inline tables of strings (JSON's quoting of those is valid TOML)."""
    lines = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {inner} }}")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def make_cloud(imds_factory, tmp_path, *, volume_tags=None, attach=True) -> Cloud:
    """An instance in us-east-1a, the IMDS answering for it, and the persistence volume attached."""
    import boto3

    ec2 = boto3.client("ec2", region_name=REGION)
    inst = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                             Placement={"AvailabilityZone": AZ})["Instances"][0]
    srv = imds_factory(instance_id=inst["InstanceId"], availability_zone=AZ, region=REGION)
    tags = dict(volume_tags or VOLUME_TAGS)
    vol = ec2.create_volume(AvailabilityZone=AZ, Size=8, VolumeType="gp3", TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
    if attach:
        ec2.attach_volume(VolumeId=vol["VolumeId"], InstanceId=inst["InstanceId"],
                          Device="/dev/xvdf")
    os.makedirs(os.path.join(str(tmp_path), "mnt"), exist_ok=True)
    return Cloud(ec2=ec2, instance_id=inst["InstanceId"], volume_id=vol["VolumeId"], imds=srv,
                 tmp=str(tmp_path), volume_tags=tags)


def context(config_path: str, *, as_json: bool = False):
    from hostagent.cli import Context

    return Context(config_path=config_path, json=as_json)


def args(**kw) -> argparse.Namespace:
    defaults = dict(dry_run=False, wait=False, no_prune=False)
    defaults.update(kw)
    return argparse.Namespace(**defaults)


def error_response(status: int, code: str, message: str = "injected by the test"):
    """A botocore AWSResponse with an EC2 XML error, for a before-send hook to return."""
    from botocore.awsrequest import AWSResponse

    body = (f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error>"
            f"</Errors><RequestID>test</RequestID></Response>").encode()

    class Raw:
        def stream(self, *a, **k):
            yield body

    return AWSResponse("https://ec2.amazonaws.com/", status, {}, Raw())
