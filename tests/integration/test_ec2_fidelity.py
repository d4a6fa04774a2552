"""The EC2 fidelity layer (tests/support/ec2_fidelity.py) itself, through raw boto3 calls.

Other tests trust it to answer as EC2 does where moto is kinder; these prove each behaviour it
plays, and that everything it does not play reaches moto unchanged. No hostagent code here.
"""

from __future__ import annotations

import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ParamValidationError

REGION = "us-east-1"


@pytest.fixture
def ec2(fidelity):
    return boto3.client("ec2", region_name=REGION)


def launch(ec2, az="us-east-1a") -> str:
    return ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                             Placement={"AvailabilityZone": az})["Instances"][0]["InstanceId"]


def make_volume(ec2, az="us-east-1a", **kw) -> str:
    return ec2.create_volume(AvailabilityZone=az, Size=kw.pop("Size", 4), **kw)["VolumeId"]


def describe(ec2, vid) -> dict:
    return ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]


def attachments(ec2, vid) -> list[tuple[str, str]]:
    return sorted((a["InstanceId"], a["State"]) for a in describe(ec2, vid)["Attachments"])


def error_of(excinfo) -> tuple[int, str]:
    response = excinfo.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


def at(start: float, seconds: float) -> None:
    """Sleep until `seconds` after `start` (monotonic)."""
    time.sleep(max(0.0, start + seconds - time.monotonic()))


def test_other_services_and_regions_pass_through_untouched(fidelity):
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="fidelity-test")
    s3.put_object(Bucket="fidelity-test", Key="k", Body=b"x" * 3_000_000)
    assert s3.head_object(Bucket="fidelity-test", Key="k")["ContentLength"] == 3_000_000
    assert s3.get_object(Bucket="fidelity-test", Key="k")["Body"].read() == b"x" * 3_000_000
    ecs = boto3.client("ecs", region_name=REGION)
    ecs.create_cluster(clusterName="c")
    assert [c["clusterName"] for c in ecs.describe_clusters(clusters=["c"])["clusters"]] == ["c"]
    cw = boto3.client("cloudwatch", region_name=REGION)
    cw.put_metric_data(Namespace="t", MetricData=[{"MetricName": "m", "Value": 1.0}])
    assert [m["MetricName"] for m in cw.list_metrics(Namespace="t")["Metrics"]] == ["m"]
    assert fidelity.calls == []  # none of that was taken for EC2
    # The region travels in the Authorization header: a us-west-2 volume lands in us-west-2.
    west = boto3.client("ec2", region_name="us-west-2")
    vid = make_volume(west, az="us-west-2a")
    assert describe(west, vid)["AvailabilityZone"] == "us-west-2a"
    assert vid not in {v["VolumeId"] for v in boto3.client("ec2", region_name=REGION)
                       .describe_volumes()["Volumes"]}


def test_attach_of_a_volume_attached_elsewhere_is_volume_in_use(ec2):
    first, second = launch(ec2), launch(ec2)
    vid = make_volume(ec2)
    ec2.attach_volume(VolumeId=vid, InstanceId=first, Device="/dev/xvdf")
    with pytest.raises(ClientError) as err:
        ec2.attach_volume(VolumeId=vid, InstanceId=second, Device="/dev/xvdf")
    assert error_of(err) == (400, "VolumeInUse")
    with pytest.raises(ClientError) as again:  # and to the same instance twice
        ec2.attach_volume(VolumeId=vid, InstanceId=first, Device="/dev/xvdg")
    assert error_of(again) == (400, "VolumeInUse")
    assert attachments(ec2, vid) == [(first, "attached")]  # moto was never asked


def test_attach_across_zones_is_zone_mismatch(ec2):
    me = launch(ec2, "us-east-1a")
    vid = make_volume(ec2, az="us-east-1b")
    with pytest.raises(ClientError) as err:
        ec2.attach_volume(VolumeId=vid, InstanceId=me, Device="/dev/xvdf")
    assert error_of(err) == (400, "InvalidVolume.ZoneMismatch")
    assert vid in err.value.response["Error"]["Message"]
    assert describe(ec2, vid)["State"] == "available" and attachments(ec2, vid) == []


def test_held_volume_lingers_attached_then_detaching_then_is_free(ec2, fidelity):
    old, me = launch(ec2), launch(ec2)
    vid = make_volume(ec2)
    ec2.terminate_instances(InstanceIds=[old])
    start = time.monotonic()
    fidelity.hold(vid, old, seconds=1.0, detaching=1.0)
    assert describe(ec2, vid)["State"] == "in-use"
    assert attachments(ec2, vid) == [(old, "attached")]
    with pytest.raises(ClientError) as err:
        ec2.attach_volume(VolumeId=vid, InstanceId=me, Device="/dev/xvdf")
    assert error_of(err) == (400, "VolumeInUse")
    with pytest.raises(ClientError) as delete:
        ec2.delete_volume(VolumeId=vid)
    assert error_of(delete) == (400, "VolumeInUse")
    at(start, 1.4)
    assert attachments(ec2, vid) == [(old, "detaching")]
    assert describe(ec2, vid)["State"] == "in-use"
    with pytest.raises(ClientError):
        ec2.attach_volume(VolumeId=vid, InstanceId=me, Device="/dev/xvdf")
    at(start, 2.4)
    assert describe(ec2, vid)["State"] == "available" and attachments(ec2, vid) == []
    ec2.attach_volume(VolumeId=vid, InstanceId=me, Device="/dev/xvdf")
    assert attachments(ec2, vid) == [(me, "attached")]


def test_hold_until_released_and_detach_by_the_holder(ec2, fidelity):
    old = launch(ec2)
    vid, other = make_volume(ec2), make_volume(ec2)
    fidelity.hold(vid, old)
    fidelity.hold(other, old, device="/dev/xvdg")
    time.sleep(0.5)
    assert attachments(ec2, vid) == [(old, "attached")]
    fidelity.release_after(vid, 0, detaching=0.5)
    assert attachments(ec2, vid) == [(old, "detaching")]
    time.sleep(0.7)
    assert attachments(ec2, vid) == []
    fidelity.detaching_for(0.5)
    answer = ec2.detach_volume(VolumeId=other, InstanceId=old)
    assert answer["State"] == "detaching" and answer["Device"] == "/dev/xvdg"
    assert attachments(ec2, other) == [(old, "detaching")]
    time.sleep(0.7)
    assert describe(ec2, other)["State"] == "available"


def test_attaching_then_attached_and_detaching_then_available(ec2, fidelity):
    me = launch(ec2)
    vid = make_volume(ec2)
    fidelity.attaching_for(1.0)
    fidelity.detaching_for(1.0)
    answer = ec2.attach_volume(VolumeId=vid, InstanceId=me, Device="/dev/xvdf")
    assert answer["State"] == "attaching"
    start = time.monotonic()  # attaching until at most start + 1.0
    assert attachments(ec2, vid) == [(me, "attaching")]
    assert describe(ec2, vid)["State"] == "in-use"
    at(start, 1.2)
    assert attachments(ec2, vid) == [(me, "attached")]
    start = time.monotonic()
    ec2.detach_volume(VolumeId=vid)  # no InstanceId: EC2 detaches the only attachment (moto: 500)
    assert attachments(ec2, vid) == [(me, "detaching")]
    assert describe(ec2, vid)["State"] == "in-use"
    ec2.get_waiter("volume_available").wait(VolumeIds=[vid], WaiterConfig={"Delay": 0.3})
    assert time.monotonic() - start >= 0.9
    assert attachments(ec2, vid) == []


@pytest.mark.parametrize("made", ["volume", "snapshot", "copy"])
def test_new_ids_are_not_found_for_a_while(ec2, fidelity, made):
    me = launch(ec2)
    vid = make_volume(ec2)
    before = ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    fidelity.not_found_for(1.0)
    if made == "volume":
        new = make_volume(ec2)
        describe_new = lambda: ec2.describe_volumes(VolumeIds=[new])  # noqa: E731
        listed = lambda: {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}  # noqa: E731
        code = "InvalidVolume.NotFound"
    else:
        client = ec2
        if made == "snapshot":
            new = ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
        else:
            client = boto3.client("ec2", region_name="us-west-2")
            new = client.copy_snapshot(SourceRegion=REGION, SourceSnapshotId=before)["SnapshotId"]
        describe_new = lambda: client.describe_snapshots(SnapshotIds=[new])  # noqa: E731
        listed = lambda: {s["SnapshotId"] for s in  # noqa: E731
                          client.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
        code = "InvalidSnapshot.NotFound"
    start = time.monotonic()  # the id was made before this: visible again by start + 1.0
    with pytest.raises(ClientError) as err:
        describe_new()
    assert error_of(err) == (400, code) and new in err.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as tag:
        (client if made == "copy" else ec2).create_tags(
            Resources=[new], Tags=[{"Key": "k", "Value": "v"}])
    assert error_of(tag)[1] == code
    if made == "volume":
        with pytest.raises(ClientError) as attach:
            ec2.attach_volume(VolumeId=new, InstanceId=me, Device="/dev/xvdf")
        assert error_of(attach)[1] == code
    assert new not in listed()
    ec2.describe_volumes(VolumeIds=[vid])  # ids made before stay visible
    ec2.describe_snapshots(SnapshotIds=[before])
    at(start, 1.1)
    describe_new()
    assert new in listed()


def test_not_found_for_a_number_of_calls(ec2, fidelity):
    vid = make_volume(ec2)
    fidelity.not_found_for(calls=2)
    new = ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    for _ in range(2):
        with pytest.raises(ClientError):
            ec2.describe_snapshots(SnapshotIds=[new])
    assert ec2.describe_snapshots(SnapshotIds=[new])["Snapshots"][0]["SnapshotId"] == new
    assert fidelity.count("DescribeSnapshots", 400) == 2


def test_new_snapshots_are_pending_with_rising_progress(ec2, fidelity):
    vid = make_volume(ec2)
    done = ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    fidelity.snapshots_pending_for(2.0)
    created = ec2.create_snapshot(VolumeId=vid)
    assert (created["State"], created.get("Progress", "")) == ("pending", "")
    sid, seen = created["SnapshotId"], []
    start = time.monotonic()
    while time.monotonic() - start < 2.6:
        snap = ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]
        seen.append((snap["State"], int(snap["Progress"].rstrip("%"))))
        time.sleep(0.25)
    assert seen[0][0] == "pending" and seen[0][1] < 30
    assert seen[-1] == ("completed", 100)
    assert [p for _, p in seen] == sorted(p for _, p in seen)
    assert {s for s, _ in seen} == {"pending", "completed"}
    assert any(s == "pending" and 30 <= p < 100 for s, p in seen)
    assert ec2.describe_snapshots(SnapshotIds=[done])["Snapshots"][0]["State"] == "completed"

    fidelity.snapshots_pending_for(5.0)
    later = ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    by_state = lambda state: {s["SnapshotId"] for s in ec2.describe_snapshots(  # noqa: E731
        OwnerIds=["self"], Filters=[{"Name": "status", "Values": [state]}])["Snapshots"]}
    assert later in by_state("pending") and later not in by_state("completed")
    assert {done, sid} <= by_state("completed")


def test_multi_attach_volume_keeps_several_attachments(ec2):
    one, two, three = launch(ec2), launch(ec2), launch(ec2)
    vid = make_volume(ec2, VolumeType="io2", Iops=100, MultiAttachEnabled=True)
    plain = make_volume(ec2, VolumeType="io2", Iops=100)
    roots = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]} - {vid, plain}
    assert describe(ec2, vid)["MultiAttachEnabled"] is True
    ec2.attach_volume(VolumeId=vid, InstanceId=one, Device="/dev/xvdf")
    second = ec2.attach_volume(VolumeId=vid, InstanceId=two, Device="/dev/xvdf")
    assert second["State"] == "attaching"
    assert attachments(ec2, vid) == sorted([(one, "attached"), (two, "attached")])
    with pytest.raises(ClientError) as twice:
        ec2.attach_volume(VolumeId=vid, InstanceId=two, Device="/dev/xvdg")
    assert error_of(twice) == (400, "VolumeInUse")
    ec2.attach_volume(VolumeId=plain, InstanceId=one, Device="/dev/xvdg")
    with pytest.raises(ClientError) as single:
        ec2.attach_volume(VolumeId=plain, InstanceId=two, Device="/dev/xvdg")
    assert error_of(single) == (400, "VolumeInUse")
    found = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [two]}])
    assert {v["VolumeId"] for v in found["Volumes"]} - roots == {vid}
    ec2.detach_volume(VolumeId=vid, InstanceId=one)
    assert attachments(ec2, vid) == [(two, "attached")] and describe(ec2, vid)["State"] == "in-use"
    ec2.attach_volume(VolumeId=vid, InstanceId=three, Device="/dev/xvdf")
    ec2.detach_volume(VolumeId=vid, InstanceId=two)
    ec2.detach_volume(VolumeId=vid, InstanceId=three)
    assert attachments(ec2, vid) == [] and describe(ec2, vid)["State"] == "available"


def test_filters_see_the_played_states(ec2, fidelity):
    old = launch(ec2)
    held, free = make_volume(ec2), make_volume(ec2)
    fidelity.hold(held, old)

    def ids(name, value):
        return {v["VolumeId"] for v in ec2.describe_volumes(
            Filters=[{"Name": name, "Values": [value]}])["Volumes"]}

    ours = {held, free}  # moto's instances have root volumes too
    assert ids("attachment.instance-id", old) & ours == {held}
    assert ids("attachment.status", "attached") & ours == {held}
    assert ids("status", "in-use") & ours == {held}
    assert ids("status", "available") & ours == {free}
    bigger = make_volume(ec2, Size=5)
    fidelity.hold(bigger, old, device="/dev/xvdg")
    both = ec2.describe_volumes(Filters=[{"Name": "status", "Values": ["in-use"]},
                                         {"Name": "size", "Values": ["4"]}])["Volumes"]
    assert {v["VolumeId"] for v in both} & {held, bigger} == {held}  # moto's filter still applies


def test_throttled_calls_answer_503_and_botocore_retries(ec2, fidelity):
    vid = make_volume(ec2)
    fidelity.throttle("DescribeVolumes", 3)
    patient = boto3.client("ec2", region_name=REGION,
                           config=Config(retries={"mode": "standard", "total_max_attempts": 5}))
    answer = patient.describe_volumes(VolumeIds=[vid])
    assert answer["ResponseMetadata"]["RetryAttempts"] == 3
    assert fidelity.count("DescribeVolumes", 503) == 3
    assert fidelity.count("DescribeVolumes", 200) == 1
    impatient = boto3.client("ec2", region_name=REGION,
                             config=Config(retries={"mode": "standard", "total_max_attempts": 2}))
    fidelity.throttle("DescribeSnapshots", 2)
    with pytest.raises(ClientError) as err:
        impatient.describe_snapshots(OwnerIds=["self"])
    assert error_of(err) == (503, "RequestLimitExceeded")


def test_create_volume_client_token_is_idempotent(ec2):
    first = ec2.create_volume(AvailabilityZone="us-east-1a", Size=4, ClientToken="t-1")
    again = ec2.create_volume(AvailabilityZone="us-east-1a", Size=4, ClientToken="t-1")
    assert again["VolumeId"] == first["VolumeId"]
    assert len(ec2.describe_volumes()["Volumes"]) == 1
    with pytest.raises(ClientError) as err:
        ec2.create_volume(AvailabilityZone="us-east-1a", Size=8, ClientToken="t-1")
    assert error_of(err) == (400, "IdempotentParameterMismatch")


def test_create_snapshot_has_no_client_token_to_play(ec2):
    """Not played: EC2's CreateSnapshot takes no ClientToken (botocore refuses the parameter)."""
    with pytest.raises(ParamValidationError):
        ec2.create_snapshot(VolumeId="vol-0123456789abcdef0", ClientToken="t")


def test_raw_moto_shrinks_and_modifies_without_limit(aws):
    """What the layer is for: moto alone accepts a smaller size and back-to-back modifications."""
    raw = boto3.client("ec2", region_name=REGION)
    vid = make_volume(raw, Size=4)
    raw.modify_volume(VolumeId=vid, Size=2)
    raw.modify_volume(VolumeId=vid, Size=8)
    assert describe(raw, vid)["Size"] == 8


def test_modify_volume_refuses_a_shrink_and_a_second_modification(ec2, fidelity):
    vid = make_volume(ec2, Size=4)
    with pytest.raises(ClientError) as shrink:
        ec2.modify_volume(VolumeId=vid, Size=2)
    assert error_of(shrink) == (400, "InvalidParameterValue")
    assert ec2.modify_volume(VolumeId=vid, Size=6)["VolumeModification"]["TargetSize"] == 6
    with pytest.raises(ClientError) as again:
        ec2.modify_volume(VolumeId=vid, Size=8)
    assert error_of(again) == (400, "VolumeModificationRateExceeded")
    assert describe(ec2, vid)["Size"] == 6
    fidelity.modification_cooldown(0)
    ec2.modify_volume(VolumeId=vid, Size=8)
    assert describe(ec2, vid)["Size"] == 8


def test_modification_is_modifying_then_optimizing_then_completed(ec2, fidelity):
    grown = []
    fidelity.modifying_for(0.6, 0.6)
    fidelity.on_volume_grown(lambda vid, size: grown.append((vid, size, time.monotonic())))
    vid = make_volume(ec2, Size=4)
    start = time.monotonic()
    answer = ec2.modify_volume(VolumeId=vid, Size=6)["VolumeModification"]
    assert answer["ModificationState"] == "modifying" and grown == []

    def state():
        [mod] = ec2.describe_volumes_modifications(VolumeIds=[vid])["VolumesModifications"]
        return mod["ModificationState"]

    assert state() == "modifying"
    at(start, 0.8)
    assert state() == "optimizing"
    assert [(v, s) for v, s, _ in grown] == [(vid, 6)] and grown[0][2] - start >= 0.55
    at(start, 1.4)
    assert state() == "completed"


def test_volume_grows_before_modify_volume_answers_without_a_window(ec2, fidelity):
    grown = []
    fidelity.on_volume_grown(lambda vid, size: grown.append((vid, size)))
    vid = make_volume(ec2, Size=4)
    ec2.modify_volume(VolumeId=vid, Size=5)
    assert grown == [(vid, 5)]
