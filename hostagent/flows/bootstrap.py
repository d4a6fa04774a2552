"""bootstrap: volume → device → format only if blank → fstab by UUID → mount → CouchDB layout.

Each phase looks at the host, then adds steps (what and why) to the plan; a step that is already
in the desired state is skipped. --dry-run prints the plan and changes nothing. A crash at any
point leaves a state that the next run recognises and finishes.
"""

from __future__ import annotations

import os
import signal
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from datetime import datetime, timezone

from hostagent.errors import OperationError, RefusedError, UsageError
from hostagent.lock import host_lock
from hostagent.plan import DONE, PLANNED, Step, apply_steps, render_steps
from hostagent.report import Report
from hostagent import state

# Test seam for crash-safety tests: SIGKILL ourselves right after the named step is done.
CRASH_AFTER_ENV = "HOSTAGENT_CRASH_AFTER"
DEVICE_POLL_SECONDS = 0.5


@dataclass
class Bootstrap:
    """The state one bootstrap run carries from phase to phase."""

    config: object
    dry_run: bool
    steps: list[Step] = field(default_factory=list)
    aws: object = None
    identity: object = None
    volume: object = None  # aws.volume.VolumeInfo when the volume is found in EC2
    device: object = None  # blockdev.BlockDevice
    fs_uuid: str | None = None
    wrote_fstab: bool = False

    @property
    def volume_id(self) -> str | None:
        return self.volume.volume_id if self.volume else (self.config.volume.id or None)

    def add(self, step: Step) -> None:
        """Record and (unless dry-run) apply one step at once: later phases look at its result."""
        self.steps.append(step)
        apply_steps([step], dry_run=self.dry_run)
        crash_after = os.environ.get(CRASH_AFTER_ENV)
        if crash_after and crash_after == step.name and step.status == DONE:
            os.kill(os.getpid(), signal.SIGKILL)

    def pending(self, name: str) -> bool:
        return any(s.name == name and s.status == PLANNED for s in self.steps)


def run(ctx, args) -> Report:
    config = ctx.config
    b = Bootstrap(config=config, dry_run=args.dry_run)
    try:
        with host_lock(config.host.lock_file):
            run_phases(b)
    except Exception as exc:
        # The operator sees which steps were done before the failure; the error is the last line.
        if b.steps and not ctx.json:
            print(render_steps(b.steps))
        raise exc
    changed = [s for s in b.steps if s.status in (DONE, PLANNED)]
    if args.dry_run:
        summary = f"dry run: {len(changed)} step(s) would change the host" if changed else \
            "dry run: nothing to do, the host is as configured"
    else:
        summary = f"{len(changed)} step(s) done" if changed else "nothing to do: already bootstrapped"
    text = render_steps(b.steps) + "\n" + summary
    extra = {"dry_run": bool(args.dry_run), "volume_id": b.volume_id,
             "device": b.device.path if b.device else None, "uuid": b.fs_uuid}
    return Report(ok=True, key="steps", items=[s.as_dict() for s in b.steps], text=text,
                  extra=extra)


def run_phases(b: Bootstrap) -> None:
    if b.config.volume.uses_aws:
        phase_volume(b)
    phase_device(b)
    if b.device is None:  # dry run: the device appears only after the planned attach
        return
    mounted_here = preflight_mount(b)  # refusals come before any change to the host
    phase_filesystem(b)
    phase_fstab(b)
    mounted = phase_mount(b, mounted_here)
    if mounted or not b.dry_run:
        phase_layout(b)
    record_volume(b)


def phase_volume(b: Bootstrap) -> None:
    from hostagent.aws.clients import AWS
    from hostagent.aws.volume import attach_volume, decide_attach, find_volume

    vol_cfg = b.config.volume
    b.aws = AWS()
    b.identity = b.aws.identity
    b.volume = find_volume(b.aws.ec2, volume_id=vol_cfg.id, tags=dict(vol_cfg.tags))
    decision = decide_attach(b.identity, b.volume)
    where = f"{b.volume.volume_id} in {b.volume.availability_zone}"
    if decision == "attached-here":
        b.add(Step("attach", f"attach {b.volume.volume_id}",
                   f"already attached to this instance ({b.identity.instance_id})"))
        return
    if not vol_cfg.attach:
        raise OperationError(f"volume {where} is available but volume.attach = false",
                             where=b.config.source, hint="attach it, or set volume.attach = true")

    def attach() -> str:
        b.volume = attach_volume(b.aws.ec2, b.identity, b.volume, vol_cfg.device_name,
                                 timeout=vol_cfg.attach_timeout)
        return f"attached to {b.identity.instance_id} as {vol_cfg.device_name}"

    b.add(Step("attach", f"AttachVolume {b.volume.volume_id} as {vol_cfg.device_name}",
               f"volume is available ({where})", run=attach))


def phase_device(b: Bootstrap) -> None:
    from hostagent.adapters.blockdev import find_volume_device, list_block_devices, \
        resolve_explicit_device

    vol_cfg = b.config.volume
    if b.pending("attach"):
        b.add(Step("device", f"wait for the block device of {b.volume_id}",
                   "it appears once the attachment completes", run=lambda: None))
        return
    if vol_cfg.device:
        b.device = resolve_explicit_device(vol_cfg.device, list_block_devices(),
                                           volume_id=b.volume_id)
        return
    # After an attach the kernel needs a moment to show the disk: wait, bounded.
    deadline = time.monotonic() + vol_cfg.attach_timeout
    while True:
        try:
            b.device = find_volume_device(list_block_devices(), volume_id=b.volume_id,
                                          requested_name=requested_name(b))
            return
        except RefusedError:
            raise
        except OperationError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(DEVICE_POLL_SECONDS)


def requested_name(b: Bootstrap) -> str:
    """The name EC2 reports for this instance's attachment (it may differ from the configured
    device_name: a launch template, a person); the configured one only when EC2 says nothing."""
    here = getattr(b.identity, "instance_id", None)
    attachment = b.volume.attachment_of(here) if b.volume is not None and here else None
    return attachment.device if attachment and attachment.device else b.config.volume.device_name


def phase_filesystem(b: Bootstrap) -> None:
    from hostagent.adapters import probe

    dev = b.device
    cfg = b.config
    formatted_tag = None
    if b.volume is not None:
        from hostagent.aws.volume import FORMATTED_TAG

        formatted_tag = b.volume.tags.get(FORMATTED_TAG)
    proven_volume_id = identity_volume_id(b)
    if b.volume_id and proven_volume_id is None:
        # Reusing the wrong disk is as bad as formatting it: mounting someone else's ext4 here
        # would report persistence=ready for data that is not this volume's.
        raise RefusedError(
            f"cannot prove {dev.path} is {b.volume_id}: it has no NVMe serial naming the volume, "
            f"and EC2 does not report the volume attached here as {dev.name}", where=dev.path,
            hint="set volume.device to the disk if you are sure, or check `hostagent devices`")
    evidence = probe.gather_evidence(
        dev.path, size_bytes=dev.size_bytes, partitions=dev.partitions, holders=dev.holders,
        serial_volume_id=proven_volume_id, expected_volume_id=b.volume_id,
        formatted_tag=formatted_tag)
    decision = probe.decide(evidence)
    intent = state.read_record(cfg.host.state_dir, state.FORMAT_INTENT)
    resume_uuid = None
    if is_own_interrupted_format(intent, dev, evidence, decision):
        resume_uuid = str(intent["uuid"])
        decision = probe.Decision("format", "an earlier hostagent mkfs of this device was "
                                  f"interrupted ({intent.get('started')}); nothing was mounted since")
    if decision.action == "refuse":
        raise probe.refusal_error(decision, dev.path, volume_id=b.volume_id)
    if decision.action == "reuse":
        refuse_uuid_twins(dev, decision.fs_uuid)
        b.fs_uuid = decision.fs_uuid
        label = f", label {decision.fs_label}" if decision.fs_label else ""
        b.add(Step("format", f"mkfs.{cfg.filesystem.type} {dev.path}",
                   f"ext4 found (UUID {decision.fs_uuid}{label}): reused, never remade"))
        if intent:
            state.remove_record(cfg.host.state_dir, state.FORMAT_INTENT)
    else:
        new_uuid = str(uuidlib.uuid4())

        def do_format() -> str:
            # The intent record makes a crash mid-mkfs recognisable as our own half-made
            # filesystem, so the rerun may format again instead of refusing forever.
            state.write_record(cfg.host.state_dir, state.FORMAT_INTENT, {
                "major_minor": dev.major_minor, "size_bytes": dev.size_bytes,
                "serial": dev.serial, "volume_id": b.volume_id, "uuid": new_uuid,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            probe.format_ext4(dev.path, cfg.filesystem.label, uuid=new_uuid,
                              resume_uuid=resume_uuid)
            b.fs_uuid = probe.filesystem_uuid(dev.path)
            if b.fs_uuid is None:
                raise OperationError(f"mkfs.ext4 finished but blkid finds no filesystem on {dev.path}")
            state.remove_record(cfg.host.state_dir, state.FORMAT_INTENT)
            return f"ext4 UUID {b.fs_uuid}"

        b.add(Step("format", f"mkfs.ext4 -L {cfg.filesystem.label} -m 0 {dev.path}",
                   f"proven blank: {decision.reason}", run=do_format))
    if b.volume is not None:
        phase_tag_formatted(b, formatted_tag)
        phase_tag_in_service(b)


def refuse_uuid_twins(dev, fs_uuid: str) -> None:
    """Our fstab line says UUID=…: with two disks carrying that UUID (a volume and a copy made
    from its snapshot), the mount could take either. Refuse before writing anything."""
    from hostagent.adapters.mounts import device_major_minor
    from hostagent.adapters.probe import devices_with_uuid

    twins = []
    for path in devices_with_uuid(fs_uuid):
        try:
            if device_major_minor(path) != dev.major_minor:
                twins.append(path)
        except OSError:
            continue
    if twins:
        raise RefusedError(f"{', '.join(twins)} carries the same filesystem UUID {fs_uuid} as "
                           f"{dev.path}; refusing: UUID= could mount either", where=dev.path,
                           hint="detach the disk that is not the volume (a copy from a snapshot?)")


def identity_volume_id(b: Bootstrap) -> str | None:
    """Which volume the device positively is, for the blank proof.

    Nitro: its NVMe serial says so. A disk with no serial at all (Xen `xvdf`, a loop device)
    carries no identity of its own; it counts as the volume only on other positive evidence:
    the operator named it in volume.device, or EC2 reports the volume attached to this instance
    under the very name the kernel gave the disk (`/dev/sdf` arrives as `xvdf` on Xen).
    """
    from hostagent.adapters.blockdev import name_key

    dev = b.device
    if dev.volume_id or dev.serial:
        return dev.volume_id
    if b.volume_id is None:
        return None
    if b.config.volume.device:
        return b.volume_id
    here = getattr(b.identity, "instance_id", None)
    for att in getattr(b.volume, "attachments", ()):
        if att.instance_id == here and name_key(att.device) == name_key(dev.name):
            return b.volume_id
    return None


def is_own_interrupted_format(intent, dev, evidence, decision) -> bool:
    """PURE: a leftover intent for this very device, and nothing on it but our own partial mkfs."""
    from hostagent.adapters.probe import is_own_interrupted_format as only_our_leftovers

    if not intent or decision.action == "format" or not intent.get("uuid"):
        return False
    same_device = (intent.get("major_minor") == dev.major_minor
                   and intent.get("size_bytes") == dev.size_bytes
                   and intent.get("serial", "") == dev.serial)
    return same_device and only_our_leftovers(evidence, str(intent["uuid"]))


def phase_tag_formatted(b: Bootstrap, formatted_tag: str | None) -> None:
    from hostagent.aws.volume import FORMATTED_TAG, tag_formatted

    if formatted_tag:
        b.add(Step("tag-volume", f"tag {b.volume_id} {FORMATTED_TAG}",
                   f"already tagged ({formatted_tag})"))
        return

    def tag() -> str:
        tag_formatted(b.aws.ec2, b.volume_id, datetime.now(timezone.utc))
        return f"{FORMATTED_TAG} set"

    b.add(Step("tag-volume", f"tag {b.volume_id} {FORMATTED_TAG}=<now>",
               "the volume now holds our filesystem: it must never look blank again", run=tag))


def phase_tag_in_service(b: Bootstrap) -> None:
    """A volume made by `hostagent restore` holds live data from its first bootstrap on."""
    from hostagent.aws.volume import IN_SERVICE_TAG, RESTORED_FROM_TAG, tag_time

    tags = b.volume.tags
    if RESTORED_FROM_TAG not in tags or IN_SERVICE_TAG in tags:
        return
    b.add(Step("tag-in-service", f"tag {b.volume_id} {IN_SERVICE_TAG}=<now>",
               f"restored from {tags[RESTORED_FROM_TAG]} and now put to use: a later restore of "
               "that snapshot must make a fresh volume",
               run=lambda: tag_time(b.aws.ec2, b.volume_id, IN_SERVICE_TAG,
                                    datetime.now(timezone.utc)) or "tagged"))


def phase_fstab(b: Bootstrap) -> None:
    from hostagent.adapters import fstab

    fs = b.config.filesystem
    old = fstab.read_fstab(fs.fstab)
    if b.fs_uuid is None:  # dry run before mkfs: the UUID is not known yet
        b.add(Step("fstab", f"add UUID=<new> {fs.mount_point} line to {fs.fstab}",
                   "after the format", run=lambda: None))
        return
    entry = fstab.desired_entry(b.fs_uuid, fs.mount_point, fs.type, fs.options, fs.device_timeout)
    new = fstab.plan_fstab(old, entry)
    if new == old:
        b.add(Step("fstab", f"UUID={b.fs_uuid} {fs.mount_point} in {fs.fstab}", "already present"))
        return
    why = fstab.describe_fstab_plan(old, entry)

    def write() -> str:
        b.wrote_fstab = fstab.write_fstab(fs.fstab, new)
        return "written (previous file kept as backup)"

    b.add(Step("fstab", f"write UUID={b.fs_uuid} {fs.mount_point} to {fs.fstab}", why, run=write))


def preflight_mount(b: Bootstrap) -> bool:
    """Every refusal about the mount point, before anything is changed. True: already mounted."""
    from hostagent.adapters import mounts

    mp = os.path.normpath(b.config.filesystem.mount_point)
    table = mounts.read_mountinfo()
    current = mounts.mount_at(mp, table)
    if current is not None:
        if current.major_minor != b.device.major_minor:
            raise RefusedError(
                f"{mp} already has {current.source} mounted, not {b.device.path}; refusing to "
                "mount over it", where=mp,
                hint=f"check `findmnt {mp}`; unmount it by hand if it is stale")
        return True
    for m in mounts.mounts_of_device(b.device.major_minor, table):
        raise RefusedError(f"{b.device.path} is already mounted at {m.mount_point}; refusing to "
                           f"mount it at {mp} too", where=b.device.path,
                           hint=f"umount {m.mount_point}")
    if os.path.lexists(mp) and not os.path.isdir(mp):
        raise UsageError("mount point exists and is not a directory", where=mp)
    return False


def phase_mount(b: Bootstrap, mounted_here: bool) -> bool:
    """Mount point, root-disk guard, mount. Returns whether the volume is (or will be) mounted."""
    from hostagent.adapters import mounts

    fs = b.config.filesystem
    mp = os.path.normpath(fs.mount_point)
    if mounted_here:
        guard_under_mount(b, mp)
        b.add(Step("mount", f"mount {b.device.path} on {mp}", "already mounted"))
        return True
    if not os.path.isdir(mp):
        b.add(Step("mount-point", f"mkdir {mp}", "missing",
                   run=lambda: os.makedirs(mp, mode=0o755, exist_ok=True)))
    guard_mount_point(b, mp)

    def do_mount() -> str:
        from hostagent.adapters import fstab

        try:
            mounts.mount_from_fstab(mp, fs.fstab)
        except OperationError:
            if b.wrote_fstab:
                fstab.restore_fstab(fs.fstab)  # never leave a line that fails at the next boot
            raise
        got = mounts.mount_at(mp, mounts.read_mountinfo())
        if got is None or got.major_minor != b.device.major_minor:
            # UUID= resolved to another disk (a twin from a snapshot appeared since the check).
            mounts.unmount(mp)
            if b.wrote_fstab:
                fstab.restore_fstab(fs.fstab)
            raise RefusedError(f"mounting UUID={b.fs_uuid} gave {got.source if got else 'nothing'}, "
                               f"not {b.device.path}; unmounted again", where=mp,
                               hint="two disks carry this filesystem UUID: detach the one that "
                                    "is not the volume")
        return f"mounted from {fs.fstab}"

    b.add(Step("mount", f"mount {b.device.path} on {mp}", "not mounted", run=do_mount))
    return True


NO_IMMUTABLE_FLAG = "this filesystem has no immutable flag; relying on the persistence attribute"


def add_guard_step(b: Bootstrap, action: str, immutable: bool | None, why: str, set_guard) -> None:
    if immutable:
        b.add(Step("guard", action, "already immutable"))
    elif immutable is None:
        b.add(Step("guard", action, NO_IMMUTABLE_FLAG))
    else:
        def apply() -> str:
            try:
                set_guard()
            except OperationError as exc:
                return f"not supported here ({exc}); relying on the persistence attribute"
            return "immutable while unmounted"

        b.add(Step("guard", action, why, run=apply))


def guard_under_mount(b: Bootstrap, mp: str) -> None:
    """The guard for a volume mounted before bootstrap ran (systemd from fstab, or by hand):
    reach the bare directory through a bind mount of the filesystem beneath it."""
    from hostagent.adapters import mounts

    with mounts.bare_directory(mp) as bare:
        immutable = mounts.is_immutable(bare)
        warn_leftovers(bare, mp)

    def set_guard() -> None:
        with mounts.bare_directory(mp) as bare:
            mounts.set_immutable(bare, True)

    add_guard_step(b, f"chattr +i {mp} (underneath the mount)", immutable,
                   "the volume was mounted before bootstrap ran; if it is ever missing, nothing "
                   "may write CouchDB data to the root disk", set_guard)


def guard_mount_point(b: Bootstrap, mp: str) -> None:
    """Keep the bare mount point immutable so nothing (Docker…) writes CouchDB data to the root disk."""
    from hostagent.adapters import mounts

    if not os.path.isdir(mp):  # dry run: created by the planned mkdir
        b.add(Step("guard", f"chattr +i {mp}", "bare mount point", run=lambda: None))
        return
    warn_leftovers(mp, mp)
    add_guard_step(b, f"chattr +i {mp}", mounts.is_immutable(mp),
                   "Docker must not create data/ on the root disk",
                   lambda: mounts.set_immutable(mp, True))


def warn_leftovers(bare: str, mp: str) -> None:
    leftovers = sorted(os.listdir(bare))
    if leftovers:
        import logging

        logging.getLogger(__name__).warning(
            "bare %s is not empty (%s): something wrote to the root disk while the volume was "
            "not mounted; it stays there, hidden under the mount", mp, ", ".join(leftovers[:5]))


def phase_layout(b: Bootstrap) -> None:
    from hostagent.adapters.layout import apply_layout, inspect_layout, layout_problem

    lay = b.config.layout
    mp = os.path.normpath(b.config.filesystem.mount_point)
    states = inspect_layout(mp, lay.directories) if not b.pending("mount") else []
    problems = [f"{s.relative}: {p}" for s in states
                if (p := layout_problem(s, lay.owner, lay.group, lay.mode_bits))]
    action = f"{', '.join(lay.directories)} owned {lay.owner}:{lay.group} mode {lay.mode}"
    if states and not problems:
        b.add(Step("layout", action, "already laid out"))
        return
    why = "; ".join(problems) if problems else "after the mount"
    b.add(Step("layout", action, why, run=lambda: "; ".join(
        apply_layout(mp, lay.directories, lay.owner, lay.group, lay.mode_bits)) or "ok"))


def record_volume(b: Bootstrap) -> None:
    """Remember what is mounted so verify-mount can check the device without calling AWS."""
    if b.dry_run or b.fs_uuid is None:
        return
    record = {"volume_id": b.volume_id, "device": b.device.path,
              "major_minor": b.device.major_minor, "serial": b.device.serial, "uuid": b.fs_uuid}
    if state.read_record(b.config.host.state_dir, state.VOLUME_RECORD) != record:
        state.write_record(b.config.host.state_dir, state.VOLUME_RECORD, record)
