"""`hostagent devices`: every disk with its EBS identity, filesystem and mount point; works without a config."""

from __future__ import annotations

import os

from hostagent.adapters.blockdev import (
    BlockDevice,
    find_volume_device,
    list_block_devices,
    list_partitions,
    resolve_explicit_device,
)
from hostagent.adapters.mounts import mounts_of_device, read_mountinfo
from hostagent.adapters.disk import blkid
from hostagent.blank import BLKID_NOTHING_FOUND, parse_blkid_export
from hostagent.errors import ConfigError, HostagentError
from hostagent.report import Report, render_table
from hostagent.runner import run as default_run

SIZE_UNITS = ("B", "K", "M", "G", "T", "P")


def human_size(size_bytes: int) -> str:
    """lsblk-style binary size: 64M, 7.5G."""
    value = float(size_bytes)
    for unit in SIZE_UNITS:
        if value < 1024 or unit == SIZE_UNITS[-1]:
            break
        value /= 1024
    return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"


def probe_filesystem(path: str, run=default_run) -> dict:
    """fs type/UUID/label via `blkid -o export`; exit 2 means nothing found, not an error."""
    try:
        result = blkid(["-o", "export", path], run, ok_codes=(0, BLKID_NOTHING_FOUND))
    except HostagentError as exc:
        return {"fstype": None, "uuid": None, "label": None, "pttype": None, "probe_error": str(exc)}
    info = parse_blkid_export(result.stdout) if result.returncode == 0 else {}
    return {"fstype": info.get("TYPE"), "uuid": info.get("UUID"), "label": info.get("LABEL"),
            "pttype": info.get("PTTYPE")}


def configured_device(ctx, devices: list[BlockDevice]) -> tuple[BlockDevice | None, str]:
    """Which disk the config names, and how we know; never raises (devices must work without config)."""
    try:
        volume = ctx.config.volume
    except ConfigError as exc:
        return None, f"no configured volume marked: {exc}"
    try:
        if volume.device:
            dev = resolve_explicit_device(volume.device, devices, volume_id=volume.id or None)
            return dev, f"volume.device = {volume.device}"
        if volume.id:
            dev = find_volume_device(devices, volume_id=volume.id, requested_name=volume.device_name)
            how = "NVMe serial" if dev.volume_id == volume.id else f"requested name {volume.device_name}"
            return dev, f"volume.id = {volume.id} (by {how})"
    except HostagentError as exc:
        return None, f"configured volume not found: {exc}"
    # Tags only: the id is known after an AWS lookup, which this read-only command does not make.
    return None, "volume is chosen by tags; run `hostagent bootstrap --dry-run` to resolve it"


def _mount_points(major_minor: str, mounts) -> list[str]:
    return sorted({m.mount_point for m in mounts_of_device(major_minor, mounts)})


def collect(ctx, *, sysfs_root: str = "/sys", dev_root: str = "/dev",
            mountinfo: str | None = None, run=default_run) -> tuple[list[dict], dict]:
    devices = list_block_devices(sysfs_root, dev_root)
    mounts = read_mountinfo(mountinfo) if mountinfo else read_mountinfo()
    chosen, note = configured_device(ctx, devices)
    items = []
    for dev in devices:
        partitions = []
        for part in list_partitions(dev, sysfs_root, dev_root):
            partitions.append({
                "name": part.name, "path": part.path, "major_minor": part.major_minor,
                "size_bytes": part.size_bytes, "holders": list(part.holders),
                **probe_filesystem(part.path, run),
                "mount_points": _mount_points(part.major_minor, mounts),
            })
        items.append({
            "name": dev.name, "path": dev.path, "major_minor": dev.major_minor,
            "size_bytes": dev.size_bytes, "serial": dev.serial, "model": dev.model,
            "vendor": dev.vendor, "volume_id": dev.volume_id, "requested_name": dev.requested_name,
            "read_only": dev.read_only, "removable": dev.removable, "backing_file": dev.backing_file,
            "by_id": list(dev.by_id), "holders": list(dev.holders),
            **probe_filesystem(dev.path, run),
            "mount_points": _mount_points(dev.major_minor, mounts),
            "partitions": partitions,
            "configured": chosen is not None and dev.name == chosen.name,
        })
    return items, {"device": chosen.path if chosen else None, "note": note}


def render(items: list[dict], configured: dict) -> str:
    show_holders = any(d["holders"] or any(p["holders"] for p in d["partitions"]) for d in items)
    headers = ["NAME", "SIZE", "SERIAL", "VOLUME", "REQUESTED", "FSTYPE", "UUID", "MOUNTPOINT"]
    if show_holders:
        headers.append("HOLDERS")
    rows = []
    for dev in items:
        fstype = dev["fstype"] or (f"({dev['pttype']})" if dev["pttype"] else None)
        row = [dev["name"] + (" *" if dev["configured"] else ""), human_size(dev["size_bytes"]),
               dev["serial"], dev["volume_id"], dev["requested_name"], fstype, dev["uuid"],
               ",".join(dev["mount_points"])]
        rows.append(row + ([",".join(dev["holders"])] if show_holders else []))
        for i, part in enumerate(dev["partitions"]):
            branch = "`-" if i == len(dev["partitions"]) - 1 else "|-"
            row = [branch + part["name"], human_size(part["size_bytes"]), None, None, None,
                   part["fstype"], part["uuid"], ",".join(part["mount_points"])]
            rows.append(row + ([",".join(part["holders"])] if show_holders else []))
    lines = [render_table(rows, headers)]
    if configured["device"]:
        lines.append(f"* configured volume: {configured['device']} ({configured['note']})")
    else:
        lines.append(configured["note"])
    if any(d.get("probe_error") for d in items):
        lines.append("some devices could not be probed: " + next(
            d["probe_error"] for d in items if d.get("probe_error")))
    elif os.geteuid() != 0:
        lines.append("not root: filesystems and EBS requested names may be missing")
    return "\n".join(lines)


def run(ctx, args) -> Report:
    items, configured = collect(ctx)
    return Report(ok=True, key="devices", items=items, text=render(items, configured),
                  extra={"configured": configured})
