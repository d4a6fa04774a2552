"""`restore SNAPSHOT_ID [--apply]`: a new persistence volume from a snapshot in this AZ; the
old one is re-tagged, never deleted.

Without --apply restore only creates and tags, so it can run while CouchDB still serves from the
old volume, and prints the swap as next steps. With --apply it does the swap too, under one host
lock from the unmount to the mounted new volume: refuse while anything has files open on the
volume, unmount, detach *our own* old volume from this instance (never force, never another
instance's, never deleted), then the bootstrap flow attaches and mounts the restored one, and
verify-mount's checks run.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from hostagent.aws.volume import IN_SERVICE_TAG, RESTORED_FROM_TAG as RESTORED_FROM_KEY
from hostagent.errors import OperationError, Reason, RefusedError, UsageError
from hostagent.log import get_logger
from hostagent.plan import Step, apply_steps, render_steps, skipped
from hostagent.report import Report

log = get_logger(__name__)

SNAPSHOT_ID_RE = re.compile(r"^snap-([0-9a-f]{8}|[0-9a-f]{17})$")
RESTORED_AT_KEY = "hostagent:restored-at"
REPLACED_BY_KEY = "hostagent:replaced-by"
REPLACED_AT_KEY = "hostagent:replaced-at"
REPLACED_PREFIX = "hostagent:replaced:"  # + the tag key the old volume was found by
DEFAULT_VOLUME_TYPE = "gp3"
AVAILABLE_TIMEOUT = 900.0
POLL_FIRST, POLL_MAX = 1.0, 10.0


def _tags(raw: Mapping) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in raw.get("Tags") or ()}


def _in_service(volume: Mapping) -> bool:
    """Attached now, or put to use by a bootstrap since (and perhaps detached again)."""
    return volume.get("State") == "in-use" or IN_SERVICE_TAG in _tags(volume) or any(
        a.get("State") != "detached" for a in volume.get("Attachments") or ())


@dataclass
class Retag:
    volume_id: str
    set_tags: dict[str, str]
    delete_tags: dict[str, str]  # key -> value: deleted only if it still has that value
    done_already: bool = False


@dataclass
class RestorePlan:
    snapshot_id: str
    availability_zone: str
    reuse_volume_id: str | None
    create_args: dict[str, Any] | None
    new_tags: dict[str, str]
    retags: list[Retag] = field(default_factory=list)


def plan_restore(snapshot: Mapping, *, availability_zone: str, old_volumes: list[Mapping],
                 restored_volumes: list[Mapping], search_tags: Mapping[str, str],
                 now: datetime) -> RestorePlan:
    """Pure: what to create (or reuse) and how to re-tag the volumes the search finds today."""
    from hostagent.aws.snapshots import user_tags
    from hostagent.aws.volume import FORMATTED_TAG

    snap_id = snapshot["SnapshotId"]
    # Only a restored volume not yet put in service is handed back (a rerun, or a rerun after a
    # crash). Once attached it holds live data: restoring the same snapshot again is a new
    # rollback, which makes a fresh volume and retags the live one as replaced.
    here = [v for v in restored_volumes if v.get("AvailabilityZone") == availability_zone
            and not _in_service(v)]
    if len(here) > 1:
        ids = ", ".join(v["VolumeId"] for v in here)
        raise OperationError(
            f"several volumes in {availability_zone} were restored from {snap_id}: {ids}",
            hint="keep one: retag or delete the others by hand, then run restore again")
    reuse = here[0] if here else None
    old = [v for v in old_volumes
           if v["VolumeId"] != (reuse or {}).get("VolumeId")
           and (_tags(v).get(RESTORED_FROM_KEY) != snap_id or _in_service(v))]
    stamp = now.astimezone(timezone.utc)
    date = stamp.strftime("%Y%m%d")
    iso = stamp.isoformat(timespec="seconds")

    previous = old[0] if old else None
    if previous:
        base = user_tags(_tags(previous))
    else:
        base = {k: v for k, v in user_tags(_tags(snapshot)).items() if k != "Name"}
    new_tags = {**base, **dict(search_tags)}
    new_tags.setdefault("Name", f"restored-{snap_id}")
    formatted = _tags(previous).get(FORMATTED_TAG) if previous else None
    # It holds hostagent's filesystem: if it ever looks blank, bootstrap must refuse, not format.
    new_tags.update({RESTORED_FROM_KEY: snap_id, RESTORED_AT_KEY: iso,
                     FORMATTED_TAG: formatted or iso})

    create_args = None
    if reuse is None:
        size = int(snapshot.get("VolumeSize") or 0)
        create_args = {"SnapshotId": snap_id, "AvailabilityZone": availability_zone,
                       "VolumeType": DEFAULT_VOLUME_TYPE}
        if previous:
            create_args["VolumeType"] = previous.get("VolumeType") or DEFAULT_VOLUME_TYPE
            size = max(size, int(previous.get("Size") or 0))
            if create_args["VolumeType"] in ("gp3", "io1", "io2") and previous.get("Iops"):
                create_args["Iops"] = int(previous["Iops"])
            if create_args["VolumeType"] == "gp3" and previous.get("Throughput"):
                create_args["Throughput"] = int(previous["Throughput"])
            if previous.get("Encrypted") and not snapshot.get("Encrypted"):
                # Never let a restore quietly drop encryption at rest.
                create_args["Encrypted"] = True
                if previous.get("KmsKeyId"):
                    create_args["KmsKeyId"] = previous["KmsKeyId"]
        if snapshot.get("Encrypted"):
            # Said explicitly rather than left to EC2's defaults: the restored volume keeps the
            # snapshot's customer-managed key, never the account's default EBS key.
            create_args["Encrypted"] = True
            if snapshot.get("KmsKeyId"):
                create_args["KmsKeyId"] = snapshot["KmsKeyId"]
        if size:
            create_args["Size"] = size

    retags = []
    for vol in old:
        tags = _tags(vol)
        name = tags.get("Name") or vol["VolumeId"]
        set_tags = {"Name": f"{name}-replaced-{date}", REPLACED_AT_KEY: iso}
        if "Name" in tags:
            set_tags[f"{REPLACED_PREFIX}Name"] = tags["Name"]
        delete = {}
        for key, value in search_tags.items():
            if key in tags:
                set_tags[f"{REPLACED_PREFIX}{key}"] = tags[key]
                if key != "Name":
                    delete[key] = tags[key]
        done = bool(reuse) and tags.get(REPLACED_BY_KEY) == reuse["VolumeId"]
        retags.append(Retag(vol["VolumeId"], set_tags, delete, done_already=done))
    return RestorePlan(snap_id, availability_zone, reuse["VolumeId"] if reuse else None,
                       create_args, new_tags, retags)


def find_current_volumes(ec2, config) -> list[dict]:
    """Volumes the config finds today, region-wide and all of them (by id, or by exact tags):
    restore re-tags every one, wherever it is, so that the search finds only the new volume."""
    from hostagent.aws.volume import volumes_matching

    if config.volume.id:
        return volumes_matching(ec2, volume_id=config.volume.id)
    return volumes_matching(ec2, tags=config.volume.tags)


def find_restored_volumes(ec2, snapshot_id: str) -> list[dict]:
    from hostagent.aws.volume import volumes_matching

    return volumes_matching(ec2, tags={RESTORED_FROM_KEY: snapshot_id})


def wait_available(ec2, volume_id: str, *, timeout: float = AVAILABLE_TIMEOUT,
                   sleep=time.sleep) -> str:
    """Poll until the new volume is available; NotFound right after CreateVolume is "not
    visible yet" (aws.errors.VISIBILITY_WINDOW), not an error."""
    from hostagent.aws.volume import describe_new_volume

    deadline = time.monotonic() + timeout
    interval = POLL_FIRST
    while True:
        state = describe_new_volume(ec2, volume_id, sleep=sleep).get("State", "")
        if state in ("available", "in-use"):
            return state
        if state == "error":
            raise OperationError(f"volume {volume_id} failed to create (state error)",
                                 hint="delete it and run `hostagent restore` again")
        if time.monotonic() + interval > deadline:
            raise OperationError(f"volume {volume_id} still {state} after {timeout:.0f}s",
                                 hint="run `hostagent restore` again later: it reuses this volume")
        sleep(interval)
        interval = min(interval * 2, POLL_MAX)


def next_steps(config, new_id: str, old_ids: list[str]) -> list[str]:
    mp = config.filesystem.mount_point
    steps = ["stop CouchDB on this host (stop its ECS task, or set the service's desired count "
             "to 0)",
             f"umount {mp}"]
    for old in old_ids:
        steps.append(f"aws ec2 detach-volume --volume-id {old}   (the old volume: kept, "
                     "delete it yourself once the restore is proven)")
    if config.volume.id:
        steps.append(f"set volume.id = \"{new_id}\" in {config.source} (the config names the "
                     "volume by id, not by tags)")
    steps.append("hostagent bootstrap   (attaches and mounts the restored volume; it is not "
                  "formatted: it holds the snapshot's filesystem)")
    steps.append("hostagent verify-mount, then start CouchDB again")
    return steps


DETACH_TIMEOUT = 300.0


def users_of_mount(config) -> tuple[str | None, list[tuple[int, str]]]:
    """(device of what is mounted at the mount point, processes using it)."""
    import os

    from hostagent.adapters.mounts import mount_at, read_mountinfo
    from hostagent.adapters.procs import processes_using

    entry = mount_at(os.path.normpath(config.filesystem.mount_point), read_mountinfo())
    if entry is None:
        return None, []
    return entry.major_minor, processes_using(entry.major_minor)


def refuse_if_in_use(config) -> None:
    _, users = users_of_mount(config)
    if users:
        listing = ", ".join(f"{comm} (pid {pid})" for pid, comm in users[:8])
        raise RefusedError(
            f"{len(users)} process(es) have files open on {config.filesystem.mount_point}: "
            f"{listing}; refusing to unmount it under them", where=config.filesystem.mount_point,
            hint="stop the CouchDB task first (set the ECS service's desired count to 0), then "
                 "run the restore again", reason=Reason.VOLUME_IN_USE)


def check_apply_possible(config) -> None:
    """Every refusal --apply can make, before anything is created."""
    if config.volume.id:
        raise UsageError("restore --apply needs the volume found by [volume] tags: with "
                         "volume.id the config itself would have to change", where=config.source,
                         hint="run restore without --apply and follow its next steps, or name the "
                              "volume by tags")
    refuse_if_in_use(config)


def swap_steps(config, ec2, identity, old_ids: list[str], current: list[dict]) -> list[Step]:
    """Unmount, detach our own old volume(s) from this instance, bootstrap the new, verify."""
    import os

    from hostagent.adapters import mounts
    from hostagent.aws.volume import detach_from_self

    mp = os.path.normpath(config.filesystem.mount_point)
    steps = []

    def unmount() -> str:
        refuse_if_in_use(config)  # again, right before: a task may have started since
        mounts.unmount(mp)
        return "unmounted (the bare mount point stays immutable)"

    device, _ = users_of_mount(config)
    if device is None:
        steps.append(skipped("umount", f"umount {mp}", "not mounted"))
    else:
        steps.append(Step("umount", f"umount {mp}",
                          "nothing has files open on it: the old volume can go", run=unmount))
    attached_here = {v["VolumeId"] for v in current if any(
        a.get("InstanceId") == identity.instance_id and a.get("State") != "detached"
        for a in v.get("Attachments") or ())}
    for old in old_ids:
        if old not in attached_here:
            steps.append(skipped("detach-old", f"DetachVolume {old}", "not attached here"))
            continue
        steps.append(Step("detach-old", f"DetachVolume {old} from {identity.instance_id}",
                          "our own old volume, unmounted: detached (never forced), kept",
                          run=lambda old=old: detach_from_self(ec2, identity, old,
                                                               timeout=DETACH_TIMEOUT)))
    return steps


def bootstrap_and_verify(config) -> list[Step]:
    """The bootstrap flow, in this process under the lock restore holds, then the checks."""
    from hostagent.checks import run_checks
    from hostagent.flows.bootstrap import bootstrap

    inner: list[Step] = []
    bootstrap(config, False, inner, {})
    checks = run_checks(config)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise OperationError("the restored volume is mounted but verify-mount fails: " +
                             "; ".join(f"{c.name}: {c.detail}" for c in failed),
                             hint="run `hostagent verify-mount` for the whole table")
    return inner


def run(ctx, args, *, aws=None, now=None) -> Report:
    from hostagent.aws import snapshots as snaps
    from hostagent.aws import volume as vol
    from hostagent.aws.clients import make_aws, require_aws_volume
    from hostagent.lock import host_lock

    config = ctx.config
    snapshot_id = args.snapshot_id
    if not SNAPSHOT_ID_RE.match(snapshot_id or ""):
        raise UsageError(f"{snapshot_id!r} is not an EBS snapshot id (snap-…)",
                         hint="`hostagent snapshots` lists this volume's snapshots")
    require_aws_volume(config)
    apply_swap = getattr(args, "apply", False)
    if apply_swap:
        check_apply_possible(config)
    aws = make_aws(aws)
    dry_run = getattr(args, "dry_run", False)
    moment = (now or (lambda: datetime.now(timezone.utc)))()
    lock = contextlib.nullcontext() if dry_run else host_lock(config.host.lock_file)
    state: dict[str, Any] = {}

    with lock:
        ec2 = aws.ec2
        snapshot = snaps.describe_snapshot(ec2, snapshot_id)
        if snapshot.get("State") != "completed":
            raise OperationError(
                f"snapshot {snapshot_id} is {snapshot.get('State')} "
                f"({snapshot.get('Progress') or '?'}), not completed: cannot restore from it yet",
                hint=f"wait for it: `aws ec2 wait snapshot-completed --snapshot-ids {snapshot_id}`")
        identity = aws.identity
        plan = plan_restore(
            snapshot, availability_zone=identity.availability_zone,
            old_volumes=find_current_volumes(ec2, config),
            restored_volumes=find_restored_volumes(ec2, snapshot_id),
            search_tags=dict(config.volume.tags), now=moment)
        state["volume_id"] = plan.reuse_volume_id

        def create() -> str:
            state["volume_id"] = vol.create_volume(ec2, plan.create_args, plan.new_tags)
            return state["volume_id"]

        def wait() -> str:
            return f"{state['volume_id']} {wait_available(ec2, state['volume_id'])}"

        def retag_step(retag: Retag):
            def apply() -> str:
                tags = {**retag.set_tags, REPLACED_BY_KEY: state["volume_id"]}
                # New tags first: the old volume is never without a trace of what it was.
                snaps.set_tags(ec2, retag.volume_id, tags)
                if retag.delete_tags:
                    vol.delete_tags(ec2, retag.volume_id, retag.delete_tags)
                return f"Name={tags['Name']}"
            return apply

        steps: list[Step] = []
        current = find_current_volumes(ec2, config) if apply_swap else []
        if plan.reuse_volume_id:
            steps.append(skipped("create-volume", f"reuse {plan.reuse_volume_id}",
                                 f"already restored from {snapshot_id} (tag {RESTORED_FROM_KEY})"))
        else:
            spec = ", ".join(f"{k}={v}" for k, v in plan.create_args.items()
                             if k not in ("SnapshotId", "AvailabilityZone"))
            steps.append(Step("create-volume",
                              f"CreateVolume from {snapshot_id} in {plan.availability_zone} "
                              f"({spec})",
                              "this instance's AZ; tagged so the next bootstrap finds it: "
                              + ", ".join(f"{k}={v}" for k, v in plan.new_tags.items()),
                              run=create))
        steps.append(Step("wait-available", "poll DescribeVolumes until available",
                          "the volume must exist before the old one stops matching", run=wait))
        if apply_swap:
            steps += swap_steps(config, ec2, identity, [r.volume_id for r in plan.retags],
                                current)
        for retag in plan.retags:
            action = (f"retag {retag.volume_id}: " + ", ".join(
                f"{k}={v}" for k, v in retag.set_tags.items())
                + (f"; remove {', '.join(retag.delete_tags)}" if retag.delete_tags else ""))
            if retag.done_already:
                steps.append(skipped("retag-old", action, "done by an earlier run"))
            else:
                steps.append(Step("retag-old", action,
                                  "so the tag search finds only the restored volume; the old one "
                                  "is kept, never deleted or detached", run=retag_step(retag)))
        apply_steps(steps, dry_run=dry_run)
        if apply_swap:
            swap = Step("bootstrap", "bootstrap + verify-mount",
                        "attach and mount the restored volume (its filesystem is the snapshot's: "
                        "reused, never formatted), then every verify-mount check",
                        run=lambda: "; ".join(f"{s.name} {s.status}" for s in
                                              bootstrap_and_verify(config)))
            steps.append(swap)
            apply_steps([swap], dry_run=dry_run)

    new_id = state.get("volume_id") or "(new volume)"
    old_ids = [r.volume_id for r in plan.retags]
    todo = [] if apply_swap else next_steps(config, new_id, old_ids)
    text = render_steps(steps) + "\n\n"
    text += ("Dry run: nothing was changed. " if dry_run else
             f"Restored {snapshot_id} to {new_id} in {plan.availability_zone}. ")
    if todo:
        text += "Next steps:\n" + "\n".join(f"  {i}. {s}" for i, s in enumerate(todo, 1))
    elif not dry_run:
        text += (f"The restored volume is mounted and verified; the old one is kept: delete it "
                 "yourself once the restore is proven. Start CouchDB again.")
    return Report(ok=True, key="steps", items=[s.as_dict() for s in steps], text=text,
                  extra={"snapshot_id": snapshot_id, "volume_id": state.get("volume_id"),
                         "replaced": old_ids, "next_steps": todo, "dry_run": dry_run})
