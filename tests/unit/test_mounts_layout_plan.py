"""Pure pieces: mountinfo parsing, layout problems, plan statuses."""

import pytest

from hostagent.adapters.layout import DirState, layout_problem, mount_root_problem
from hostagent.adapters.mounts import mount_at, mounts_of_device, parse_mountinfo
from hostagent.plan import DONE, FAILED, PLANNED, SKIPPED, Step, apply_steps

MOUNTINFO = (
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    "30 22 0:25 / /tmp rw,nosuid,nodev shared:5 - tmpfs tmpfs rw\n"
    "41 22 259:1 / /opt/couch\\040db rw,nodev,noexec,noatime shared:20 - ext4 /dev/nvme1n1 rw\n"
    "42 22 7:3 / /opt/couchdb rw,noatime - ext4 /dev/loop3 rw\n"
    "43 22 7:4 / /opt/couchdb ro,noatime master:1 propagate_from:2 - ext4 /dev/loop4 ro,errors=remount-ro\n"
    "garbage line\n"
)


def test_parse_mountinfo_unescapes_and_handles_optional_fields():
    entries = parse_mountinfo(MOUNTINFO)
    assert len(entries) == 5
    spaced = entries[2]
    assert spaced.mount_point == "/opt/couch db" and spaced.major_minor == "259:1"
    assert spaced.fstype == "ext4" and spaced.source == "/dev/nvme1n1"
    assert not spaced.read_only


def test_mount_at_returns_the_top_of_a_stack():
    entries = parse_mountinfo(MOUNTINFO)
    top = mount_at("/opt/couchdb/", entries)
    assert top.source == "/dev/loop4" and top.read_only
    assert mount_at("/opt", entries) is None
    assert [e.mount_point for e in mounts_of_device("7:3", entries)] == ["/opt/couchdb"]


@pytest.mark.parametrize("state, problem", [
    (DirState("data", "/x/data", "dir", 5984, 5984, 0o750), None),
    (DirState("data", "/x/data", "missing"), "missing"),
    (DirState("data", "/x/data", "symlink", 0, 0, 0o777), "is a symlink, not a directory"),
    (DirState("data", "/x/data", "other", 0, 0, 0o644), "is a other, not a directory"),
    (DirState("data", "/x/data", "dir", 0, 0, 0o750), "owner 0:0, want 5984:5984"),
    (DirState("data", "/x/data", "dir", 5984, 5984, 0o755), "mode 0755, want 0750"),
    (DirState("data", "/x/data", "dir", 0, 5984, 0o700), "owner 0:5984, want 5984:5984; mode 0700, want 0750"),
])
def test_layout_problem(state, problem):
    assert layout_problem(state, 5984, 5984, 0o750) == problem


@pytest.mark.parametrize("state, problem", [
    (DirState("/", "/x", "dir", 0, 0, 0o700), None),
    (DirState("/", "/x", "dir", 0, 0, 0o755), "mode 0755, want 0700"),  # what mkfs.ext4 leaves
    (DirState("/", "/x", "dir", 0, 0, 0o711), "mode 0711, want 0700"),
    (DirState("/", "/x", "dir", 5984, 5984, 0o700), "owner 5984:5984, want 0:0"),
    (DirState("/", "/x", "not-top", 0, 0, 0o700),
     "not the top directory of the mounted ext4 filesystem"),
])
def test_mount_root_problem_wants_the_volume_top_root_only(state, problem):
    assert mount_root_problem(state) == problem


def test_apply_steps_statuses():
    calls = []
    steps = [Step("a", "do a", "why", run=lambda: calls.append("a") or "did a"),
             Step("b", "b", "already so")]
    assert [s.status for s in apply_steps(steps, dry_run=True)] == [PLANNED, SKIPPED]
    assert calls == []
    assert [s.status for s in apply_steps(steps, dry_run=False)] == [DONE, SKIPPED]
    assert calls == ["a"] and steps[0].detail == "did a"


def test_apply_steps_marks_failure_and_stops():
    def boom():
        raise RuntimeError("no")

    later = Step("later", "x", "y", run=lambda: "never")
    steps = [Step("fails", "x", "y", run=boom), later]
    with pytest.raises(RuntimeError):
        apply_steps(steps, dry_run=False)
    assert steps[0].status == FAILED and later.status == PLANNED and later.detail == ""
