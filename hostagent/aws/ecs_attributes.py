"""ECS container-instance attributes that say whether this host may run CouchDB: build, diff, put."""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping

from hostagent.errors import ConfigError

PERSISTENCE = "persistence"  # ready | missing | degraded — the placement constraint reads this
VOLUME_ID = "volume-id"
COUCHDB = "couchdb"  # up | down | maintenance_mode | nolb | seeding | unauthorized | error | …
# Why persistence is not ready: "none" when it is, else a short cause (attached-elsewhere,
# not-blank, not-mounted…). Always put, never deleted: "none" says it as plainly as an absence
# would, and the IAM policy grants no ecs:DeleteAttributes.
REASON = "reason"
REASON_NONE = "none"
PERSISTENCE_STATES = ("ready", "missing", "degraded")

# ECS limits (API reference, Attribute): 1-128 characters each; names letters, digits and - _ / \ .;
# values also @ : and space, but not at either end. PutAttributes takes at most 10 per call.
MAX_CHARS = 128
MAX_PER_CALL = 10
NAME_OK = re.compile(r"^[A-Za-z0-9_./\\-]{1,128}$")
VALUE_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.@/\\: -]")


def check_prefix(prefix: str, *, where: str | None = None) -> str:
    """The attribute prefix must be usable as is: a trimmed name would not match the placement
    constraint the operator wrote, so a bad prefix is a config error, never silently fixed.
    config.py calls this at load; everything after that takes the prefix as valid."""
    longest = max(len(PERSISTENCE), len(VOLUME_ID), len(COUCHDB), len(REASON))
    if not prefix or not NAME_OK.match(prefix) or len(prefix) + 1 + longest > MAX_CHARS:
        raise ConfigError(
            f"ecs.attribute_prefix {prefix!r} is not a valid ECS attribute name prefix",
            where=where,
            hint="letters, digits, - _ . / \\ only, at most "
                 f"{MAX_CHARS - 1 - longest} characters (e.g. \"hostagent\")")
    return prefix


def attribute_name(prefix: str, key: str) -> str:
    return f"{prefix}.{key}"


def clean_value(value: str | None) -> str | None:
    """A value ECS accepts: forbidden characters become '_', at most 128 characters, no edge spaces.

    Trimming cuts whole characters (str slicing), never a UTF-8 sequence, and the result is
    checked again after stripping; None means 'nothing to say' (the attribute is left alone).
    """
    if value is None:
        return None
    text = VALUE_BAD_CHARS.sub("_", str(value))
    text = text[:MAX_CHARS].strip(" ")
    return text or None


def desired_attributes(prefix: str, *, persistence: str, volume_id: str | None = None,
                       couchdb: str | None = None, reason: str | None = None) -> dict[str, str]:
    """The attributes this host should carry now; unknown values are left out, not invented."""
    if persistence not in PERSISTENCE_STATES:
        raise ValueError(f"persistence must be one of {PERSISTENCE_STATES}, not {persistence!r}")
    wanted = {
        attribute_name(prefix, PERSISTENCE): persistence,
        attribute_name(prefix, VOLUME_ID): clean_value(volume_id),
        attribute_name(prefix, COUCHDB): clean_value(couchdb),
        attribute_name(prefix, REASON): clean_value(reason),
    }
    return {name: value for name, value in wanted.items() if value is not None}


def changed_attributes(desired: Mapping[str, str], current: Mapping[str, str]) -> dict[str, str]:
    """Only what differs: report on change, one PutAttributes per real change."""
    return {name: value for name, value in desired.items() if current.get(name) != value}


def batches(items: Iterable, size: int = MAX_PER_CALL) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def put_attributes(ecs, cluster: str, instance_arn: str, attributes: Mapping[str, str]) -> int:
    """PutAttributes on the container instance, ≤ 10 per call; returns how many were sent."""
    from hostagent.aws.errors import aws_call

    sent = 0
    for batch in batches(sorted(attributes.items())):
        for name, value in batch:
            if not NAME_OK.match(name) or clean_value(value) != value:
                raise ValueError(f"attribute {name}={value!r} breaks the ECS limits")
        # The full ARN as targetId needs no targetType (that is for the short id form).
        with aws_call("ecs:PutAttributes", where=cluster):
            ecs.put_attributes(cluster=cluster, attributes=[
                {"name": name, "value": value, "targetId": instance_arn} for name, value in batch
            ])
        sent += len(batch)
    return sent


def current_attributes(ecs, cluster: str, instance_arn: str, prefix: str) -> dict[str, str]:
    """Our attributes as ECS holds them now, so a restarted agent does not re-put what is there.

    DescribeContainerInstances names exactly this instance; ListAttributes would page through
    the whole cluster (and, filtered by attributeName alone, returns nothing on moto).
    """
    from hostagent.aws.errors import AWSError, aws_call

    with aws_call("ecs:DescribeContainerInstances", where=cluster):
        answer = ecs.describe_container_instances(cluster=cluster, containerInstances=[instance_arn])
    instances = answer.get("containerInstances") or []
    if not instances:
        reasons = ", ".join(f.get("reason", "?") for f in answer.get("failures") or []) or "not found"
        raise AWSError(f"container instance {instance_arn} not in cluster {cluster}: {reasons}",
                       action="ecs:DescribeContainerInstances", code="MISSING", where=cluster)
    want = f"{prefix}."
    return {a["name"]: a["value"] for a in instances[0].get("attributes") or []
            if a.get("name", "").startswith(want) and a.get("value") is not None}
