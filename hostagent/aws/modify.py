"""ModifyVolume (size only) and its progress: the latest modification of a volume, and the wait for it."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Callable, Mapping, NamedTuple

from hostagent.aws.errors import AWSError, aws_call
from hostagent.errors import OperationError

RATE_EXCEEDED = "VolumeModificationRateExceeded"
IN_PROGRESS = "IncorrectModificationState"  # a modification of this volume has not finished
# ModifyVolume's size is usable once the modification is `optimizing` (AWS: "the volume's new
# size is available ... when it enters the optimizing state"); `completed` comes much later.
SIZE_USABLE_STATES = ("optimizing", "completed")
POLL_FIRST, POLL_MAX = 2.0, 15.0


class Modification(NamedTuple):
    """One VolumeModification, as plain data."""

    volume_id: str
    state: str  # modifying | optimizing | completed | failed
    original_size: int | None
    target_size: int | None
    progress: int | None
    start_time: datetime | None
    message: str = ""

    def describe(self) -> str:
        sizes = f"{self.original_size} -> {self.target_size} GiB"
        progress = f" {self.progress}%" if self.progress is not None else ""
        return f"{self.volume_id} {sizes}: {self.state}{progress}"


def modification_of(raw: Mapping[str, Any]) -> Modification:
    from hostagent.capacity import parse_time

    def number(key):
        value = raw.get(key)
        return int(value) if isinstance(value, (int, float)) or str(value or "").isdigit() else None

    return Modification(volume_id=raw.get("VolumeId", ""), state=raw.get("ModificationState", ""),
                        original_size=number("OriginalSize"), target_size=number("TargetSize"),
                        progress=number("Progress"), start_time=parse_time(raw.get("StartTime")),
                        message=raw.get("StatusMessage") or "")


def latest_modification(ec2, volume_id: str) -> Modification | None:
    """The most recent modification of the volume (EC2 lists only that one; moto keeps them
    all, so the newest by StartTime is taken), or None if it was never modified."""
    try:
        with aws_call("ec2:DescribeVolumesModifications", where=volume_id):
            answer = ec2.describe_volumes_modifications(VolumeIds=[volume_id])
    except AWSError as exc:
        if exc.code == "InvalidVolumeModification.NotFound":  # never modified
            return None
        raise
    found = [modification_of(m) for m in answer.get("VolumesModifications") or ()
             if m.get("VolumeId") == volume_id]
    found.sort(key=lambda m: (m.start_time is not None, m.start_time or 0), reverse=True)
    return found[0] if found else None


def modify_size(ec2, volume_id: str, size_gib: int) -> Modification:
    """ModifyVolume Size=size_gib; EC2's refusals leave as AWSError (code kept) for the caller."""
    with aws_call("ec2:ModifyVolume", where=volume_id):
        answer = ec2.modify_volume(VolumeId=volume_id, Size=size_gib)
    return modification_of(answer.get("VolumeModification") or {"VolumeId": volume_id})


def wait_size_usable(ec2, volume_id: str, size_gib: int, *, timeout: float,
                     on_progress: Callable[[Modification], None] = lambda m: None,
                     sleep=time.sleep, clock=time.monotonic) -> Modification:
    """Poll until the modification to size_gib is optimizing or completed; failed or the
    timeout is an OperationError."""
    deadline = clock() + timeout
    interval = POLL_FIRST
    while True:
        mod = latest_modification(ec2, volume_id)
        if mod is not None and mod.target_size == size_gib:
            on_progress(mod)
            if mod.state in SIZE_USABLE_STATES:
                return mod
            if mod.state == "failed":
                raise OperationError(
                    f"EC2 could not modify {volume_id} to {size_gib} GiB (modification failed"
                    f"{': ' + mod.message if mod.message else ''})", where=volume_id,
                    hint="the volume keeps its old size; check `aws ec2 "
                         f"describe-volumes-modifications --volume-ids {volume_id}`")
        if clock() + interval > deadline:
            state = mod.describe() if mod is not None else "no modification listed"
            raise OperationError(
                f"the modification of {volume_id} to {size_gib} GiB is not usable after "
                f"{timeout:.0f}s ({state})", where=volume_id,
                hint="it goes on in EC2: once it is optimizing, `hostagent bootstrap` (or the "
                     "agent) grows the filesystem")
        sleep(interval)
        interval = min(interval * 1.5, POLL_MAX)


def is_rate_exceeded(exc: BaseException) -> bool:
    return isinstance(exc, AWSError) and exc.code == RATE_EXCEEDED
