#!/usr/bin/env python3
"""Prune over 5,000 of hostagent's own snapshots: API calls by operation, time, ratio to a baseline.

    python3 benchmarks/bench_prune.py [--snapshots 5000] [--keep-last 7]

Starts its own moto server (in process, spoken to over HTTP by boto3), creates the volume, and
puts N snapshots carrying hostagent's tags straight into moto's backend (one hour apart, so the
history is realistic and ordered; going through the API would take ~10 ms each). moto is taught to
page DescribeSnapshots like AWS (tests/support/moto_paging.py; at most 1,000 per page).

Measured in the same run:
  listing   the bare paginated DescribeSnapshots listing with the same filters (what prune cannot
            do without)
  prune     `hostagent prune` through the flow (find the volume, list, decide, DeleteSnapshot each)
  floor     listing + a bare boto3 loop of DeleteSnapshot over as many snapshots (of another
            volume, seeded the same way): the least any prune must do against this server
Every request is counted by operation through a botocore before-send hook; the benchmark fails if
prune describes a single snapshot on its own (DescribeSnapshots with SnapshotIds).
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"  # before moto is imported

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CallCounter:
    """Counts requests per operation; notes DescribeSnapshots calls that name snapshot ids."""

    def __init__(self):
        self.by_operation: collections.Counter = collections.Counter()
        self.single_describes = 0

    def __call__(self, request, event_name, **kw):
        operation = event_name.rsplit(".", 1)[-1]
        self.by_operation[operation] += 1
        if operation == "DescribeSnapshots":
            body = request.body.decode() if isinstance(request.body, bytes) else str(request.body)
            if any(k.startswith("SnapshotId") for k in parse_qs(body)):
                self.single_describes += 1

    def attach(self, client):
        client.meta.events.register("before-send.ec2.*", self)
        return self


def seed(volume_id: str, n: int, tags_for) -> tuple[float, list[str]]:
    """Put n snapshots with our tags into moto's backend; returns seconds taken and their ids."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
    start = time.perf_counter()
    ids = []
    newest = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)
    for i in range(n):
        when = newest - timedelta(hours=i)
        snap = backend.create_snapshot(volume_id, "hostagent crash snapshot (benchmark seed)")
        snap.start_time = when.replace(tzinfo=None)  # moto keeps naive UTC
        snap.add_tags(tags_for(when))
        ids.append(snap.id)
    return time.perf_counter() - start, ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=5000)
    parser.add_argument("--keep-last", type=int, default=7)
    opts = parser.parse_args()

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION)
    os.environ.pop("AWS_PROFILE", None)
    try:
        return run(opts)
    finally:
        server.stop()


def run(opts) -> int:
    import boto3

    from hostagent.aws.clients import AWS
    from hostagent.aws.snapshots import MARKER_KEY, MARKER_VALUE, VOLUME_KEY, snapshot_tags
    from hostagent.cli import Context
    from hostagent.flows.snapshot import run_prune
    from tests.support.moto_paging import paginated_snapshots

    ec2 = boto3.client("ec2", region_name=REGION)
    volume_tags = {"Name": "couch-data-bench", "app": "grand-central"}
    vol = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=8, TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in volume_tags.items()]}
    ])["VolumeId"]
    n = opts.snapshots
    seed_seconds, _ = seed(vol, n, lambda when: snapshot_tags(vol, volume_tags, "crash", when))
    # Someone else's snapshot of the same volume: must survive.
    foreign = ec2.create_snapshot(VolumeId=vol, Description="by hand")["SnapshotId"]

    tmp = tempfile.mkdtemp(prefix="bench-prune-")
    config = os.path.join(tmp, "hostagent.toml")
    with open(config, "w") as f:
        f.write(f'[volume]\ntags = {{ Name = "couch-data-bench" }}\n\n'
                f'[host]\nlock_file = "{tmp}/lock"\nstate_dir = "{tmp}/state"\n\n'
                f'[snapshot]\nkeep_last = {opts.keep_last}\nfreeze = false\n')

    with paginated_snapshots():
        # Baseline: the bare listing prune needs, with the same filters and page size.
        listing = boto3.client("ec2", region_name=REGION)
        base_calls = CallCounter().attach(listing)
        start = time.perf_counter()
        seen = 0
        for page in listing.get_paginator("describe_snapshots").paginate(
                OwnerIds=["self"],
                Filters=[{"Name": f"tag:{MARKER_KEY}", "Values": [MARKER_VALUE]},
                         {"Name": f"tag:{VOLUME_KEY}", "Values": [vol]}],
                PaginationConfig={"PageSize": 1000}):
            seen += len(page["Snapshots"])
        baseline = time.perf_counter() - start
        assert seen == n, f"baseline listing saw {seen} of {n}"

        aws = AWS()
        calls = CallCounter().attach(aws.ec2)
        start = time.perf_counter()
        report = run_prune(Context(config_path=config), argparse.Namespace(dry_run=False), aws=aws)
        pruned = time.perf_counter() - start

    # Floor: the same number of deletes through a bare client, on a second seeded volume.
    other = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=8)["VolumeId"]
    _, doomed = seed(other, n - opts.keep_last,
                     lambda when: snapshot_tags(other, {}, "crash", when))
    bare = boto3.client("ec2", region_name=REGION)
    start = time.perf_counter()
    for snapshot_id in doomed:
        bare.delete_snapshot(SnapshotId=snapshot_id)
    bare_deletes = time.perf_counter() - start
    floor = baseline + bare_deletes

    remaining = {s["SnapshotId"] for page in ec2.get_paginator("describe_snapshots").paginate(
        OwnerIds=["self"]) for s in page["Snapshots"]}
    deleted = len(report.items)
    pages = calls.by_operation["DescribeSnapshots"]
    deletes = calls.by_operation["DeleteSnapshot"]
    expected_pages = -(-n // 1000)

    print(f"seed: {n} snapshots with hostagent's tags into moto's backend in {seed_seconds:.2f} s")
    print(f"listing (bare paginated DescribeSnapshots): {base_calls.by_operation['DescribeSnapshots']} "
          f"pages, {baseline:.2f} s")
    print(f"prune keep_last={opts.keep_last}: {pruned:.2f} s, deleted {deleted}, "
          f"kept {len(report.extra['kept'])}")
    print("  API calls by operation: " + ", ".join(
        f"{op}={count}" for op, count in sorted(calls.by_operation.items())))
    print(f"  per-snapshot describes: {calls.single_describes}")
    print(f"  total calls: {sum(calls.by_operation.values())} "
          f"(= {pages} pages + {deletes} deletes + "
          f"{sum(calls.by_operation.values()) - pages - deletes} other)")
    print(f"floor (listing + bare boto3 loop of {len(doomed)} DeleteSnapshot): {floor:.2f} s "
          f"({1000 * bare_deletes / max(len(doomed), 1):.2f} ms per delete)")
    print(f"ratio prune / listing alone: {pruned / baseline:.1f}x; "
          f"prune / floor: {pruned / floor:.2f}x")

    failures = []
    if calls.single_describes:
        failures.append(f"{calls.single_describes} per-snapshot DescribeSnapshots calls")
    if pages != expected_pages:
        failures.append(f"{pages} DescribeSnapshots pages, expected {expected_pages}")
    if deletes != n - opts.keep_last or deleted != n - opts.keep_last:
        failures.append(f"{deletes} deletes / {deleted} reported, expected {n - opts.keep_last}")
    if foreign not in remaining or len(remaining) != opts.keep_last + 1:
        failures.append(f"remaining {len(remaining)} snapshots, foreign kept: {foreign in remaining}")
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
