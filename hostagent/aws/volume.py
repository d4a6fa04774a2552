"""Find the persistence EBS volume, decide whether it may be attached here, attach it, tag it.

The checks are ours, made before any call that changes anything: AWS refuses some of these cases
itself (VolumeInUse, InvalidVolume.ZoneMismatch) but test servers and future APIs may not, and a
refusal should name the other instance or zone in words an operator can act on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Callable, Mapping

from hostagent.blank import FORMATTED_TAG  # noqa: F401 - one definition, re-exported here
from hostagent.errors import ConfigError, OperationError, Reason, RefusedError

RESTORED_FROM_TAG = "hostagent:restored-from"  # set by `hostagent restore` on the new volume
# Set by bootstrap the first time it puts a restored volume to use: from then on it holds live
# data, and restoring the same snapshot again must make a fresh volume, not hand this one back.
IN_SERVICE_TAG = "hostagent:in-service"

ATTACHED_HERE = "attached-here"
ATTACH = "attach"

USABLE_STATES = ("available", "in-use")
# An attachment in any of these states means the instance holds (or is about to hold) the volume.
HOLDING_STATES = ("attaching", "attached", "busy", "detaching")
POLL_START = 1.0  # seconds between DescribeVolumes polls while attaching, doubled up to POLL_MAX
POLL_MAX = 5.0


@dataclass(frozen=True)
class Identity:
    instance_id: str
    region: str
    availability_zone: str


@dataclass(frozen=True)
class Attachment:
    instance_id: str
    device: str
    state: str


@dataclass(frozen=True)
class VolumeInfo:
    volume_id: str
    availability_zone: str
    state: str
    size_gib: int
    attachments: tuple[Attachment, ...] = ()
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    snapshot_id: str = ""  # the snapshot EC2 made this volume from ("" for an empty volume)
    multi_attach: bool = False  # io1/io2 Multi-Attach: several instances may attach it at once

    def attachment_of(self, instance_id: str) -> Attachment | None:
        return next((a for a in self.attachments if a.instance_id == instance_id), None)

    def describe(self) -> str:
        """'vol-… (us-east-1a, in-use, attached to i-… as /dev/xvdf)' for operator messages."""
        held = [f"{a.state} to {a.instance_id}" + (f" as {a.device}" if a.device else "")
                for a in self.attachments if a.state != "detached"]
        return f"{self.volume_id} ({', '.join([self.availability_zone, self.state, *held])})"


def volume_info(raw: Mapping[str, Any]) -> VolumeInfo:
    """A VolumeInfo from one entry of DescribeVolumes' `Volumes`."""
    attachments = tuple(
        Attachment(instance_id=a.get("InstanceId", ""), device=a.get("Device", ""),
                   state=a.get("State", ""))
        for a in raw.get("Attachments") or ())
    tags = {t["Key"]: t.get("Value", "") for t in raw.get("Tags") or ()}
    return VolumeInfo(volume_id=raw["VolumeId"], availability_zone=raw.get("AvailabilityZone", ""),
                      state=raw.get("State", ""), size_gib=int(raw.get("Size") or 0),
                      attachments=attachments, tags=MappingProxyType(tags),
                      snapshot_id=raw.get("SnapshotId") or "",
                      multi_attach=bool(raw.get("MultiAttachEnabled")))


def describe_search(volume_id: str = "", tags: Mapping[str, str] | None = None) -> str:
    parts = []
    if volume_id:
        parts.append(f"id {volume_id}")
    if tags:
        parts.append("tags " + ", ".join(f"{k}={v}" for k, v in sorted(tags.items())))
    return " and ".join(parts)


def find_volume(ec2, *, volume_id: str = "", tags: Mapping[str, str] = MappingProxyType({}),
                availability_zone: str | None = None) -> VolumeInfo:
    """The one volume with this id and/or these tags; zero is an error, several a refusal.

    availability_zone: with tags, the one volume *in this zone* — one persistence volume per AZ
    is how a stack spans zones, and only a volume in the instance's zone can attach. Matches only
    in other zones are a refusal naming them (a person decides: restore a snapshot here, or move
    the instance)."""
    from hostagent.aws.errors import AWSError, aws_call

    tags = dict(tags or {})
    if not volume_id and not tags:
        raise ConfigError("[volume] sets neither id nor tags: nothing to look for")
    searched = describe_search(volume_id, tags)
    region = getattr(getattr(ec2, "meta", None), "region_name", None)
    kwargs: dict[str, Any] = {}
    if volume_id:
        kwargs["VolumeIds"] = [volume_id]
    if tags:
        kwargs["Filters"] = [{"Name": f"tag:{k}", "Values": [v]} for k, v in sorted(tags.items())]
    volumes: list[VolumeInfo] = []
    try:
        with aws_call("ec2:DescribeVolumes", where=region):
            for page in ec2.get_paginator("describe_volumes").paginate(**kwargs):
                volumes.extend(volume_info(v) for v in page.get("Volumes", ()))
    except AWSError as exc:
        if exc.code != "InvalidVolume.NotFound":
            raise
        volumes = []
    # Filter values treat * and ? as wildcards: keep only exact tag matches. Deleted volumes
    # linger in listings for a while but are no longer volumes.
    volumes = [v for v in volumes
               if v.state != "deleted" and all(v.tags.get(k) == val for k, val in tags.items())]
    if not volumes:
        raise OperationError(
            f"no EBS volume with {searched}", where=region, reason=Reason.VOLUME_NOT_FOUND,
            hint="check [volume] id/tags in the config, and that the volume exists in this "
                 "instance's region")
    if availability_zone and tags and not volume_id:
        return _the_one_in_zone(volumes, availability_zone, searched)
    if len(volumes) > 1:
        listing = "; ".join(v.describe() for v in volumes)
        raise RefusedError(
            f"{len(volumes)} EBS volumes match {searched}: {listing}; refusing to guess",
            where=region, reason=Reason.AMBIGUOUS_VOLUME,
            hint="make the tags match exactly one volume (retag the others), or set [volume] id")
    return volumes[0]


def _the_one_in_zone(volumes: list[VolumeInfo], zone: str, searched: str) -> VolumeInfo:
    """PURE: the single match in this zone, or the refusal that says what matched where."""
    here = [v for v in volumes if v.availability_zone == zone]
    if len(here) == 1:
        return here[0]
    if len(here) > 1:
        raise RefusedError(
            f"{len(here)} EBS volumes in {zone} match {searched}: "
            f"{'; '.join(v.describe() for v in here)}; refusing to guess", where=zone,
            reason=Reason.AMBIGUOUS_VOLUME,
            hint="one persistence volume per availability zone: retag the extra one, or set "
                 "[volume] id")
    zones = sorted({v.availability_zone for v in volumes})
    raise RefusedError(
        f"no EBS volume in {zone} matches {searched}; only in {', '.join(zones)}: "
        f"{'; '.join(v.describe() for v in volumes)}", where=zone, reason=Reason.OTHER_ZONE,
        hint=f"a volume attaches only in its own zone: restore its latest snapshot here "
             f"(`hostagent snapshots`, then `hostagent restore SNAPSHOT_ID`), or run this "
             f"instance in {', '.join(zones)}")


def describe_volume(ec2, volume_id: str) -> VolumeInfo:
    """The current state of one volume, by id."""
    return find_volume(ec2, volume_id=volume_id)


def decide_attach(identity: Identity, volume: VolumeInfo) -> str:
    """ATTACHED_HERE or ATTACH, or an error saying why this volume must not be attached here.

    Pure: the same answer for the same data, and no call to anything.
    """
    if volume.multi_attach:
        raise RefusedError(
            f"volume {volume.volume_id} has Multi-Attach enabled; refusing to use it: ext4 is "
            "not a cluster filesystem, and two instances mounting it would corrupt CouchDB's "
            "data", where=volume.volume_id, reason=Reason.MULTI_ATTACH,
            hint="turn Multi-Attach off (`aws ec2 modify-volume --no-multi-attach-enabled` "
                 "while it is detached) or use a volume without it")
    others = [a for a in volume.attachments
              if a.instance_id != identity.instance_id and a.state != "detached"]
    if others:
        held = ", ".join(f"{a.instance_id} ({a.state})" for a in others)
        raise RefusedError(
            f"volume {volume.volume_id} is attached to another instance: {held}; refusing to "
            "take it (hostagent never force-detaches)", where=identity.instance_id,
            reason=Reason.ATTACHED_ELSEWHERE,
            hint="detach it there once nothing uses it (stop CouchDB on that host first), then "
                 "run `hostagent bootstrap` again")
    if volume.availability_zone != identity.availability_zone:
        raise OperationError(
            f"volume {volume.volume_id} is in {volume.availability_zone} but this instance "
            f"{identity.instance_id} is in {identity.availability_zone}; EBS volumes attach only "
            "within their zone", reason=Reason.OTHER_ZONE,
            hint=f"make a volume in {identity.availability_zone} from a snapshot: `hostagent "
                 "snapshots`, then `hostagent restore SNAPSHOT_ID`; or launch the instance in "
                 f"{volume.availability_zone}")
    if volume.state not in USABLE_STATES:
        raise OperationError(
            f"volume {volume.volume_id} is {volume.state or 'in an unknown state'}, not available",
            hint=("wait until it is available, then run again" if volume.state == "creating" else
                  "this volume cannot be attached: restore a snapshot with `hostagent restore`"))
    mine = volume.attachment_of(identity.instance_id)
    if mine and mine.state in ("attached", "busy"):
        return ATTACHED_HERE
    if mine and mine.state == "detaching":
        raise OperationError(
            f"volume {volume.volume_id} is being detached from this instance "
            f"{identity.instance_id}", hint="wait until it is available, then run again")
    if mine and mine.state == "attaching":
        return ATTACH  # attach_volume only waits: a second AttachVolume would fail
    if volume.state == "in-use":
        raise OperationError(
            f"volume {volume.volume_id} is in-use but lists no attachment to this instance",
            hint="run again in a few seconds (EC2 listings settle)")
    return ATTACH


def attach_volume(ec2, identity: Identity, volume: VolumeInfo, device_name: str, *,
                  timeout: float, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> VolumeInfo:
    """Attach `volume` to this instance and wait until DescribeVolumes shows it attached here.

    The volume is described afresh and decide_attach runs again right before AttachVolume, so a
    stale VolumeInfo can never lead to taking a volume another instance has picked up since.
    """
    from hostagent.aws.errors import AWSError, aws_call

    current = describe_volume(ec2, volume.volume_id)
    if decide_attach(identity, current) == ATTACHED_HERE:
        return current
    mine = current.attachment_of(identity.instance_id)
    if not (mine and mine.state == "attaching"):
        try:
            with aws_call("ec2:AttachVolume", where=volume.volume_id):
                ec2.attach_volume(VolumeId=volume.volume_id, InstanceId=identity.instance_id,
                                  Device=device_name)
        except AWSError as exc:
            if exc.code == "VolumeInUse":
                raise RefusedError(
                    f"volume {volume.volume_id} is in use elsewhere (AWS said VolumeInUse); "
                    "refusing to take it", where=identity.instance_id,
                    reason=Reason.ATTACHED_ELSEWHERE,
                    hint="hostagent never force-detaches: detach it where it is attached, then "
                         "run `hostagent bootstrap` again") from exc
            raise
    deadline = clock() + timeout
    delay = POLL_START
    while True:
        current = describe_volume(ec2, volume.volume_id)
        mine = current.attachment_of(identity.instance_id)
        # Before the device is touched: nobody else may hold the volume, even once it shows
        # attached here (two attachments at once is Multi-Attach turned on behind our back).
        others = [a for a in current.attachments
                  if a.instance_id != identity.instance_id and a.state in HOLDING_STATES]
        if others or current.multi_attach:
            held = ", ".join(f"{a.instance_id} ({a.state})" for a in others) or "Multi-Attach on"
            raise RefusedError(
                f"volume {volume.volume_id} is also held by another instance after the attach: "
                f"{held}; refusing to touch its device", where=identity.instance_id,
                reason=Reason.MULTI_ATTACH,
                hint="make sure only one instance uses the volume (no Multi-Attach), detach it "
                     "from this one, and run `hostagent bootstrap` again")
        if mine and mine.state in ("attached", "busy"):
            return current
        remaining = deadline - clock()
        if remaining <= 0:
            state = mine.state if mine else "no attachment yet"
            raise OperationError(
                f"volume {volume.volume_id} not attached to {identity.instance_id} after "
                f"{timeout:g} s (attachment state: {state})",
                hint="EC2 may still finish the attachment: check `aws ec2 describe-volumes "
                     f"--volume-ids {volume.volume_id}` and run `hostagent bootstrap` again")
        sleep(min(delay, remaining))
        delay = min(delay * 2, POLL_MAX)


def tag_formatted(ec2, volume_id: str, when: datetime) -> None:
    """Mark the volume as formatted by hostagent: a later blank-looking device is then suspect."""
    tag_time(ec2, volume_id, FORMATTED_TAG, when)


def tag_time(ec2, volume_id: str, key: str, when: datetime) -> None:
    """Set one hostagent tag whose value is a UTC time."""
    from hostagent.aws.errors import aws_call

    if when.tzinfo is None:
        raise ValueError("tag times need an aware datetime")
    stamp = when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with aws_call("ec2:CreateTags", where=volume_id):
        ec2.create_tags(Resources=[volume_id], Tags=[{"Key": key, "Value": stamp}])


def is_formatted(volume: VolumeInfo) -> bool:
    """Has hostagent put a filesystem on this volume before (the FORMATTED_TAG is set)?"""
    return bool(volume.tags.get(FORMATTED_TAG))


# Raw DescribeVolumes listings, for callers that need every match (not exactly one) or fields
# VolumeInfo does not carry (restore: type, IOPS, throughput, encryption and KMS key).

def describe_volumes(ec2, **kwargs) -> list[dict]:
    """Every DescribeVolumes entry for these arguments (all pages), deleted ones left out; an
    unknown volume id lists nothing."""
    from hostagent.aws.errors import AWSError, aws_call

    found: list[dict] = []
    try:
        with aws_call("ec2:DescribeVolumes", where=getattr(ec2.meta, "region_name", None)):
            for page in ec2.get_paginator("describe_volumes").paginate(**kwargs):
                found.extend(page.get("Volumes", ()))
    except AWSError as exc:
        if exc.code != "InvalidVolume.NotFound":
            raise
    return [v for v in found if v.get("State") != "deleted"]


def raw_tags(raw: Mapping[str, Any]) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in raw.get("Tags") or ()}


def volumes_matching(ec2, *, volume_id: str = "",
                     tags: Mapping[str, str] = MappingProxyType({})) -> list[dict]:
    """All volumes with this id and/or exactly these tags, region-wide, as raw entries.

    Tag filter values are wildcards to EC2 (* and ?): only exact matches are kept."""
    tags = dict(tags or {})
    kwargs: dict[str, Any] = {}
    if volume_id:
        kwargs["VolumeIds"] = [volume_id]
    if tags:
        kwargs["Filters"] = [{"Name": f"tag:{k}", "Values": [v]} for k, v in sorted(tags.items())]
    found = describe_volumes(ec2, **kwargs)
    return [v for v in found if all(raw_tags(v).get(k) == val for k, val in tags.items())]


def describe_new_volume(ec2, volume_id: str, *, sleep: Callable[[float], None] = time.sleep,
                        clock: Callable[[], float] = time.monotonic) -> dict:
    """A volume hostagent has just created: NotFound means "not visible yet" (when_visible)."""
    from hostagent.aws.errors import AWSError, when_visible

    def call() -> dict:
        found = describe_volumes(ec2, VolumeIds=[volume_id])
        if not found:
            raise AWSError(f"volume {volume_id} not listed", action="ec2:DescribeVolumes",
                           code="InvalidVolume.NotFound", where=volume_id)
        return found[0]

    return when_visible(call, what=f"volume {volume_id}", sleep=sleep, clock=clock)


def create_volume(ec2, create_args: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """CreateVolume, tagged in the call itself. botocore fills in its ClientToken (EC2's
    idempotency token) once per call and resends the same one on each retry, so a retried
    timeout never makes two volumes."""
    from hostagent.aws.errors import aws_call

    with aws_call("ec2:CreateVolume", where=str(create_args.get("SnapshotId") or "")):
        answer = ec2.create_volume(**create_args, TagSpecifications=[
            {"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
    return answer["VolumeId"]


def delete_tags(ec2, resource_id: str, tags: Mapping[str, str]) -> None:
    """DeleteTags, each only while it still has this value (EC2 matches Key and Value)."""
    from hostagent.aws.errors import aws_call

    with aws_call("ec2:DeleteTags", where=resource_id):
        ec2.delete_tags(Resources=[resource_id],
                        Tags=[{"Key": k, "Value": v} for k, v in tags.items()])


def detach_from_self(ec2, identity: Identity, volume_id: str, *, timeout: float,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> str:
    """Detach one of *our* volumes from *this* instance (never Force, never another instance's
    attachment) and wait until EC2 no longer lists it attached here. Idempotent."""
    from hostagent.aws.errors import AWSError, aws_call

    current = describe_volume(ec2, volume_id)
    mine = current.attachment_of(identity.instance_id)
    if mine is None or mine.state == "detached":
        return "not attached here"
    if mine.state != "detaching":
        try:
            with aws_call("ec2:DetachVolume", where=volume_id):
                ec2.detach_volume(VolumeId=volume_id, InstanceId=identity.instance_id)
        except AWSError as exc:
            if exc.code != "IncorrectState":
                raise
    deadline = clock() + timeout
    delay = POLL_START
    while True:
        current = describe_volume(ec2, volume_id)
        mine = current.attachment_of(identity.instance_id)
        if mine is None or mine.state == "detached":
            return "detached"
        remaining = deadline - clock()
        if remaining <= 0:
            raise OperationError(
                f"volume {volume_id} still {mine.state} from {identity.instance_id} after "
                f"{timeout:g} s", hint="EC2 may still finish the detach: run the command again "
                                       "later (it never force-detaches)")
        sleep(min(delay, remaining))
        delay = min(delay * 2, POLL_MAX)

