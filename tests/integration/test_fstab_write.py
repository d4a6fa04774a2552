"""Writing a real fstab file: atomic replace, mode/owner kept, backup and restore, crash safety;
the written line checked by util-linux's own parser (findmnt) and by systemd-fstab-generator."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hostagent.adapters.fstab import (
    backup_path,
    desired_entry,
    ensure_fstab_entry,
    plan_fstab,
    read_fstab,
    restore_fstab,
    write_fstab,
)
from hostagent.errors import OperationError, UsageError
from tests.support.hosttools import need, need_root, need_tool, sh

UUID = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
SEED = ("# seed image\n"
        "UUID=aaaa-bbbb / ext4 defaults 0 1\n"
        "/dev/xvdf /opt/couchdb ext4 defaults 0 2\n")
REPO = Path(__file__).resolve().parents[2]
FSTAB_GENERATOR = "/usr/lib/systemd/system-generators/systemd-fstab-generator"


def entry(mount_point="/opt/couchdb", uuid=UUID):
    return desired_entry(uuid, mount_point, "ext4", "defaults,noatime,nodev,nosuid,noexec", 30)


def identity(path) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def dir_listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def fstab(tmp_path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "fstab"
    path.write_bytes(SEED.encode())
    path.chmod(0o644)
    return path


def test_write_replaces_the_file_and_keeps_a_backup_of_the_previous_bytes(fstab):
    before_ino = os.stat(fstab).st_ino
    new_text = plan_fstab(SEED, entry())

    assert write_fstab(str(fstab), new_text) is True
    assert fstab.read_bytes() == new_text.encode()
    assert Path(backup_path(str(fstab))).read_bytes() == SEED.encode()
    # A new inode proves rename over the file, not a rewrite in place a crash could truncate.
    assert os.stat(fstab).st_ino != before_ino
    assert stat.S_IMODE(os.stat(fstab).st_mode) == 0o644
    assert dir_listing(fstab.parent) == ["fstab", "fstab.hostagent.bak"]


def test_write_keeps_mode_and_owner_of_the_previous_file(fstab):
    need_root()
    os.chown(fstab, 1234, 5678)
    fstab.chmod(0o640)

    assert ensure_fstab_entry(str(fstab), entry()) is True
    for path in (fstab, Path(backup_path(str(fstab)))):
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678), path


def test_unchanged_content_is_not_written_at_all(fstab):
    assert ensure_fstab_entry(str(fstab), entry()) is True
    written = fstab.read_bytes()
    before = identity(fstab)
    backup_before = identity(backup_path(str(fstab)))

    assert ensure_fstab_entry(str(fstab), entry()) is False
    assert write_fstab(str(fstab), written.decode()) is False
    assert fstab.read_bytes() == written
    assert identity(fstab) == before
    assert identity(backup_path(str(fstab))) == backup_before


def test_restore_puts_the_previous_bytes_back(fstab):
    fstab.chmod(0o600)
    assert ensure_fstab_entry(str(fstab), entry()) is True
    assert fstab.read_bytes() != SEED.encode()

    assert restore_fstab(str(fstab)) is True
    assert fstab.read_bytes() == SEED.encode()
    assert stat.S_IMODE(os.stat(fstab).st_mode) == 0o600
    assert restore_fstab(str(fstab)) is False  # already restored: nothing to do


def test_restore_without_a_backup_changes_nothing(fstab):
    before = identity(fstab)
    assert restore_fstab(str(fstab)) is False
    assert identity(fstab) == before


def test_missing_fstab_is_created_0644_whatever_the_umask(tmp_path):
    path = tmp_path / "fstab"
    old_umask = os.umask(0o077)
    try:
        assert ensure_fstab_entry(str(path), entry()) is True
    finally:
        os.umask(old_umask)
    assert path.read_text() == plan_fstab("", entry())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    # The previous state was "no lines"; an empty backup lets restore undo the write.
    assert Path(backup_path(str(path))).read_bytes() == b""
    assert restore_fstab(str(path)) is True
    assert path.read_bytes() == b""


def test_crash_before_rename_leaves_the_old_file_and_the_next_write_works(fstab):
    """The writer process really dies (os._exit) at the worst moment: temp written and synced,
    rename not done. The fstab must still be the old bytes, and the next run must succeed."""
    new_text = plan_fstab(SEED, entry())
    crash = (
        "import os, sys\n"
        "from hostagent.adapters import fstab\n"
        "target = os.path.realpath(sys.argv[1])\n"
        "real_rename = os.rename\n"
        "def dying_rename(src, dst):\n"
        "    if dst == target:\n"
        "        os._exit(137)\n"
        "    real_rename(src, dst)\n"
        "os.rename = dying_rename\n"
        "fstab.write_fstab(sys.argv[1], sys.argv[2])\n"
    )
    proc = subprocess.run([sys.executable, "-c", crash, str(fstab), new_text], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert proc.returncode == 137, proc.stderr
    assert fstab.read_bytes() == SEED.encode()
    leftover = fstab.parent / "fstab.hostagent.tmp"
    assert leftover.read_bytes() == new_text.encode()

    assert write_fstab(str(fstab), new_text) is True
    assert fstab.read_bytes() == new_text.encode()
    assert Path(backup_path(str(fstab))).read_bytes() == SEED.encode()
    assert dir_listing(fstab.parent) == ["fstab", "fstab.hostagent.bak"]


def test_stale_temp_file_with_odd_mode_and_owner_does_not_leak_into_the_result(fstab):
    need_root()
    leftover = fstab.parent / "fstab.hostagent.tmp"
    leftover.write_bytes(b"garbage from an interrupted run\n" * 100)
    os.chown(leftover, 4321, 4321)
    leftover.chmod(0o600)

    assert ensure_fstab_entry(str(fstab), entry()) is True
    st = os.stat(fstab)
    assert fstab.read_text() == plan_fstab(SEED, entry())
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o644, 0, 0)
    assert not leftover.exists()


def test_symlinked_fstab_is_written_through_the_link(tmp_path, fstab):
    link = tmp_path / "fstab-link"
    link.symlink_to(fstab)
    assert ensure_fstab_entry(str(link), entry()) is True
    assert link.is_symlink()
    assert fstab.read_text() == plan_fstab(SEED, entry())
    assert Path(backup_path(str(link))) == fstab.parent / "fstab.hostagent.bak"


def test_bytes_that_are_not_utf8_survive_byte_for_byte(fstab):
    odd = b"# caf\xe9 in latin-1\n/dev/sdb /mnt/\xff ext4 rw 0 0\n"
    fstab.write_bytes(odd)
    assert ensure_fstab_entry(str(fstab), entry()) is True
    assert fstab.read_bytes().startswith(odd)
    assert read_fstab(str(fstab)).endswith("comment=hostagent\t0\t2\n")


def test_unwritable_location_is_a_one_line_operation_error(tmp_path):
    missing_dir = tmp_path / "no-such-dir" / "fstab"
    with pytest.raises(OperationError) as err:
        write_fstab(str(missing_dir), "x\n")
    assert err.value.exit_code == 1
    assert "cannot write" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="is a directory"):
        write_fstab(str(tmp_path), "x\n")


def findmnt_fstab(path: Path, target: str) -> list[dict]:
    need_tool("findmnt", "util-linux")
    out = sh("findmnt", "--json", "--fstab", "--tab-file", path, "--target", target,
             "-o", "SOURCE,TARGET,FSTYPE,OPTIONS,FREQ,PASSNO", check=False)
    assert "parse error" not in out.stderr, out.stderr
    return json.loads(out.stdout)["filesystems"] if out.returncode == 0 else []


def test_util_linux_reads_our_line_with_every_option(fstab):
    assert len(findmnt_fstab(fstab, "/opt/couchdb")) == 1  # the seed's /dev/xvdf line
    ensure_fstab_entry(str(fstab), entry())

    [line] = findmnt_fstab(fstab, "/opt/couchdb")
    assert line["source"] == f"UUID={UUID}"
    assert line["fstype"] == "ext4"
    assert line["options"] == ("defaults,noatime,nodev,nosuid,noexec,nofail,"
                               "x-systemd.device-timeout=30s,comment=hostagent")
    assert (line["freq"], line["passno"]) == (0, 2)


def test_util_linux_reads_an_escaped_mount_point_with_a_space(fstab):
    ensure_fstab_entry(str(fstab), entry("/srv/couch db"))
    [line] = findmnt_fstab(fstab, "/srv/couch db")
    assert line["target"] == "/srv/couch db"
    assert line["source"] == f"UUID={UUID}"
    assert "x-systemd.device-timeout=30s" in line["options"].split(",")


def run_fstab_generator(fstab: Path, out: Path) -> subprocess.CompletedProcess:
    need(os.access(FSTAB_GENERATOR, os.X_OK), f"needs {FSTAB_GENERATOR} (apt-get install systemd)")
    out.mkdir()
    # $SYSTEMD_FSTAB points the generator at our file instead of /etc/fstab.
    return sh(FSTAB_GENERATOR, out, out, out, check=False,
              env={**os.environ, "SYSTEMD_FSTAB": str(fstab), "SYSTEMD_LOG_LEVEL": "info"})


def test_systemd_makes_our_line_optional_with_a_bounded_device_wait(tmp_path, fstab):
    """The hand-made seed line would be a hard boot dependency; ours is wanted, not required,
    and systemd stops waiting for the device after the configured timeout."""
    run_fstab_generator(fstab, tmp_path / "seed-units")
    assert (tmp_path / "seed-units/local-fs.target.requires/opt-couchdb.mount").exists()

    ensure_fstab_entry(str(fstab), entry())
    units = tmp_path / "units"
    proc = run_fstab_generator(fstab, units)
    assert proc.returncode == 0, proc.stderr
    mount_unit = (units / "opt-couchdb.mount").read_text()
    assert f"What=/dev/disk/by-uuid/{UUID}\n" in mount_unit
    assert (units / "local-fs.target.wants/opt-couchdb.mount").exists()
    assert not (units / "local-fs.target.requires/opt-couchdb.mount").exists()
    dropin = units / (r"dev-disk-by\x2duuid-" + UUID.replace("-", r"\x2d") + ".device.d")
    assert "JobRunningTimeoutSec=30s" in (dropin / "50-device-timeout.conf").read_text()
