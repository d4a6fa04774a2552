"""Small JSON records under host.state_dir: what bootstrap last mounted, and a format in progress."""

from __future__ import annotations

import json
import os

from hostagent.errors import OperationError
from hostagent.fileio import atomic_write, fsync_dir

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
    try:
        os.makedirs(state_dir, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise OperationError(f"cannot create the state directory: {exc.strerror}",
                             where=state_dir) from None
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(os.path.join(state_dir, name), text.encode(), 0o644)


def remove_record(state_dir: str, name: str) -> None:
    path = os.path.join(state_dir, name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OperationError(f"cannot remove {name}: {exc.strerror}", where=path) from None
    fsync_dir(state_dir)
