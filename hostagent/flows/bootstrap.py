"""bootstrap = observe → plan → apply: volume → device → format only if blank → fstab by UUID →
mount → CouchDB layout → grow the ext4 online when the device outgrew it.

observe_host() looks at everything once (sysfs, the disk's evidence, mountinfo, fstab, state
records) without changing anything; plan_bootstrap() is a pure function of that observation and
the config that makes every decision and every refusal before anything changes; apply runs the
planned steps in order. --dry-run prints the plan and stops. A crash at any point leaves a state
the next observation recognises and finishes (see the format intent and the view cleanup).

The one change made before the host is observed is the AttachVolume call: the disk does not
exist until then. With an attach pending, the host part is observed and planned after it.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Mapping, NamedTuple

from hostagent import state
from hostagent.errors import OperationError, Reason, RefusedError, UsageError
from hostagent.lock import host_lock
from hostagent.log import get_logger
from hostagent.plan import DONE, PLANNED, Step, Unchanged, apply_steps, render_steps
from hostagent.report import Report

log = get_logger(__name__)

# Test seam for crash-safety tests: SIGKILL ourselves right after the named step is done.
CRASH_AFTER_ENV = "HOSTAGENT_CRASH_AFTER"
DEVICE_POLL_SECONDS = 0.5
GUARD_RECORD = "guard.json"  # the bare directory under a mount that was already there is guarded
NO_IMMUTABLE_FLAG = "this filesystem has no immutable flag; relying on the persistence attribute"
# Room the fstab write needs besides the new text: the backup copy, and a margin.
FSTAB_SPACE_MARGIN = 64 * 1024


class VolumeSide(NamedTuple):
    """What EC2 says about the volume (all None/empty when the config names only a device)."""

    volume_id: str | None = None
    instance_id: str | None = None
    requested_name: str | None = None
    tags: Mapping[str, str] = {}  # never mutated
    snapshot_id: str | None = None
    volume: Any = None  # aws.volume.VolumeInfo


class HostObservation(NamedTuple):
    """Everything the plan needs, looked at once; plain data (tests build it by hand)."""

    device: Any  # blockdev.BlockDevice
    mount_point: str
    proven_volume_id: str | None  # the volume the disk positively is (serial or attachment)
    identity: str | None  # durable identity of the disk (blockdev.durable_identity)
    superblock: Any  # superblock.Superblock | None
    evidence: Any  # blank.Evidence | None (None: the volume record vouches for the filesystem)
    known_uuid: str | None  # set when the volume record names this disk and this filesystem
    loop_users: tuple[str, ...]
    intent: Mapping | None
    own_mkfs_clean: bool | None  # e2fsck -n on an unmounted ext4 our intent made; None: not run
    mark_uuid: str | None  # the UUID our pre-mkfs mark names (read only with a format record)
    mounted: Any  # MountEntry at the mount point, or None
    device_mounts: tuple[Any, ...]  # MountEntry of this disk elsewhere (this namespace)
    mount_point_kind: str  # "dir" | "missing" | "other"
    mount_point_blocked: str | None  # why the missing mount point cannot be created
    bare_immutable: bool | None  # chattr +i of the bare mount point (unmounted case)
    bare_leftovers: tuple[str, ...]
    guard_recorded: bool  # the guard underneath the already-mounted volume was set before
    fstab_text: str
    fstab_blocked: str | None  # why the fstab cannot be written (read-only, full)
    fstab_free_bytes: int | None
    twins: tuple[str, ...]
    views: tuple[str, ...]  # our bind mounts left by a killed run
    layout: tuple[Any, ...] | None  # DirState of each directory when mounted
    couchdb_admin: Any = None  # AdminObservation when couchdb.admin_secret is set
    mount_root: Any = None  # DirState of the volume's top directory, with layout


class AdminObservation(NamedTuple):
    """couchdb.admin_secret, fetched before anything changes, and etc/local.d when mounted."""

    secret: Any = None  # couchdb_admin.AdminSecret (its repr hides the password)
    error: Any = None  # HostagentError: S3 missing, not allowed or unreachable
    local_d: Any = None  # adapters.couchdb_ini.LocalDState; None: looked at after the mount


class AdminSecretUnavailable(OperationError):
    """The admin secret could not be fetched: every other step was done, the ini left as is."""


def run(ctx, args) -> Report:
    config = ctx.config
    steps: list[Step] = []
    info: dict[str, Any] = {"volume_id": config.volume.id or None, "device": None, "uuid": None}
    try:
        with host_lock(config.host.lock_file, dry_run=args.dry_run):
            bootstrap(config, args.dry_run, steps, info)
    except Exception as exc:
        # The operator sees which steps were done before the failure; the error is the last line.
        if steps and not ctx.json:
            print(render_steps(steps))
        if isinstance(exc, AdminSecretUnavailable):
            exc.json_extra = {"steps": [s.as_dict() for s in steps], **info}
        raise
    changed = [s for s in steps if s.status in (DONE, PLANNED)]
    if args.dry_run:
        summary = f"dry run: {len(changed)} step(s) would change the host" if changed else \
            "dry run: nothing to do, the host is as configured"
    else:
        summary = f"{len(changed)} step(s) done" if changed else "nothing to do: already bootstrapped"
    text = render_steps(steps) + "\n" + summary
    extra = {"dry_run": bool(args.dry_run), **info}
    return Report(ok=True, key="steps", items=[s.as_dict() for s in steps], text=text,
                  extra=extra)


def bootstrap(config, dry_run: bool, steps: list[Step], info: dict) -> None:
    aws = None
    side = VolumeSide(volume_id=config.volume.id or None)
    if config.volume.uses_aws or config.couchdb.admin_secret:
        from hostagent.aws.clients import AWS

        aws = AWS()
    # Before any change: a malformed secret is exit 2 with nothing changed. S3 missing or
    # unreachable only fails the couchdb-admin step, last: the data volume is never held back.
    admin = observe_admin_secret(config, aws) if config.couchdb.admin_secret else None
    if config.volume.uses_aws:
        side, attach = observe_volume(config, aws)
        info["volume_id"] = side.volume_id
        if attach is not None and attach.op is None:
            apply(steps, [attach], dry_run, {})
        elif attach is not None:
            apply(steps, [attach], dry_run, executors(config, aws, side, None))
            if dry_run:
                steps.append(Step("device", f"wait for the block device of {side.volume_id}",
                                  "it appears once the attachment completes", status=PLANNED))
                return
            side = side._replace(volume=attach.op[1]["result"]["volume"])
    device = find_device(config, side)
    obs = observe_host(config, side, device)
    if admin is not None:
        obs = obs._replace(couchdb_admin=observe_admin_ini(config, obs, admin))
    info["device"] = device.path
    plan = plan_bootstrap(obs, config, side)
    fmt = next((s for s in plan if s.op and s.op[0] == "mkfs"), None)
    info["uuid"] = fmt.op[1]["uuid"] if fmt else fs_uuid_of(obs)
    if dry_run and fmt is not None and not (obs.intent or {}).get("uuid") == info["uuid"]:
        # The UUID is drawn at random when planning: a real run draws its own. Say <new>.
        for step in plan:
            step.action = step.action.replace(info["uuid"], "<new>")
            step.reason = step.reason.replace(info["uuid"], "<new>")
        info["uuid"] = None
    degraded = None
    try:
        apply(steps, plan, dry_run, executors(config, aws, side, obs))
    except AdminSecretUnavailable as exc:
        degraded = exc  # the last step: everything else is done
    if not dry_run:
        record_volume(config, side, obs, info["uuid"])
    if degraded is not None:
        raise degraded


def apply(steps: list[Step], plan: list[Step], dry_run: bool, execs: dict) -> None:
    """Bind each step's op to its executor, then run the steps in order."""
    for step in plan:
        if step.op is not None:
            kind, args = step.op
            step.run = (lambda fn=execs[kind], a=args: fn(a))
    crash_after = os.environ.get(CRASH_AFTER_ENV)

    def after(step: Step) -> None:
        if crash_after and crash_after == step.name and step.status == DONE:
            os.kill(os.getpid(), signal.SIGKILL)

    for step in plan:
        steps.append(step)
        apply_steps([step], dry_run=dry_run, on_step=after)


# --- observe ------------------------------------------------------------------------------


def observe_volume(config, aws) -> tuple[VolumeSide, Step | None]:
    """Find the volume in EC2 and decide the attach (refusals raise here, before any change)."""
    from hostagent.aws.volume import decide_attach, find_volume

    vol_cfg = config.volume
    identity = aws.identity
    volume = find_volume(aws.ec2, volume_id=vol_cfg.id, tags=dict(vol_cfg.tags),
                         availability_zone=identity.availability_zone)
    decision = decide_attach(identity, volume)
    side = VolumeSide(volume_id=volume.volume_id, instance_id=identity.instance_id,
                      tags=dict(volume.tags), snapshot_id=volume.snapshot_id or None,
                      volume=volume)
    where = f"{volume.volume_id} in {volume.availability_zone}"
    if decision == "attached-here":
        return side, Step("attach", f"attach {volume.volume_id}",
                          f"already attached to this instance ({identity.instance_id})")
    if not vol_cfg.attach:
        raise OperationError(f"volume {where} is available but volume.attach = false",
                             where=config.source, hint="attach it, or set volume.attach = true")
    return side, Step("attach", f"AttachVolume {volume.volume_id} as {vol_cfg.device_name}",
                      f"volume is available ({where})",
                      op=("attach", {"device_name": vol_cfg.device_name, "result": {}}))


def requested_name(config, side: VolumeSide) -> str:
    """The name EC2 reports for this instance's attachment (it may differ from the configured
    device_name: a launch template, a person); the configured one only when EC2 says nothing."""
    attachment = side.volume.attachment_of(side.instance_id) \
        if side.volume is not None and side.instance_id else None
    return attachment.device if attachment and attachment.device else config.volume.device_name


def find_device(config, side: VolumeSide):
    from hostagent.adapters.blockdev import find_volume_device, list_block_devices, \
        resolve_explicit_device

    vol_cfg = config.volume
    if vol_cfg.device:
        return resolve_explicit_device(vol_cfg.device, list_block_devices(),
                                       volume_id=side.volume_id)
    # After an attach the kernel needs a moment to show the disk: wait, bounded.
    deadline = time.monotonic() + vol_cfg.attach_timeout
    while True:
        try:
            return find_volume_device(list_block_devices(), volume_id=side.volume_id,
                                      requested_name=requested_name(config, side))
        except RefusedError:
            raise
        except OperationError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(DEVICE_POLL_SECONDS)


def identity_volume_id(config, side: VolumeSide, dev) -> str | None:
    """Which volume the device positively is, for the blank proof.

    Nitro: its NVMe serial says so. A disk with no serial at all (Xen `xvdf`, a loop device)
    carries no identity of its own; it counts as the volume only on other positive evidence:
    the operator named it in volume.device, or EC2 reports the volume attached to this instance
    under the very name the kernel gave the disk (`/dev/sdf` arrives as `xvdf` on Xen).
    """
    from hostagent.adapters.blockdev import name_key

    if dev.volume_id or dev.serial:
        return dev.volume_id
    if side.volume_id is None:
        return None
    if config.volume.device:
        return side.volume_id
    for att in getattr(side.volume, "attachments", ()):
        if att.instance_id == side.instance_id and name_key(att.device) == name_key(dev.name):
            return side.volume_id
    return None


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _write_problem(directory: str) -> tuple[str | None, int | None]:
    """Why nothing can be created in directory (read-only filesystem, no write access), and
    how many bytes are free there."""
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        return f"cannot look at {directory}: {exc.strerror}", None
    if st.f_flag & os.ST_RDONLY:
        return f"{directory} is on a read-only filesystem", st.f_bavail * st.f_frsize
    if not os.access(directory, os.W_OK):
        return f"{directory} is not writable", st.f_bavail * st.f_frsize
    return None, st.f_bavail * st.f_frsize


def find_twins(fs_uuid: str, dev, devices) -> tuple[str, ...]:
    """Other disks or partitions whose ext superblock carries this UUID (a copy of the volume
    made from its snapshot): UUID= in fstab could mount either. Read straight from each
    superblock, no blkid cache."""
    from hostagent.adapters.superblock import read_superblock

    twins = []
    for other in devices:
        paths = [] if other.major_minor == dev.major_minor else [other.path]
        paths += [f"/dev/{p}" for p in other.partitions]
        for path in paths:
            sb = read_superblock(path)
            if sb and sb.uuid.lower() == fs_uuid.lower():
                twins.append(path)
    return tuple(twins)


def observe_host(config, side: VolumeSide, dev) -> HostObservation:
    """Look at the disk, the mount point, fstab and our records once, changing nothing."""
    from hostagent.adapters import fstab, mounts
    from hostagent.adapters.blockdev import durable_identity, list_block_devices, loops_backed_by
    from hostagent.adapters.layout import inspect_layout, inspect_mount_root
    from hostagent.adapters.superblock import read_superblock

    fs_cfg, host = config.filesystem, config.host
    mp = os.path.normpath(fs_cfg.mount_point)
    proven = identity_volume_id(config, side, dev)
    identity = durable_identity(dev, proven)
    record = state.read_record(host.state_dir, state.VOLUME_RECORD) or {}
    intent = state.read_record(host.state_dir, state.FORMAT_INTENT)
    sb = read_superblock(dev.path)
    table = mounts.read_mountinfo()
    mounted = mounts.mount_at(mp, table)
    device_mounts = tuple(m for m in mounts.mounts_of_device(dev.major_minor, table)
                          if m.mount_point != mp)

    known_uuid = None
    if (sb and identity and record.get("identity") == identity
            and str(record.get("uuid", "")).lower() == sb.uuid.lower()):
        known_uuid = sb.uuid  # the filesystem a bootstrap of ours mounted from this very disk
    evidence = None
    loop_users: tuple[str, ...] = ()
    if known_uuid:
        loop_users = tuple(f"backs {loop} (a loop device reads and writes through it)"
                           for loop in loops_backed_by({dev.major_minor, *_partition_devs(dev)}))
    else:
        from hostagent.adapters.disk import gather_evidence
        from hostagent.blank import FORMATTED_TAG

        evidence = gather_evidence(
            dev.path, size_bytes=dev.size_bytes, partitions=dev.partitions, holders=dev.holders,
            serial_volume_id=proven, expected_volume_id=side.volume_id,
            formatted_tag=side.tags.get(FORMATTED_TAG), snapshot_id=side.snapshot_id,
            mountinfo=table)

    mark_uuid = None
    if intent and identity and intent.get("identity") == identity:
        from hostagent.adapters.mkfs import read_mark

        mark_uuid = read_mark(dev.path, dev.size_bytes)
    own_mkfs_clean = None
    if (intent and identity and intent.get("identity") == identity and sb and not sb.ever_mounted
            and str(intent.get("uuid", "")).lower() == sb.uuid.lower() and mounted is None
            and not device_mounts):
        from hostagent.adapters.mkfs import is_clean

        own_mkfs_clean = is_clean(dev.path)

    kind = "missing"
    if os.path.lexists(mp):
        kind = "dir" if os.path.isdir(mp) else "other"
    blocked = None
    if kind == "missing":
        ancestor = _nearest_existing(os.path.dirname(mp))
        if not os.path.isdir(ancestor):
            blocked = f"{ancestor} is not a directory"
        else:
            blocked, _ = _write_problem(ancestor)
    bare_immutable, leftovers = None, ()
    if kind == "dir" and mounted is None:
        bare_immutable = mounts.is_immutable(mp)
        leftovers = tuple(sorted(os.listdir(mp)))

    fstab_text = fstab.read_fstab(fs_cfg.fstab)
    fstab_dir = _nearest_existing(os.path.dirname(os.path.realpath(fs_cfg.fstab)))
    fstab_blocked, fstab_free = _write_problem(fstab_dir)

    fs_uuid = sb.uuid if sb else None
    twins = find_twins(fs_uuid, dev, list_block_devices()) if fs_uuid else ()
    layout = mount_root = None
    if mounted is not None and mounted.major_minor == dev.major_minor:
        layout = tuple(inspect_layout(mp, config.layout.directories))
        mount_root = inspect_mount_root(mp)
    guard = state.read_record(host.state_dir, GUARD_RECORD) or {}
    return HostObservation(
        device=dev, mount_point=mp, proven_volume_id=proven, identity=identity, superblock=sb,
        evidence=evidence, known_uuid=known_uuid, loop_users=loop_users, intent=intent,
        own_mkfs_clean=own_mkfs_clean, mark_uuid=mark_uuid, mounted=mounted, device_mounts=device_mounts,
        mount_point_kind=kind, mount_point_blocked=blocked, bare_immutable=bare_immutable,
        bare_leftovers=leftovers,
        guard_recorded=(guard.get("mount_point") == mp and mounted is not None
                        and guard.get("major_minor") == mounted.major_minor),
        fstab_text=fstab_text, fstab_blocked=fstab_blocked, fstab_free_bytes=fstab_free,
        twins=twins, views=tuple(mounts.leftover_views(host.state_dir, table)), layout=layout,
        mount_root=mount_root)


def observe_admin_secret(config, aws) -> AdminObservation:
    """GetObject of couchdb.admin_secret: a malformed object raises (exit 2, before any change);
    S3 missing, not allowed or unreachable is kept as the couchdb-admin step's failure."""
    from hostagent.couchdb_admin import try_fetch_admin_secret

    secret, error = try_fetch_admin_secret(aws, config.couchdb.admin_secret)
    return AdminObservation(secret=secret, error=error)


def observe_admin_ini(config, obs: HostObservation, admin: AdminObservation) -> AdminObservation:
    """etc/local.d/10-hostagent.ini and the ini files after it, when our volume is mounted."""
    if admin.secret is None or obs.layout is None:
        return admin
    return admin._replace(local_d=inspect_admin_ini(obs.mount_point))


def inspect_admin_ini(mount_point: str):
    """adapters.couchdb_ini.LocalDState of our ini and the *.ini CouchDB reads after it."""
    from hostagent import couchdb_admin as ca
    from hostagent.adapters.couchdb_ini import inspect_local_d

    return inspect_local_d(mount_point, ca.INI_DIR, ca.INI_NAME, limit=ca.MAX_OTHER_INI_BYTES,
                           other_limit=ca.MAX_OTHER_INI_BYTES)


def _partition_devs(dev) -> set[str]:
    from hostagent.adapters.blockdev import device_number

    return {n for n in (device_number(f"/dev/{p}") for p in dev.partitions) if n}


def fs_uuid_of(obs: HostObservation) -> str | None:
    return obs.superblock.uuid if obs.superblock else None


# --- plan (pure) ------------------------------------------------------------------------------


def plan_bootstrap(obs: HostObservation, config, side: VolumeSide) -> list[Step]:
    """PURE: the observation and the config → the steps, or the refusal (raised) — every
    decision made before anything changes."""
    from hostagent.adapters import fstab as fstab_mod

    dev, mp = obs.device, obs.mount_point
    fs_cfg = config.filesystem
    steps: list[Step] = []

    for view in obs.views:
        steps.append(Step("cleanup", f"umount {view}", "a bind mount left by a killed bootstrap",
                          op=("remove-view", {"path": view})))

    # The mount point first: refusals about it come before anything is formatted.
    mounted_here = obs.mounted is not None
    if mounted_here and obs.mounted.major_minor != dev.major_minor:
        raise RefusedError(
            f"{mp} already has {obs.mounted.source} mounted, not {dev.path}; refusing to mount "
            "over it", where=mp, hint=f"check `findmnt {mp}`; unmount it by hand if it is stale",
            reason=Reason.MOUNT_POINT_BUSY)
    for m in obs.device_mounts:
        raise RefusedError(f"{dev.path} is already mounted at {m.mount_point}; refusing to mount "
                           f"it at {mp} too", where=dev.path, hint=f"umount {m.mount_point}",
                           reason=Reason.MOUNTED_ELSEWHERE)
    if obs.mount_point_kind == "other":
        raise UsageError("mount point exists and is not a directory", where=mp)
    if obs.mount_point_blocked:
        raise OperationError(f"cannot create the mount point: {obs.mount_point_blocked}",
                             where=mp, hint="fix the filesystem that should hold the mount point "
                                            "(or choose another filesystem.mount_point)")
    if obs.twins:
        raise RefusedError(f"{', '.join(obs.twins)} carries the same filesystem UUID "
                           f"{fs_uuid_of(obs)} as {dev.path}; refusing: UUID= could mount either",
                           where=dev.path,
                           hint="detach the disk that is not the volume (a copy from a snapshot?)",
                           reason=Reason.UUID_TWINS)
    if side.volume_id and obs.proven_volume_id is None and not config.volume.device:
        # Reusing the wrong disk is as bad as formatting it: mounting someone else's ext4 here
        # would report persistence=ready for data that is not this volume's.
        raise RefusedError(
            f"cannot prove {dev.path} is {side.volume_id}: it has no NVMe serial naming the "
            f"volume, and EC2 does not report the volume attached here as {dev.name}",
            where=dev.path,
            hint="set volume.device to the disk if you are sure, or check `hostagent devices`",
            reason=Reason.WRONG_DEVICE)
    if obs.loop_users:
        from hostagent.blank import HINT_IN_USE

        raise RefusedError(f"{dev.path} {'; '.join(obs.loop_users)}; refusing to use it",
                           where=dev.path, hint=HINT_IN_USE, reason=Reason.DEVICE_IN_USE)

    fmt, fs_uuid = plan_filesystem(obs, config, side)
    will_format = fmt.op is not None and fmt.op[0] == "mkfs"
    if dev.read_only and (will_format or not mounted_here):
        raise OperationError(f"{dev.path} is read-only (the kernel reports ro=1); cannot "
                             f"{'format' if will_format else 'mount'} it read-write",
                             where=dev.path, hint="attach the volume read-write (`blockdev --setrw`"
                                                  " if it was set read-only by hand)")
    sb = obs.superblock
    if not will_format and sb is not None and sb.records_errors and not mounted_here:
        steps.append(Step("fsck", f"e2fsck -p {dev.path}",
                          f"the superblock records errors (state {'errors' if sb.has_errors else 'ok'}"
                          f", {sb.error_count} error(s)): check before the first mount",
                          op=("fsck", {"device": dev.path})))
    steps.append(fmt)
    if side.volume is not None:
        steps += plan_tags(side, fmt)

    entry = fstab_mod.desired_entry(fs_uuid, mp, fs_cfg.type, fs_cfg.options,
                                    fs_cfg.device_timeout)
    new = fstab_mod.plan_fstab(obs.fstab_text, entry)
    if new == obs.fstab_text:
        steps.append(Step("fstab", f"UUID={fs_uuid} {mp} in {fs_cfg.fstab}", "already present"))
    else:
        need = 2 * len(new.encode("utf-8", "surrogateescape")) + FSTAB_SPACE_MARGIN
        if obs.fstab_blocked or (obs.fstab_free_bytes is not None and obs.fstab_free_bytes < need):
            why = obs.fstab_blocked or f"only {obs.fstab_free_bytes} bytes free"
            raise OperationError(f"cannot write the fstab: {why}", where=fs_cfg.fstab,
                                 hint="free space or make it writable; nothing was changed")
        steps.append(Step("fstab", f"write UUID={fs_uuid} {mp} to {fs_cfg.fstab}",
                          fstab_mod.describe_fstab_plan(obs.fstab_text, entry),
                          op=("write-fstab", {"text": new})))

    if mounted_here:
        if obs.guard_recorded:
            steps.append(Step("guard", f"chattr +i {mp} (underneath the mount)",
                              "set underneath before (recorded)"))
        else:
            steps.append(Step("guard", f"chattr +i {mp} (underneath the mount)",
                              "the volume was mounted before bootstrap ran; if it is ever "
                              "missing, nothing may write CouchDB data to the root disk",
                              op=("guard-under", {"major_minor": obs.mounted.major_minor})))
        steps.append(Step("mount", f"mount {dev.path} on {mp}", "already mounted"))
    else:
        if obs.mount_point_kind == "missing":
            steps.append(Step("mount-point", f"mkdir {mp}", "missing", op=("mkdir", {})))
        steps.append(plan_guard(obs))
        steps.append(Step("mount", f"mount {dev.path} on {mp}", "not mounted",
                          op=("mount", {"uuid": fs_uuid})))
    steps.append(plan_layout(obs, config))
    grow = plan_grow_fs(obs, will_format)
    if grow is not None:
        steps.append(grow)
    if obs.couchdb_admin is not None:
        steps.append(plan_couchdb_admin(obs, config))  # last: a failure leaves the rest done
    return steps


def plan_grow_fs(obs: HostObservation, will_format: bool) -> Step | None:
    """PURE: resize2fs the mounted ext4 when its device is more than 1% larger (the volume was
    resized in the console, or by a grow whose resize2fs did not run); None when it covers the
    device. Last, after the layout: a failed grow leaves the volume mounted and laid out."""
    from hostagent.capacity import fs_needs_grow, gib

    sb, dev = obs.superblock, obs.device
    if will_format or sb is None or not fs_needs_grow(dev.size_bytes, sb.size_bytes):
        return None
    action = f"resize2fs {dev.path} ({gib(sb.size_bytes)} -> {gib(dev.size_bytes)}, online)"
    if obs.mounted is not None and sb.records_errors:
        return Step("grow-fs", action, "the superblock records errors: not grown until e2fsck "
                                       "has checked it (unmounted)")
    if obs.mounted is not None and obs.mounted.read_only:
        return Step("grow-fs", action, "mounted read-only: resize2fs needs a read-write mount")
    grown = 100.0 * (dev.size_bytes - sb.size_bytes) / sb.size_bytes
    return Step("grow-fs", action, f"the device is {grown:.0f}% larger than its ext4 (the volume "
                                   "was resized); grown online, never shrunk",
                op=("grow-fs", {"major_minor": dev.major_minor}))


def plan_filesystem(obs: HostObservation, config, side: VolumeSide) -> tuple[Step, str]:
    """PURE: the format step (mkfs, resume our own, or reuse) and the filesystem UUID."""
    dev = obs.device
    label = config.filesystem.label
    intent = obs.intent or {}
    intent_here = bool(obs.identity and intent.get("identity") == obs.identity
                       and intent.get("volume_id") == side.volume_id and intent.get("uuid")
                       and intent.get("size_bytes") == dev.size_bytes)
    intent_uuid = str(intent.get("uuid", "")) if intent_here else ""
    action = f"mkfs.ext4 -L {label} -m 0 {dev.path}"

    if obs.known_uuid:
        return Step("format", action, f"ext4 UUID {obs.known_uuid}: the filesystem bootstrap "
                                      "mounted before (state record): reused, never remade",
                    op=("forget-intent", {}) if intent_here else None), obs.known_uuid

    from hostagent import blank

    decision = blank.decide(obs.evidence)
    if decision.action == "reuse":
        if intent_here and decision.fs_uuid and decision.fs_uuid.lower() == intent_uuid.lower() \
                and obs.own_mkfs_clean is False:
            return Step("format", action + " -F", f"our own mkfs of this disk ({intent.get('started')}) "
                        "was interrupted: its never-mounted ext4 is incomplete; finishing it with "
                        "the same UUID", op=("mkfs", {"uuid": intent_uuid, "resume": True})), \
                intent_uuid
        label_note = f", label {decision.fs_label}" if decision.fs_label else ""
        why = f"ext4 found (UUID {decision.fs_uuid}{label_note}): reused, never remade"
        if intent_here and decision.fs_uuid.lower() == intent_uuid.lower():
            why = f"our own mkfs (UUID {decision.fs_uuid}) finished before a crash: reused"
        return Step("format", action, why, op=("forget-intent", {}) if intent_here else None), \
            decision.fs_uuid
    if decision.action == "refuse":
        if intent_here and blank.is_own_interrupted_format(
                obs.evidence, intent_uuid, obs.mark_uuid) == "partial":
            return Step("format", action + " -F", f"our own mkfs of this disk "
                        f"({intent.get('started')}) was interrupted before it wrote a superblock; "
                        "formatting again with the same UUID",
                        op=("mkfs", {"uuid": intent_uuid, "resume": True})), intent_uuid
        error = blank.refusal_error(decision, dev.path, volume_id=side.volume_id)
        error.reason = Reason.NOT_BLANK
        if obs.intent and not intent_here:
            error.hint = (f"{error.hint}; a format record in the state directory names another "
                          f"disk ({obs.intent.get('identity') or 'no durable identity'}), not this "
                          f"one ({obs.identity or 'no durable identity'})")
        raise error
    new_uuid = intent_uuid or random_uuid()
    return Step("format", action, f"proven blank: {decision.reason}",
                op=("mkfs", {"uuid": new_uuid, "resume": False})), new_uuid


def random_uuid() -> str:
    """A version-4 UUID, as uuid.uuid4() makes it (os.urandom), without importing uuid (~3 ms:
    it pulls in platform)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def now_utc():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def plan_tags(side: VolumeSide, fmt: Step) -> list[Step]:
    from hostagent.aws.volume import FORMATTED_TAG, IN_SERVICE_TAG, RESTORED_FROM_TAG

    steps = []
    tags = side.tags
    if tags.get(FORMATTED_TAG) is not None:
        steps.append(Step("tag-volume", f"tag {side.volume_id} {FORMATTED_TAG}",
                          f"already tagged ({tags[FORMATTED_TAG]})"))
    else:
        steps.append(Step("tag-volume", f"tag {side.volume_id} {FORMATTED_TAG}=<now>",
                          "the volume now holds our filesystem: it must never look blank again",
                          op=("tag", {"key": FORMATTED_TAG})))
    if RESTORED_FROM_TAG in tags and IN_SERVICE_TAG not in tags:
        steps.append(Step("tag-in-service", f"tag {side.volume_id} {IN_SERVICE_TAG}=<now>",
                          f"restored from {tags[RESTORED_FROM_TAG]} and now put to use: a later "
                          "restore of that snapshot must make a fresh volume",
                          op=("tag", {"key": IN_SERVICE_TAG})))
    return steps


def plan_guard(obs: HostObservation) -> Step:
    mp = obs.mount_point
    action = f"chattr +i {mp}"
    if obs.bare_immutable:
        return Step("guard", action, "already immutable")
    if obs.mount_point_kind == "dir" and obs.bare_immutable is None:
        return Step("guard", action, NO_IMMUTABLE_FLAG)
    why = "Docker must not create data/ on the root disk"
    if obs.bare_leftovers:
        why += (f" (bare {mp} is not empty: {', '.join(obs.bare_leftovers[:5])} — written while "
                "the volume was not mounted; left there, hidden under the mount)")
    return Step("guard", action, why, op=("guard", {}))


def plan_layout(obs: HostObservation, config) -> Step:
    from hostagent.adapters.layout import (MOUNT_ROOT, MOUNT_ROOT_MODE, layout_problem,
                                           mount_root_problem)

    lay = config.layout
    action = (f"{MOUNT_ROOT} private (root:root {MOUNT_ROOT_MODE:04o}); "
              f"{', '.join(lay.directories)} owned {lay.owner}:{lay.group} mode {lay.mode}")
    op = ("layout", {})
    if obs.layout is None:
        return Step("layout", action, "after the mount", op=op)
    root_problem = mount_root_problem(obs.mount_root) if obs.mount_root else None
    problems = [f"{MOUNT_ROOT}: {root_problem}"] if root_problem else []
    problems += [f"{s.relative}: {p}" for s in obs.layout
                 if (p := layout_problem(s, lay.owner, lay.group, lay.mode_bits))]
    if not problems:
        return Step("layout", action, "already laid out")
    return Step("layout", action, "; ".join(problems), op=op)


def plan_couchdb_admin(obs: HostObservation, config) -> Step:
    """PURE: CouchDB's admin, bind_address and single_node in etc/local.d/10-hostagent.ini."""
    from hostagent.couchdb_admin import INI_DIR, INI_NAME, decide_admin_ini

    admin, url = obs.couchdb_admin, config.couchdb.admin_secret
    action = (f"write {obs.mount_point}/{INI_DIR}/{INI_NAME} ([admins] from {url}, "
              "bind_address 127.0.0.1, single_node)")
    if admin.error is not None:
        return Step("couchdb-admin", action, f"cannot fetch the secret: {admin.error}; the file "
                    "is left as it is", op=("couchdb-admin-unavailable", {}))
    local_d = admin.local_d
    if local_d is None or local_d.kind == "no-dir":
        return Step("couchdb-admin", action, "after the mount and layout", op=("couchdb-admin", {}))
    decision = decide_admin_ini(local_d.kind, local_d.data, admin.secret, local_d.later,
                                meta=local_d.meta, owner=(config.layout.owner,
                                                          config.layout.group))
    if decision.write or decision.drop or decision.fix:
        return Step("couchdb-admin", action, decision.reason, op=("couchdb-admin", {}))
    return Step("couchdb-admin", action, decision.reason)


# --- apply --------------------------------------------------------------------------------


def executors(config, aws, side: VolumeSide, obs: HostObservation | None) -> dict:
    """op kind → the function that carries it out (adapters only)."""
    from hostagent.adapters import fstab, mounts

    fs_cfg, host = config.filesystem, config.host
    mp = os.path.normpath(fs_cfg.mount_point)
    wrote_fstab = []
    mounted_now: list[bool] = []
    guarded = [obs is not None and bool(obs.bare_immutable)]

    def attach(args) -> str:
        from hostagent.aws.volume import attach_volume

        args["result"]["volume"] = attach_volume(
            aws.ec2, aws.identity, side.volume, args["device_name"],
            timeout=config.volume.attach_timeout)
        return f"attached to {aws.identity.instance_id} as {args['device_name']}"

    def remove_view(args) -> str:
        mounts.remove_view(args["path"])
        return "removed"

    def fsck(args) -> str:
        from hostagent.adapters.mkfs import fsck_preen

        return fsck_preen(args["device"])

    def mkfs(args) -> str:
        from hostagent.adapters.mkfs import format_ext4
        from hostagent.adapters.superblock import read_superblock
        from hostagent.errors import CommandError

        dev = obs.device
        # Written only now, after every input was validated and the plan made: a crash from
        # here on leaves a record that authorises finishing mkfs on this very disk only.
        state.write_record(host.state_dir, state.FORMAT_INTENT, {
            "identity": obs.identity, "volume_id": side.volume_id, "uuid": args["uuid"],
            "device": dev.path, "size_bytes": dev.size_bytes,
            "started": now_utc().isoformat(timespec="seconds")})
        try:
            format_ext4(dev.path, fs_cfg.label, args["uuid"], size_bytes=dev.size_bytes,
                        resume=args["resume"])
        except RefusedError:
            # The disk changed under us before mkfs ran: nothing of ours is on it.
            state.remove_record(host.state_dir, state.FORMAT_INTENT)
            raise
        except CommandError as exc:
            # mkfs failed by itself: the record goes, a person looks. Killed by a signal or our
            # timeout, it was interrupted: the record stays, so the next run may finish it.
            if exc.returncode is not None and exc.returncode >= 0:
                state.remove_record(host.state_dir, state.FORMAT_INTENT)
            raise
        sb = read_superblock(dev.path)
        if sb is None or sb.uuid.lower() != args["uuid"].lower():
            raise OperationError(f"mkfs.ext4 finished but {dev.path} does not show UUID "
                                 f"{args['uuid']}", where=dev.path)
        state.remove_record(host.state_dir, state.FORMAT_INTENT)
        return f"ext4 UUID {sb.uuid}"

    def forget_intent(args) -> str:
        state.remove_record(host.state_dir, state.FORMAT_INTENT)
        return Unchanged("filesystem reused; the format record of our earlier mkfs removed")

    def tag(args) -> str:
        from hostagent.aws.volume import tag_time

        tag_time(aws.ec2, side.volume_id, args["key"], now_utc())
        return f"{args['key']} set"

    def write_fstab(args) -> str:
        if fstab.write_fstab(fs_cfg.fstab, args["text"]):
            wrote_fstab.append(True)
        return "written (previous file kept as backup)"

    def mkdir(args) -> str:
        try:
            os.makedirs(mp, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise OperationError(f"cannot create the mount point: {exc.strerror}",
                                 where=mp) from None
        return "created"

    def guard(args) -> str:
        if mounts.is_immutable(mp) is None:
            return NO_IMMUTABLE_FLAG
        try:
            mounts.set_immutable(mp, True)
        except OperationError as exc:
            return f"not supported here ({exc}); relying on the persistence attribute"
        guarded[0] = True
        return "immutable while unmounted"

    def guard_under(args) -> str:
        with mounts.bare_directory(mp, host.state_dir) as bare:
            immutable = mounts.is_immutable(bare)
            if immutable is None:
                detail = NO_IMMUTABLE_FLAG
            elif immutable:
                detail = "already immutable"
            else:
                try:
                    mounts.set_immutable(bare, True)
                    detail = "immutable underneath the mount"
                except OperationError as exc:
                    detail = f"not supported here ({exc}); relying on the persistence attribute"
        state.write_record(host.state_dir, GUARD_RECORD,
                           {"mount_point": mp, "major_minor": args["major_minor"]})
        return detail

    def mount(args) -> str:
        try:
            mounts.mount_from_fstab(mp, fs_cfg.fstab)
        except OperationError:
            if wrote_fstab:
                fstab.restore_fstab(fs_cfg.fstab)  # never leave a line that fails at next boot
            raise
        got = mounts.mount_at(mp, mounts.read_mountinfo())
        if got is None or got.major_minor != obs.device.major_minor:
            # UUID= resolved to another disk (a twin from a snapshot appeared since the check).
            if got is not None:
                mounts.unmount(mp)
            if wrote_fstab:
                fstab.restore_fstab(fs_cfg.fstab)
            raise RefusedError(f"mounting UUID={args['uuid']} gave "
                               f"{got.source if got else 'nothing'}, not {obs.device.path}; "
                               "unmounted again", where=mp,
                               hint="two disks carry this filesystem UUID: detach the one that "
                                    "is not the volume")
        mounted_now.append(True)
        if guarded[0]:
            # The bare directory under this mount is known immutable: the next run need not
            # bind-mount the parent filesystem to look underneath.
            state.write_record(host.state_dir, GUARD_RECORD,
                               {"mount_point": mp, "major_minor": got.major_minor})
        return f"mounted from {fs_cfg.fstab}"

    def layout(args) -> str:
        from hostagent.adapters.layout import apply_layout

        lay = config.layout
        try:
            changed = apply_layout(mp, lay.directories, lay.owner, lay.group, lay.mode_bits,
                                   expected_device=obs.device.major_minor)
        except RefusedError:
            if mounted_now:
                # A reused ext4 whose layout cannot be trusted (a symlink off the volume): leave
                # the host as it was before this run, not half set up for CouchDB.
                mounts.unmount(mp)
                if wrote_fstab:
                    fstab.restore_fstab(fs_cfg.fstab)
            raise
        return "; ".join(changed) if changed else Unchanged("already laid out")

    def grow_fs(args) -> str:
        from hostagent.adapters.resize import grow_ext4_online

        return grow_ext4_online(mp, args["major_minor"])

    def couchdb_admin(args) -> str:
        from hostagent import couchdb_admin as ca
        from hostagent.adapters.couchdb_ini import fix_in_local_d, write_in_local_d

        secret, lay = obs.couchdb_admin.secret, config.layout
        # Looked at again now: after a mount or a layout, or a change since the observation.
        local_d = inspect_admin_ini(mp)
        if local_d.kind == "no-dir":
            raise OperationError(f"{mp}/{ca.INI_DIR} is missing or not a directory",
                                 where=mp, hint="check layout.directories and `hostagent "
                                                "verify-mount`")
        decision = ca.decide_admin_ini(local_d.kind, local_d.data, secret, local_d.later,
                                       meta=local_d.meta, owner=(lay.owner, lay.group))
        done = []
        if decision.write:
            write_in_local_d(mp, ca.INI_DIR, ca.INI_NAME, ca.render_admin_ini(secret).encode(),
                             mode=ca.INI_MODE, uid=lay.owner, gid=lay.group,
                             expected_device=obs.device.major_minor)
            done.append(f"written ({decision.reason}), mode {ca.INI_MODE:04o}")
        elif decision.fix:
            fix_in_local_d(mp, ca.INI_DIR, ca.INI_NAME, decision.fix, ino=local_d.meta.ino,
                           expected_device=obs.device.major_minor)
            done.append(f"fixed in place ({decision.reason})")
        later = dict(local_d.later)
        for name, lines in decision.drop:
            write_in_local_d(mp, ca.INI_DIR, name, ca.without_lines(later[name], lines),
                             mode=None, uid=None, gid=None, expected_device=obs.device.major_minor)
            done.append(f"dropped {len(lines)} stale admin line(s) from {name}")
        for warning in decision.warnings + ((decision.reason,) if decision.state in (
                "foreign", "not-a-file") else ()):
            log.warning("couchdb-admin: %s", warning)
        if not done:
            return Unchanged(decision.reason)
        return "; ".join(done + [f"warning: {w}" for w in decision.warnings])

    def couchdb_admin_unavailable(args) -> str:
        from hostagent.couchdb_admin import INI_DIR, INI_NAME

        error = obs.couchdb_admin.error
        raise AdminSecretUnavailable(
            f"CouchDB's admin secret was not fetched, so {mp}/{INI_DIR}/{INI_NAME} was "
            f"left as it is (every other step was done): {error.message}",
            where=error.where, hint=error.hint, reason=Reason.ADMIN_SECRET_UNAVAILABLE)

    return {"attach": attach, "remove-view": remove_view, "fsck": fsck, "mkfs": mkfs,
            "forget-intent": forget_intent, "tag": tag, "write-fstab": write_fstab,
            "mkdir": mkdir, "guard": guard, "guard-under": guard_under, "mount": mount,
            "layout": layout, "grow-fs": grow_fs, "couchdb-admin": couchdb_admin,
            "couchdb-admin-unavailable": couchdb_admin_unavailable}


def record_volume(config, side: VolumeSide, obs: HostObservation, fs_uuid: str | None) -> None:
    """Remember what is mounted so verify-mount can check the device without calling AWS, and
    the next bootstrap can trust this disk's filesystem without probing it again."""
    if fs_uuid is None:
        return
    dev = obs.device
    record = {"volume_id": side.volume_id, "device": dev.path, "major_minor": dev.major_minor,
              "serial": dev.serial, "uuid": fs_uuid, "identity": obs.identity}
    if state.read_record(config.host.state_dir, state.VOLUME_RECORD) != record:
        state.write_record(config.host.state_dir, state.VOLUME_RECORD, record)
    # The volume is in place: a format record still here is stale (another disk's, or ours
    # already settled), and must never arm a later run.
    if state.read_record(config.host.state_dir, state.FORMAT_INTENT) is not None:
        state.remove_record(config.host.state_dir, state.FORMAT_INTENT)
