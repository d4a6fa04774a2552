"""`fetch-secrets`: [secrets] source (s3://bucket/key) → dest, atomically, mode 0600, never shown.

The content is held in memory only as long as it takes to compare and write it; it is never
logged, printed, or put into an error message (only its size is reported).
"""

from __future__ import annotations

import errno
import os
import stat

from hostagent.errors import ConfigError, OperationError
from hostagent.fileio import atomic_write
from hostagent.log import get_logger
from hostagent.report import Report

log = get_logger(__name__)

MAX_BYTES = 4 * 1024 * 1024  # a secrets file, not a data set: refuse to fill /etc by mistake
FILE_MODE = 0o600
DIR_MODE = 0o700
WRITTEN, UNCHANGED, MODE_FIXED = "written", "unchanged", "mode fixed"
NOT_CONFIGURED = "not configured"


def ensure_private_dir(path: str) -> list[str]:
    """Create missing parents of dest with mode 0700 (exactly, whatever the umask)."""
    made = []
    missing = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise OperationError(f"{directory} exists and is not a directory") from None
            continue
        os.chmod(directory, DIR_MODE)
        made.append(directory)
    return made


def _read_existing(path: str) -> tuple[bytes | None, os.stat_result | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, None  # a symlink: the rename replaces the link itself
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OperationError(f"{path} exists and is not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def write_secret(dest: str, data: bytes) -> str:
    """Atomically make dest hold data with mode 0600: temp file (O_EXCL) + fsync + rename."""
    parent = os.path.dirname(os.path.abspath(dest))
    ensure_private_dir(parent)
    existing, st = _read_existing(dest)
    if existing == data and st is not None:
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.chmod(dest, FILE_MODE)
            return MODE_FIXED
        return UNCHANGED
    # Created 0600 from the first byte (never readable by others, whatever the umask); the owner
    # of the file it replaces is kept, so whoever reads it today still can.
    keep_owner = st is not None and os.geteuid() == 0
    atomic_write(dest, data, FILE_MODE, st.st_uid if keep_owner else None,
                 st.st_gid if keep_owner else None)
    return WRITTEN


def run(ctx, args, *, aws=None) -> Report:
    from hostagent.config import parse_s3_url
    from hostagent.aws.clients import make_aws
    from hostagent.aws.s3 import get_object_bytes
    from hostagent.lock import host_lock

    config = ctx.config
    source, dest = config.secrets.source, config.secrets.dest
    if not source and getattr(args, "if_configured", False):
        # hostagent-secrets.service runs this at every boot, configured or not: no source is
        # nothing to do, not an error. Without the flag it stays exit 2 (a person asked for it).
        log.info("fetch-secrets: [secrets] source is not set: nothing to fetch")
        item = {"source": "", "dest": dest, "status": NOT_CONFIGURED}
        return Report(ok=True, key="secrets", items=[item],
                      text=f"{dest}: {NOT_CONFIGURED} ([secrets] source is not set: nothing "
                           "to fetch)")
    if not source:
        raise ConfigError("secrets.source is not set: nothing to fetch", where=config.source,
                          hint='[secrets] source = "s3://bucket/key"')
    bucket, key = parse_s3_url(source)  # its shape and dest were checked at config load
    aws = make_aws(aws)
    with host_lock(config.host.lock_file):
        data = get_object_bytes(aws.s3, bucket, key, max_bytes=MAX_BYTES)
        status = write_secret(dest, data)
        size = len(data)
        del data
    log.info("fetch-secrets: %s -> %s: %s (%d bytes)", source, dest, status, size)
    item = {"source": source, "dest": dest, "status": status, "bytes": size,
            "mode": f"{FILE_MODE:04o}"}
    return Report(ok=True, key="secrets", items=[item],
                  text=f"{dest}: {status} ({size} bytes from {source}, mode {FILE_MODE:04o})")
