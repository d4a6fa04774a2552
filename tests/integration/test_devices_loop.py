"""Device detection on real loop devices and the real /sys, and `hostagent devices` as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostagent.adapters.blockdev import (
    list_block_devices,
    read_nvme_identify_controller,
    resolve_explicit_device,
)
from hostagent.errors import UsageError
from tests.support.hosttools import need_root, need_tool, sh

REPO = Path(__file__).resolve().parents[2]


def loop_name(dev: str) -> str:
    return os.path.basename(dev)


def find(devices, dev: str):
    return next((d for d in devices if d.path == dev), None)


def test_real_sysfs_lists_the_loop_with_backing_file_and_size(loop_device, tmp_path):
    dev = loop_device("96M", name="persist.img")
    devices = list_block_devices()
    loop = find(devices, dev)
    assert loop is not None, [d.name for d in devices]
    assert loop.backing_file == str(tmp_path / "persist.img")
    assert loop.size_bytes == 96 * 1024**2
    assert loop.major_minor == sh("lsblk", "-dno", "MAJ:MIN", dev).stdout.strip()
    assert loop.volume_id is None and loop.requested_name is None
    assert loop.partitions == () and loop.holders == ()
    assert not any(d.name.startswith(("ram", "zram")) for d in devices)
    # Unattached loop devices (no backing file) are not disks anyone can use: never listed.
    assert all(d.backing_file for d in devices if d.name.startswith("loop"))


def test_resolve_explicit_device_on_real_nodes(loop_device, tmp_path):
    dev = loop_device()
    devices = list_block_devices()
    assert resolve_explicit_device(dev, devices).path == dev
    # A by-id style symlink resolves to the same disk: identity is major:minor, not the name.
    link = tmp_path / "by-id-link"
    link.symlink_to(dev)
    assert resolve_explicit_device(str(link), devices, volume_id="vol-0123456789abcdef0").path == dev

    image = tmp_path / "disk0.img"  # the loop's own backing file: a regular file
    with pytest.raises(UsageError) as exc:
        resolve_explicit_device(str(image), devices)
    assert str(exc.value) == f"not a block device: it is a regular file ({image})"
    with pytest.raises(UsageError) as exc:
        resolve_explicit_device("/dev/null", devices)
    assert "character device" in str(exc.value)
    with pytest.raises(UsageError) as exc:
        resolve_explicit_device("/dev/loop-does-not-exist", devices)
    assert str(exc.value) == "no such device (/dev/loop-does-not-exist)"
    assert exc.value.exit_code == 2


def test_unattached_loop_node_is_not_usable():
    need_root()
    free = sh("losetup", "-f").stdout.strip()  # the next free loop; the node exists, no backing
    if not os.path.exists(free):
        pytest.skip(f"{free} has no node yet")
    with pytest.raises(UsageError) as exc:
        resolve_explicit_device(free, list_block_devices())
    assert "not a disk hostagent can use" in str(exc.value)


@pytest.fixture
def partitioned_loop(tmp_path):
    """A loop device over an image with a real GPT (sfdisk), attached with `losetup -P`."""
    need_root()
    need_tool("sfdisk", "fdisk")
    need_tool("partx", "util-linux")
    image = tmp_path / "parted.img"
    sh("truncate", "-s", "64M", image)
    sh("sfdisk", "-q", image, input="label: gpt\n,32M\n,\n")
    dev = sh("losetup", "-P", "--show", "-f", image).stdout.strip()
    try:
        part_dir = Path("/sys/block") / loop_name(dev) / f"{loop_name(dev)}p1"
        deadline = time.monotonic() + 3
        while not part_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not part_dir.exists():
            # Measured on this kernel (6.18): the -P scan sometimes adds nothing; partx adds the
            # partitions through BLKPG from the same on-disk table.
            sh("partx", "-a", dev)
        for _ in range(30):
            if os.path.exists(f"{dev}p1"):
                break
            time.sleep(0.1)
        yield dev
    finally:
        sh("partx", "-d", dev, check=False)
        sh("losetup", "-d", dev, check=False)


def test_partition_of_a_loop_is_refused_with_the_whole_disk_named(partitioned_loop):
    dev = partitioned_loop
    devices = list_block_devices()
    loop = find(devices, dev)
    assert loop.partitions == (f"{loop_name(dev)}p1", f"{loop_name(dev)}p2")
    with pytest.raises(UsageError) as exc:
        resolve_explicit_device(f"{dev}p2", devices)
    assert f"is a partition ({loop_name(dev)}p2) of {dev}; give the whole disk" in str(exc.value)
    assert exc.value.hint == f'set volume.device = "{dev}"'
    # The whole disk itself is accepted.
    assert resolve_explicit_device(dev, devices) == loop


def test_identify_ioctl_on_a_non_nvme_disk_is_none_not_an_error(loop_device):
    assert read_nvme_identify_controller(loop_device()) is None
    assert read_nvme_identify_controller("/dev/does-not-exist") is None


def run_cli(*args, env_extra=None, importtime=False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    argv = [sys.executable] + (["-X", "importtime"] if importtime else []) + ["-m", "hostagent", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


def test_hostagent_devices_json_without_config(loop_device, tmp_path):
    need_tool("mkfs.ext4", "e2fsprogs")
    need_tool("blkid", "util-linux")
    dev = loop_device()
    sh("mkfs.ext4", "-q", "-L", "couchdb", dev)
    uuid = sh("blkid", "-s", "UUID", "-o", "value", dev).stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", dev, mnt)  # the loop_device fixture unmounts it
    blank = loop_device(name="blank.img")

    missing = tmp_path / "no-such-config.toml"
    proc = run_cli("devices", "--json", env_extra={"HOSTAGENT_CONFIG": str(missing)},
                   importtime=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is True
    loop = next(d for d in out["devices"] if d["path"] == dev)
    assert loop["fstype"] == "ext4" and loop["uuid"] == uuid and loop["label"] == "couchdb"
    assert loop["mount_points"] == [str(mnt)]
    assert loop["size_bytes"] == 64 * 1024**2
    assert loop["backing_file"] == str(tmp_path / "disk0.img")
    assert loop["configured"] is False
    empty = next(d for d in out["devices"] if d["path"] == blank)
    assert empty["fstype"] is None and empty["uuid"] is None  # blkid exit 2: nothing, not an error
    assert out["configured"]["device"] is None
    assert str(missing) in out["configured"]["note"]
    # An ops command that talks to no AWS API must not pay for importing boto3.
    assert "boto3" not in proc.stderr and "botocore" not in proc.stderr

    proc = run_cli("devices", env_extra={"HOSTAGENT_CONFIG": str(missing)})
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.split()[0] == loop_name(dev))
    assert "ext4" in line.split() and uuid in line.split() and str(mnt) in line.split()
    assert proc.stdout.splitlines()[0].split()[:8] == [
        "NAME", "SIZE", "SERIAL", "VOLUME", "REQUESTED", "FSTYPE", "UUID", "MOUNTPOINT"]


def test_hostagent_devices_marks_the_configured_device(loop_device, tmp_path):
    dev = loop_device()
    other = loop_device(name="other.img")
    config = tmp_path / "hostagent.toml"
    config.write_text(f'[volume]\ndevice = "{dev}"\n')
    proc = run_cli("devices", "--json", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    marked = [d["path"] for d in out["devices"] if d["configured"]]
    assert marked == [dev] and other != dev
    assert out["configured"]["device"] == dev

    proc = run_cli("devices", "--config", str(config))
    assert f"{loop_name(dev)} *" in proc.stdout
    assert f"* configured volume: {dev}" in proc.stdout

    # A configured path that is not a disk is reported, and the listing still works.
    config.write_text('[volume]\ndevice = "/dev/null"\n')
    proc = run_cli("devices", "--json", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert not any(d["configured"] for d in out["devices"])
    assert "not a block device" in out["configured"]["note"]

