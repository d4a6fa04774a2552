"""Find, check and attach the volume against a real moto server over HTTP, as bootstrap does.

The instance is a real moto instance (run_instances), and the IMDSv2 test server serves its id, so
hostagent learns who it is the way it does on EC2. moto attaches volumes that AWS would refuse
(attached elsewhere, other zone); these tests prove hostagent refuses them itself, before any call
that changes anything. Throttling and access-denied answers are injected with a botocore
before-send hook (tests/support/aws_faults.py); every other call reaches moto.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from hostagent.aws.clients import AWS
from hostagent.aws.errors import AWSError
from hostagent.aws.volume import (ATTACHED_HERE, FORMATTED_TAG, attach_volume, decide_attach,
                                  find_volume, is_formatted, tag_formatted)
from hostagent.errors import EXIT_FAILED, EXIT_REFUSED, OperationError, RefusedError
from tests.support.aws_faults import ec2_error, inject

TAGS = {"Name": "grand-central-persistence"}


@pytest.fixture
def host(aws, imds):
    """(AWS, ec2 client) for a moto instance in us-east-1a whose id the IMDS server serves."""
    setup = AWS().ec2
    iid = launch(setup, "us-east-1a")
    imds(instance_id=iid, region="us-east-1", availability_zone="us-east-1a")
    hostagent_aws = AWS()
    assert hostagent_aws.identity.instance_id == iid
    return hostagent_aws, setup


def launch(ec2, az):
    answer = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                               Placement={"AvailabilityZone": az})
    return answer["Instances"][0]["InstanceId"]


def make_volume(ec2, az="us-east-1a", tags=TAGS):
    spec = [{"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
    return ec2.create_volume(AvailabilityZone=az, Size=1, TagSpecifications=spec)["VolumeId"]


def attachments(ec2, volume_id):
    vol = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    return [(a["InstanceId"], a["Device"], a["State"]) for a in vol.get("Attachments", [])]


def count_attaches(ec2):
    return inject(ec2, "ec2.AttachVolume", [])


def test_find_by_tags_by_id_and_by_both(host):
    aws, setup = host
    vid = make_volume(setup)
    make_volume(setup, tags={"Name": "something-else"})
    assert find_volume(aws.ec2, tags=TAGS).volume_id == vid
    by_id = find_volume(aws.ec2, volume_id=vid)
    assert (by_id.volume_id, by_id.availability_zone, by_id.state, by_id.size_gib) == \
        (vid, "us-east-1a", "available", 1)
    assert dict(by_id.tags) == TAGS
    assert find_volume(aws.ec2, volume_id=vid, tags=TAGS).volume_id == vid
    with pytest.raises(OperationError):  # id right, tags wrong: not the volume we want
        find_volume(aws.ec2, volume_id=vid, tags={"Name": "something-else"})


def test_not_found_says_what_was_searched(host):
    aws, setup = host
    make_volume(setup, tags={"Name": "other"})
    with pytest.raises(OperationError) as err:
        find_volume(aws.ec2, tags=TAGS)
    assert str(err.value) == "no EBS volume with tags Name=grand-central-persistence (us-east-1)"
    assert err.value.exit_code == EXIT_FAILED
    with pytest.raises(OperationError, match="no EBS volume with id vol-0123456789abcdef0"):
        find_volume(aws.ec2, volume_id="vol-0123456789abcdef0")  # AWS: InvalidVolume.NotFound


def test_wildcards_in_tag_values_match_only_exactly(host):
    """EC2 filter values treat ? and * as wildcards; a config value must match literally."""
    aws, setup = host
    make_volume(setup, tags={"Name": "db-1"})
    with pytest.raises(OperationError, match="no EBS volume with tags Name=db-\\?"):
        find_volume(aws.ec2, tags={"Name": "db-?"})


def test_two_matches_are_refused_listing_both(host):
    aws, setup = host
    other = launch(setup, "us-east-1b")
    first = make_volume(setup)
    second = make_volume(setup, az="us-east-1b")
    setup.attach_volume(VolumeId=second, InstanceId=other, Device="/dev/sdf")
    with pytest.raises(RefusedError) as err:
        find_volume(aws.ec2, tags=TAGS)
    text = str(err.value)
    assert err.value.exit_code == EXIT_REFUSED
    assert text.startswith("2 EBS volumes match tags Name=grand-central-persistence: ")
    assert f"{first} (us-east-1a, available)" in text
    assert f"{second} (us-east-1b, in-use, attached to {other} as /dev/sdf)" in text
    assert "refusing to guess" in text


def test_attach_attaches_to_this_instance_and_is_idempotent(host):
    aws, setup = host
    vid = make_volume(setup)
    me = aws.identity
    volume = find_volume(aws.ec2, tags=TAGS)
    calls = count_attaches(aws.ec2)
    info = attach_volume(aws.ec2, me, volume, "/dev/xvdf", timeout=30)
    assert info.attachment_of(me.instance_id).state == "attached"
    assert attachments(setup, vid) == [(me.instance_id, "/dev/xvdf", "attached")]
    assert decide_attach(me, find_volume(aws.ec2, tags=TAGS)) == ATTACHED_HERE
    again = attach_volume(aws.ec2, me, volume, "/dev/xvdf", timeout=30)  # stale info: rechecked
    assert again.attachment_of(me.instance_id).state == "attached"
    assert calls == ["sent"]  # one AttachVolume, none on the second run


def test_volume_attached_elsewhere_is_refused_and_left_alone(host):
    aws, setup = host
    other = launch(setup, "us-east-1a")
    vid = make_volume(setup)
    setup.attach_volume(VolumeId=vid, InstanceId=other, Device="/dev/sdg")
    before = attachments(setup, vid)
    calls = count_attaches(aws.ec2)
    volume = find_volume(aws.ec2, tags=TAGS)
    with pytest.raises(RefusedError) as err:
        decide_attach(aws.identity, volume)
    assert f"attached to another instance: {other} (attached)" in str(err.value)
    with pytest.raises(RefusedError):
        attach_volume(aws.ec2, aws.identity, volume, "/dev/xvdf", timeout=5)
    assert calls == []  # moto would have attached it; we never asked
    assert attachments(setup, vid) == before == [(other, "/dev/sdg", "attached")]


def test_volume_in_another_zone_is_not_attached(host):
    aws, setup = host
    vid = make_volume(setup, az="us-east-1b")
    calls = count_attaches(aws.ec2)
    volume = find_volume(aws.ec2, volume_id=vid)
    with pytest.raises(OperationError) as err:
        attach_volume(aws.ec2, aws.identity, volume, "/dev/xvdf", timeout=5)
    assert err.value.exit_code == EXIT_FAILED
    assert "us-east-1b" in str(err.value) and "us-east-1a" in str(err.value)
    assert "hostagent restore" in err.value.hint
    assert calls == [] and attachments(setup, vid) == []


def test_volume_in_use_answer_is_a_refusal(host):
    """AWS's own VolumeInUse (a race we could not see) is exit 3 too, not a plain failure."""
    aws, setup = host
    make_volume(setup)
    inject(aws.ec2, "ec2.AttachVolume", [ec2_error(400, "VolumeInUse", "vol is already attached")])
    with pytest.raises(RefusedError, match="AWS said VolumeInUse"):
        attach_volume(aws.ec2, aws.identity, find_volume(aws.ec2, tags=TAGS), "/dev/xvdf",
                      timeout=5)


def test_tag_formatted_writes_utc_iso_time(host):
    aws, setup = host
    vid = make_volume(setup)
    when = datetime(2026, 3, 4, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))
    tag_formatted(aws.ec2, vid, when)
    info = find_volume(aws.ec2, volume_id=vid)
    assert info.tags[FORMATTED_TAG] == "2026-03-04T05:08:09Z"
    assert is_formatted(info) and info.tags["Name"] == TAGS["Name"]
    with pytest.raises(ValueError):
        tag_formatted(aws.ec2, vid, datetime(2026, 1, 1))


def test_throttled_describe_is_retried_and_succeeds(host):
    aws, setup = host
    vid = make_volume(setup)
    calls = inject(aws.ec2, "ec2.DescribeVolumes",
                   [ec2_error(503, "RequestLimitExceeded", "Request limit exceeded.")] * 2)
    assert find_volume(aws.ec2, tags=TAGS).volume_id == vid
    assert calls == ["injected", "injected", "sent"]


def test_access_denied_names_the_iam_action(host):
    aws, setup = host
    make_volume(setup)
    calls = inject(aws.ec2, "ec2.DescribeVolumes",
                   [ec2_error(403, "UnauthorizedOperation",
                              "You are not authorized to perform this operation.")])
    with pytest.raises(AWSError) as err:
        find_volume(aws.ec2, tags=TAGS)
    assert str(err.value) == ("not allowed to call ec2:DescribeVolumes (UnauthorizedOperation) "
                              "(us-east-1)")
    assert "iam/hostagent-policy.json" in err.value.hint
    assert calls == ["injected"]  # access denied is not retried
