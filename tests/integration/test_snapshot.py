"""snapshot / snapshots / prune against a real moto server over HTTP (boto3, AWS_ENDPOINT_URL).

These tests use freeze = false (crash-consistent); the freeze itself is proven on a real ext4
loop mount in test_freeze.py. Hooks on the boto3 client (botocore events) count calls, shrink
pages and inject failures; nothing in hostagent has a test seam.
"""

from __future__ import annotations

import io
import json
import time
from datetime import datetime, timezone

import pytest

from hostagent.aws.clients import AWS
from hostagent.aws.errors import AWSError
from hostagent.aws.snapshots import snapshot_tags
from hostagent.cli import main
from hostagent.flows.snapshot import run_prune, run_snapshot
from tests.support.cloud import args, context, error_response, make_cloud
from tests.support.moto_paging import paginated_snapshots

# moto stores StartTime to the second: runs one second apart keep the order unambiguous.
TICK = 1.05


@pytest.fixture
def cloud(aws, imds, tmp_path):
    return make_cloud(imds, tmp_path)


def body_of(request) -> str:
    body = request.body or ""
    return body.decode() if isinstance(body, bytes) else str(body)


def snapshot_cli(config, *extra):
    return main(["--config", config, "snapshot", "--json", *extra])


def our_ids(cloud, region="us-east-1"):
    return {s["SnapshotId"] for s in cloud.snapshots(region)
            if {"Key": "hostagent:volume-id", "Value": cloud.volume_id} in s.get("Tags", [])}


def make_foreign_snapshots(cloud):
    """A person's snapshot, a DLM-like one, and one with our marker for another volume."""
    ec2 = cloud.ec2
    by_hand = ec2.create_snapshot(VolumeId=cloud.volume_id, Description="before the upgrade",
                                  TagSpecifications=[{"ResourceType": "snapshot", "Tags": [
                                      {"Key": "Name", "Value": "couch-data-manual"}]}])
    # aws:dlm:* keys cannot be set by users; a DLM-style tag without our marker stands in.
    dlm = ec2.create_snapshot(VolumeId=cloud.volume_id, TagSpecifications=[
        {"ResourceType": "snapshot", "Tags": [{"Key": "dlm:managed", "Value": "true"}]}])
    other = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    tags = snapshot_tags(other, {"Name": "other"}, "crash", datetime.now(timezone.utc))
    other_snap = ec2.create_snapshot(VolumeId=other, TagSpecifications=[
        {"ResourceType": "snapshot", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
    return {by_hand["SnapshotId"], dlm["SnapshotId"], other_snap["SnapshotId"]}


def test_five_runs_keep_the_newest_three_and_spare_everyone_elses(cloud, capsys):
    foreign = make_foreign_snapshots(cloud)
    config = cloud.config(snapshot={"keep_last": 3})
    made = []
    for _ in range(5):
        time.sleep(TICK)
        assert snapshot_cli(config) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["ok"] is True
        assert [s["name"] for s in out["steps"]] == ["snapshot", "prune"]
        assert all(s["status"] == "done" for s in out["steps"])
        made.append(out["snapshot_id"])
    remaining = {s["SnapshotId"] for s in cloud.snapshots()}
    assert our_ids(cloud) == set(made[-3:])
    assert foreign <= remaining, "a snapshot hostagent did not make was deleted"
    assert remaining == foreign | set(made[-3:])


def test_snapshot_tags_carry_marker_volume_name_consistency_and_user_tags(cloud, capsys):
    assert snapshot_cli(cloud.config()) == 0
    snap_id = json.loads(capsys.readouterr().out)["snapshot_id"]
    tags = cloud.snapshot_tags(snap_id)
    assert tags["hostagent:managed"] == "true"
    assert tags["hostagent:volume-id"] == cloud.volume_id
    assert tags["hostagent:consistency"] == "crash"
    assert tags["Name"].startswith("couch-data-") and tags["Name"].endswith("Z")
    assert tags["app"] == "grand-central" and tags["team"] == "db"
    assert not any(k.startswith("aws:") for k in tags)


def test_tags_are_set_in_the_create_call_itself(cloud):
    """No window in which the snapshot exists untagged: one CreateSnapshot, no CreateTags."""
    aws = AWS()
    calls = []
    aws.ec2.meta.events.register("before-send.ec2.*",
                                 lambda request, **kw: calls.append(body_of(request)))
    report = run_snapshot(context(cloud.config()), args(no_prune=True), aws=aws)
    assert report.ok
    actions = [b.split("Action=")[1].split("&")[0] for b in calls]
    assert actions.count("CreateSnapshot") == 1 and "CreateTags" not in actions
    create = next(b for b in calls if "Action=CreateSnapshot" in b)
    assert "hostagent%3Amanaged" in create


def test_snapshots_lists_ours_newest_first_as_json_and_table(cloud, capsys):
    foreign = make_foreign_snapshots(cloud)
    config = cloud.config(snapshot={"keep_last": 5})
    made = []
    for _ in range(2):
        time.sleep(TICK)
        assert snapshot_cli(config) == 0
        made.append(json.loads(capsys.readouterr().out)["snapshot_id"])
    assert main(["--config", config, "snapshots", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True
    assert [s["id"] for s in out["snapshots"]] == list(reversed(made))
    assert set(out["snapshots"][0]) >= {"id", "start_time", "state", "progress", "tags"}
    assert not foreign & {s["id"] for s in out["snapshots"]}
    assert main(["--config", config, "snapshots"]) == 0
    table = capsys.readouterr().out
    assert table.index(made[1]) < table.index(made[0])
    assert "SNAPSHOT" in table and "crash" in table


def test_prune_dry_run_lists_what_would_go_and_deletes_nothing(cloud, capsys):
    config = cloud.config(snapshot={"keep_last": 5})
    for _ in range(4):
        time.sleep(TICK)
        assert snapshot_cli(config) == 0
    capsys.readouterr()
    before = our_ids(cloud)
    strict = cloud.config(snapshot={"keep_last": 1}, name="strict.toml")
    assert main(["--config", strict, "prune", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] is True and len(out["deleted"]) == 3 and len(out["kept"]) == 1
    assert our_ids(cloud) == before
    assert main(["--config", strict, "prune", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["deleted"]) == 3
    assert our_ids(cloud) == {k["id"] for k in out["kept"]}


def seed_our_snapshots(cloud, n):
    """n snapshots carrying our tags (moto sets StartTime itself, to the second)."""
    ids = []
    for _ in range(n):
        tags = snapshot_tags(cloud.volume_id, cloud.volume_tags, "crash", datetime.now(timezone.utc))
        ids.append(cloud.ec2.create_snapshot(VolumeId=cloud.volume_id, TagSpecifications=[
            {"ResourceType": "snapshot", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ])["SnapshotId"])
    return ids


def test_listing_follows_every_page(cloud):
    seed_our_snapshots(cloud, 12)
    aws = AWS()
    pages = []
    aws.ec2.meta.events.register("provide-client-params.ec2.DescribeSnapshots",
                                 lambda params, **kw: params.update(MaxResults=5))
    aws.ec2.meta.events.register("before-send.ec2.DescribeSnapshots",
                                 lambda request, **kw: pages.append(1))
    with paginated_snapshots():
        report = run_prune(context(cloud.config(snapshot={"keep_last": 3})), args(dry_run=True),
                           aws=aws)
    assert len(pages) == 3  # 5 + 5 + 2
    assert len(report.items) + len(report.extra["kept"]) == 12
    assert len(report.items) == 9


def test_a_failed_page_means_nothing_is_deleted_and_exit_1(cloud):
    ids = seed_our_snapshots(cloud, 12)
    aws = AWS(max_attempts=1)  # the failure must reach hostagent, not be retried away
    deletes = []
    aws.ec2.meta.events.register("provide-client-params.ec2.DescribeSnapshots",
                                 lambda params, **kw: params.update(MaxResults=5))

    def fail_second_page(request, **kw):
        if "NextToken" in body_of(request):
            return error_response(500, "InternalError")

    aws.ec2.meta.events.register("before-send.ec2.DescribeSnapshots", fail_second_page)
    aws.ec2.meta.events.register("before-send.ec2.DeleteSnapshot",
                                 lambda request, **kw: deletes.append(1))
    with paginated_snapshots(), pytest.raises(AWSError) as info:
        run_prune(context(cloud.config(snapshot={"keep_last": 1})), args(), aws=aws)
    assert info.value.exit_code == 1
    assert "listing incomplete" in str(info.value) and "InternalError" in str(info.value)
    assert "nothing was deleted" in info.value.hint
    assert deletes == []
    assert our_ids(cloud) == set(ids)


def test_snapshot_in_use_by_an_ami_is_skipped_with_a_warning(cloud, caplog):
    ec2 = cloud.ec2
    seed_our_snapshots(cloud, 2)
    # register_image makes moto create (and hold) a snapshot for the AMI; give it our tags.
    base = ec2.create_snapshot(VolumeId=cloud.volume_id)["SnapshotId"]
    ec2.register_image(Name="couch-ami", RootDeviceName="/dev/xvda", BlockDeviceMappings=[
        {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": base}}])
    held = next(s["SnapshotId"] for s in cloud.snapshots()
                if "Auto-created snapshot for AMI" in s.get("Description", ""))
    time.sleep(TICK)
    ours = snapshot_tags(cloud.volume_id, cloud.volume_tags, "crash",
                         datetime(2020, 1, 1, tzinfo=timezone.utc))
    ec2.create_tags(Resources=[held], Tags=[{"Key": k, "Value": v} for k, v in ours.items()])
    time.sleep(TICK)
    newest = seed_our_snapshots(cloud, 1)
    report = run_prune(context(cloud.config(snapshot={"keep_last": 1})), args(), aws=AWS())
    assert report.ok
    assert [s["id"] for s in report.extra["skipped"]] == [held]
    assert held in our_ids(cloud) and newest[0] in our_ids(cloud)
    assert len(report.items) == 2
    assert "in use by an AMI" in caplog.text


def test_wait_shows_progress_plain_when_not_a_tty(cloud):
    stream = io.StringIO()
    report = run_snapshot(context(cloud.config()), args(wait=True, no_prune=True), aws=AWS(),
                          progress_stream=stream)
    assert report.ok
    lines = stream.getvalue().splitlines()
    assert lines and lines[-1].startswith(report.extra["snapshot_id"] + ": completed 100%")
    assert "\r" not in stream.getvalue()


def test_wait_rewrites_one_line_on_a_tty(cloud):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    report = run_snapshot(context(cloud.config()), args(wait=True, no_prune=True), aws=AWS(),
                          progress_stream=stream)
    assert report.ok
    assert stream.getvalue().startswith("\r\033[K") and "completed 100%" in stream.getvalue()


def test_copy_to_region_copies_with_tags_and_applies_retention_there(cloud, capsys):
    config = cloud.config(snapshot={"keep_last": 2, "copy_to_region": "us-west-2"})
    made = []
    for _ in range(4):
        time.sleep(TICK)
        assert snapshot_cli(config) == 0
        made.append(json.loads(capsys.readouterr().out)["snapshot_id"])
    assert our_ids(cloud) == set(made[-2:])
    copies = [s for s in cloud.snapshots("us-west-2")]
    sources = {}
    for c in copies:
        tags = {t["Key"]: t["Value"] for t in c["Tags"]}
        assert tags["hostagent:managed"] == "true" and tags["hostagent:volume-id"] == cloud.volume_id
        assert tags["app"] == "grand-central" and tags["hostagent:source-region"] == "us-east-1"
        sources[tags["hostagent:source-snapshot"]] = c["SnapshotId"]
    assert set(sources) == set(made[-2:])


def test_no_prune_leaves_old_snapshots(cloud, capsys):
    config = cloud.config(snapshot={"keep_last": 1})
    for _ in range(3):
        time.sleep(TICK)
        assert snapshot_cli(config, "--no-prune") == 0
    assert len(our_ids(cloud)) == 3


def test_dry_run_creates_nothing_and_shows_the_plan(cloud, capsys):
    assert snapshot_cli(cloud.config(), "--dry-run") == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["status"] for s in out["steps"]] == ["planned", "planned"]
    assert out["snapshot_id"] is None
    assert our_ids(cloud) == set()


def test_volume_by_id_works_like_tags(cloud, capsys):
    config = cloud.config(volume={"id": cloud.volume_id, "tags": {}})
    assert snapshot_cli(config) == 0
    assert our_ids(cloud) == {json.loads(capsys.readouterr().out)["snapshot_id"]}


def test_device_only_config_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('[volume]\ndevice = "/dev/loop9"\n')
    assert main(["--config", str(path), "snapshot"]) == 2
    assert "snapshots need an EBS volume" in capsys.readouterr().err
