"""Which processes use a filesystem: open files, working or root directories, mapped files."""

from __future__ import annotations

import os

PROC = "/proc"


def _dev_of_maps_field(field: str) -> str | None:
    """ "fd:01" (hex major:minor in /proc/PID/maps) → "253:1"."""
    major, sep, minor = field.partition(":")
    try:
        return f"{int(major, 16)}:{int(minor, 16)}" if sep else None
    except ValueError:
        return None


def _uses(pid: str, device: str, proc: str) -> bool:
    base = os.path.join(proc, pid)
    for link in ("cwd", "root"):
        try:
            st = os.stat(os.path.join(base, link))
        except OSError:
            continue
        if f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" == device:
            return True
    try:
        fds = os.listdir(os.path.join(base, "fd"))
    except OSError:
        fds = []
    for fd in fds:
        try:
            # stat through the magic link reaches the open file itself, whatever mount
            # namespace (a container) the process sees it in.
            st = os.stat(os.path.join(base, "fd", fd))
        except OSError:
            continue
        if f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" == device:
            return True
    try:
        with open(os.path.join(base, "maps"), encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and _dev_of_maps_field(parts[3]) == device:
                    return True
    except OSError:
        pass
    return False


def processes_using(device: str, proc: str = PROC) -> list[tuple[int, str]]:
    """(pid, command) of every process, in any mount namespace, with a file, directory or
    mapping on the filesystem of block device `device` (major:minor); ourselves excluded."""
    me = str(os.getpid())
    found = []
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit() and p != me]
    except OSError:
        return found
    for pid in sorted(pids, key=int):
        if _uses(pid, device, proc):
            try:
                with open(os.path.join(proc, pid, "comm"), encoding="utf-8",
                          errors="replace") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            found.append((int(pid), comm))
    return found
