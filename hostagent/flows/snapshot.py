"""`snapshot`, `snapshots` and `prune`: consistent EBS snapshots of the volume, tagged, with retention."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from hostagent.aws.clients import make_aws, require_aws_volume
from hostagent.errors import ConfigError, HostagentError, OperationError, RefusedError
from hostagent.log import get_logger
from hostagent.plan import Step, apply_steps, render_steps
from hostagent.report import Report, render_table
from hostagent.retention import Decision, Policy, SnapshotRecord, decide_retention

log = get_logger(__name__)

WAIT_TIMEOUT = 4 * 3600.0  # a first full snapshot of a large volume can take hours
MAX_COPIES_PER_RUN = 5  # AWS runs at most 20 concurrent copies per destination region


def find_configured_volume(config, aws):
    """The volume bootstrap uses: by id, or by tags within this instance's AZ (one persistence
    volume per AZ: the others are other hosts' volumes)."""
    from hostagent.aws.volume import find_volume

    zone = aws.identity.availability_zone if config.volume.tags and not config.volume.id else None
    return find_volume(aws.ec2, volume_id=config.volume.id, tags=config.volume.tags,
                       availability_zone=zone)


def policy_of(config) -> Policy:
    s = config.snapshot
    return Policy(s.keep_last, s.keep_daily, s.keep_weekly, s.keep_monthly)


@dataclass
class PruneOutcome:
    region: str
    decisions: list[Decision] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def to_delete(self) -> list[SnapshotRecord]:
        return [d.snapshot for d in self.decisions if not d.keep]

    def summary(self, dry_run: bool) -> str:
        kept = sum(d.keep for d in self.decisions)
        if dry_run:
            return f"{self.region}: would delete {len(self.to_delete)}, keep {kept}"
        text = f"{self.region}: deleted {len(self.deleted)}, kept {kept}"
        if self.skipped:
            text += f", {len(self.skipped)} in use (kept)"
        return text


def prune_region(ec2, volume_id: str, policy: Policy, *, now: datetime, protect_ids=(),
                 dry_run: bool) -> PruneOutcome:
    """List (all pages or nothing), decide, delete one by one."""
    from hostagent.aws.snapshots import delete_snapshots, list_snapshots

    outcome = PruneOutcome(region=ec2.meta.region_name)
    records = list_snapshots(ec2, volume_id)
    outcome.decisions = decide_retention(records, policy, now=now, protect_ids=protect_ids)
    if not dry_run and outcome.to_delete:
        result = delete_snapshots(ec2, [s.id for s in outcome.to_delete])
        outcome.deleted, outcome.skipped = result.deleted, result.skipped
    return outcome


def prune_all(aws, config, volume_id: str, *, now: datetime, protect_ids=(),
              dry_run: bool) -> list[PruneOutcome]:
    policy = policy_of(config)
    outcomes = [prune_region(aws.ec2, volume_id, policy, now=now, protect_ids=protect_ids,
                             dry_run=dry_run)]
    dest = config.snapshot.copy_to_region
    if dest and dest != aws.ec2.meta.region_name:
        outcomes.append(prune_region(aws.client_for_region("ec2", dest), volume_id, policy,
                                     now=now, protect_ids=protect_ids, dry_run=dry_run))
    return outcomes


def copy_missing(aws, config, volume_id: str, *, now: datetime) -> list[str]:
    """Copy completed snapshots the DR region lacks and its retention would keep; newest first.

    AWS copies only completed snapshots, so one still pending is copied by a later run (or by
    this one with --wait). Copies carry the original's tags and its time (hostagent:taken-at).
    """
    from hostagent.aws.snapshots import copied_sources, copy_snapshot, list_snapshots

    src_region = aws.ec2.meta.region_name
    dest_ec2 = aws.client_for_region("ec2", config.snapshot.copy_to_region)
    sources = [r for r in list_snapshots(aws.ec2, volume_id) if r.state == "completed"]
    present = list_snapshots(dest_ec2, volume_id)
    have = copied_sources(present)
    missing = [r for r in sources if r.id not in have]
    if not missing:
        return []
    # Pretend the missing ones were already there: copy only what retention there would keep.
    decisions = decide_retention(present + missing, policy_of(config), now=now)
    wanted = {d.snapshot.id for d in decisions if d.keep}
    copies = []
    for record in [r for r in missing if r.id in wanted][:MAX_COPIES_PER_RUN]:
        copies.append(copy_snapshot(dest_ec2, source_region=src_region, record=record,
                                    description=f"hostagent copy of {record.id} from {src_region}",
                                    kms_key_id=config.snapshot.copy_kms_key))
    return copies


def check_copy_encryption(config, volume: dict) -> None:
    """Refuse (exit 2) copies that EC2 would re-encrypt under the destination's default key.

    A copy to another region can never keep its source's key (KMS keys are regional); without
    KmsKeyId EC2 silently uses the destination's default EBS key. Which key that should be is
    the operator's choice, so it must be said: snapshot.copy_kms_key ("alias/aws/ebs" accepts
    the default). Pure: `volume` is the volume's DescribeVolumes entry.
    """
    s = config.snapshot
    if not s.copy_to_region or s.copy_kms_key or not volume.get("Encrypted"):
        return
    key = volume.get("KmsKeyId") or "the default EBS key"
    raise ConfigError(
        f"volume {volume.get('VolumeId')} is encrypted ({key}); its copies to "
        f"{s.copy_to_region} would be re-encrypted under that region's default EBS key",
        where=config.source,
        hint=f'set [snapshot] copy_kms_key to a KMS key in {s.copy_to_region} (its ARN, '
             'alias/NAME or key id), or copy_kms_key = "alias/aws/ebs" to accept the default')


def _mounted_volume_id(config) -> str | None:
    """The EBS volume id of the disk mounted at the mount point: from its NVMe serial, or (a
    Xen disk has none) from what bootstrap recorded for that very device; None if unknown."""
    from hostagent.adapters.blockdev import list_block_devices
    from hostagent.adapters.mounts import mount_at, read_mountinfo
    from hostagent.state import VOLUME_RECORD, read_record

    entry = mount_at(config.filesystem.mount_point, read_mountinfo())
    if entry is None:
        return None
    try:
        devices = list_block_devices()
    except HostagentError:
        devices = []
    for dev in devices:
        if dev.major_minor == entry.major_minor and dev.volume_id:
            return dev.volume_id
    record = read_record(config.host.state_dir, VOLUME_RECORD) or {}
    if record.get("major_minor") == entry.major_minor:
        return record.get("volume_id")
    return None


def check_frozen_is_the_volume(config, volume, identity) -> None:
    """Freezing our mount point only makes a snapshot consistent if the volume is mounted there."""
    mp = config.filesystem.mount_point
    attachment = volume.attachment_of(identity.instance_id)
    if attachment is None or attachment.state != "attached":
        raise OperationError(
            f"volume {volume.volume_id} is not attached to this instance ({identity.instance_id}); "
            f"freezing {mp} here would not make its snapshot consistent",
            where=volume.describe(),
            hint="run `hostagent snapshot` on the instance that has the volume, or set "
                 "snapshot.freeze = false for a crash-consistent snapshot")
    mounted = _mounted_volume_id(config)
    if mounted and mounted != volume.volume_id:
        raise RefusedError(
            f"{mp} holds {mounted}, not the configured volume {volume.volume_id}; "
            "refusing to snapshot one volume while freezing another",
            where=config.source, hint="check [volume] id/tags and `hostagent verify-mount`")


class ProgressPrinter:
    """--wait feedback on stderr: one rewritten line on a terminal, plain lines otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last = None
        self.started = time.monotonic()

    def __call__(self, record: SnapshotRecord) -> None:
        self.show(f"{record.id}: {record.state} {record.progress or '0%'}",
                  key=(record.state, record.progress), final=record.state != "pending")

    def show(self, text: str, *, key=None, final: bool = False) -> None:
        """One progress line (the elapsed time added): rewritten in place on a terminal until
        final; elsewhere printed only when key (default: the text) changes."""
        elapsed = int(time.monotonic() - self.started)
        key = text if key is None else key
        if self.tty:
            self.stream.write(f"\r\033[K{text} ({elapsed}s)" + ("\n" if final else ""))
        elif key != self.last:
            self.stream.write(f"{text} ({elapsed}s)\n")
        self.stream.flush()
        self.last = key


def _record_json(record: SnapshotRecord, region: str | None = None, reasons=None) -> dict:
    item = {"id": record.id, "start_time": record.start_time.isoformat(),
            "state": record.state, "progress": record.progress, "tags": dict(record.tags)}
    if region:
        item["region"] = region
    if reasons is not None:
        item["reasons"] = list(reasons)
    return item


def snapshot_step(config, aws, volume, state: dict, *, clock: Callable[[], datetime],
                  extra_tags: dict[str, str] | None = None, why: str = "") -> Step:
    """The `snapshot` step of the volume: its checks now (the frozen mount point is the volume,
    FIFREEZE works), CreateSnapshot when run, frozen around the call alone when snapshot.freeze.
    The new id goes to state["snapshot_id"]. `snapshot` and `grow` (extra_tags say why it was
    taken) share it, and the caller holds the host lock."""
    from hostagent.aws import snapshots as snaps

    freeze_on = config.snapshot.freeze
    mp = config.filesystem.mount_point
    if freeze_on:
        from hostagent.freeze import check_can_freeze

        check_frozen_is_the_volume(config, volume, aws.identity)
        check_can_freeze(mp)
    consistency = snaps.FROZEN if freeze_on else snaps.CRASH

    def take_snapshot() -> str:
        taken = clock()
        tags = snaps.fit_tags({**snaps.snapshot_tags(volume.volume_id, volume.tags, consistency,
                                                     taken), **(extra_tags or {})})
        description = f"hostagent {consistency} snapshot of {volume.volume_id}" + (
            f" {why}" if why else "")
        if not freeze_on:
            state["snapshot_id"] = snaps.create_snapshot(aws.ec2, volume.volume_id, tags,
                                                         description)
            return state["snapshot_id"] + " (crash-consistent)"
        from hostagent.aws.ready import ready_for_call
        from hostagent.freeze import frozen, sync_filesystem

        # Only the CreateSnapshot call runs frozen: the sync, the client's credentials and
        # connection, and the armed watchdog are all ready before FIFREEZE.
        synced_in = sync_filesystem(mp)
        with ready_for_call(aws.ec2, "CreateSnapshot", volume_id=volume.volume_id,
                            idle_for=synced_in), \
                frozen(mp, timeout=config.snapshot.freeze_timeout, sync=False) as outcome:
            state["snapshot_id"] = snaps.create_snapshot(aws.ec2, volume.volume_id, tags,
                                                         description)
        if outcome.watchdog_fired:
            # The point in time may have been taken after the watchdog thawed: say so.
            snaps.set_tags(aws.ec2, state["snapshot_id"], {snaps.CONSISTENCY_KEY: snaps.CRASH})
            log.warning("%s: the freeze watchdog thawed %s before CreateSnapshot returned; "
                        "tagged %s=crash", state["snapshot_id"], mp, snaps.CONSISTENCY_KEY)
            return f"{state['snapshot_id']} (watchdog thawed first after " \
                   f"{config.snapshot.freeze_timeout}s: tagged crash)"
        return f"{state['snapshot_id']} (frozen {outcome.frozen_seconds:.3f}s)"

    if freeze_on:
        action = f"sync; FIFREEZE {mp}; CreateSnapshot {volume.volume_id}; FITHAW {mp}"
        reason = (f"consistent: writes paused only for the API call; a watchdog thaws after "
                  f"{config.snapshot.freeze_timeout}s whatever happens")
    else:
        action = f"CreateSnapshot {volume.volume_id}"
        reason = "snapshot.freeze = false: crash-consistent (tagged crash)"
    return Step("snapshot", action, f"{why}; {reason}" if why else reason, run=take_snapshot)


def run_snapshot(ctx, args, *, aws=None, now: Callable[[], datetime] | None = None,
                 progress_stream=None) -> Report:
    from hostagent.aws import snapshots as snaps
    from hostagent.lock import host_lock

    config = ctx.config
    require_aws_volume(config)
    aws = make_aws(aws)
    clock = now or (lambda: datetime.now(timezone.utc))
    dry_run = getattr(args, "dry_run", False)
    lock = contextlib.nullcontext() if dry_run else host_lock(config.host.lock_file)
    state: dict = {}

    with lock:
        volume = find_configured_volume(config, aws)
        snapshot = snapshot_step(config, aws, volume, state, clock=clock)

        def wait() -> str:
            record = snaps.wait_until_completed(
                aws.ec2, state["snapshot_id"], timeout=WAIT_TIMEOUT,
                on_progress=ProgressPrinter(progress_stream))
            return f"{record.id} {record.state} {record.progress}"

        def copy() -> str:
            made = copy_missing(aws, config, volume.volume_id, now=clock())
            state["copies"] = made
            return f"copied {len(made)} to {config.snapshot.copy_to_region}" + (
                f": {', '.join(made)}" if made else "")

        def prune() -> str:
            outcomes = prune_all(aws, config, volume.volume_id, now=clock(),
                                 protect_ids=[state["snapshot_id"], *state.get("copies", ())],
                                 dry_run=False)
            state["deleted"] = [i for o in outcomes for i in o.deleted]
            return "; ".join(o.summary(False) for o in outcomes)

        steps = [snapshot]
        if getattr(args, "wait", False):
            steps.append(Step("wait", f"poll DescribeSnapshots until completed (at most "
                                      f"{WAIT_TIMEOUT / 3600:.0f} h)", "--wait", run=wait))
        dest = config.snapshot.copy_to_region
        if dest and dest == aws.ec2.meta.region_name:
            log.warning("snapshot.copy_to_region is this region (%s): nothing to copy", dest)
        elif dest:
            if not config.snapshot.copy_kms_key:
                from hostagent.aws.volume import describe_volumes

                for raw in describe_volumes(aws.ec2, VolumeIds=[volume.volume_id]):
                    check_copy_encryption(config, raw)
            steps.append(Step("copy", f"CopySnapshot to {config.snapshot.copy_to_region}",
                              "snapshot.copy_to_region: completed snapshots it lacks", run=copy))
        if not getattr(args, "no_prune", False):
            steps.append(Step("prune", f"retention {describe_policy(config)}",
                              "deletes only hostagent's snapshots of this volume", run=prune))

        error = None
        try:
            apply_steps(steps, dry_run=dry_run)
        except HostagentError as exc:
            if "snapshot_id" not in state:
                raise
            # The snapshot exists: report it, and fail the command for what came after.
            error = exc
            log.error("%s", exc)
        if dry_run and not getattr(args, "no_prune", False):
            outcomes = prune_all(aws, config, volume.volume_id, now=clock(), dry_run=True)
            steps[-1].detail = "now: " + "; ".join(o.summary(True) for o in outcomes)

    report = Report(ok=error is None, key="steps", items=[s.as_dict() for s in steps],
                    text=render_steps(steps),
                    extra={"snapshot_id": state.get("snapshot_id"),
                           "deleted": state.get("deleted", []), "copies": state.get("copies", [])})
    if error is not None:
        report.extra["error"] = str(error)
        report.text += f"\nhostagent: error: {error}"
        report.exit_code = error.exit_code
    return report


def describe_policy(config) -> str:
    s = config.snapshot
    parts = [f"keep_last={s.keep_last}"]
    parts += [f"{k}={getattr(s, k)}" for k in ("keep_daily", "keep_weekly", "keep_monthly")
              if getattr(s, k)]
    return " ".join(parts)


def run_prune(ctx, args, *, aws=None, now: Callable[[], datetime] | None = None) -> Report:
    from hostagent.lock import host_lock

    config = ctx.config
    require_aws_volume(config)
    aws = make_aws(aws)
    clock = now or (lambda: datetime.now(timezone.utc))
    dry_run = getattr(args, "dry_run", False)
    lock = contextlib.nullcontext() if dry_run else host_lock(config.host.lock_file)
    with lock:
        volume = find_configured_volume(config, aws)
        outcomes = prune_all(aws, config, volume.volume_id, now=clock(), dry_run=dry_run)

    deleted, kept, skipped, rows = [], [], [], []
    for o in outcomes:
        gone = set(o.deleted) if not dry_run else {s.id for s in o.to_delete}
        for d in o.decisions:
            s = d.snapshot
            if s.id in gone:
                deleted.append(_record_json(s, o.region))
                verdict = "would delete" if dry_run else "deleted"
            else:
                kept.append(_record_json(s, o.region, d.reasons or ("in use",)))
                verdict = "keep: " + ", ".join(d.reasons or ("in use by an AMI",))
            rows.append((o.region, s.id, _when(s), s.state, verdict))
        skipped += [{"id": i, "region": o.region, "reason": why} for i, why in o.skipped]
    summary = "; ".join(o.summary(dry_run) for o in outcomes)
    text = render_table(rows, ("REGION", "SNAPSHOT", "STARTED (UTC)", "STATE", "RETENTION"))
    text += f"\n{describe_policy(config)}: {summary}" + (" (dry run: nothing deleted)"
                                                       if dry_run else "")
    return Report(ok=True, key="deleted", items=deleted, text=text,
                  extra={"kept": kept, "skipped": skipped, "dry_run": dry_run})


def _when(record: SnapshotRecord) -> str:
    return record.start_time.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def run_list(ctx, args, *, aws=None) -> Report:
    from hostagent.aws.snapshots import CONSISTENCY_KEY, list_snapshots

    config = ctx.config
    require_aws_volume(config)
    aws = make_aws(aws)
    volume = find_configured_volume(config, aws)
    records = list_snapshots(aws.ec2, volume.volume_id)
    rows = [(r.id, _when(r), r.state, r.progress, r.tags.get(CONSISTENCY_KEY, ""),
             r.tags.get("Name", "")) for r in records]
    text = render_table(rows, ("SNAPSHOT", "STARTED (UTC)", "STATE", "PROGRESS", "CONSISTENCY",
                               "NAME"))
    text += f"\n{len(records)} snapshot(s) of {volume.volume_id} made by hostagent"
    return Report(ok=True, key="snapshots", items=[_record_json(r) for r in records], text=text)
