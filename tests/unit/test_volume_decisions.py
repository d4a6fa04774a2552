"""decide_attach over a table of volume states, DescribeVolumes parsing, and the attach wait.

The wait tests use a small hand-written EC2 stand-in: the moto server attaches instantly and
never shows 'attaching' or a stuck attachment, so no real part can produce those states.
"""

from __future__ import annotations

from types import MappingProxyType

import pytest

from hostagent.aws.volume import (ATTACH, ATTACHED_HERE, FORMATTED_TAG, Attachment, Identity,
                                  VolumeInfo, attach_volume, decide_attach, describe_search,
                                  is_formatted, volume_info)
from hostagent.errors import EXIT_FAILED, EXIT_REFUSED, OperationError, RefusedError

ME = Identity(instance_id="i-0aaaaaaaaaaaaaaaa", region="us-east-1", availability_zone="us-east-1a")
OTHER = "i-0bbbbbbbbbbbbbbbb"


def vol(state="available", az="us-east-1a", attachments=(), tags=None):
    return VolumeInfo(volume_id="vol-0123456789abcdef0", availability_zone=az, state=state,
                      size_gib=10, attachments=tuple(Attachment(*a) for a in attachments),
                      tags=MappingProxyType(dict(tags or {})))


@pytest.mark.parametrize("volume,expected", [
    (vol("available"), ATTACH),
    (vol("in-use", attachments=[(ME.instance_id, "/dev/xvdf", "attached")]), ATTACHED_HERE),
    (vol("in-use", attachments=[(ME.instance_id, "/dev/xvdf", "busy")]), ATTACHED_HERE),
    (vol("in-use", attachments=[(ME.instance_id, "/dev/xvdf", "attaching")]), ATTACH),
    (vol("available", attachments=[(OTHER, "/dev/xvdf", "detached")]), ATTACH),
])
def test_decisions(volume, expected):
    assert decide_attach(ME, volume) == expected


@pytest.mark.parametrize("state", ["attached", "attaching", "detaching", "busy"])
def test_attached_elsewhere_is_refused_naming_the_instance_and_state(state):
    volume = vol("in-use", attachments=[(OTHER, "/dev/sdf", state)])
    with pytest.raises(RefusedError) as err:
        decide_attach(ME, volume)
    assert err.value.exit_code == EXIT_REFUSED
    assert f"attached to another instance: {OTHER} ({state})" in str(err.value)
    assert "never force-detaches" in str(err.value)


def test_refusal_wins_over_zone_mismatch():
    """Data live on another host matters more than where this one runs: exit 3, not 1."""
    volume = vol("in-use", az="us-east-1b", attachments=[(OTHER, "/dev/sdf", "attached")])
    with pytest.raises(RefusedError):
        decide_attach(ME, volume)


def test_other_zone_names_both_zones_and_points_to_restore():
    with pytest.raises(OperationError) as err:
        decide_attach(ME, vol("available", az="us-east-1b"))
    assert type(err.value) is OperationError and err.value.exit_code == EXIT_FAILED
    assert ("is in us-east-1b but this instance i-0aaaaaaaaaaaaaaaa is in us-east-1a"
            in str(err.value))
    assert "hostagent restore SNAPSHOT_ID" in err.value.hint


@pytest.mark.parametrize("state,hint", [("creating", "wait until it is available"),
                                        ("deleting", "hostagent restore"),
                                        ("error", "hostagent restore")])
def test_unusable_states(state, hint):
    with pytest.raises(OperationError) as err:
        decide_attach(ME, vol(state))
    assert type(err.value) is OperationError
    assert f"is {state}, not available" in str(err.value) and hint in err.value.hint


def test_detaching_from_here_is_an_error_not_an_attach():
    with pytest.raises(OperationError, match="being detached from this instance"):
        decide_attach(ME, vol("in-use", attachments=[(ME.instance_id, "/dev/xvdf", "detaching")]))


def test_in_use_without_attachment_is_not_attached():
    with pytest.raises(OperationError, match="in-use but lists no attachment"):
        decide_attach(ME, vol("in-use"))


def test_volume_info_from_describe_volumes():
    raw = {"VolumeId": "vol-1", "AvailabilityZone": "us-east-1a", "State": "in-use", "Size": 20,
           "Attachments": [{"InstanceId": OTHER, "Device": "/dev/sdf", "State": "attached",
                            "VolumeId": "vol-1"}],
           "Tags": [{"Key": "Name", "Value": "p"}, {"Key": FORMATTED_TAG,
                                                    "Value": "2026-01-02T03:04:05Z"}]}
    info = volume_info(raw)
    assert info == VolumeInfo("vol-1", "us-east-1a", "in-use", 20,
                              (Attachment(OTHER, "/dev/sdf", "attached"),),
                              {"Name": "p", FORMATTED_TAG: "2026-01-02T03:04:05Z"})
    assert is_formatted(info) and not is_formatted(vol())
    assert info.describe() == f"vol-1 (us-east-1a, in-use, attached to {OTHER} as /dev/sdf)"
    with pytest.raises(TypeError):
        info.tags["Name"] = "x"  # read-only
    assert volume_info({"VolumeId": "vol-2"}).attachments == ()


def test_describe_search():
    assert describe_search("vol-1", {"b": "2", "a": "1"}) == "id vol-1 and tags a=1, b=2"
    assert describe_search("", {"Name": "x"}) == "tags Name=x"


class StuckEC2:
    """DescribeVolumes answers from a script; AttachVolume calls are recorded."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.attach_calls = []

    def get_paginator(self, name):
        assert name == "describe_volumes"
        ec2 = self

        class Paginator:
            def paginate(self, **kw):
                answer = ec2.answers.pop(0) if len(ec2.answers) > 1 else ec2.answers[0]
                return [{"Volumes": [answer]}]

        return Paginator()

    def attach_volume(self, **kw):
        self.attach_calls.append(kw)


def raw(state="available", attachments=()):
    return {"VolumeId": "vol-0123456789abcdef0", "AvailabilityZone": "us-east-1a",
            "State": state, "Size": 10,
            "Attachments": [{"InstanceId": i, "Device": d, "State": s} for i, d, s in attachments]}


class Clock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_attach_wait_is_bounded_with_a_clear_error():
    ec2 = StuckEC2([raw("available"), raw("in-use", [(ME.instance_id, "/dev/xvdf", "attaching")])])
    clock = Clock()
    with pytest.raises(OperationError) as err:
        attach_volume(ec2, ME, vol(), "/dev/xvdf", timeout=10, clock=clock, sleep=clock.sleep)
    assert str(err.value) == ("volume vol-0123456789abcdef0 not attached to i-0aaaaaaaaaaaaaaaa "
                              "after 10 s (attachment state: attaching)")
    assert ec2.attach_calls == [{"VolumeId": "vol-0123456789abcdef0",
                                 "InstanceId": ME.instance_id, "Device": "/dev/xvdf"}]
    assert clock.now == 10 and clock.sleeps == [1.0, 2.0, 4.0, 3.0]


def test_attaching_here_is_waited_for_without_a_second_attach():
    ec2 = StuckEC2([raw("in-use", [(ME.instance_id, "/dev/xvdf", "attaching")]),
                    raw("in-use", [(ME.instance_id, "/dev/xvdf", "attaching")]),
                    raw("in-use", [(ME.instance_id, "/dev/xvdf", "attached")])])
    clock = Clock()
    info = attach_volume(ec2, ME, vol(), "/dev/xvdf", timeout=60, clock=clock, sleep=clock.sleep)
    assert info.attachment_of(ME.instance_id).state == "attached"
    assert ec2.attach_calls == []


def test_stale_info_is_rechecked_before_attaching():
    """The caller's VolumeInfo says available; AWS now says another instance took it."""
    ec2 = StuckEC2([raw("in-use", [(OTHER, "/dev/sdf", "attached")])])
    with pytest.raises(RefusedError, match=OTHER):
        attach_volume(ec2, ME, vol("available"), "/dev/xvdf", timeout=5)
    assert ec2.attach_calls == []


def test_another_instance_winning_the_race_is_a_refusal():
    ec2 = StuckEC2([raw("available"), raw("in-use", [(OTHER, "/dev/sdf", "attaching")])])
    clock = Clock()
    with pytest.raises(RefusedError, match="also held by another instance"):
        attach_volume(ec2, ME, vol(), "/dev/xvdf", timeout=30, clock=clock, sleep=clock.sleep)


def test_attached_here_and_elsewhere_at_once_is_refused_before_the_device_is_touched():
    """Two attachments at once (Multi-Attach switched on behind our back): even though this
    instance's attachment completed, the device must not be used."""
    both = raw("in-use", [(ME.instance_id, "/dev/xvdf", "attached"), (OTHER, "/dev/sdf", "attached")])
    ec2 = StuckEC2([raw("available"), both])
    clock = Clock()
    with pytest.raises(RefusedError, match=OTHER):
        attach_volume(ec2, ME, vol(), "/dev/xvdf", timeout=30, clock=clock, sleep=clock.sleep)


# --- one volume per AZ; Multi-Attach --------------------------------------------------------

from hostagent.aws.volume import _the_one_in_zone  # noqa: E402


def named(volume_id, az):
    return VolumeInfo(volume_id=volume_id, availability_zone=az, state="available", size_gib=10)


def test_the_one_in_this_zone_is_chosen_among_matches_elsewhere():
    here = named("vol-0aaaaaaaaaaaaaaaa", "us-east-1a")
    chosen = _the_one_in_zone([named("vol-0bbbbbbbbbbbbbbbb", "us-east-1b"), here],
                              "us-east-1a", "tags Name=x")
    assert chosen is here


def test_two_in_this_zone_are_refused_listing_both():
    with pytest.raises(RefusedError) as err:
        _the_one_in_zone([named("vol-0aaaaaaaaaaaaaaaa", "us-east-1a"),
                          named("vol-0cccccccccccccccc", "us-east-1a")], "us-east-1a", "tags Name=x")
    assert "vol-0aaaaaaaaaaaaaaaa" in str(err.value) and "vol-0cccccccccccccccc" in str(err.value)


def test_matches_only_in_other_zones_are_refused_naming_the_zones():
    with pytest.raises(RefusedError) as err:
        _the_one_in_zone([named("vol-0bbbbbbbbbbbbbbbb", "us-east-1b"),
                          named("vol-0dddddddddddddddd", "us-east-1c")], "us-east-1a", "tags Name=x")
    assert err.value.exit_code == EXIT_REFUSED
    assert "only in us-east-1b, us-east-1c" in str(err.value) and "restore" in err.value.hint


def test_multi_attach_volume_is_refused_before_any_attach():
    multi = VolumeInfo(volume_id="vol-0123456789abcdef0", availability_zone="us-east-1a",
                       state="available", size_gib=10, multi_attach=True)
    with pytest.raises(RefusedError) as err:
        decide_attach(ME, multi)
    assert "Multi-Attach" in str(err.value) and "no-multi-attach-enabled" in err.value.hint


def test_multi_attach_flag_is_read_from_describe_volumes():
    raw = {"VolumeId": "vol-0123456789abcdef0", "AvailabilityZone": "us-east-1a",
           "State": "available", "Size": 10, "MultiAttachEnabled": True}
    assert volume_info(raw).multi_attach is True
    assert volume_info({**raw, "MultiAttachEnabled": False}).multi_attach is False
