"""The agent's AWS calls, run in a short-lived child process: JSON request on stdin, JSON answer on stdout.

Why a child: importing boto3 and building one ECS client costs ~33 MB of RSS (46 MB for a bare
python with an ECS client, 62 MB with EC2 too), which would break the agent's 45 MB footprint
for the whole life of the service. The agent calls AWS only on change (attributes), every few
minutes (metrics) and rarely (snapshot age), so paying ~0.35 s of CPU in a child each time is
far cheaper than holding boto3 resident.

Request keys (each optional): "ecs" {cluster, arn, prefix, attributes, sync}, "snapshots"
{volume_id}, "metrics" {namespace, volume_id, samples}, "couchdb_admin" {url} (answers the
name and password of [couchdb] admin_secret, on stdout only, to the agent's pipe). Each part answers {"ok": true, …} or
{"ok": false, "error": "<one line>"} independently, so one failing service does not hide others.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any

from hostagent.errors import HostagentError


def _failure(exc: BaseException) -> dict:
    if isinstance(exc, HostagentError):
        return {"ok": False, "error": str(exc), "code": getattr(exc, "code", "")}
    from hostagent.aws.errors import map_aws_error

    mapped = map_aws_error(exc, "aws")
    if mapped is not None:
        return {"ok": False, "error": str(mapped), "code": mapped.code}
    return {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}


def do_ecs(aws_factory, part: dict) -> dict:
    from hostagent.aws import ecs_attributes as ea

    arn = part["arn"]
    region = arn.split(":")[3] if arn.count(":") >= 5 else ""
    ecs = aws_factory(region).ecs
    desired = dict(part.get("attributes") or {})
    current = None
    if part.get("sync"):
        current = ea.current_attributes(ecs, part["cluster"], arn, part["prefix"])
        to_put = ea.changed_attributes(desired, current)
    else:
        to_put = desired
    ea.put_attributes(ecs, part["cluster"], arn, to_put)
    return {"ok": True, "put": to_put, "current": current}


def do_snapshots(aws_factory, part: dict) -> dict:
    from hostagent.aws.snapshots import list_snapshots

    records = list_snapshots(aws_factory("").ec2, part["volume_id"])
    completed = [r for r in records if r.state == "completed"]
    newest = completed[0] if completed else None
    return {"ok": True, "count": len(records),
            "pending": sum(1 for r in records if r.state == "pending"),
            "newest": None if newest is None else {"id": newest.id,
                                                   "start_time": newest.start_time.isoformat()}}


def do_metrics(aws_factory, part: dict) -> dict:
    from hostagent import metrics

    aws = aws_factory("")
    instance_id = None
    if not part.get("volume_id"):
        instance_id = aws.identity.instance_id
    dims = metrics.dimensions(part.get("volume_id"), instance_id)
    samples = [metrics.Sample.from_json(s) for s in part.get("samples") or []]
    sent = metrics.put_metrics(aws.cloudwatch, part["namespace"], metrics.metric_data(samples, dims))
    return {"ok": True, "sent": sent}


def do_couchdb_admin(aws_factory, part: dict) -> dict:
    from hostagent.couchdb_admin import fetch_admin_secret

    secret = fetch_admin_secret(aws_factory("").s3, part["url"])
    return {"ok": True, "name": secret.name, "password": secret.password}


HANDLERS = {"ecs": do_ecs, "snapshots": do_snapshots, "metrics": do_metrics,
            "couchdb_admin": do_couchdb_admin}


def handle(request: dict, aws_factory=None) -> dict:
    if aws_factory is None:
        from hostagent.aws.clients import AWS

        cache: dict[str, Any] = {}

        def aws_factory(region: str):
            if region not in cache:
                cache[region] = AWS(region)
            return cache[region]

    answer: dict[str, Any] = {"at": datetime.now(timezone.utc).isoformat()}
    for name, handler in HANDLERS.items():
        if name not in request:
            continue
        try:
            answer[name] = handler(aws_factory, request[name])
        except Exception as exc:  # each part fails on its own; the agent logs the one line
            answer[name] = _failure(exc)
    return answer


def main() -> int:
    try:
        request = json.loads(sys.stdin.read() or "{}")
    except ValueError as exc:
        print(json.dumps({"error": f"bad request: {exc}"}))
        return 2
    print(json.dumps(handle(request), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
