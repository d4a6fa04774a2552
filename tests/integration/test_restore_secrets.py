"""restore and fetch-secrets against the moto server over HTTP (EC2 volumes/snapshots, S3 objects)."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
import uuid

import boto3
import pytest

from hostagent.aws.clients import AWS
from hostagent.aws.volume import find_volume
from hostagent.cli import main
from hostagent.flows.restore import run as run_restore
from tests.support.cloud import AZ, args, context, make_cloud


@pytest.fixture
def cloud(aws, imds, tmp_path):
    return make_cloud(imds, tmp_path)


def take_snapshot(cloud, capsys) -> str:
    assert main(["--config", cloud.config(), "snapshot", "--json", "--no-prune"]) == 0
    return json.loads(capsys.readouterr().out)["snapshot_id"]


def volumes(cloud) -> dict[str, dict]:
    out = {}
    for page in cloud.ec2.get_paginator("describe_volumes").paginate():
        for v in page["Volumes"]:
            out[v["VolumeId"]] = {**v, "tags": {t["Key"]: t["Value"] for t in v.get("Tags", [])}}
    return out


def restore(config, snap, *extra):
    return main(["--config", config, "restore", snap, "--json", *extra])


def test_restore_makes_exactly_one_tagged_volume_here_and_retags_the_old(cloud, capsys):
    snap = take_snapshot(cloud, capsys)
    before = volumes(cloud)
    config = cloud.config()
    assert restore(config, snap) == 0
    out = json.loads(capsys.readouterr().out)
    new_id = out["volume_id"]
    after = volumes(cloud)
    assert set(after) - set(before) == {new_id}
    new = after[new_id]
    assert new["AvailabilityZone"] == AZ and new["SnapshotId"] == snap
    assert new["State"] == "available" and new["VolumeType"] == "gp3" and new["Size"] == 8
    assert new["tags"]["Name"] == "couch-data"
    assert new["tags"]["app"] == "grand-central" and new["tags"]["team"] == "db"
    assert new["tags"]["hostagent:restored-from"] == snap
    assert "hostagent:formatted" in new["tags"]

    old = after[cloud.volume_id]
    assert old["State"] == "in-use", "the old volume is never detached"
    assert old["Attachments"][0]["InstanceId"] == cloud.instance_id
    assert old["tags"]["Name"].startswith("couch-data-replaced-")
    assert old["tags"]["hostagent:replaced:Name"] == "couch-data"
    assert old["tags"]["hostagent:replaced-by"] == new_id
    assert old["tags"]["app"] == "grand-central", "tags not used by the search stay"

    # What the next bootstrap does: the tag search now finds exactly the restored volume.
    assert find_volume(cloud.ec2, tags={"Name": "couch-data"}).volume_id == new_id
    assert out["replaced"] == [cloud.volume_id]
    assert any("hostagent bootstrap" in s for s in out["next_steps"])
    assert any(f"detach-volume --volume-id {cloud.volume_id}" in s for s in out["next_steps"])


def test_second_restore_reuses_the_volume_and_changes_nothing(cloud, capsys):
    snap = take_snapshot(cloud, capsys)
    config = cloud.config()
    assert restore(config, snap) == 0
    first = json.loads(capsys.readouterr().out)
    snapshot_of_state = volumes(cloud)
    assert restore(config, snap) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["volume_id"] == first["volume_id"]
    assert volumes(cloud).keys() == snapshot_of_state.keys()
    assert {s["name"]: s["status"] for s in second["steps"]}["create-volume"] == "skipped"
    assert volumes(cloud)[cloud.volume_id]["tags"] == snapshot_of_state[cloud.volume_id]["tags"]


def test_restore_after_a_crash_between_create_and_retag_finishes_the_job(cloud, capsys):
    snap = take_snapshot(cloud, capsys)
    aws = AWS()

    def crash(**kw):
        raise KeyboardInterrupt("killed after CreateVolume")

    aws.ec2.meta.events.register("before-send.ec2.CreateTags", crash)
    with pytest.raises(KeyboardInterrupt):
        run_restore(context(cloud.config()), args(snapshot_id=snap), aws=aws)
    made = [v for v in volumes(cloud).values() if v["tags"].get("hostagent:restored-from") == snap]
    assert len(made) == 1
    # Both volumes match the search now; the rerun must settle it without a second volume.
    assert restore(cloud.config(), snap) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["volume_id"] == made[0]["VolumeId"]
    assert len([v for v in volumes(cloud).values()
                if v["tags"].get("hostagent:restored-from") == snap]) == 1
    assert find_volume(cloud.ec2, tags={"Name": "couch-data"}).volume_id == out["volume_id"]


def test_restore_dry_run_changes_nothing(cloud, capsys):
    snap = take_snapshot(cloud, capsys)
    before = volumes(cloud)
    assert main(["--config", cloud.config(), "restore", snap, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "Dry run" in text and "CreateVolume" in text and f"retag {cloud.volume_id}" in text
    assert volumes(cloud) == before


def test_restore_into_this_instances_az_even_if_the_old_volume_is_elsewhere(aws, imds, tmp_path,
                                                                          capsys):
    cloud = make_cloud(imds, tmp_path, attach=False)
    snap = take_snapshot(cloud, capsys)
    # The host was replaced by one in another AZ: its IMDS says us-east-1b.
    imds(instance_id=cloud.instance_id, availability_zone="us-east-1b", region="us-east-1")
    assert restore(cloud.config(), snap) == 0
    new_id = json.loads(capsys.readouterr().out)["volume_id"]
    assert volumes(cloud)[new_id]["AvailabilityZone"] == "us-east-1b"


def test_config_by_volume_id_is_told_to_update_the_id(cloud, capsys):
    snap = take_snapshot(cloud, capsys)
    config = cloud.config(volume={"id": cloud.volume_id, "tags": {}})
    assert restore(config, snap) == 0
    out = json.loads(capsys.readouterr().out)
    assert any(f'volume.id = "{out["volume_id"]}"' in s for s in out["next_steps"])
    old_tags = volumes(cloud)[cloud.volume_id]["tags"]
    assert restore(config, snap) == 0  # found by id again: must not rename it twice
    capsys.readouterr()
    assert volumes(cloud)[cloud.volume_id]["tags"] == old_tags


@pytest.mark.parametrize("snap,code,words", [
    ("vol-0123", 2, "not an EBS snapshot id"),
    ("snap-0123456789abcdef0", 2, "not found"),
])
def test_bad_snapshot_ids_are_exit_2_and_change_nothing(cloud, capsys, snap, code, words):
    before = volumes(cloud)
    assert main(["--config", cloud.config(), "restore", snap]) == code
    assert words in capsys.readouterr().err
    assert volumes(cloud) == before


# ---------------------------------------------------------------- fetch-secrets

SECRET_PREFIX = "COUCHDB_PASSWORD="


@pytest.fixture
def bucket(aws):
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="gc-secrets")
    return s3


def secret_value() -> bytes:
    return f"{SECRET_PREFIX}{uuid.uuid4().hex}\nOTHER=x\n".encode()


def fetch(config, *extra):
    return main(["--config", config, "fetch-secrets", *extra])


def test_fetch_secrets_writes_0600_atomically_and_never_shows_the_content(
        cloud, bucket, capsys, caplog):
    body = secret_value()
    bucket.put_object(Bucket="gc-secrets", Key="prod/couch.env", Body=body)
    dest = os.path.join(cloud.tmp, "etc", "grand-central", "secrets.env")
    config = cloud.config(secrets={"source": "s3://gc-secrets/prod/couch.env", "dest": dest})
    caplog.set_level(logging.DEBUG)
    old_umask = os.umask(0)  # the file mode must not depend on the caller's umask
    try:
        assert fetch(config, "-vv") == 0
        assert fetch(config, "--json") == 0
    finally:
        os.umask(old_umask)
    out, err = capsys.readouterr()
    with open(dest, "rb") as f:
        assert f.read() == body
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(dest)).st_mode) == 0o700
    secret = body.split(b"=", 1)[1].split(b"\n")[0].decode()
    for where, text in (("stdout", out), ("stderr", err), ("log", caplog.text)):
        assert secret not in text, f"secret leaked to {where}"
    assert "written" in out and "unchanged" in out
    assert os.listdir(os.path.dirname(dest)) == ["secrets.env"], "no temp files left behind"


def test_fetch_secrets_is_idempotent_and_rewrites_only_on_change(cloud, bucket, capsys):
    bucket.put_object(Bucket="gc-secrets", Key="k", Body=secret_value())
    dest = os.path.join(cloud.tmp, "secrets.env")
    config = cloud.config(secrets={"source": "s3://gc-secrets/k", "dest": dest})

    def fetch_status():
        assert fetch(config, "--json") == 0
        return json.loads(capsys.readouterr().out)["secrets"][0]["status"]

    assert fetch_status() == "written"
    first = os.stat(dest)
    time.sleep(0.02)
    assert fetch_status() == "unchanged"
    second = os.stat(dest)
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    new = secret_value()
    bucket.put_object(Bucket="gc-secrets", Key="k", Body=new)
    os.chmod(dest, 0o644)  # someone loosened it: the rewrite is 0600 again
    assert fetch_status() == "written"
    with open(dest, "rb") as f:
        assert f.read() == new
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600


def test_fetch_secrets_if_configured_fetches_when_a_source_is_set(cloud, bucket, capsys):
    """What hostagent-secrets.service runs: with a source, exactly the plain command."""
    body = secret_value()
    bucket.put_object(Bucket="gc-secrets", Key="k", Body=body)
    dest = os.path.join(cloud.tmp, "grand-central", "secrets.env")
    config = cloud.config(secrets={"source": "s3://gc-secrets/k", "dest": dest})
    assert fetch(config, "--if-configured", "--json") == 0
    assert json.loads(capsys.readouterr().out)["secrets"][0]["status"] == "written"
    with open(dest, "rb") as f:
        assert f.read() == body
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600


def test_fetch_secrets_fixes_a_loose_mode_without_rewriting(cloud, bucket, capsys):
    body = secret_value()
    bucket.put_object(Bucket="gc-secrets", Key="k", Body=body)
    dest = os.path.join(cloud.tmp, "secrets.env")
    with open(dest, "wb") as f:
        f.write(body)
    os.chmod(dest, 0o644)
    config = cloud.config(secrets={"source": "s3://gc-secrets/k", "dest": dest})
    assert fetch(config) == 0
    assert "mode fixed" in capsys.readouterr().out
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600


@pytest.mark.parametrize("source,words", [
    ("s3://gc-secrets/missing.env", "key 'missing.env'"),
    ("s3://no-such-bucket/k", "bucket 'no-such-bucket'"),
])
def test_missing_object_is_exit_1_naming_bucket_and_key(cloud, bucket, capsys, source, words):
    dest = os.path.join(cloud.tmp, "secrets.env")
    config = cloud.config(secrets={"source": source, "dest": dest})
    assert fetch(config) == 1
    err = capsys.readouterr().err
    assert "not found" in err and words in err
    assert not os.path.exists(dest)


def test_no_source_configured_is_exit_2(cloud, capsys):
    assert fetch(cloud.config()) == 2
    assert "secrets.source is not set" in capsys.readouterr().err


def test_plan_keeps_type_iops_throughput_and_encryption_of_the_old_volume():
    """plan_restore is pure: plain DescribeSnapshots/DescribeVolumes dicts in, a plan out."""
    from datetime import datetime, timezone

    from hostagent.flows.restore import plan_restore

    snapshot = {"SnapshotId": "snap-0123456789abcdef0", "VolumeSize": 8, "Encrypted": False,
                "Tags": [{"Key": "Name", "Value": "couch-data-20240101T000000Z"},
                         {"Key": "hostagent:managed", "Value": "true"}]}
    old = {"VolumeId": "vol-0aaaaaaaaaaaaaaaa", "AvailabilityZone": "us-east-1b", "Size": 20,
           "VolumeType": "gp3", "Iops": 6000, "Throughput": 250, "Encrypted": True,
           "KmsKeyId": "arn:aws:kms:us-east-1:123456789012:key/abc",
           "Tags": [{"Key": "Name", "Value": "couch-data"}, {"Key": "app", "Value": "gc"},
                    {"Key": "aws:cloudformation:stack-name", "Value": "x"}]}
    plan = plan_restore(snapshot, availability_zone="us-east-1a", old_volumes=[old],
                        restored_volumes=[], search_tags={"Name": "couch-data", "app": "gc"},
                        now=datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc))
    assert plan.create_args == {
        "SnapshotId": "snap-0123456789abcdef0", "AvailabilityZone": "us-east-1a",
        "VolumeType": "gp3", "Size": 20, "Iops": 6000, "Throughput": 250, "Encrypted": True,
        "KmsKeyId": "arn:aws:kms:us-east-1:123456789012:key/abc"}
    assert plan.new_tags["Name"] == "couch-data" and plan.new_tags["app"] == "gc"
    assert not any(k.startswith("aws:") for k in plan.new_tags)
    [retag] = plan.retags
    assert retag.set_tags["Name"] == "couch-data-replaced-20240506"
    assert retag.set_tags["hostagent:replaced:app"] == "gc"
    assert retag.delete_tags == {"app": "gc"}


def test_restoring_the_same_snapshot_after_the_volume_went_live_makes_a_fresh_one(cloud, capsys):
    """Rolling back twice to one snapshot: the first restored volume has been attached and used
    since, so the second restore must not hand it back as if it were the snapshot's content."""
    snap = take_snapshot(cloud, capsys)
    config = cloud.config()
    assert restore(config, snap) == 0
    first = json.loads(capsys.readouterr().out)["volume_id"]
    # The runbook: detach the old volume, bootstrap attaches the restored one, CouchDB writes.
    cloud.ec2.detach_volume(VolumeId=cloud.volume_id, InstanceId=cloud.instance_id)
    cloud.ec2.attach_volume(VolumeId=first, InstanceId=cloud.instance_id, Device="/dev/xvdf")
    assert restore(config, snap) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["volume_id"] != first
    after = volumes(cloud)
    assert after[first]["State"] == "in-use", "the live volume is kept, never detached"
    assert after[first]["tags"]["hostagent:replaced-by"] == second["volume_id"]
    assert find_volume(cloud.ec2, tags={"Name": "couch-data"}).volume_id == second["volume_id"]


def test_a_restored_volume_used_then_detached_is_not_handed_back(cloud, capsys):
    """Bootstrap marks a restored volume in service; detached again later (state available),
    it still holds live data, so a repeated restore of that snapshot makes a fresh volume."""
    snap = take_snapshot(cloud, capsys)
    config = cloud.config()
    assert restore(config, snap) == 0
    first = json.loads(capsys.readouterr().out)["volume_id"]
    cloud.ec2.create_tags(Resources=[first], Tags=[{"Key": "hostagent:in-service",
                                                    "Value": "2026-11-25T00:00:00Z"}])
    assert volumes(cloud)[first]["State"] == "available"
    assert restore(config, snap) == 0
    second = json.loads(capsys.readouterr().out)["volume_id"]
    assert second != first
    assert find_volume(cloud.ec2, tags={"Name": "couch-data"}).volume_id == second


# ------------------------------------------------- EC2 as it is: KMS keys, eventual consistency

def encrypted_snapshot(cloud, capsys) -> tuple[str, str]:
    """A snapshot encrypted with a customer-managed key. moto's CreateSnapshot drops the volume's
    key, so the key comes from an in-region CopySnapshot with KmsKeyId, as AWS would list it."""
    key = boto3.client("kms", region_name="us-east-1").create_key()["KeyMetadata"]["Arn"]
    plain = take_snapshot(cloud, capsys)
    snap = cloud.ec2.copy_snapshot(SourceRegion="us-east-1", SourceSnapshotId=plain,
                                   Encrypted=True, KmsKeyId=key)["SnapshotId"]
    return snap, key


def test_restore_keeps_the_snapshots_encryption_and_customer_managed_key(cloud, capsys):
    snap, key = encrypted_snapshot(cloud, capsys)
    assert restore(cloud.config(), snap) == 0
    new = volumes(cloud)[json.loads(capsys.readouterr().out)["volume_id"]]
    assert new["Encrypted"] is True and new.get("KmsKeyId") == key


def test_restore_waits_for_a_new_volume_ec2_does_not_list_yet(cloud, capsys, monkeypatch):
    from hostagent.aws import errors
    from tests.support.aws_faults import NotVisibleYet

    monkeypatch.setattr(errors, "VISIBILITY_FIRST_DELAY", 0.05)
    snap = take_snapshot(cloud, capsys)
    aws = AWS()
    hide = NotVisibleYet(times=3).watch(aws.ec2, "CreateVolume", "VolumeId")
    hide.answer_not_found(aws.ec2, "DescribeVolumes", "InvalidVolume.NotFound")
    report = run_restore(context(cloud.config()), args(snapshot_id=snap), aws=aws)
    assert report.ok
    new_id = report.extra["volume_id"]
    assert hide.injected == [f"DescribeVolumes {new_id}"] * 3
    assert [s["status"] for s in report.items if s["name"] == "wait-available"] == ["done"]
    assert len([v for v in volumes(cloud).values()
                if v["tags"].get("hostagent:restored-from") == snap]) == 1


def test_create_volume_carries_a_client_token_so_a_retry_never_makes_two(cloud, capsys):
    """botocore fills CreateVolume's ClientToken once per call and resends it on every retry;
    EC2 then answers a retried CreateVolume with the volume the first try made."""
    snap = take_snapshot(cloud, capsys)
    aws = AWS()
    bodies = []
    aws.ec2.meta.events.register(
        "before-send.ec2.CreateVolume",
        lambda request, **kw: bodies.append(request.body.decode() if isinstance(
            request.body, bytes) else request.body))
    assert run_restore(context(cloud.config()), args(snapshot_id=snap), aws=aws).ok
    [body] = bodies
    assert "ClientToken=" in body


def test_a_denied_secrets_object_says_missing_or_not_allowed_with_both_fixes(cloud, bucket):
    """Without s3:ListBucket (the shipped policy grants only GetObject) S3 answers a missing key
    with 403 AccessDenied. moto answers 404 NoSuchKey, so the 403 is played by a hook."""
    from hostagent.errors import OperationError
    from hostagent.flows.secrets import run as run_fetch
    from tests.support.aws_faults import inject, s3_error

    dest = os.path.join(cloud.tmp, "secrets.env")
    config = cloud.config(secrets={"source": "s3://gc-secrets/prod/couch.env", "dest": dest})
    aws = AWS()
    calls = inject(aws.s3, "s3.GetObject", [s3_error(403, "AccessDenied", "Access Denied")])
    with pytest.raises(OperationError) as err:
        run_fetch(context(config), args(), aws=aws)
    assert calls == ["injected"]
    assert err.value.exit_code == 1
    assert "missing, or not allowed" in str(err.value)
    assert "bucket 'gc-secrets', key 'prod/couch.env'" in str(err.value)
    assert "aws s3 cp FILE s3://gc-secrets/prod/couch.env" in err.value.hint
    assert "grant s3:GetObject on arn:aws:s3:::gc-secrets/prod/couch.env" in err.value.hint
    assert not os.path.exists(dest)
