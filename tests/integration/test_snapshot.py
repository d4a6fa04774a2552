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
from tests.support.aws_faults import NotVisibleYet, lose_answers
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


# ------------------------------------------------- EC2 as it is: eventual consistency, lost answers

@pytest.fixture
def quick_visibility(monkeypatch):
    """The NotFound window's backoff shortened (the window itself is unchanged)."""
    from hostagent.aws import errors

    monkeypatch.setattr(errors, "VISIBILITY_FIRST_DELAY", 0.05)
    monkeypatch.setattr(errors, "VISIBILITY_MAX_DELAY", 0.2)


def test_wait_treats_not_found_right_after_create_as_not_visible_yet(cloud, quick_visibility):
    """EC2 may answer InvalidSnapshot.NotFound for a snapshot it has just made; moto never does.
    Before: `snapshot --wait` exited 2 ("not found in this region") and skipped pruning."""
    seed_our_snapshots(cloud, 4)
    aws = AWS()
    hide = NotVisibleYet(times=3).watch(aws.ec2, "CreateSnapshot", "SnapshotId")
    hide.answer_not_found(aws.ec2, "DescribeSnapshots", "InvalidSnapshot.NotFound")
    report = run_snapshot(context(cloud.config(snapshot={"keep_last": 2})), args(wait=True),
                          aws=aws, progress_stream=io.StringIO())
    assert report.ok, report.text
    assert {s["name"]: s["status"] for s in report.items} == {
        "snapshot": "done", "wait": "done", "prune": "done"}
    new = report.extra["snapshot_id"]
    assert hide.injected == [f"DescribeSnapshots {new}"] * 3
    assert report.extra["deleted"] and new in our_ids(cloud)


def test_tagging_a_snapshot_just_made_waits_until_ec2_knows_it(cloud, quick_visibility):
    from hostagent.aws.snapshots import set_tags

    aws = AWS()
    hide = NotVisibleYet(times=2).watch(aws.ec2, "CreateSnapshot", "SnapshotId")
    hide.answer_not_found(aws.ec2, "CreateTags", "InvalidSnapshot.NotFound")
    snap = aws.ec2.create_snapshot(VolumeId=cloud.volume_id)["SnapshotId"]
    set_tags(aws.ec2, snap, {"hostagent:consistency": "crash"})
    assert len(hide.injected) == 2
    assert cloud.snapshot_tags(snap)["hostagent:consistency"] == "crash"


def test_a_lost_create_snapshot_answer_makes_one_snapshot_not_two(cloud, capsys):
    """EC2's CreateSnapshot has no ClientToken. The first try is carried out, its answer lost (a
    read timeout): botocore alone retries and makes a second snapshot. hostagent looks for its
    hostagent:request-id tag first and finds the one it made."""
    aws = AWS()
    sent = lose_answers(aws.ec2, "ec2.CreateSnapshot", times=1)
    report = run_snapshot(context(cloud.config()), args(no_prune=True), aws=aws)
    assert report.ok, report.text
    assert sent == ["lost"], "CreateSnapshot must not be sent again when the first one worked"
    assert our_ids(cloud) == {report.extra["snapshot_id"]}
    assert "hostagent:request-id" in cloud.snapshot_tags(report.extra["snapshot_id"])


def test_copy_waits_for_a_source_ec2_does_not_list_yet(cloud, quick_visibility):
    aws = AWS()
    dest = aws.client_for_region("ec2", "us-west-2")
    hide = NotVisibleYet(times=2).watch(aws.ec2, "CreateSnapshot", "SnapshotId")
    hide.answer_not_found(dest, "CopySnapshot", "InvalidSnapshot.NotFound")
    report = run_snapshot(context(cloud.config(snapshot={"copy_to_region": "us-west-2"})), args(),
                          aws=aws)
    assert report.ok, report.text
    assert hide.injected == [f"CopySnapshot {report.extra['snapshot_id']}"] * 2
    assert [c["SnapshotId"] for c in cloud.snapshots("us-west-2")] == report.extra["copies"]


def test_a_lost_copy_snapshot_answer_makes_one_copy_not_two(cloud):
    """CopySnapshot has no ClientToken either: the copy's hostagent:source-snapshot tag finds it."""
    aws = AWS()
    lost = lose_answers(aws.client_for_region("ec2", "us-west-2"), "ec2.CopySnapshot", times=1)
    report = run_snapshot(context(cloud.config(snapshot={"copy_to_region": "us-west-2"})), args(),
                          aws=aws)
    assert report.ok, report.text
    assert lost == ["lost"]
    copies = cloud.snapshots("us-west-2")
    assert len(copies) == 1 and [c["SnapshotId"] for c in copies] == report.extra["copies"]


KEY_WEST = "arn:aws:kms:us-west-2:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def test_copies_are_encrypted_with_copy_kms_key(cloud):
    aws = AWS()
    dest = aws.client_for_region("ec2", "us-west-2")
    copies = []
    dest.meta.events.register("before-send.ec2.CopySnapshot",
                              lambda request, **kw: copies.append(body_of(request)))
    config = cloud.config(snapshot={"copy_to_region": "us-west-2", "copy_kms_key": KEY_WEST})
    report = run_snapshot(context(config), args(), aws=aws)
    assert report.ok, report.text
    [body] = copies
    assert "Encrypted=true" in body and "KmsKeyId=arn%3Aaws%3Akms%3Aus-west-2" in body
    [copy] = cloud.snapshots("us-west-2")
    assert copy["Encrypted"] is True and copy["KmsKeyId"] == KEY_WEST


def test_an_encrypted_volume_is_not_copied_under_a_default_key_nobody_chose(cloud, capsys):
    """Without copy_kms_key EC2 would re-encrypt the copies under the destination's default EBS
    key, silently: refused at plan time (exit 2), before any snapshot is taken."""
    vol = cloud.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1, Encrypted=True)["VolumeId"]
    config = cloud.config(volume={"id": vol, "tags": {}},
                          snapshot={"copy_to_region": "us-west-2"})
    for extra in ((), ("--dry-run",)):
        assert snapshot_cli(config, *extra) == 2
        err = capsys.readouterr().err
        assert f"volume {vol} is encrypted" in err and "copy_kms_key" in err
    assert not [s for s in cloud.snapshots() if s["VolumeId"] == vol]
    assert cloud.snapshots("us-west-2") == []
    ok = cloud.config(volume={"id": vol, "tags": {}}, name="ok.toml",
                      snapshot={"copy_to_region": "us-west-2", "copy_kms_key": "alias/aws/ebs"})
    assert snapshot_cli(ok) == 0
