"""`hostagent grow --size GIB`: snapshot, ModifyVolume, wait until the device shows it, grow ext4 online.

Every check is made before the first change (the size, the volume attached and mounted here,
the filesystem healthy, no modification in progress); then the steps run under the host lock.
A run that stopped after ModifyVolume (a timeout, the kernel refusing the resize) is finished by
running the same command again, or by `hostagent bootstrap` / the agent, which grow an ext4 whose
device outgrew it. The agent's own filesystem grow is grow_filesystem() below.
"""

from __future__ import annotations

import sys
import time

from hostagent import state
from hostagent.capacity import (CAPACITY_RECORD, DEVICE_TIMEOUT, GIB, MAX_VOLUME_GIB,
                                MODIFY_TIMEOUT, fs_needs_grow, gib, next_modification_at,
                                utc_text)
from hostagent.errors import HostagentError, OperationError, Reason, RefusedError, UsageError
from hostagent.lock import host_lock
from hostagent.log import get_logger
from hostagent.plan import DONE, PLANNED, Step, Unchanged, apply_steps, render_steps
from hostagent.report import Report

log = get_logger(__name__)

BEFORE_GROW_KEY = "hostagent:before-grow"  # on the snapshot taken first: "8 to 12 GiB"
DEVICE_POLL_SECONDS = 0.5
RESCAN_EVERY = 10.0  # seconds between NVMe/SCSI rescans while the device shows the old size


def run(ctx, args, *, aws=None, now=None, progress_stream=None) -> Report:
    from datetime import datetime, timezone

    from hostagent.aws.clients import make_aws

    config = ctx.config
    if not config.volume.uses_aws:
        raise UsageError("grow needs an EBS volume (it calls ModifyVolume): set volume.id or "
                         "volume.tags", where=config.source,
                         hint="on a disk hostagent does not manage in EC2, enlarge it by hand; "
                              "`hostagent bootstrap` then grows the filesystem")
    size = args.size
    if not 1 <= size <= MAX_VOLUME_GIB:
        raise UsageError(f"--size {size} must be between 1 and {MAX_VOLUME_GIB} GiB")
    aws = make_aws(aws)
    clock = now or (lambda: datetime.now(timezone.utc))
    dry_run = bool(getattr(args, "dry_run", False))
    stream = progress_stream or sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    steps: list[Step] = []
    info: dict = {"volume_id": None, "from_gib": None, "to_gib": size, "snapshot_id": None,
                  "device": None}

    def reached(step: Step) -> None:
        steps.append(step)
        if tty:
            _show_step(stream, step)

    try:
        with host_lock(config.host.lock_file, dry_run=dry_run):
            plan = plan_grow(config, aws, args, info, clock=clock,
                             progress=_printer(stream) if tty else None)
            apply_steps(plan, dry_run=dry_run, on_step=reached)
    except HostagentError as exc:
        # The steps done so far (a snapshot, a modification) belong in the answer, also in --json.
        exc.json_extra = {"steps": [s.as_dict() for s in steps], "dry_run": dry_run, **info}
        if info["snapshot_id"] and exc.reason == Reason.MODIFICATION_RATE:
            exc.hint = f"{exc.hint}; the snapshot {info['snapshot_id']} taken first is kept"
        if steps and not ctx.json:
            print(render_steps(steps))
        raise
    changed = [s for s in steps if s.status in (DONE, PLANNED)]
    if dry_run:
        summary = f"dry run: {len(changed)} step(s) would grow {info['volume_id']} to {size} GiB"
    else:
        summary = f"{info['volume_id']} is {size} GiB, its ext4 grown online"
    return Report(ok=True, key="steps", items=[s.as_dict() for s in steps],
                  text=render_steps(steps) + "\n" + summary,
                  extra={"dry_run": dry_run, **info})


def plan_grow(config, aws, args, info: dict, *, clock, progress) -> list[Step]:
    """Look, refuse what must be refused, and return the steps; nothing is changed here."""
    from hostagent.aws.modify import latest_modification
    from hostagent.flows.snapshot import find_configured_volume, snapshot_step

    size = args.size
    volume = find_configured_volume(config, aws)
    info.update(volume_id=volume.volume_id, from_gib=volume.size_gib)
    fs = mounted_volume(config, volume, aws.identity)
    info["device"] = fs.device
    current = volume.size_gib
    latest = latest_modification(aws.ec2, volume.volume_id)
    in_progress = latest is not None and latest.state in ("modifying", "optimizing")
    # EC2 is at (or on its way to) this size already and the ext4 is not: a grow that stopped
    # after ModifyVolume (a timeout, a refused resize) is finished, not made again.
    resume = fs_needs_grow(size * GIB, fs.fs_bytes) and (
        size == current or (in_progress and latest.target_size == size))
    if not resume and size <= current:
        raise UsageError(f"--size {size} GiB is not larger than {volume.volume_id} "
                         f"({current} GiB): EBS volumes can only grow",
                         hint=f"give a size above {current} GiB")
    if in_progress and not resume:
        raise OperationError(f"{volume.volume_id} is being modified already ({latest.describe()})",
                             where=volume.volume_id, reason=Reason.MODIFICATION_IN_PROGRESS,
                             hint="EC2 takes one modification of a volume at a time: run again "
                                  "once it is completed")
    state_box: dict = {}
    steps: list[Step] = []
    if resume:
        why = f"EC2 has the volume at {size} GiB already (an earlier grow): finishing it"
        steps.append(Step("snapshot", f"CreateSnapshot {volume.volume_id}", why))
        steps.append(Step("modify", f"ModifyVolume {volume.volume_id} Size={size}", why))
    else:
        if getattr(args, "no_snapshot", False):
            steps.append(Step("snapshot", f"CreateSnapshot {volume.volume_id}", "--no-snapshot"))
        else:
            snap = snapshot_step(config, aws, volume, state_box, clock=clock,
                                 extra_tags={BEFORE_GROW_KEY: f"{current} to {size} GiB"},
                                 why=f"before growing it to {size} GiB")
            run_snapshot = snap.run

            def take() -> str:
                detail = run_snapshot()
                info["snapshot_id"] = state_box.get("snapshot_id")
                return detail

            snap.run = take
            steps.append(snap)
        cap = config.capacity.max_size_gib
        above = f" (above capacity.max_size_gib = {cap}: auto-grow will not grow it further)" \
            if size > cap else ""
        steps.append(Step("modify", f"ModifyVolume {volume.volume_id} Size={size}",
                          f"{current} -> {size} GiB{above}",
                          run=lambda: modify(config, aws, volume, size, clock)))
    wait_action = "poll DescribeVolumesModifications until optimizing"
    if resume and not (in_progress and latest.state == "modifying"):
        steps.append(Step("wait-modification", wait_action,
                          f"EC2 has the volume at {size} GiB, usable already"))
    else:
        steps.append(Step("wait-modification", wait_action,
                          "the new size is usable once EC2 says optimizing (or completed)",
                          run=lambda: wait_modification(aws, volume.volume_id, size, progress)))
    steps.append(Step("wait-device", f"wait until {fs.device} shows {size} GiB",
                      "NVMe reports the resize itself; rescanned where it does not",
                      run=lambda: wait_device(fs.device, fs.major_minor, size, progress)))
    steps.append(Step("grow-fs", f"resize2fs {fs.device} (online)",
                      f"ext4 {gib(fs.fs_bytes)} -> {size} GiB, mounted at {fs.mount_point}; "
                      "never unmounted, never shrunk", run=lambda: grow_fs(fs)))
    return steps


def mounted_volume(config, volume, identity):
    """The ext4 of this volume mounted at the mount point (adapters.resize.MountedFs); anything
    else is refused before any change: grow works on the volume as bootstrap mounted it."""
    from hostagent.adapters.resize import observe_mounted
    from hostagent.checks import expected_device
    from hostagent.flows.snapshot import _mounted_volume_id

    mp = config.filesystem.mount_point
    attachment = volume.attachment_of(identity.instance_id)
    if attachment is None or attachment.state != "attached":
        raise OperationError(f"volume {volume.volume_id} is not attached to this instance "
                             f"({identity.instance_id})", where=volume.describe(),
                             hint="run `hostagent grow` on the instance that has the volume")
    fs = observe_mounted(mp)
    if fs is None:
        raise OperationError(f"nothing is mounted at {mp}; grow works on the mounted volume",
                             where=mp, hint="run `hostagent bootstrap` first")
    want, how = expected_device(config)
    mounted_id = _mounted_volume_id(config)
    if want != fs.major_minor or (mounted_id and mounted_id != volume.volume_id):
        raise RefusedError(f"{mp} does not hold {volume.volume_id} ({how}); refusing to grow it",
                           where=mp, reason=Reason.WRONG_DEVICE,
                           hint="check `hostagent verify-mount`")
    if fs.fstype != "ext4" or fs.fs_bytes is None:
        raise OperationError(f"{mp} holds {fs.fstype}, not a readable ext4", where=mp)
    if fs.read_only:
        raise OperationError(f"{mp} is mounted read-only; resize2fs needs it read-write",
                             where=fs.device, hint="ext4 remounts read-only after I/O errors: "
                                                   "check dmesg")
    if fs.records_errors:
        raise RefusedError(f"the ext4 on {fs.device} records errors; refusing to grow a damaged "
                           "filesystem", where=fs.device, reason=Reason.FS_DAMAGED,
                           hint=f"snapshot it, stop CouchDB, umount and run `e2fsck -f "
                                f"{fs.device}`, then grow")
    return fs


def modify(config, aws, volume, size: int, clock) -> str:
    from hostagent.aws.errors import AWSError
    from hostagent.aws.modify import IN_PROGRESS, RATE_EXCEEDED, latest_modification, modify_size

    try:
        mod = modify_size(aws.ec2, volume.volume_id, size)
    except AWSError as exc:
        if exc.code == RATE_EXCEEDED:
            raise rate_exceeded_error(config, volume.volume_id,
                                      latest_modification(aws.ec2, volume.volume_id),
                                      now=clock()) from None
        if exc.code == IN_PROGRESS:
            raise OperationError(f"{volume.volume_id} is being modified already ({exc.message})",
                                 where=volume.volume_id, reason=Reason.MODIFICATION_IN_PROGRESS,
                                 hint="run again once the modification is completed") from None
        raise
    started = mod.start_time or clock()
    state.write_record(config.host.state_dir, CAPACITY_RECORD, {
        "volume_id": volume.volume_id, "last_modification_at": started.isoformat(),
        "from_gib": volume.size_gib, "to_gib": size})
    return f"{mod.describe()}"


def rate_exceeded_error(config, volume_id: str, latest, *, now) -> OperationError:
    """VolumeModificationRateExceeded in words: when the next modification is possible. The
    time is also recorded, so the agent's auto-grow waits for it."""
    last = latest.start_time if latest is not None else None
    after = next_modification_at(last)
    if after is None or after <= now:
        # EC2 refused, but lists no modification in the last 6 h (another rule, or its listing
        # lags): the next chance is counted from now.
        after = next_modification_at(now)
        when = f"EC2 lists no recent one; try again after {utc_text(after)}"
    else:
        when = f"the last started {utc_text(last)}, so the next is possible from {utc_text(after)}"
    state.write_record(config.host.state_dir, CAPACITY_RECORD, {
        "volume_id": volume_id, "last_modification_at": last.isoformat() if last else None,
        "next_possible_at": after.isoformat(), "refused_at": now.isoformat()})
    return OperationError(
        f"EC2 allows one modification of a volume per 6 h (VolumeModificationRateExceeded): "
        f"{when}", where=volume_id, reason=Reason.MODIFICATION_RATE,
        hint="nothing was changed on the volume; free space meanwhile (or run `hostagent grow` "
             "again then)")


def wait_modification(aws, volume_id: str, size: int, progress) -> str:
    from hostagent.aws.modify import wait_size_usable

    def show(mod) -> None:
        if progress is not None:
            progress.show(f"modification of {volume_id}: {mod.state} {mod.progress or 0}%",
                          final=mod.state in ("optimizing", "completed", "failed"))

    mod = wait_size_usable(aws.ec2, volume_id, size, timeout=MODIFY_TIMEOUT, on_progress=show)
    return mod.describe()


def wait_device(device: str, major_minor: str, size: int, progress, *,
                timeout: float = DEVICE_TIMEOUT, clock=time.monotonic, sleep=time.sleep) -> str:
    """Until the kernel shows the device at size GiB; NVMe/SCSI rescanned every RESCAN_EVERY."""
    from hostagent.adapters.blockdev import rescan_size, size_of

    want = size * GIB
    start = clock()
    rescanned_at, rescans, polls = None, 0, 0
    while True:
        have = size_of(major_minor) or 0
        polls += 1
        if progress is not None:
            progress.show(f"{device}: {gib(have)} of {size} GiB", final=have >= want)
        if have >= want and polls == 1:
            return Unchanged(f"{device} shows {gib(have)} already")
        if have >= want:
            how = f" after {rescans} rescan(s)" if rescans else ""
            return f"{device} shows {gib(have)}{how} ({clock() - start:.1f}s)"
        now = clock()
        if now - start >= timeout:
            raise OperationError(
                f"EC2 says the volume is {size} GiB, but {device} still shows {gib(have)} after "
                f"{timeout:.0f}s", where=device,
                hint="the kernel has not seen the new size: on NVMe `echo 1 > "
                     "/sys/class/nvme/nvmeN/rescan_controller` (or reboot); the agent or "
                     "`hostagent bootstrap` grows the filesystem once the device shows it")
        if rescanned_at is None or now - rescanned_at >= RESCAN_EVERY:
            if rescan_size(major_minor):
                rescans += 1
            rescanned_at = now
        sleep(DEVICE_POLL_SECONDS)


def grow_fs(fs) -> str:
    from hostagent.adapters.resize import grow_ext4_online

    return grow_ext4_online(fs.mount_point, fs.major_minor)


def grow_filesystem(config, major_minor: str) -> str:
    """The agent's filesystem grow: under the host lock (a bootstrap, grow or snapshot may be
    running), resize2fs the mounted ext4 of device major_minor if its device still outgrows it."""
    from hostagent.adapters.resize import grow_ext4_online

    with host_lock(config.host.lock_file):
        return grow_ext4_online(config.filesystem.mount_point, major_minor)


def _printer(stream):
    from hostagent.flows.snapshot import ProgressPrinter

    return ProgressPrinter(stream)


def _show_step(stream, step: Step) -> None:
    stream.write(f"{step.name}: {step.status}" + (f" ({step.detail})" if step.detail else "")
                 + "\n")
    stream.flush()
