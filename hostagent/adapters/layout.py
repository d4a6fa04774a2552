"""CouchDB's directories on the mounted volume: inspect, say what is wrong, create/fix without touching contents."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from hostagent.errors import RefusedError


@dataclass(frozen=True)
class DirState:
    relative: str
    path: str
    kind: str  # "dir" | "missing" | "symlink" | "other"
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None  # permission bits only


def inspect_layout(mount_point: str, directories) -> list[DirState]:
    states = []
    for rel in directories:
        path = os.path.join(mount_point, os.path.normpath(rel))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            states.append(DirState(rel, path, "missing"))
            continue
        kind = "symlink" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "other"
        states.append(DirState(rel, path, kind, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)))
    return states


def layout_problem(state: DirState, owner: int, group: int, mode: int) -> str | None:
    """PURE: what is wrong with one directory, or None when it is as configured."""
    if state.kind == "missing":
        return "missing"
    if state.kind != "dir":
        return f"is a {state.kind}, not a directory"
    wrong = []
    if (state.uid, state.gid) != (owner, group):
        wrong.append(f"owner {state.uid}:{state.gid}, want {owner}:{group}")
    if state.mode != mode:
        wrong.append(f"mode {state.mode:04o}, want {mode:04o}")
    return "; ".join(wrong) or None


def apply_layout(mount_point: str, directories, owner: int, group: int, mode: int) -> list[str]:
    """Create missing directories and fix owner/mode of the directories themselves (never recursive).

    Returns what was changed. A symlink or file where a directory belongs is refused: following
    it could chown something outside the volume.
    """
    changed = []
    for state in inspect_layout(mount_point, directories):
        if state.kind in ("symlink", "other"):
            raise RefusedError(f"{state.path} {layout_problem(state, owner, group, mode)}; "
                               "refusing to change it", hint="move it aside by hand, then rerun")
        if state.kind == "missing":
            # Parents first come from the configured order (etc before etc/local.d); makedirs
            # covers configs that list only the leaf.
            os.makedirs(state.path, mode=0o700, exist_ok=True)
            changed.append(f"created {state.relative}")
        fd = os.open(state.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (owner, group):
                os.fchown(fd, owner, group)
                if state.kind != "missing":
                    changed.append(f"chown {state.relative} {owner}:{group}")
            if stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
                if state.kind != "missing":
                    changed.append(f"chmod {state.relative} {mode:04o}")
        finally:
            os.close(fd)
    return changed
