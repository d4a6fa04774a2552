"""Optional CloudWatch metrics ([metrics] enabled): disk used %, newest snapshot age, CouchDB up."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Iterator, Mapping, Sequence

DISK_USED = "DiskUsedPercent"
SNAPSHOT_AGE = "SnapshotAgeHours"
COUCHDB_UP = "CouchDBUp"
# PutMetricData has taken 20 data points per call for most of its life (1,000 since 2023); 20
# works against every endpoint and implementation, and a flush rarely holds more than ~40.
MAX_PER_CALL = 20


@dataclass(frozen=True)
class Sample:
    """One round's values; None means 'not known this round' and sends nothing for that metric."""

    at: datetime
    disk_used_percent: float | None
    snapshot_age_hours: float | None
    couchdb_up: bool | None

    def to_json(self) -> dict:
        return {"at": self.at.isoformat(), "disk_used_percent": self.disk_used_percent,
                "snapshot_age_hours": self.snapshot_age_hours, "couchdb_up": self.couchdb_up}

    @classmethod
    def from_json(cls, data: Mapping) -> "Sample":
        return cls(datetime.fromisoformat(data["at"]), data.get("disk_used_percent"),
                   data.get("snapshot_age_hours"), data.get("couchdb_up"))


def dimensions(volume_id: str | None, instance_id: str | None) -> list[dict]:
    """Per volume when known: the data's history follows the volume across replaced instances."""
    if volume_id:
        return [{"Name": "VolumeId", "Value": volume_id}]
    if instance_id:
        return [{"Name": "InstanceId", "Value": instance_id}]
    return []


def metric_data(samples: Iterable[Sample], dims: Sequence[Mapping]) -> list[dict]:
    """Samples → PutMetricData entries, each with its own timestamp (buffered, sent later)."""
    data = []
    for s in samples:
        at = s.at if s.at.tzinfo else s.at.replace(tzinfo=timezone.utc)
        for name, value, unit in (
            (DISK_USED, s.disk_used_percent, "Percent"),
            (SNAPSHOT_AGE, s.snapshot_age_hours, "None"),
            (COUCHDB_UP, None if s.couchdb_up is None else float(s.couchdb_up), "Count"),
        ):
            if value is None:
                continue
            data.append({"MetricName": name, "Dimensions": list(dims), "Timestamp": at,
                         "Value": round(float(value), 3), "Unit": unit})
    return data


def chunks(items: Sequence, size: int = MAX_PER_CALL) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def put_metrics(cloudwatch, namespace: str, data: Sequence[dict]) -> int:
    from hostagent.aws.errors import aws_call

    sent = 0
    for batch in chunks(data):
        with aws_call("cloudwatch:PutMetricData", where=namespace):
            cloudwatch.put_metric_data(Namespace=namespace, MetricData=batch)
        sent += len(batch)
    return sent
