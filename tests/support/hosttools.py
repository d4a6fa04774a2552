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
