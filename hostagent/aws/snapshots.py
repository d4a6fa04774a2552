"""EBS snapshots of the persistence volume: tags, create, the all-or-nothing listing, delete, copy, wait.

The pure parts (tags, names, records) take plain data; the rest take a boto3 EC2 client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from hostagent.aws.errors import AWSError, aws_call
from hostagent.log import get_logger
from hostagent.retention import SnapshotRecord

log = get_logger(__name__)

MARKER_KEY = "hostagent:managed"
MARKER_VALUE = "true"
VOLUME_KEY = "hostagent:volume-id"
CONSISTENCY_KEY = "hostagent:consistency"
TAKEN_AT_KEY = "hostagent:taken-at"
SOURCE_SNAPSHOT_KEY = "hostagent:source-snapshot"
SOURCE_REGION_KEY = "hostagent:source-region"
FROZEN, CRASH = "frozen", "crash"
RESERVED_PREFIXES = ("aws:", "hostagent:")
# AWS answers at most 1,000 snapshots per DescribeSnapshots page; asking for the maximum keeps the
# number of pages (and calls) for a long history small.
PAGE_SIZE = 1000
MAX_TAGS = 50  # per resource, AWS limit
WAIT_POLL_FIRST, WAIT_POLL_MAX = 2.0, 15.0


def user_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The tags a person or tool set on the volume: never aws:* (AWS-owned) nor our own."""
    return {k: v for k, v in tags.items() if not k.startswith(RESERVED_PREFIXES)}


def utc_stamp(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def snapshot_tags(volume_id: str, volume_tags: Mapping[str, str], consistency: str,
                  now: datetime) -> dict[str, str]:
    """All tags of a new snapshot, set in the CreateSnapshot call itself (never untagged)."""
    base = volume_tags.get("Name") or volume_id
    tags = user_tags(volume_tags)
    tags.update({
        "Name": f"{base}-{utc_stamp(now)}",
        MARKER_KEY: MARKER_VALUE,
        VOLUME_KEY: volume_id,
        CONSISTENCY_KEY: consistency,
        TAKEN_AT_KEY: now.astimezone(timezone.utc).isoformat(timespec="seconds"),
    })
    if len(tags) > MAX_TAGS:
        # Drop user tags rather than ours: without the marker retention could never clean it up.
        ours = {k: v for k, v in tags.items() if k.startswith("hostagent:") or k == "Name"}
        extra = [k for k in tags if k not in ours][: MAX_TAGS - len(ours)]
        tags = {**{k: tags[k] for k in extra}, **ours}
    return tags


def tag_specifications(resource_type: str, tags: Mapping[str, str]) -> list[dict]:
    return [{"ResourceType": resource_type,
             "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


def tags_of(raw: Mapping) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in raw.get("Tags") or ()}


def _parse_time(value) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def to_record(raw: Mapping) -> SnapshotRecord:
    """A DescribeSnapshots entry as plain data.

    A cross-region copy starts when it is copied, not when its point in time was taken, so its
    retention time is the original's (tag hostagent:taken-at, which CopySnapshot carries over).
    """
    tags = tags_of(raw)
    start = _parse_time(raw["StartTime"])
    if SOURCE_SNAPSHOT_KEY in tags and TAKEN_AT_KEY in tags:
        try:
            start = _parse_time(tags[TAKEN_AT_KEY])
        except ValueError:
            pass
    return SnapshotRecord(id=raw["SnapshotId"], start_time=start, state=raw.get("State", ""),
                          progress=raw.get("Progress", ""), tags=MappingProxyType(tags))


def is_ours(record: SnapshotRecord, volume_id: str) -> bool:
    return (record.tags.get(MARKER_KEY) == MARKER_VALUE
            and record.tags.get(VOLUME_KEY) == volume_id)


def create_snapshot(ec2, volume_id: str, tags: Mapping[str, str], description: str) -> str:
    with aws_call("ec2:CreateSnapshot", where=volume_id):
        answer = ec2.create_snapshot(VolumeId=volume_id, Description=description,
                                     TagSpecifications=tag_specifications("snapshot", tags))
    return answer["SnapshotId"]


def set_tags(ec2, resource_id: str, tags: Mapping[str, str]) -> None:
    with aws_call("ec2:CreateTags", where=resource_id):
        ec2.create_tags(Resources=[resource_id],
                        Tags=[{"Key": k, "Value": v} for k, v in tags.items()])


def list_snapshots(ec2, volume_id: str, *, page_size: int = PAGE_SIZE) -> list[SnapshotRecord]:
    """Every snapshot hostagent made of this volume (newest first), or an error — never a part.

    Retention decides on this list: a page that failed, or a pagination token seen twice, means
    the list may be incomplete and a snapshot we cannot see could be the one we must keep.
    """
    paginator = ec2.get_paginator("describe_snapshots")
    pages = paginator.paginate(
        OwnerIds=["self"],
        Filters=[{"Name": f"tag:{MARKER_KEY}", "Values": [MARKER_VALUE]},
                 {"Name": f"tag:{VOLUME_KEY}", "Values": [volume_id]}],
        PaginationConfig={"PageSize": page_size},
    )
    records: dict[str, SnapshotRecord] = {}
    seen_tokens: set[str] = set()
    number = 0
    try:
        with aws_call("ec2:DescribeSnapshots", where=volume_id):
            for number, page in enumerate(pages, start=1):
                for raw in page.get("Snapshots", ()):
                    record = to_record(raw)
                    # The server filtered already; checking again costs nothing and means a
                    # loose filter can never hand retention someone else's snapshot.
                    if is_ours(record, volume_id):
                        records[record.id] = record
                token = page.get("NextToken")
                if token and token in seen_tokens:
                    raise AWSError("DescribeSnapshots returned the same page token twice",
                                   action="ec2:DescribeSnapshots", where=volume_id)
                if token:
                    seen_tokens.add(token)
    except AWSError as exc:
        raise AWSError(f"snapshot listing incomplete (page {number + 1}): {exc.message}",
                       action=exc.action, code=exc.code, where=exc.where,
                       hint="nothing was deleted; run `hostagent prune` again later") from exc
    return sorted(records.values(), key=lambda r: (r.start_time, r.id), reverse=True)


@dataclass
class DeleteResult:
    deleted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (snapshot id, why)


def delete_snapshots(ec2, snapshot_ids: Iterable[str]) -> DeleteResult:
    """DeleteSnapshot one by one; in use by an AMI → skipped; already gone → counted as deleted."""
    result = DeleteResult()
    for snapshot_id in snapshot_ids:
        try:
            with aws_call("ec2:DeleteSnapshot", where=snapshot_id):
                ec2.delete_snapshot(SnapshotId=snapshot_id)
        except AWSError as exc:
            if exc.code == "InvalidSnapshot.InUse":
                log.warning("keeping %s: it is in use by an AMI (deregister the AMI to let "
                            "retention delete it)", snapshot_id)
                result.skipped.append((snapshot_id, "in use by an AMI"))
                continue
            if exc.code == "InvalidSnapshot.NotFound":
                result.deleted.append(snapshot_id)  # someone else got there first
                continue
            raise AWSError(f"{exc.message} (after deleting {len(result.deleted)})",
                           action=exc.action, code=exc.code, where=exc.where,
                           hint=exc.hint) from exc
        result.deleted.append(snapshot_id)
    return result


def describe_snapshot(ec2, snapshot_id: str) -> dict:
    """One snapshot's DescribeSnapshots entry (no owner filter: restore may use any we can see)."""
    try:
        with aws_call("ec2:DescribeSnapshots", where=snapshot_id):
            answer = ec2.describe_snapshots(SnapshotIds=[snapshot_id])
    except AWSError as exc:
        if exc.code in ("InvalidSnapshot.NotFound", "InvalidSnapshotID.Malformed"):
            from hostagent.errors import UsageError

            raise UsageError(f"snapshot {snapshot_id} not found in this region",
                             hint="`hostagent snapshots` lists this volume's snapshots") from None
        raise
    found = answer.get("Snapshots") or []
    if not found:
        from hostagent.errors import UsageError

        raise UsageError(f"snapshot {snapshot_id} not found in this region")
    return found[0]


def wait_until_completed(ec2, snapshot_id: str, *, timeout: float,
                         on_progress: Callable[[SnapshotRecord], None] = lambda r: None,
                         sleep=time.sleep, clock=time.monotonic) -> SnapshotRecord:
    """Poll until completed; an `error` state or the timeout is an AWSError/OperationError."""
    from hostagent.errors import OperationError

    deadline = clock() + timeout
    interval = WAIT_POLL_FIRST
    while True:
        record = to_record(describe_snapshot(ec2, snapshot_id))
        on_progress(record)
        if record.state == "completed":
            return record
        if record.state == "error":
            raise OperationError(f"snapshot {snapshot_id} failed (state error)",
                                 hint="AWS keeps no partial snapshot; run `hostagent snapshot` "
                                      "again")
        if clock() + interval > deadline:
            raise OperationError(
                f"snapshot {snapshot_id} still {record.state} ({record.progress or '?'}) after "
                f"{timeout:.0f}s", hint="it goes on in AWS; `hostagent snapshots` shows it")
        sleep(interval)
        interval = min(interval * 1.5, WAIT_POLL_MAX)


def copy_snapshot(ec2_dest, *, source_region: str, record: SnapshotRecord,
                  description: str) -> str:
    """CopySnapshot into ec2_dest's region with the source's tags plus where it came from."""
    tags = dict(record.tags)
    tags.update({SOURCE_SNAPSHOT_KEY: record.id, SOURCE_REGION_KEY: source_region})
    tags.setdefault(TAKEN_AT_KEY, record.start_time.isoformat(timespec="seconds"))
    region = ec2_dest.meta.region_name
    with aws_call("ec2:CopySnapshot", where=f"{record.id} -> {region}"):
        answer = ec2_dest.copy_snapshot(
            SourceRegion=source_region, SourceSnapshotId=record.id, Description=description,
            TagSpecifications=tag_specifications("snapshot", tags))
    return answer["SnapshotId"]


def copied_sources(records: Iterable[SnapshotRecord]) -> set[str]:
    """Source snapshot ids that already have a copy among these (destination-region) records."""
    return {r.tags[SOURCE_SNAPSHOT_KEY] for r in records if SOURCE_SNAPSHOT_KEY in r.tags}
