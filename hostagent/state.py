"""Small JSON records under host.state_dir: what bootstrap last mounted, and a format in progress."""

from __future__ import annotations

import json
import os
import tempfile

VOLUME_RECORD = "volume.json"  # what bootstrap mounted last: verify-mount checks against it
FORMAT_INTENT = "format-intent.json"  # written before mkfs, removed after: a crash mid-mkfs is ours


def read_record(state_dir: str, name: str) -> dict | None:
    try:
        with open(os.path.join(state_dir, name), encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return None  # a torn or unreadable record counts as absent; it only ever relaxes nothing
    return data if isinstance(data, dict) else None


def write_record(state_dir: str, name: str, data: dict) -> None:
    """Atomic: temp file + fsync + rename + directory fsync."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(state_dir, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(state_dir)


def remove_record(state_dir: str, name: str) -> None:
    try:
        os.unlink(os.path.join(state_dir, name))
    except FileNotFoundError:
        return
    _fsync_dir(state_dir)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
