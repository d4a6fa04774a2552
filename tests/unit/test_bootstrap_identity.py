"""Which disk bootstrap may treat as the volume: pure decisions over plain data."""

from types import SimpleNamespace

from hostagent.aws.volume import Attachment, Identity, VolumeInfo
from hostagent.config import parse_config
from hostagent.flows.bootstrap import Bootstrap, identity_volume_id, requested_name

VOL = "vol-0123456789abcdef0"
ME = Identity("i-0aaaaaaaaaaaaaaaa", "us-east-1", "us-east-1a")


def disk(name, serial="", volume_id=None):
    return SimpleNamespace(name=name, path=f"/dev/{name}", serial=serial, volume_id=volume_id)


def boot(device, attached_as="/dev/sdf", explicit=""):
    volume = {"tags": {"Name": "x"}}
    if explicit:
        volume["device"] = explicit
    b = Bootstrap(config=parse_config({"volume": volume}), dry_run=False)
    b.identity = ME
    b.volume = VolumeInfo(VOL, "us-east-1a", "in-use", 10,
                          (Attachment(ME.instance_id, attached_as, "attached"),))
    b.device = device
    return b


def test_nitro_serial_proves_the_volume():
    assert identity_volume_id(boot(disk("nvme1n1", "vol0123456789abcdef0", VOL))) == VOL


def test_a_serial_of_another_kind_proves_nothing():
    assert identity_volume_id(boot(disk("nvme1n1", "QEMU1234"))) is None


def test_xen_disk_is_the_volume_only_under_the_name_ec2_reports_here():
    assert identity_volume_id(boot(disk("xvdf"), attached_as="/dev/sdf")) == VOL
    assert identity_volume_id(boot(disk("xvdf"), attached_as="/dev/xvdf")) == VOL
    # Attached as sdg; xvdf is some other disk: not proven.
    assert identity_volume_id(boot(disk("xvdf"), attached_as="/dev/sdg")) is None


def test_xen_attachment_to_another_instance_proves_nothing():
    b = boot(disk("xvdf"))
    b.volume = VolumeInfo(VOL, "us-east-1a", "in-use", 10,
                          (Attachment("i-0bbbbbbbbbbbbbbbb", "/dev/sdf", "attached"),))
    assert identity_volume_id(b) is None


def test_operator_named_device_counts_as_identity():
    assert identity_volume_id(boot(disk("loop3"), attached_as="/dev/sdg", explicit="/dev/loop3")) == VOL


def test_requested_name_follows_the_attachment_not_the_config():
    assert requested_name(boot(disk("xvdg"), attached_as="/dev/sdg")) == "/dev/sdg"
    b = boot(disk("xvdf"))
    b.volume = VolumeInfo(VOL, "us-east-1a", "available", 10, ())
    assert requested_name(b) == "/dev/xvdf"  # volume.device_name default
