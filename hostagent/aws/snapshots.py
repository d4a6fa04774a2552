"""EBS snapshots of the persistence volume: tags, create, the all-or-nothing listing, delete, copy, wait.

The pure parts (tags, names, records) take plain data; the rest take a boto3 EC2 client.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from hostagent.aws.errors import THROTTLING_CODES, AWSError, aws_call, map_aws_error, when_visible
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
# CreateSnapshot and CopySnapshot take no ClientToken (botocore's EC2 model has none for either;
# CreateVolume's is filled in by botocore and kept across its retries). This tag, unique per
# call, is how a retry finds out whether an attempt that timed out was carried out after all.
REQUEST_ID_KEY = "hostagent:request-id"
FROZEN, CRASH = "frozen", "crash"
RESERVED_PREFIXES = ("aws:", "hostagent:")
# AWS answers at most 1,000 snapshots per DescribeSnapshots page; asking for the maximum keeps the
# number of pages (and calls) for a long history small.
PAGE_SIZE = 1000
MAX_TAGS = 50  # per resource, AWS limit
WAIT_POLL_FIRST, WAIT_POLL_MAX = 2.0, 15.0
BLIND_RETRY_OPERATIONS = ("CreateSnapshot", "CopySnapshot")
CREATE_ATTEMPTS = 3  # our own tries of a create call whose outcome was unknown
# After an attempt that may have worked, how long to look for what it made before trying again:
# a short look, because CreateSnapshot runs while the filesystem is frozen.
LOOKUP_DELAYS = (0.5, 1.0, 2.0)


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
    return fit_tags(tags)


def fit_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """At most MAX_TAGS: user tags are dropped rather than ours (without the marker retention
    could never clean the snapshot up)."""
    tags = dict(tags)
    if len(tags) > MAX_TAGS:
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


class _MaybeCarriedOut(Exception):
    """A create call failed in a way that leaves open whether AWS carried it out (the answer was
    lost: read timeout, connection dropped, a 5xx that is not throttling)."""

    def __init__(self, response=None, exception: BaseException | None = None):
        super().__init__("the outcome of the call is unknown")
        self.response = response
        self.exception = exception

    def as_aws_error(self, action: str, where: str) -> AWSError:
        cause = self.exception
        if cause is None and self.response is not None:
            from botocore.exceptions import ClientError

            cause = ClientError(self.response[1], action.split(":")[1])
        mapped = map_aws_error(cause, action, where=where) if cause is not None else None
        return mapped or AWSError(f"{action} failed: outcome unknown", action=action, where=where)


def _may_have_been_carried_out(response, caught_exception) -> bool:
    from botocore import exceptions as bx

    if caught_exception is not None:
        # Refused before the request left (no connection): a plain retry is safe.
        return not isinstance(caught_exception, (bx.EndpointConnectionError,
                                                 bx.ConnectTimeoutError))
    if response is None:
        return False
    http, parsed = response
    code = str(((parsed or {}).get("Error") or {}).get("Code") or "")
    return http.status_code >= 500 and code not in THROTTLING_CODES


def _veto_blind_retry(response=None, caught_exception=None, **_):
    if _may_have_been_carried_out(response, caught_exception):
        raise _MaybeCarriedOut(response, caught_exception)
    return None  # botocore's retry handler decides


def refuse_blind_retries(ec2) -> None:
    """botocore would retry CreateSnapshot/CopySnapshot after a read timeout or a 5xx as if
    nothing had happened, and without a ClientToken that can make two; stop it there and let
    _create_once look first. Throttling and connection failures are still retried by botocore.

    aws.clients registers this when it builds an EC2 client: registering clears botocore's event
    lookup cache, which is not work for the freeze window. Registering again is a no-op.
    """
    for operation in BLIND_RETRY_OPERATIONS:
        # The most specific event name is emitted first, before botocore's own needs-retry.ec2.
        ec2.meta.events.register(f"needs-retry.ec2.{operation}", _veto_blind_retry,
                                 unique_id=f"hostagent-no-blind-retry-{operation}")


def _create_once(ec2, operation: str, call: Callable[[], str], find: Callable[[], str | None],
                 *, where: str, sleep=time.sleep) -> str:
    """call() (returns the new id) at most once in effect: when an attempt may have worked, look
    for what it made (find(), by our request-id tag) before trying again.

    A duplicate remains possible only if EC2 has not listed the first one after LOOKUP_DELAYS.
    """
    action = f"ec2:{operation}"
    refuse_blind_retries(ec2)
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            return call()
        except _MaybeCarriedOut as unknown:
            for delay in (0.0, *LOOKUP_DELAYS):
                sleep(delay)
                found = find()
                if found:
                    log.warning("%s: the answer to %s was lost, but it was carried out: %s",
                                where, operation, found)
                    return found
            error = unknown.as_aws_error(action, where)
            if attempt == CREATE_ATTEMPTS:
                raise error from unknown.exception
            log.warning("%s (attempt %d of %d); not carried out, so trying again", error,
                        attempt, CREATE_ATTEMPTS)
    raise AssertionError("unreachable")


def find_by_tag(ec2, key: str, value: str) -> str | None:
    """The id of our snapshot carrying tag key=value, if EC2 lists one yet (newest if several)."""
    with aws_call("ec2:DescribeSnapshots", where=f"{key}={value}"):
        answer = ec2.describe_snapshots(
            OwnerIds=["self"], Filters=[{"Name": f"tag:{key}", "Values": [value]},
                                        {"Name": f"tag:{MARKER_KEY}", "Values": [MARKER_VALUE]}])
    found = [s for s in answer.get("Snapshots") or () if tags_of(s).get(key) == value]
    found.sort(key=lambda s: str(s.get("StartTime")), reverse=True)
    return found[0]["SnapshotId"] if found else None


def new_request_id() -> str:
    return os.urandom(8).hex()


def create_snapshot(ec2, volume_id: str, tags: Mapping[str, str], description: str) -> str:
    """CreateSnapshot with all its tags, made at most once even when an answer is lost."""
    request_id = new_request_id()
    tags = fit_tags({**tags, REQUEST_ID_KEY: request_id})

    def call() -> str:
        with aws_call("ec2:CreateSnapshot", where=volume_id):
            answer = ec2.create_snapshot(VolumeId=volume_id, Description=description,
                                         TagSpecifications=tag_specifications("snapshot", tags))
        return answer["SnapshotId"]

    return _create_once(ec2, "CreateSnapshot", call,
                        lambda: find_by_tag(ec2, REQUEST_ID_KEY, request_id), where=volume_id)


def set_tags(ec2, resource_id: str, tags: Mapping[str, str]) -> None:
    """CreateTags; a NotFound on an id made moments ago means "not visible yet" (when_visible)."""

    def call() -> None:
        with aws_call("ec2:CreateTags", where=resource_id):
            ec2.create_tags(Resources=[resource_id],
                            Tags=[{"Key": k, "Value": v} for k, v in tags.items()])

    when_visible(call, what=resource_id)


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


def _describe_one(ec2, snapshot_id: str) -> dict:
    """One DescribeSnapshots entry; not listed is an AWSError InvalidSnapshot.NotFound."""
    with aws_call("ec2:DescribeSnapshots", where=snapshot_id):
        answer = ec2.describe_snapshots(SnapshotIds=[snapshot_id])
    found = answer.get("Snapshots") or []
    if not found:
        raise AWSError(f"snapshot {snapshot_id} not listed", action="ec2:DescribeSnapshots",
                       code="InvalidSnapshot.NotFound", where=snapshot_id)
    return found[0]


def describe_snapshot(ec2, snapshot_id: str) -> dict:
    """A snapshot the operator named (no owner filter: restore may use any we can see).

    Not found is a usage error: this id came from the command line, not from a create call."""
    try:
        return _describe_one(ec2, snapshot_id)
    except AWSError as exc:
        if exc.code in ("InvalidSnapshot.NotFound", "InvalidSnapshotID.Malformed"):
            from hostagent.errors import UsageError

            raise UsageError(f"snapshot {snapshot_id} not found in this region",
                             hint="`hostagent snapshots` lists this volume's snapshots") from None
        raise


def describe_new_snapshot(ec2, snapshot_id: str, *, sleep=time.sleep,
                          clock=time.monotonic) -> dict:
    """A snapshot hostagent has just created: NotFound is "not visible yet" (when_visible)."""
    return when_visible(lambda: _describe_one(ec2, snapshot_id), what=f"snapshot {snapshot_id}",
                        sleep=sleep, clock=clock)


def wait_until_completed(ec2, snapshot_id: str, *, timeout: float,
                         on_progress: Callable[[SnapshotRecord], None] = lambda r: None,
                         sleep=time.sleep, clock=time.monotonic) -> SnapshotRecord:
    """Poll until completed; an `error` state or the timeout is an AWSError/OperationError.

    The id was just made by CreateSnapshot, so NotFound means EC2 does not list it yet."""
    from hostagent.errors import OperationError

    deadline = clock() + timeout
    interval = WAIT_POLL_FIRST
    while True:
        record = to_record(describe_new_snapshot(ec2, snapshot_id, sleep=sleep, clock=clock))
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


def copy_encryption(kms_key_id: str) -> dict[str, Any]:
    """CopySnapshot's encryption parameters: with a key, every copy is encrypted under it.

    Without KmsKeyId, EC2 encrypts the copy of an encrypted snapshot under the destination's
    default EBS key, whatever key the source had: the caller refuses that case beforehand.
    """
    return {"Encrypted": True, "KmsKeyId": kms_key_id} if kms_key_id else {}


def copy_snapshot(ec2_dest, *, source_region: str, record: SnapshotRecord,
                  description: str, kms_key_id: str = "") -> str:
    """CopySnapshot into ec2_dest's region with the source's tags plus where it came from.

    Made at most once (the source-snapshot tag finds an earlier copy whose answer was lost); a
    source that EC2 does not list yet is waited for (when_visible)."""
    tags = {k: v for k, v in record.tags.items() if k != REQUEST_ID_KEY}
    tags.update({SOURCE_SNAPSHOT_KEY: record.id, SOURCE_REGION_KEY: source_region})
    tags.setdefault(TAKEN_AT_KEY, record.start_time.isoformat(timespec="seconds"))
    tags = fit_tags(tags)
    region = ec2_dest.meta.region_name
    where = f"{record.id} -> {region}"

    def call() -> str:
        with aws_call("ec2:CopySnapshot", where=where):
            answer = ec2_dest.copy_snapshot(
                SourceRegion=source_region, SourceSnapshotId=record.id, Description=description,
                TagSpecifications=tag_specifications("snapshot", tags),
                **copy_encryption(kms_key_id))
        return answer["SnapshotId"]

    return when_visible(
        lambda: _create_once(ec2_dest, "CopySnapshot", call,
                             lambda: find_by_tag(ec2_dest, SOURCE_SNAPSHOT_KEY, record.id),
                             where=where),
        what=f"source snapshot {record.id}")


def copied_sources(records: Iterable[SnapshotRecord]) -> set[str]:
    """Source snapshot ids that already have a copy among these (destination-region) records."""
    return {r.tags[SOURCE_SNAPSHOT_KEY] for r in records if SOURCE_SNAPSHOT_KEY in r.tags}
