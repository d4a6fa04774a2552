"""Helpers for tests that use real loop devices, mounts and host tools."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

IN_CI = bool(os.environ.get("CI"))


def need(condition: bool, reason: str) -> None:
    """Skip locally when a prerequisite is missing; fail in CI, which installs everything."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI prerequisite missing: {reason}")
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root (loop devices, mount)")


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    need(path is not None, f"needs {name} (apt-get install {package})")
    return path


def sh(*argv, check=True, **kw) -> subprocess.CompletedProcess:
    """Run a setup/inspection command in a test (not the code under test)."""
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=True, **kw)


def mounts_of(source: str) -> list[str]:
    out = sh("findmnt", "-rn", "-S", source, "-o", "TARGET", check=False).stdout
    return [line for line in out.splitlines() if line]


def unmount_everything_under(path: str) -> None:
    out = sh("findmnt", "-rn", "-o", "TARGET", check=False).stdout.splitlines()
    for target in sorted((t for t in out if t == path or t.startswith(path.rstrip("/") + "/")),
                         key=len, reverse=True):
        sh("umount", "-l", target, check=False)


def sha256_of_device(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


CAP_SYS_RESOURCE = 24  # linux/capability.h
# Run a command without CAP_SYS_RESOURCE (dropped from the bounding set: root's exec gets no more
# than that): the kernel then refuses online ext4 resizes (EXT4_IOC_RESIZE_FS: EPERM) as it does
# for a unit or a container that lacks the capability.
WITHOUT_SYS_RESOURCE = ("setpriv", "--bounding-set", "-sys_resource", "--")


def has_capability(bit: int) -> bool:
    """Is this capability in our effective set (/proc/self/status CapEff)?"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def need_online_resize() -> None:
    """A property of the sandbox, not a package CI could install: skip (not fail) without it.
    The machines this project's CI runs on lack it too, so the refused-resize path is what the
    suite proves there; the success path needs a host (or the VM) with CAP_SYS_RESOURCE."""
    if not has_capability(CAP_SYS_RESOURCE):
        pytest.skip("online resize2fs needs CAP_SYS_RESOURCE, which this machine's capability "
                    "bounding set lacks (the kernel answers EPERM to EXT4_IOC_RESIZE_FS)")


def loop_backing_file(dev: str) -> str:
    with open(f"/sys/block/{os.path.basename(dev)}/loop/backing_file") as f:
        return f.read().strip()


def grow_loop(dev: str, size_bytes: int) -> None:
    """Grow a loop device as EBS grows a volume: the backing file (sparse), then `losetup -c`,
    after which the kernel shows the new size (as an NVMe namespace after the resize event)."""
    os.truncate(loop_backing_file(dev), size_bytes)
    sh("losetup", "-c", dev)


def fill_to_free_percent(mount_point: str, percent: float, name: str = "fill") -> int:
    """fallocate one file so that `percent` of the filesystem stays free (as verify-mount counts
    it); returns its size. Allocated, not written: fast, and counted as used like real data."""
    st = os.statvfs(mount_point)
    size = int((st.f_bavail - st.f_blocks * percent / 100.0) * st.f_frsize)
    size -= size % 4096
    if size > 0:
        sh("fallocate", "-l", str(size), os.path.join(mount_point, name))
    return max(size, 0)
