"""Customer-managed KMS keys: snapshot.copy_kms_key at load, the copy refusal, restore's key."""

from datetime import datetime, timezone

import pytest

from hostagent.aws.snapshots import copy_encryption
from hostagent.config import parse_config
from hostagent.errors import EXIT_USAGE, ConfigError
from hostagent.flows.restore import plan_restore
from hostagent.flows.snapshot import check_copy_encryption

KEY_WEST = "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
KEY_EAST = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def config(**snapshot):
    return parse_config({"volume": {"tags": {"Name": "couch-data"}}, "snapshot": snapshot})


@pytest.mark.parametrize("key", [
    KEY_WEST, "arn:aws:kms:us-west-2:111122223333:alias/couch-dr", "alias/aws/ebs",
    "alias/couch-dr", "1234abcd-12ab-34cd-56ef-1234567890ab",
    "mrk-1234abcd12ab34cd56ef1234567890ab",
])
def test_copy_kms_key_takes_what_copysnapshot_takes(key):
    assert config(copy_to_region="us-west-2", copy_kms_key=key).snapshot.copy_kms_key == key


@pytest.mark.parametrize("snapshot, words", [
    ({"copy_to_region": "us-west-2", "copy_kms_key": "my key"}, "is not a KMS key"),
    ({"copy_to_region": "us-west-2", "copy_kms_key": "arn:aws:kms:us-west-2:1:key/x"},
     "is not a KMS key"),
    ({"copy_kms_key": KEY_WEST}, "copy_to_region is not"),
    ({"copy_to_region": "us-west-2", "copy_kms_key": KEY_EAST}, "KMS keys are regional"),
    ({"copy_to_region": "us-west-2", "copy_kms_key": 7}, "copy_kms_key must be a string"),
])
def test_bad_copy_kms_keys_are_exit_2_naming_the_key(snapshot, words):
    with pytest.raises(ConfigError) as err:
        config(**snapshot)
    assert err.value.exit_code == EXIT_USAGE
    assert "copy_kms_key" in str(err.value) and words in str(err.value)


def test_copies_are_encrypted_under_the_configured_key():
    assert copy_encryption(KEY_WEST) == {"Encrypted": True, "KmsKeyId": KEY_WEST}
    assert copy_encryption("") == {}


def test_an_encrypted_volume_needs_a_copy_key_before_anything_is_copied():
    volume = {"VolumeId": "vol-0123456789abcdef0", "Encrypted": True, "KmsKeyId": KEY_EAST}
    with pytest.raises(ConfigError) as err:
        check_copy_encryption(config(copy_to_region="us-west-2"), volume)
    assert err.value.exit_code == EXIT_USAGE
    assert "re-encrypted under that region's default EBS key" in str(err.value)
    assert KEY_EAST in str(err.value) and 'copy_kms_key = "alias/aws/ebs"' in err.value.hint
    # Said explicitly, or not encrypted, or not copied: nothing to refuse.
    check_copy_encryption(config(copy_to_region="us-west-2", copy_kms_key=KEY_WEST), volume)
    check_copy_encryption(config(copy_to_region="us-west-2", copy_kms_key="alias/aws/ebs"),
                          volume)
    check_copy_encryption(config(copy_to_region="us-west-2"), {**volume, "Encrypted": False})
    check_copy_encryption(config(), volume)


def plan(snapshot, old=()):
    return plan_restore(snapshot, availability_zone="us-east-1a", old_volumes=list(old),
                        restored_volumes=[], search_tags={"Name": "couch-data"},
                        now=datetime(2024, 5, 6, tzinfo=timezone.utc))


def test_restore_keeps_the_snapshots_encryption_and_key():
    snapshot = {"SnapshotId": "snap-0123456789abcdef0", "VolumeSize": 8, "Encrypted": True,
                "KmsKeyId": KEY_EAST}
    old = {"VolumeId": "vol-0aaaaaaaaaaaaaaaa", "Size": 8, "VolumeType": "gp3",
           "Encrypted": True, "KmsKeyId": "arn:aws:kms:us-east-1:111122223333:key/other",
           "Tags": [{"Key": "Name", "Value": "couch-data"}]}
    for args in (plan(snapshot).create_args, plan(snapshot, [old]).create_args):
        assert args["Encrypted"] is True and args["KmsKeyId"] == KEY_EAST
    # Encrypted, key not listed (as moto answers): still encrypted, EC2 uses the snapshot's key.
    bare = plan({**snapshot, "KmsKeyId": None}).create_args
    assert bare["Encrypted"] is True and "KmsKeyId" not in bare
    plain = plan({**snapshot, "Encrypted": False, "KmsKeyId": None}).create_args
    assert "Encrypted" not in plain and "KmsKeyId" not in plain
